"""``pyro-tvc diagnose RUN_DIR``: DataTree, summary tables, calibration and plots, with an index.md."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from pyro_tvc.diagnostics import plots
from pyro_tvc.diagnostics.export import load_run, posterior_datatree, save_datatree
from pyro_tvc.diagnostics.summaries import calibration_table, coefficient_summary, input_summary
from pyro_tvc.infer import point_predictions, predictive_probs
from pyro_tvc.reporting import markdown_table
from pyro_tvc.runtime import write_json


def _write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def diagnose(run_dir: Path, num_obs: int = 16, num_draws: int = 200, mc_samples: int = 16, seed: int = 0) -> Path:
    run_dir = Path(run_dir)
    out = run_dir / "diagnostics"
    out.mkdir(exist_ok=True)
    problem = load_run(run_dir)
    trace = json.loads((run_dir / "metrics.json").read_text())["neg_elbo_per_datum"]
    y_all = problem.splits["test"][2]
    obs = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))[:num_obs].sort().values.tolist()
    tree = posterior_datatree(problem, obs, num_draws, elbo_trace=trace, seed=seed)
    save_datatree(tree, out / "posterior.nc")

    coef = tree["posterior"]["coef"].values[0]
    probs = tree["posterior_predictive"]["class_probs"].values[0]
    labels = tree["observed_data"]["label"].values
    tasks, blocks = list(tree["posterior"]["task"].values), list(tree["posterior"]["block"].values)
    coef_rows = coefficient_summary(coef, tasks, blocks, obs)
    _write_csv(coef_rows, out / "coefficients.csv")
    inputs = input_summary(coef, probs, labels, obs)
    _write_csv(inputs, out / "inputs.csv")

    torch.manual_seed(seed)
    mc = predictive_probs(problem, "test", mc_samples).mean(0).cpu().numpy()
    gated_mc = predictive_probs(problem, "test", mc_samples, gated=True).mean(0).cpu().numpy()
    point, _ = point_predictions(problem, "test")
    y = y_all.cpu().numpy()
    calib = calibration_table({"mc_average": mc, "gated_mc_average": gated_mc,
                               "gated_deterministic": point.cpu().numpy()}, y)
    dataset = {"dataset": problem.cfg.target, "inputs": len(inputs),
               **{k: float(np.mean([r[k] for r in inputs])) for k in
                  ("mean_inclusion_prob", "fraction_exact_zeros", "effective_active_components", "predictive_entropy")}}
    write_json(out / "summary.json", {"dataset": dataset, "calibration": calib, "obs": obs})

    figures = {"ELBO trace": plots.elbo_trace(np.asarray(trace), out / "elbo_trace.png"),
               "Inclusion heat map": plots.inclusion_heatmap(tree, out / "inclusion_heatmap.png"),
               "Reliability diagram": plots.reliability({"MC average": mc, "gated MC average": gated_mc,
                                                         "gated deterministic": point.cpu().numpy()}, y,
                                                        out / "reliability.png"),
               "Uncertainty vs error": plots.uncertainty_vs_error(mc, y, out / "uncertainty_vs_error.png")}
    for o in obs[:3]:
        figures[f"Forest plot, input {o}"] = plots.forest(tree, o, out / f"forest_obs{o}.png")
    figures[f"ArviZ forest plot, input {obs[0]}"] = plots.arviz_forest(tree, obs[0], out / f"arviz_forest_obs{obs[0]}.png")
    lines = [f"# Diagnostics of `{run_dir}`", "",
             f"Target **{problem.cfg.target}**, guide **{problem.cfg.guide}**, KL weight {problem.cfg.kl_weight}; "
             f"{num_draws} posterior draws for {len(obs)} test inputs in `posterior.nc` (ArviZ DataTree, NetCDF); "
             f"per-coefficient summaries in `coefficients.csv` (mean, sd, 94% HDI, inclusion probability), per-input "
             f"ones in `inputs.csv`.", "",
             markdown_table(list(dataset), [dataset], title="Per-dataset summary (mean over exported inputs)"),
             markdown_table(list(calib[0]), calib, title=f"Calibration on the whole test split ({len(y)} inputs)"),
             markdown_table(["obs", "label", "prediction", "correct", "mean_inclusion_prob",
                             "effective_active_components", "predictive_entropy"], inputs, title="Per input")]
    for title, path in figures.items():
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    (out / "index.md").write_text("\n".join(lines))
    return out
