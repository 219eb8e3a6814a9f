"""Write notebooks/posterior_exploration.ipynb (outputs cleared). Edit the cells here, then re-run this script."""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# Exploring VTVC posteriors

Each test input gets its **own** posterior over composition coefficients `lambda[t, b]` (task vector t, parameter block b),
a spike-and-slab: an exact zero with probability `1 - gamma`, else Normal(`mu`, `sigma`). This notebook loads a trained
run (or trains one in about a minute on the embedded default), picks inputs, and looks at:

1. which task vectors and blocks each input uses, and how sure the posterior is;
2. how two inputs' posteriors differ;
3. what the gate does (pruned / reliable / sampled coefficients) and how gated and ungated predictions compare;
4. calibration of Monte-Carlo-averaged vs gated deterministic predictions.

Set `PYRO_TVC_ARTIFACTS` / `PYRO_TVC_RUN` to use other folders; `PYRO_TVC_FAST=1` makes everything small (the tests use it)."""),
    new_code_cell("""import json, os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from pyro_tvc.diagnostics import load_run, posterior_datatree, calibration_table, input_summary
from pyro_tvc.diagnostics import plots
from pyro_tvc.infer import TrainConfig, point_predictions, predictive_probs, train

FAST = os.environ.get("PYRO_TVC_FAST") == "1"
ARTIFACTS = Path(os.environ.get("PYRO_TVC_ARTIFACTS", "../artifacts/pyro-tvc-tiny"))
RUN = Path(os.environ.get("PYRO_TVC_RUN", "../runs/demo"))
DRAWS = 40 if FAST else 300
torch.manual_seed(0)
print("artifacts:", ARTIFACTS, "| run:", RUN, "| fast mode:", FAST)"""),
    new_markdown_cell("## A run: load it, or train one (about a minute on 2 cores)"),
    new_code_cell("""if not (RUN / "config.json").exists():
    cfg = TrainConfig(artifacts=ARTIFACTS, target="mnist", out=RUN, epochs=1 if FAST else 2,
                      max_train=128 if FAST else 1500, eval_samples=2 if FAST else 8, quiet=True, device="cpu")
    train(cfg)
problem = load_run(RUN)
results = json.loads((RUN / "results.json").read_text())
print(f"target {problem.cfg.target}, guide {problem.cfg.guide}, task vectors {list(problem.composer.task_names)}")
{k: round(v, 3) for k, v in results.items() if isinstance(v, float)}"""),
    new_markdown_cell("## Pick inputs and draw their posteriors (ArviZ DataTree)"),
    new_code_cell("""x, features, labels = problem.splits["test"]
obs = list(range(0, min(len(labels), 8 if FAST else 24)))
tree = posterior_datatree(problem, obs, num_draws=DRAWS)
tree"""),
    new_markdown_cell("""## Which task vectors does each input use?

Expected |lambda| summed over blocks, per task vector (rows: inputs). Inputs of the same class tend to lean on the same
vectors; an input that spreads its weight everywhere is usually one the model is unsure about."""),
    new_code_cell("""coef = tree["posterior"]["coef"].values[0]            # [draw, obs, task, block]
tasks = list(tree["posterior"]["task"].values)
usage = np.abs(coef).mean(0).sum(-1)                   # [obs, task]
inclusion = (coef != 0).mean(0).mean(-1)               # [obs, task]
fig, axes = plt.subplots(1, 2, figsize=(12, 0.3 * len(obs) + 2))
for ax, data, title in ((axes[0], usage, "E|lambda| summed over blocks"), (axes[1], inclusion, "mean inclusion probability")):
    im = ax.imshow(data, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(obs)), [f"{o} (y={int(labels[o])})" for o in obs], fontsize=7)
    ax.set_title(title); fig.colorbar(im, ax=ax)
plt.tight_layout(); plt.show()"""),
    new_markdown_cell("## How sure is each input? (predictive entropy, active components)"),
    new_code_cell("""probs = tree["posterior_predictive"]["class_probs"].values[0]
summary = pd.DataFrame(input_summary(coef, probs, labels[obs].cpu().numpy(), obs)).set_index("obs")
summary.sort_values("predictive_entropy")"""),
    new_markdown_cell("## Two inputs side by side: their largest coefficients (94% HDI)"),
    new_code_cell("""ordered = summary.sort_values("predictive_entropy").index
sure, unsure = int(ordered[0]), int(ordered[-1])
for o in (sure, unsure):
    path = plots.forest(tree, o, RUN / f"nb_forest_{o}.png", top=10)
    plt.figure(figsize=(8, 4.5)); plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()"""),
    new_markdown_cell("""## Gated vs ungated

The gate prunes coefficients of low importance (`gamma |mu|`), takes reliable ones (high `gamma`, small `sigma/|mu|`) at
their mean, and samples the rest. Below: how many of each per input, and what it does to accuracy."""),
    new_code_cell("""if hasattr(problem.guide, "masks"):
    pruned, reliable = problem.guide.masks(features[obs])
    gate = pd.DataFrame({"pruned": pruned.float().mean((-1, -2)).numpy(), "reliable": reliable.float().mean((-1, -2)).numpy()},
                        index=obs)
    gate["sampled"] = 1 - gate.pruned - gate.reliable
    display(gate.describe().loc[["mean", "min", "max"]])
gated_coef = tree["posterior"]["coef_gated"].values[0]
print("exact zeros: ungated draws %.3f, gated draws %.3f, gated point estimate %.3f" % (
    (coef == 0).mean(), (gated_coef == 0).mean(), (tree["point"]["coef_point"].values == 0).mean()))"""),
    new_markdown_cell("## Calibration: Monte-Carlo average vs gated deterministic prediction (whole test split)"),
    new_code_cell("""samples = 2 if FAST else 16
mc = predictive_probs(problem, "test", samples).mean(0).numpy()
point, _ = point_predictions(problem, "test")
y = labels.numpy()
named = {"MC average": mc, "gated deterministic": point.numpy()}
display(pd.DataFrame(calibration_table(named, y)).set_index("prediction").round(3))
path = plots.reliability(named, y, RUN / "nb_reliability.png")
plt.figure(figsize=(5, 5)); plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()"""),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
Path("notebooks/posterior_exploration.ipynb").write_text(nbformat.writes(nb))
