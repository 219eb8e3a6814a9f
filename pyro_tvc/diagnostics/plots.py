"""PNG plots of a diagnostics DataTree (:mod:`pyro_tvc.diagnostics.export`).

Figures are built with matplotlib's object API (no pyplot state), so the module works headless and leaves a
notebook's inline backend alone; each is laid out by the constrained layout engine, which makes room for titles and
tick labels instead of clipping them. Every plot names blocks with :func:`short_block` (one name per block
everywhere) and uses fonts of at least 8 pt.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pyro_tvc.diagnostics.summaries import auroc, hdi_interval, predictive_entropy

FONT = 9


def short_block(name: str) -> str:
    """Compact block name used by every plot and table: ``transformer.resblocks.2.attn.out_proj.weight`` ->
    ``L2.attn.out_proj.w``."""
    out = str(name).replace("transformer.resblocks.", "L").replace(".weight", ".w").replace(".bias", ".b")
    # nn.MultiheadAttention names its packed projection in_proj_weight / in_proj_bias (no dot)
    return out.replace("in_proj_weight", "in_proj.w").replace("in_proj_bias", "in_proj.b")


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG (110 dpi) and close it in pyplot (ArviZ's figures are made through pyplot; a notebook
    would otherwise show them a second time); returns ``path``."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _class_name(tree, k: int) -> str:
    classes = tree["point"]["class"].values if "class" in tree["point"].coords else []
    return f"{k} ({classes[k]})" if len(classes) > k and str(classes[k]) != str(k) else str(k)


def _prediction(tree, obs) -> tuple[int, str]:
    """(predicted class, source): the MC-averaged posterior predictive if exported, else the single model."""
    if "posterior_predictive" in tree.children:
        return int(tree["posterior_predictive"]["class_probs"].sel(obs=obs).mean(("chain", "draw")).values.argmax()), "MC"
    return int(tree["point"]["class_probs_point"].sel(obs=obs).values.argmax()), "single model"


def forest(tree, obs, top: int = 15) -> Figure:
    """The ``top`` coefficients of one input with the largest |posterior mean|: mean (dot) and 94% HDI (line) of the
    ungated draws, and of the gated draws when the guide has a gate; for a point-estimate run, the point values only.
    The title names the input, its true class and the prediction."""
    label = int(tree["observed_data"]["label"].sel(obs=obs))
    pred, source = _prediction(tree, obs)
    has_post = "posterior" in tree.children
    point = tree["point"]["coef_point"].sel(obs=obs).values
    series = []
    if has_post:
        post = tree["posterior"]
        series.append((post["coef"].sel(obs=obs).values[0], "tab:blue", "posterior"))
        if "coef_gated" in post:
            series.append((post["coef_gated"].sel(obs=obs).values[0], "tab:orange", "gated draws"))
        ref = series[0][0].mean(0)
    else:
        series.append((point[None], "tab:green", "point estimate"))
        ref = point
    tasks, blocks = tree["point"]["task"].values, tree["point"]["block"].values
    top = min(top, ref.size)
    flat = np.argsort(-np.abs(ref).ravel(), kind="stable")[:top]
    t_idx, b_idx = np.unravel_index(flat, ref.shape)
    labels = [f"{tasks[t]} / {short_block(blocks[b])}" for t, b in zip(t_idx, b_idx)]
    fig = _figure(8.5, 0.32 * top + 1.8)
    ax = fig.subplots()
    shifts = np.linspace(-0.15, 0.15, len(series)) if len(series) > 1 else [0.0]
    for shift, (draws, color, name) in zip(shifts, series):
        sel = draws[:, t_idx, b_idx]
        y = np.arange(top) + shift
        if len(sel) > 1:
            lo, hi = hdi_interval(sel, 0.94)
            ax.hlines(y, lo, hi, color=color, lw=2, label=f"{name}: 94% HDI")
        ax.plot(sel.mean(0), y, "o", color=color, ms=4, label=f"{name}: mean" if len(sel) > 1 else name)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(np.arange(top), labels, fontsize=FONT)
    ax.invert_yaxis()
    ax.set_xlabel("coefficient lambda (task vector / parameter block)", fontsize=FONT)
    verdict = "correct" if pred == label else "wrong"
    ax.set_title(f"{tree.attrs.get('target', '')} test input {obs}: true {_class_name(tree, label)}, predicted "
                 f"{_class_name(tree, pred)} ({source}, {verdict})\nits {top} largest coefficients", fontsize=FONT + 1)
    ax.legend(fontsize=FONT - 1, loc="best")
    return fig


def inclusion_heatmap(tree) -> Figure:
    """Posterior inclusion probability P(lambda != 0), averaged over the exported inputs, task x block."""
    post = tree["posterior"]
    incl = post["included"].values[0].mean(axis=(0, 1))  # [T, B]
    tasks, blocks = post["task"].values, post["block"].values
    fig = _figure(max(8.0, 0.17 * len(blocks) + 2.5), 0.35 * len(tasks) + 3.2)
    ax = fig.subplots()
    im = ax.imshow(incl, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=FONT)
    ax.set_xticks(range(len(blocks)), [short_block(b) for b in blocks], rotation=90, fontsize=8)
    ax.set_xlabel("parameter block (Lk = transformer block k)", fontsize=FONT)
    ax.set_ylabel("task vector", fontsize=FONT)
    fig.colorbar(im, ax=ax, label="P(coefficient != 0)", pad=0.01)
    ax.set_title(f"Inclusion probability, mean over {post.sizes['obs']} {tree.attrs.get('target', '')} test inputs",
                 fontsize=FONT + 2, loc="left")
    return fig


def reliability(named_probs: dict[str, np.ndarray], labels: np.ndarray, bins: int = 10) -> Figure:
    """Reliability diagram: accuracy vs mean confidence per equal-width confidence bin (bins with >= 5 inputs),
    each point annotated with its input count; below, the histogram of confidences. ``named_probs``: ``[N, C]``."""
    fig = _figure(6, 6.5)
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for k, (name, p) in enumerate(named_probs.items()):
        conf, correct = p.max(-1), p.argmax(-1) == labels
        xs, ys, ns = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (conf > lo) & (conf <= hi)
            if m.sum() >= 5:
                xs.append(conf[m].mean())
                ys.append(correct[m].mean())
                ns.append(int(m.sum()))
        line, = ax.plot(xs, ys, "o-", label=name)
        for x, y, n in zip(xs, ys, ns):
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10 - 9 * k), fontsize=7,
                        color=line.get_color())
        hist.hist(conf, bins=edges, histtype="step", lw=1.5, color=line.get_color(), label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy in bin", fontsize=FONT)
    ax.set_title(f"Reliability diagram, test split ({len(labels)} inputs)\nnumbers: inputs per bin (bins with >= 5 "
                 f"shown)", fontsize=FONT + 1)
    ax.legend(fontsize=FONT - 1, loc="upper left")
    hist.set_xlabel("confidence (largest class probability)", fontsize=FONT)
    hist.set_ylabel("inputs", fontsize=FONT)
    return fig


def training_curve(loss: np.ndarray, epochs: list[dict]) -> Figure:
    """Tempered training loss per datum per SVI step (raw and moving average), epoch boundaries as dotted lines, and
    the validation single-model accuracy (%) at the end of each epoch on a second axis. ``epochs``: metrics.json's
    records ``{epoch, val_single_model_accuracy, ...}``."""
    loss = np.asarray(loss, dtype=float)
    fig = _figure(8, 4)
    ax = fig.subplots()
    ax.plot(loss, "o-" if len(loss) < 10 else "-", lw=0.7, ms=4, alpha=0.5, color="tab:blue", label="per step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(loss) >= 10:
        w = max(5, len(loss) // 20)
        ax.plot(np.arange(w - 1, len(loss)), np.convolve(loss, np.ones(w) / w, "valid"), lw=2, color="tab:blue",
                label=f"moving average ({w} steps)")
    n_ep = len(epochs)
    per_epoch = len(loss) / n_ep if n_ep else 0
    ends = [per_epoch * (i + 1) - 1 for i in range(n_ep)]
    for e in ends[:-1]:
        ax.axvline(e + 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("SVI step (dotted lines: epoch ends)", fontsize=FONT)
    ax.set_ylabel("tempered loss per input (nats)", fontsize=FONT)
    ax.set_title("Training: tempered loss (-ELBO with the KL x kl_weight) and validation accuracy", fontsize=FONT + 1)
    handles, names = ax.get_legend_handles_labels()
    val = [e.get("val_single_model_accuracy", e.get("val_gated_accuracy")) for e in epochs]
    if n_ep and all(v is not None for v in val):
        ax2 = ax.twinx()
        h, = ax2.plot(ends, val, "s-", color="tab:red", label="validation single-model accuracy (%)")
        ax2.set_ylabel("validation accuracy (%)", color="tab:red", fontsize=FONT)
        handles.append(h)
        names.append(h.get_label())
    ax.legend(handles, names, fontsize=FONT - 1, loc="upper right")
    return fig


def uncertainty_vs_error(probs: np.ndarray, labels: np.ndarray, name: str = "MC-averaged") -> Figure:
    """Histograms of the predictive entropy (nats) of correct and wrong predictions, with the AUROC of entropy as a
    detector of errors in the title. ``probs [N, C]``."""
    entropy = predictive_entropy(probs)
    wrong = probs.argmax(-1) != labels
    fig = _figure(6.5, 4)
    ax = fig.subplots()
    bins = np.linspace(0, max(entropy.max(), 1e-3), 30)
    ax.hist(entropy[~wrong], bins=bins, alpha=0.6, density=True, label=f"correct ({(~wrong).sum()} inputs)")
    ax.hist(entropy[wrong], bins=bins, alpha=0.6, density=True, label=f"wrong ({wrong.sum()} inputs)")
    ax.set_xlabel(f"predictive entropy of the {name} prediction (nats)", fontsize=FONT)
    ax.set_ylabel("density", fontsize=FONT)
    ax.set_title(f"Does uncertainty flag errors? AUROC(entropy -> error) = {auroc(entropy, wrong):.3f}",
                 fontsize=FONT + 1)
    ax.legend(fontsize=FONT - 1)
    return fig


def arviz_forest(tree, obs, top: int = 10):
    """ArviZ's own forest plot (``arviz_plots.plot_forest``, 94% HDI) of one input's ``top`` largest coefficients,
    with a title and an axis label; labels are ``task / block`` as in :func:`forest`. Returns ArviZ's figure
    (made through pyplot: :func:`save` closes it)."""
    import arviz_plots as azp
    import xarray as xr

    coef = tree["posterior"]["coef"].sel(obs=obs).stack(component=("task", "block"))
    order = np.argsort(-np.abs(coef.mean(("chain", "draw")).values), kind="stable")[:top]
    sel = coef.isel(component=order)
    labels = [f"{t} / {short_block(b)}" for t, b in sel["component"].values]
    ds = xr.Dataset({"coef": sel.drop_vars(["component", "task", "block"]).assign_coords(component=labels)})
    collection = azp.plot_forest(ds, backend="matplotlib", ci_kind="hdi", ci_probs=(0.5, 0.94),
                                 figure_kwargs={"figsize": (9, 0.45 * top + 1.6)})
    fig = collection.viz["figure"].item()
    label = int(tree["observed_data"]["label"].sel(obs=obs))
    pred, source = _prediction(tree, obs)
    fig.suptitle(f"ArviZ plot_forest, input {obs}: true {_class_name(tree, label)}, predicted {_class_name(tree, pred)} "
                 f"({source})", fontsize=FONT + 1)
    collection.viz["plot"].values[-1].set_xlabel("coefficient lambda (thick: 50% HDI, thin: 94% HDI)", fontsize=FONT)
    return fig
