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
    """Per (input, task, block): mean, sd, HDI, inclusion probability. ``coef [S, N, T, B]``."""
    mean, sd = coef.mean(0), coef.std(0, ddof=1)
    lower, upper = hdi_interval(coef, prob)
    incl = (coef != 0).mean(0)
    rows = []
    for i, o in enumerate(obs_ids):
        for t, task in enumerate(task_names):
            for b, block in enumerate(block_names):
                rows.append({"obs": int(o), "task": task, "block": block, "mean": float(mean[i, t, b]),
                             "sd": float(sd[i, t, b]), "hdi_lower": float(lower[i, t, b]),
                             "hdi_upper": float(upper[i, t, b]), "inclusion_prob": float(incl[i, t, b])})
    return rows


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
    """Per input: inclusion, exact zeros, effective active components, predictive entropy, correctness.
    ``coef [S, N, T, B]``, ``probs [S, N, C]`` (per-draw class probabilities), ``labels [N]``."""
    mean_probs = probs.mean(0)
    eff = effective_active(coef.mean(0))
    rows = []
    for i, o in enumerate(obs_ids):
        rows.append({"obs": int(o), "label": int(labels[i]), "prediction": int(mean_probs[i].argmax()),
                     "correct": bool(mean_probs[i].argmax() == labels[i]),
                     "mean_inclusion_prob": float((coef[:, i] != 0).mean()),
                     "fraction_exact_zeros": float((coef[:, i] == 0).mean()),
                     "effective_active_components": float(eff[i]),
                     "predictive_entropy": float(predictive_entropy(mean_probs[i]))})
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
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
    """Accuracy, NLL, Brier, ECE and AUROC(entropy -> error) per prediction kind (e.g. MC-averaged vs gated)."""
    rows = []
    for name, p in named_probs.items():
        wrong = p.argmax(-1) != labels
        rows.append({"prediction": name, "accuracy": float(100 * (~wrong).mean()),
                     "nll": float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1)).mean()),
                     "brier": brier(p, labels), "ece": expected_calibration_error(p, labels),
                     "auroc_entropy_error": auroc(predictive_entropy(p), wrong)})
    return rows
