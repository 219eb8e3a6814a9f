"""PNG plots of a diagnostics DataTree. Figures are built with matplotlib's object API (no pyplot state), so the
module works headless and leaves a notebook's inline backend alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pyro_tvc.diagnostics.summaries import auroc, hdi_interval, predictive_entropy


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def forest(tree, obs, path: Path, top: int = 15) -> Path:
    """Posterior mean and 94% HDI of the ``top`` coefficients with the largest |mean| for one input,
    ungated (blue) and gated (orange) draws side by side; labels are ``task / block``."""
    post = tree["posterior"]
    coef = post["coef"].sel(obs=obs).values[0]  # [S, T, B]
    gated = post["coef_gated"].sel(obs=obs).values[0]
    tasks, blocks = post["task"].values, post["block"].values
    mean = coef.mean(0)
    flat = np.argsort(-np.abs(mean).ravel())[:top]
    t_idx, b_idx = np.unravel_index(flat, mean.shape)
    labels = [f"{tasks[t]} / {blocks[b]}" for t, b in zip(t_idx, b_idx)]
    fig = Figure(figsize=(8, 0.35 * top + 1.5))
    ax = fig.subplots()
    for shift, draws, color, name in ((-0.15, coef, "tab:blue", "posterior"), (0.15, gated, "tab:orange", "gated")):
        sel = draws[:, t_idx, b_idx]
        lo, hi = hdi_interval(sel, 0.94)
        y = np.arange(top) + shift
        ax.hlines(y, lo, hi, color=color, lw=2, label=f"{name} 94% HDI")
        ax.plot(sel.mean(0), y, "o", color=color, ms=4)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(np.arange(top), labels, fontsize=7)
    ax.invert_yaxis()
    label = int(tree["observed_data"]["label"].sel(obs=obs))
    ax.set_xlabel("coefficient lambda (dot: posterior mean; an HDI reaches 0 when P(lambda = 0) > 6%)")
    ax.set_title(f"input {obs} (label {label}): the {top} largest coefficients")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def inclusion_heatmap(tree, path: Path) -> Path:
    """Posterior inclusion probability averaged over the exported inputs, task x block."""
    post = tree["posterior"]
    incl = post["included"].values[0].mean(axis=(0, 1))  # [T, B]
    tasks, blocks = post["task"].values, post["block"].values
    fig = Figure(figsize=(max(8, 0.16 * len(blocks)), 0.4 * len(tasks) + 2.2))
    ax = fig.subplots()
    im = ax.imshow(incl, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xticks(range(len(blocks)), [short_block(b) for b in blocks], rotation=90, fontsize=5)
    fig.colorbar(im, ax=ax, label="inclusion probability")
    ax.set_title(f"P(coefficient != 0), mean over {post.sizes['obs']} {tree.attrs.get('target', '')} test inputs "
                 f"(task vector x parameter block; Lk = transformer block k)")
    return _save(fig, path)


def reliability(named_probs: dict[str, np.ndarray], labels: np.ndarray, path: Path, bins: int = 10) -> Path:
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for name, p in named_probs.items():
        conf, correct = p.max(-1), p.argmax(-1) == labels
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (conf > lo) & (conf <= hi)
            if m.sum() >= 5:
                xs.append(conf[m].mean())
                ys.append(correct[m].mean())
        ax.plot(xs, ys, "o-", label=name)
    ax.set_xlabel("confidence (max class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram (test split)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def elbo_trace(trace: np.ndarray, path: Path) -> Path:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.plot(trace, lw=0.7, alpha=0.5, label="per step")
    if len(trace) >= 10:
        w = max(5, len(trace) // 20)
        ax.plot(np.arange(w - 1, len(trace)), np.convolve(trace, np.ones(w) / w, "valid"), lw=2,
                label=f"moving average ({w})")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("-ELBO per input (nats)")
    ax.set_title("Training objective (KL as weighted in training)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def uncertainty_vs_error(probs: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    entropy = predictive_entropy(probs)
    wrong = probs.argmax(-1) != labels
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    bins = np.linspace(0, max(entropy.max(), 1e-3), 30)
    ax.hist(entropy[~wrong], bins=bins, alpha=0.6, density=True, label=f"correct ({(~wrong).sum()})")
    ax.hist(entropy[wrong], bins=bins, alpha=0.6, density=True, label=f"wrong ({wrong.sum()})")
    ax.set_xlabel("predictive entropy of the MC-averaged prediction (nats)")
    ax.set_ylabel("density")
    ax.set_title(f"Does uncertainty flag errors? AUROC = {auroc(entropy, wrong):.3f}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def short_block(name: str) -> str:
    return name.replace("transformer.resblocks.", "L").replace(".weight", ".w").replace(".bias", ".b")


def arviz_forest(tree, obs, path: Path, top: int = 10) -> Path:
    """ArviZ's own forest plot (arviz_plots.plot_forest) of one input's ``top`` largest coefficients."""
    import arviz_plots as azp
    import xarray as xr

    coef = tree["posterior"]["coef"].sel(obs=obs).stack(component=("task", "block"))
    order = np.argsort(-np.abs(coef.mean(("chain", "draw")).values))[:top]
    sel = coef.isel(component=order)
    labels = [f"{t} / {short_block(b)}" for t, b in sel["component"].values]
    ds = xr.Dataset({"coef": sel.drop_vars(["component", "task", "block"]).assign_coords(component=labels)})
    collection = azp.plot_forest(ds, backend="matplotlib")
    collection.savefig(path)
    return path
