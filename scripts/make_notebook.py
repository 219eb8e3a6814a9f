"""Write notebooks/posterior_exploration.ipynb (outputs cleared). Edit the cells here, then re-run this script:
``.venv/bin/python scripts/make_notebook.py``."""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

md, code = new_markdown_cell, new_code_cell

cells = [
    md("""# Exploring VTVC posteriors, input by input

VTVC gives every test input its **own** posterior over the composition coefficients `lambda[t, b]` (task vector t,
parameter block b): a spike-and-slab, exactly 0 with probability `1 - gamma`, else Normal(`mu`, `sigma`). The model
that classifies an input is theta_0 plus the task vectors weighted by its coefficients.

This notebook opens a trained run and asks, in order:

1. What did the run achieve (the numbers of `results.json`, and what they mean)?
2. Which inputs does it get right and wrong? We pick some of each **on purpose** and look at them.
3. What do the posteriors of a right and a wrong input look like, next to each other and next to the prior (ArviZ)?
4. Do inputs of the same class use the same task vectors?
5. What does the gate do: which coefficients does it prune, which does it trust, and why?
6. Are the predictions calibrated?

It reads the run and writes nothing. Set `PYRO_TVC_RUN` (default `../runs/demo`, made by `make demo`) and, if the run
was copied away from its artefacts, `PYRO_TVC_ARTIFACTS`; `PYRO_TVC_FAST=1` keeps everything small (the tests use it).
Names of numbers follow docs/glossary.md."""),
    code("""import json, logging, os, warnings
from pathlib import Path

# Two known, harmless messages are silenced by name (nothing else is): tqdm.auto, imported by a dependency, warns
# that ipywidgets is missing; open_clip logs that the tiny CLIP is built without downloaded weights (the run's own
# theta_0 replaces them right after).
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="No pretrained weights loaded")
logging.getLogger().setLevel(logging.ERROR)

import arviz_plots as azp
import arviz_stats as azs
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import xarray as xr

from pyro_tvc.diagnostics import calibration_table, load_problem, posterior_datatree, resolve_run
from pyro_tvc.diagnostics import plots
from pyro_tvc.infer import point_predictions, predictive_probs
from pyro_tvc.variants import get_variant


FAST = os.environ.get("PYRO_TVC_FAST") == "1"
RUN = Path(os.environ.get("PYRO_TVC_RUN", "../runs/demo"))
ARTIFACTS = Path(os.environ["PYRO_TVC_ARTIFACTS"]) if os.environ.get("PYRO_TVC_ARTIFACTS") else None
DRAWS = 40 if FAST else 300          # posterior draws per explored input
PER_KIND = 2 if FAST else 3          # right / wrong inputs picked
pd.set_option("display.precision", 3)"""),
    md("""## 1. The run

`resolve_run` checks the folder and finds what it needs **before** loading anything: a wrong path stops here with one
line saying what is missing (nothing is trained behind your back). It also says which checkpoint it loads: the run's
final one."""),
    code("""source = resolve_run(RUN, artifacts=ARTIFACTS)   # FileNotFoundError with the fix, if RUN is not a run folder
print(source.describe())
problem = load_problem(source)
variant = get_variant(problem.cfg.guide)
results = json.loads((RUN / "results.json").read_text())
print(f"target {problem.cfg.target}, guide {problem.cfg.guide}: {variant.description}")
print(f"task vectors: {', '.join(problem.composer.task_names)}; {len(problem.composer.block_names)} blocks each")
keys = ["zero_shot_accuracy", "mc_accuracy", "mc_accuracy_se", "gated_mc_accuracy", "single_model_accuracy",
        "mc_nll", "exact_zero_fraction", "true_elbo_per_datum", "mc_samples"]
pd.Series({k: results[k] for k in keys if results.get(k) is not None}, name="results.json")"""),
    md("""## 2. Right and wrong inputs, picked on purpose

We recompute the Monte-Carlo predictive on the whole test split **exactly as `train` did** (the run's number of
draws and seed), so the accuracy below is the one in `results.json`, with its Monte-Carlo standard error. Then we pick
the most confident correct inputs and the most confident wrong ones: the first are easy cases, the second are the
interesting failures."""),
    code("""x_test, f_test, y_test = problem.splits["test"]
y = y_test.cpu().numpy()
S, seed = problem.cfg.eval_samples, problem.cfg.seed
named = {}
if not variant.point_only:
    torch.manual_seed(seed); import pyro; pyro.set_rng_seed(seed)
    named["mc_average"] = predictive_probs(problem, "test", S).cpu().numpy()
    if variant.has_gate:
        torch.manual_seed(seed); pyro.set_rng_seed(seed)
        named["gated_mc_average"] = predictive_probs(problem, "test", S, gated=True).cpu().numpy()
named["single_model"] = point_predictions(problem, "test")[0].cpu().numpy()
calib = pd.DataFrame(calibration_table(named, y)).set_index("prediction")
probs = {k: (v.mean(0) if v.ndim == 3 else v) for k, v in named.items()}
main = next(iter(probs))
pred, conf = probs[main].argmax(-1), probs[main].max(-1)
right, wrong = np.flatnonzero(pred == y), np.flatnonzero(pred != y)
chosen_right = right[np.argsort(-conf[right])][:PER_KIND].tolist()
chosen_wrong = wrong[np.argsort(-conf[wrong])][:PER_KIND].tolist()
chosen = chosen_right + chosen_wrong
print(f"{main}: accuracy {calib.loc[main, 'accuracy']:.1f} %" +
      (f" ± {calib.loc[main, 'accuracy_mcse']:.1f} (MC standard error over {S} draws)" if 'accuracy_mcse' in calib else ""))
print(f"{len(right)} right, {len(wrong)} wrong; picked right {chosen_right}, wrong {chosen_wrong}")"""),
    md("""The picked inputs as images (contrast-stretched per image), with the true class and the prediction:"""),
    code("""classes = problem.classes
fig, axes = plt.subplots(1, len(chosen), figsize=(2.1 * len(chosen), 2.6), squeeze=False)
for ax, i in zip(axes[0], chosen):
    img = x_test[i].cpu().permute(1, 2, 0).numpy()
    img = (img - img.min()) / max(img.max() - img.min(), 1e-8)
    ax.imshow(img)
    ok = pred[i] == y[i]
    ax.set_title(f"#{i}\\ntrue {classes[y[i]]}\\npred {classes[pred[i]]} ({conf[i]:.2f})", fontsize=8,
                 color="tab:green" if ok else "tab:red")
    ax.axis("off")
fig.suptitle("confident right (green) and confident wrong (red) test inputs", fontsize=10)
plt.show()"""),
    md("""## 3. Their posteriors, as an ArviZ DataTree

`posterior_datatree` draws coefficients from each picked input's posterior (and from the run's prior) and returns
an ArviZ DataTree with named dims `obs`, `task`, `block`. The draws are independent, so the summary below shows mean,
sd and 94% HDI only: `r_hat` and ESS are for Markov chains and say nothing here."""),
    code("""metrics = json.loads((RUN / "metrics.json").read_text()) if (RUN / "metrics.json").exists() else {}
tree = posterior_datatree(problem, chosen, num_draws=DRAWS, metrics=metrics, seed=seed)
print("groups:", list(tree.children))
if "posterior" in tree.children:
    table = azs.summary(tree, var_names=["coef"], kind="stats", ci_kind="hdi", ci_prob=0.94)
    display(table.reindex(table["mean"].abs().sort_values(ascending=False).index).head(8))"""),
    md("""### A right and a wrong input side by side

ArviZ's `plot_forest` of the coefficients that matter most for either input (largest |posterior mean|). Where the
two inputs lean on different task vectors, or where the wrong input's intervals are wide, the posterior tells us how
the composed model differs between them."""),
    code("""a, b = chosen_right[0], chosen_wrong[0] if chosen_wrong else chosen_right[-1]
if "posterior" in tree.children:
    coef = tree["posterior"]["coef"].sel(obs=[a, b]).stack(component=("task", "block"))
    strength = np.abs(coef.mean(("chain", "draw"))).max("obs").values
    top = np.argsort(-strength)[:6 if FAST else 10]
    sel = coef.isel(component=top)
    names = [f"{t} / {plots.short_block(k)}" for t, k in sel["component"].values]
    ds = xr.Dataset({"coef": sel.drop_vars(["component", "task", "block"]).assign_coords(component=names)})
    ds = ds.assign_coords(obs=[f"#{a} right", f"#{b} wrong"])
    pc = azp.plot_forest(ds, backend="matplotlib", ci_kind="hdi", ci_probs=(0.5, 0.94), aes={"color": ["obs"]},
                         figure_kwargs={"figsize": (9, 0.7 * len(top) + 1.5)})
    pc.add_legend("obs")
    pc.viz["figure"].item().suptitle(f"input {a} (right) vs input {b} (wrong): 50% and 94% HDI of lambda")
    plt.show()
else:
    display(plots.forest(tree, a, top=10)); display(plots.forest(tree, b, top=10))"""),
    md("""### Prior against posterior

The prior puts mass `1 - pi` exactly at 0 and spreads the rest widely; a posterior that moved away from it was
informed by the input. ArviZ's `plot_prior_posterior` reads the `prior` and `posterior` groups of the same tree."""),
    code("""if "prior" in tree.children:
    first = sel["component"].values[0] if "posterior" in tree.children else None
    t0, b0 = first
    pc = azp.plot_prior_posterior(tree, var_names=["coef"], coords={"obs": a, "task": t0, "block": b0},
                                  backend="matplotlib", figure_kwargs={"figsize": (8, 4)})
    fig = pc.viz["figure"].item()
    fig.suptitle(f"input {a}: lambda[{t0}, {plots.short_block(b0)}], prior vs posterior", x=0.02, ha="left")
    fig.subplots_adjust(top=0.8, right=0.8)
    plt.show()
else:
    print("a point-estimate run has no posterior to compare with its prior")"""),
    md("""## 4. Inputs grouped by class

For many test inputs at once we read the guide's posterior parameters directly (no draws): the expected magnitude
`gamma |mu|` of each coefficient, summed over blocks per task vector, averaged over the inputs of each class. Rows that
look alike mean classes composed alike."""),
    code("""n_use = min(len(y), 200 if FAST else 2000)
with torch.no_grad():
    guide = problem.guide
    if hasattr(guide, "net"):
        logits, mu, _ = guide.net(f_test[:n_use])
        weight = (torch.sigmoid(logits) * mu.abs()) if not variant.point_only else mu.abs()
        weight = weight.unflatten(-1, problem.composer.coefficient_shape).sum(-1).cpu().numpy()   # [N, T]
    else:  # one posterior for every input (task_level): no per-input structure to group
        weight = np.abs(guide.point_estimate(None).cpu().numpy()).sum(-1)[None].repeat(n_use, 0)
by_class = pd.DataFrame(weight, columns=problem.composer.task_names).groupby(y[:n_use]).mean()
by_class.index = [classes[k] for k in by_class.index]
fig, ax = plt.subplots(figsize=(1.1 * weight.shape[1] + 2.5, 0.35 * len(by_class) + 1.5))
im = ax.imshow(by_class.values, aspect="auto", cmap="magma")
ax.set_xticks(range(weight.shape[1]), by_class.columns, rotation=30, ha="right")
ax.set_yticks(range(len(by_class)), by_class.index)
fig.colorbar(im, ax=ax, label="mean of sum over blocks of gamma |mu|")
ax.set_title(f"task-vector use by true class ({n_use} test inputs)")
plt.tight_layout(); plt.show()"""),
    md("""## 5. Gated vs ungated, and what the gate pruned

The gate (guide `gated` only) looks at each coefficient's posterior: **pruned** (set to exactly 0) when its expected
magnitude `gamma |mu|` is below `importance_min`; **reliable** (taken at its mean, not sampled) when it is almost
surely included (`gamma >= inclusion_min`) and precise (`sigma / |mu| <= cv_max`); otherwise **sampled**. The scatter
shows every coefficient of the picked inputs on those two axes, with the thresholds, so each decision can be read
off the plot."""),
    code("""if variant.has_gate:
    display(calib[["accuracy"] + [c for c in ("accuracy_mcse",) if c in calib]].rename_axis("prediction"))
    with torch.no_grad():
        logits, mu, sigma = problem.guide.net(f_test[chosen])
    gamma = torch.sigmoid(logits).cpu().numpy().ravel()
    importance = gamma * mu.abs().cpu().numpy().ravel()
    cv = (sigma / mu.abs().clamp_min(1e-12)).cpu().numpy().ravel()
    pruned, reliable = (m.cpu().numpy().ravel() for m in problem.guide.masks(f_test[chosen]))
    g = problem.cfg.gate
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mask, name, colour in ((pruned, "pruned", "tab:grey"), (reliable, "reliable", "tab:green"),
                               (~pruned & ~reliable, "sampled", "tab:blue")):
        ax.scatter(importance[mask], cv[mask], s=6, alpha=0.5, color=colour, label=f"{name} ({mask.mean():.0%})")
    ax.axvline(g.importance_min, color="k", ls="--", lw=1); ax.axhline(g.cv_max, color="k", ls=":", lw=1)
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("importance gamma |mu| (dashed: importance_min)"); ax.set_ylabel("sigma / |mu| (dotted: cv_max)")
    ax.set_title(f"gate decisions, {len(chosen)} picked inputs (reliable also needs gamma >= {g.inclusion_min})")
    ax.legend(); plt.tight_layout(); plt.show()
    per_task = pd.DataFrame({"pruned": pruned.reshape(len(chosen), -1, len(problem.composer.block_names)).mean((0, 2)),
                             "reliable": reliable.reshape(len(chosen), -1, len(problem.composer.block_names)).mean((0, 2))},
                            index=problem.composer.task_names)
    display(per_task)
else:
    print(f"guide {problem.cfg.guide} has no gate: nothing is pruned; every prediction uses the plain posterior")"""),
    md("""## 6. Calibration on the whole test split

A calibrated model is right 80% of the time when it says 80%. The table gives accuracy (± MC standard error for
Monte-Carlo predictions), NLL, Brier, ECE and whether the predictive entropy flags errors (AUROC); the diagram
shows accuracy against confidence per bin, with the number of inputs in each bin."""),
    code("""display(calib)
pretty = {"mc_average": "MC average", "gated_mc_average": "gated MC average", "single_model": "single model"}
fig = plots.reliability({pretty[k]: v for k, v in probs.items()}, y)
display(fig)"""),
    md("""## Where next

* `pyro-tvc diagnose RUN` writes the same numbers, the DataTree and more plots into `RUN/diagnostics/`
  (docs/diagnostics.md); `load_datatree(".../posterior.nc")` reloads the tree for any ArviZ function.
* Train with `--guide spike_slab` (no gate) or `--guide point` (no posterior) and re-run this notebook to compare."""),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}})
Path(__file__).resolve().parents[1].joinpath("notebooks", "posterior_exploration.ipynb").write_text(nbformat.writes(nb))
