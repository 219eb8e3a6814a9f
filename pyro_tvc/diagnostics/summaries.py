"""Summaries of posterior draws and of predictive calibration, in plain numpy (independent of ArviZ internals)."""
from __future__ import annotations

import numpy as np


def hdi_interval(draws: np.ndarray, prob: float = 0.94) -> tuple[np.ndarray, np.ndarray]:
    """Narrowest interval holding ``prob`` of the draws, along axis 0. ``[S, ...] -> ([...], [...])``."""
    s = np.sort(draws, axis=0)
    n = s.shape[0]
    k = int(np.floor(prob * n))
    if k < 1:
        raise ValueError(f"{n} draws are too few for a {prob} HDI")
    widths = s[k:] - s[:n - k]
    best = np.argmin(widths, axis=0)
    lower = np.take_along_axis(s, best[None], 0)[0]
    upper = np.take_along_axis(s, (best + k)[None], 0)[0]
    return lower, upper


def coefficient_summary(coef: np.ndarray, task_names, block_names, obs_ids, prob: float = 0.94) -> list[dict]:
    """Per (input, task, block) of independent draws ``coef [S, N, T, B]``: mean, sd, HDI, inclusion probability
    P(lambda != 0), and their Monte-Carlo standard errors ``mean_mcse = sd / sqrt(S)`` and
    ``inclusion_prob_mcse = sqrt(p (1 - p) / S)`` (valid for independent draws; no r_hat/ESS: there is no chain)."""
    S = coef.shape[0]
    mean, sd = coef.mean(0), coef.std(0, ddof=1)
    lower, upper = hdi_interval(coef, prob)
    incl = (coef != 0).mean(0)
    incl_se = np.sqrt(incl * (1 - incl) / S)
    rows = []
    for i, o in enumerate(obs_ids):
        for t, task in enumerate(task_names):
            for b, block in enumerate(block_names):
                rows.append({"obs": int(o), "task": task, "block": block, "mean": float(mean[i, t, b]),
                             "mean_mcse": float(sd[i, t, b] / np.sqrt(S)), "sd": float(sd[i, t, b]),
                             "hdi_lower": float(lower[i, t, b]), "hdi_upper": float(upper[i, t, b]),
                             "inclusion_prob": float(incl[i, t, b]), "inclusion_prob_mcse": float(incl_se[i, t, b])})
    return rows


def mc_accuracy(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Accuracy (%) of the Monte-Carlo-averaged prediction ``probs [S, N, C] -> mean over S``, and its Monte-Carlo
    standard error (%) over the S independent draws by the delete-one jackknife:
    ``se^2 = (S - 1) / S * sum_s (acc_(-s) - mean_s acc_(-s))^2``, with ``acc_(-s)`` the accuracy of the average
    without draw s. It measures how much the printed accuracy would move with other draws (not sampling error of the
    test set). ``S = 1`` gives ``se = nan``."""
    S = probs.shape[0]
    total = probs.sum(0)
    acc = 100.0 * float(np.mean(total.argmax(-1) == labels))
    if S < 2:
        return acc, float("nan")
    loo = np.array([100.0 * np.mean((total - probs[s]).argmax(-1) == labels) for s in range(S)])
    return acc, float(np.sqrt((S - 1) / S * ((loo - loo.mean()) ** 2).sum()))


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """``[..., C] -> [...]`` in nats."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1)


def effective_active(coef_mean: np.ndarray) -> np.ndarray:
    """Participation ratio ``(sum |m|)^2 / sum m^2`` of posterior-mean magnitudes over (task, block): the number of
    equally weighted components that would carry the same spread. ``[N, T, B] -> [N]``."""
    a = np.abs(coef_mean).reshape(coef_mean.shape[0], -1)
    denom = (a ** 2).sum(-1)
    return np.where(denom > 0, a.sum(-1) ** 2 / np.where(denom > 0, denom, 1), 0.0)


def input_summary(coef: np.ndarray, probs: np.ndarray, labels: np.ndarray, obs_ids) -> list[dict]:
    """Per input: true label, prediction of the mean probabilities, correctness, mean inclusion probability (fraction
    of draws != 0 over all coefficients), effective active components, predictive entropy (nats).
    ``coef [S, N, T, B]`` and ``probs [S, N, C]`` (per-draw class probabilities; S = 1 for a point estimate),
    ``labels [N]``."""
    mean_probs = probs.mean(0)
    eff = effective_active(coef.mean(0))
    rows = []
    for i, o in enumerate(obs_ids):
        rows.append({"obs": int(o), "label": int(labels[i]), "prediction": int(mean_probs[i].argmax()),
                     "correct": bool(mean_probs[i].argmax() == labels[i]),
                     "mean_inclusion_prob": float((coef[:, i] != 0).mean()),
                     "effective_active_components": float(eff[i]),
                     "predictive_entropy": float(predictive_entropy(mean_probs[i]))})
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over ``bins`` equal-width confidence bins of (bin share) x |accuracy - mean confidence|, as a fraction
    (0..1). ``probs [N, C]``, ``labels [N]``."""
    conf, pred = probs.max(-1), probs.argmax(-1)
    correct = (pred == labels).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over inputs of sum_c (p_c - [c = y])^2 (0..2)."""
    onehot = np.eye(probs.shape[-1])[labels]
    return float(((probs - onehot) ** 2).sum(-1).mean())


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positives`` (Mann-Whitney U with mid-ranks); nan if one class."""
    pos, neg = scores[positives], scores[~positives]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(allv):  # mid-ranks for ties
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def calibration_table(named_probs: dict[str, np.ndarray], labels: np.ndarray) -> list[dict]:
    """Accuracy (%), NLL (nats), Brier, ECE and AUROC(entropy -> error) per prediction kind. Each value of
    ``named_probs`` is ``[N, C]`` (one prediction) or ``[S, N, C]`` (Monte-Carlo draws, averaged here; the row then
    also gets ``accuracy_mcse``, the jackknife standard error of :func:`mc_accuracy`)."""
    rows = []
    for name, p in named_probs.items():
        row = {"prediction": name}
        if p.ndim == 3:
            acc, se = mc_accuracy(p, labels)
            p = p.mean(0)
            row |= {"accuracy": acc, "accuracy_mcse": se}
        wrong = p.argmax(-1) != labels
        row.setdefault("accuracy", float(100 * (~wrong).mean()))
        row |= {"nll": float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1)).mean()),
                "brier": brier(p, labels), "ece": expected_calibration_error(p, labels),
                "auroc_entropy_error": auroc(predictive_entropy(p), wrong)}
        rows.append(row)
    return rows
