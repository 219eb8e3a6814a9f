"""``pyro-tvc diagnose RUN_DIR``: DataTree, summary tables, calibration and plots, with an ``index.md``.

Every argument is checked before any work (:class:`DiagnoseConfig`, then :func:`resolve_run`); the output is written
into a hidden temporary folder next to the destination and renamed into place only when complete, so a failed or
interrupted command leaves no partial ``diagnostics/`` (a previous complete one stays until the new one is done).

Monte-Carlo numbers use the run's own ``eval_samples`` and ``seed`` by default, the computation ``train`` used for
``results.json``, so both report the same accuracy to the printed digits; each carries its jackknife standard error.
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch

from pyro_tvc.diagnostics import plots
from pyro_tvc.diagnostics.export import VARIATIONAL_NOTE, posterior_datatree, save_datatree
from pyro_tvc.diagnostics.run_files import RunSource, load_problem, resolve_run
from pyro_tvc.diagnostics.summaries import calibration_table, coefficient_summary, input_summary
from pyro_tvc.reporting import markdown_table
from pyro_tvc.runtime import read_json, write_json
from pyro_tvc.variants import get_variant


@dataclass
class DiagnoseConfig:
    """Options of ``pyro-tvc diagnose`` (the command line is derived from these fields).

    Args:
        run_dir: Run folder written by ``pyro-tvc train``.
        artifacts: Artefact folder of the run (``pyro-tvc prepare`` output); default: the recorded path, else
            found by the run's theta_0 hash among ``artifacts/*`` above the run folder.
        checkpoint: Checkpoint to load: ``final`` (the run's final checkpoint), ``epoch<k>``, or a file.
        out: Output folder; default: ``RUN_DIR/diagnostics`` (replaced when the new one is complete).
        num_obs: Test inputs whose posteriors are exported and plotted (at least 1).
        draws: Posterior (and prior) draws per exported input (at least 2).
        mc_samples: Posterior draws for the Monte-Carlo predictive on the whole test split; default: the run's
            ``eval_samples``, so the accuracy equals ``results.json``'s (at least 2).
        seed: Random seed of the draws; default: the run's seed.
        device: ``cpu``, ``cuda[:i]`` or ``auto`` (CUDA when present).
        quiet: No progress messages.
    """

    run_dir: Path
    artifacts: Path | None = None
    checkpoint: str = "final"
    out: Path | None = None
    num_obs: int = 16
    draws: int = 200
    mc_samples: int | None = None
    seed: int | None = None
    device: str = "cpu"
    quiet: bool = False

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.artifacts = Path(self.artifacts) if self.artifacts is not None else None
        self.out = Path(self.out) if self.out is not None else None
        for name, low in (("num_obs", 1), ("draws", 2), ("mc_samples", 2)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError(f"--checkpoint must be 'final', epoch<k> or a file, got {self.checkpoint!r}")
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"run folder {self.run_dir} does not exist: pass a folder written by "
                                    f"`pyro-tvc train`")
        if self.artifacts is not None and not self.artifacts.is_dir():
            raise FileNotFoundError(f"--artifacts {self.artifacts} is not a folder; expected a `pyro-tvc prepare` output")
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} exists and is not a folder")


def _say(cfg: DiagnoseConfig, msg: str) -> None:
    if not cfg.quiet:
        print(f"diagnose: {msg}", file=sys.stderr, flush=True)


def _write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` with renames only (the old folder is removed last)."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def diagnose(cfg: DiagnoseConfig) -> Path:
    """Write the diagnostics of ``cfg.run_dir`` into ``cfg.out`` (default ``RUN_DIR/diagnostics``); returns that folder.

    Raises:
        FileNotFoundError: run folder, artefacts or checkpoint not found.
        ValueError: an out-of-range option (``--num-obs`` larger than the test split included).
    """
    source = resolve_run(cfg.run_dir, cfg.artifacts, cfg.checkpoint)
    run_cfg = source.config
    metrics_path = cfg.run_dir / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    results_path = cfg.run_dir / "results.json"
    results = read_json(results_path) if results_path.is_file() else {}
    seed = cfg.seed if cfg.seed is not None else int(run_cfg.get("seed", 0))
    mc_samples = cfg.mc_samples or int(run_cfg.get("eval_samples", 16))
    out = cfg.out or cfg.run_dir / "diagnostics"
    _say(cfg, f"loading {source.describe()}")
    problem = load_problem(source, cfg.device)
    n_test = len(problem.splits["test"][2])
    if cfg.num_obs > n_test:
        raise ValueError(f"--num-obs {cfg.num_obs} exceeds the {n_test} inputs of {problem.cfg.target}'s test split")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # plain mkdir: the folder gets the umask's permissions (tempfile.mkdtemp would make it 0700)
    try:
        _write_all(cfg, source, problem, metrics, results, seed, mc_samples, tmp, out)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_all(cfg, source: RunSource, problem, metrics, results, seed, mc_samples, tmp: Path, out: Path) -> None:
    from pyro_tvc.infer import point_predictions, predictive_probs

    variant = get_variant(problem.cfg.guide)
    y = problem.splits["test"][2].cpu().numpy()
    obs = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:cfg.num_obs].sort().values.tolist()
    _say(cfg, f"drawing {cfg.draws} posterior and prior draws for {len(obs)} test inputs")
    tree = posterior_datatree(problem, obs, cfg.draws, metrics=metrics, seed=seed)
    save_datatree(tree, tmp / "posterior.nc")

    _say(cfg, f"Monte-Carlo predictive on {len(y)} test inputs ({mc_samples} draws, seed {seed})")
    named = {}
    if not variant.point_only:
        _seeded(seed)
        named["mc_average"] = predictive_probs(problem, "test", mc_samples).cpu().numpy()
        if variant.has_gate:
            _seeded(seed)
            named["gated_mc_average"] = predictive_probs(problem, "test", mc_samples, gated=True).cpu().numpy()
    point, coefs = point_predictions(problem, "test")
    named["single_model"] = point.cpu().numpy()
    calib = calibration_table(named, y)
    labels = tree["observed_data"]["label"].values
    tasks, blocks = list(tree["point"]["task"].values), list(tree["point"]["block"].values)
    if variant.point_only:
        coef = tree["point"]["coef_point"].values[None]
        probs = tree["point"]["class_probs_point"].values[None]
        rows = [{"obs": int(o), "task": t, "block": b, "value": float(coef[0, i, j, k])}
                for i, o in enumerate(obs) for j, t in enumerate(tasks) for k, b in enumerate(blocks)]
    else:
        coef = tree["posterior"]["coef"].values[0]
        probs = tree["posterior_predictive"]["class_probs"].values[0]
        rows = coefficient_summary(coef, tasks, blocks, obs)
    _write_csv(rows, tmp / "coefficients.csv")
    inputs = input_summary(coef, probs, labels, obs)
    if variant.point_only:
        for r in inputs:
            del r["mean_inclusion_prob"]  # a point estimate has no inclusion probability
    _write_csv(inputs, tmp / "inputs.csv")
    dataset = {"dataset": problem.cfg.target, "test_inputs": len(y),
               "exact_zero_fraction": float((coefs == 0).float().mean()), "exported_inputs": len(inputs),
               **{k: float(np.mean([r[k] for r in inputs])) for k in inputs[0]
                  if k in ("mean_inclusion_prob", "effective_active_components", "predictive_entropy")}}
    gate = None
    if variant.has_gate and hasattr(problem.guide, "masks"):
        pruned, reliable = problem.guide.masks(problem.splits["test"][1])
        gate = {"pruned_fraction": float(pruned.float().mean()), "reliable_fraction": float(reliable.float().mean()),
                "sampled_fraction": float((~pruned & ~reliable).float().mean()), **vars(problem.cfg.gate)}
    summary = {"run": str(cfg.run_dir.resolve()), "checkpoint": source.checkpoint.name, "epoch": source.epoch,
               "artifacts": str(source.artifacts), "artifacts_found_by": source.found_by, "guide": problem.cfg.guide,
               "seed": seed, "mc_samples": mc_samples, "draws": cfg.draws, "dataset": dataset, "calibration": calib,
               "gate": gate, "obs": obs, "draws_note": VARIATIONAL_NOTE}
    write_json(tmp / "summary.json", summary)

    _say(cfg, "plots")
    figures = _figures(tree, metrics, named, y, variant, obs, tmp)
    (tmp / "index.md").write_text(_index(cfg, source, problem, variant, summary, results, inputs, figures, out))


def _figures(tree, metrics, named, y, variant, obs, folder: Path) -> dict[str, tuple[Path, str]]:
    """Title -> (PNG written into ``folder``, the sentence saying what to look at)."""
    figs = {}
    save = plots.save
    loss = metrics.get("tempered_loss_per_datum", metrics.get("neg_elbo_per_datum", []))
    if len(loss):
        figs["Training curve"] = (save(plots.training_curve(np.asarray(loss), metrics.get("epochs", [])),
                                       folder / "training_curve.png"),
                                  "The tempered loss should fall and flatten; validation accuracy per epoch in red.")
    if not variant.point_only:
        figs["Inclusion heat map"] = (save(plots.inclusion_heatmap(tree), folder / "inclusion_heatmap.png"),
                                      "Which task vectors and blocks the posterior keeps (P(lambda != 0)).")
    pretty = {"mc_average": "MC average", "gated_mc_average": "gated MC average", "single_model": "single model"}
    finals = {pretty[k]: (v.mean(0) if v.ndim == 3 else v) for k, v in named.items()}
    figs["Reliability diagram"] = (save(plots.reliability(finals, y), folder / "reliability.png"),
                                   "Points under the diagonal are over-confident; numbers are inputs per bin.")
    first = next(iter(finals))
    figs["Uncertainty vs error"] = (save(plots.uncertainty_vs_error(finals[first], y, first),
                                         folder / "uncertainty_vs_error.png"),
                                    "Wrong predictions should have higher entropy.")
    note = "Point estimate (no posterior, so no interval)." if variant.point_only else \
        "Dots: posterior mean; lines: 94% HDI (an HDI reaching 0 means P(lambda = 0) > 6%)."
    for o in obs[:3]:
        figs[f"Largest coefficients of input {o}"] = (save(plots.forest(tree, o), folder / f"forest_obs{o}.png"), note)
    if not variant.point_only:
        figs[f"ArviZ forest plot, input {obs[0]}"] = (
            save(plots.arviz_forest(tree, obs[0]), folder / f"arviz_forest_obs{obs[0]}.png"),
            "The same input through ArviZ's own plot_forest.")
    return figs


def _fmt_acc(row: dict) -> str:
    se = row.get("accuracy_mcse")
    return f"{row['accuracy']:.1f} ± {se:.1f}" if se is not None and np.isfinite(se) else f"{row['accuracy']:.1f}"


def _index(cfg, source, problem, variant, summary, results, inputs, figures, out) -> str:
    calib = [{"prediction": r["prediction"], "accuracy (%)": _fmt_acc(r), "NLL (nats)": f"{r['nll']:.3f}",
              "Brier": f"{r['brier']:.3f}", "ECE": f"{r['ece']:.3f}",
              "AUROC entropy→error": f"{r['auroc_entropy_error']:.3f}"} for r in summary["calibration"]]
    lines = [f"# Diagnostics of `{cfg.run_dir}`", "",
             f"Loaded {source.describe()}.", "",
             f"Target **{problem.cfg.target}**, guide **{problem.cfg.guide}** ({variant.description}), KL weight "
             f"{problem.cfg.kl_weight}; seed {summary['seed']}. Glossary of every number: docs/glossary.md.", ""]
    if variant.point_only:
        lines += ["This run is a **point estimate** (one lambda per input, no posterior): there are no inclusion "
                  "probabilities, intervals, Monte-Carlo averages or prior/posterior groups. `posterior.nc` holds the "
                  "single-model coefficients (`point` group).", ""]
    else:
        lines += [f"`posterior.nc` (ArviZ DataTree, NetCDF) holds {cfg.draws} posterior and prior draws for "
                  f"{len(summary['obs'])} test inputs. They are {VARIATIONAL_NOTE}; `coefficients.csv` gives each "
                  f"coefficient's mean, sd, 94% HDI and inclusion probability with their MC standard errors "
                  f"(`*_mcse`). Accuracies of Monte-Carlo predictions below are ± their jackknife MC standard error "
                  f"over the {summary['mc_samples']} draws.", ""]
    if results.get("mc_accuracy") is not None and not variant.point_only:
        lines += [f"`results.json` of the run records MC accuracy {results['mc_accuracy']:.1f} % (the same computation "
                  f"when `--mc-samples`/`--seed` are left at the run's own).", ""]
    lines.append(markdown_table(["prediction", "accuracy (%)", "NLL (nats)", "Brier", "ECE", "AUROC entropy→error"],
                                calib, title=f"Calibration on the whole test split ({summary['dataset']['test_inputs']} "
                                             f"inputs)"))
    ds = summary["dataset"]
    lines.append(markdown_table(list(ds), [ds], title="Per-dataset summary (exact_zero_fraction: whole test split, "
                                                       "single model; the rest: mean over exported inputs)"))
    if summary["gate"]:
        g = summary["gate"]
        lines += [markdown_table(list(g), [g], title="Gate on the test split: pruned if gamma |mu| < importance_min; "
                                                      "reliable (taken at mu) if gamma >= inclusion_min and "
                                                      "sigma/|mu| <= cv_max; else sampled")]
    lines.append(markdown_table(list(inputs[0]), inputs, title="Per exported input (prediction of the mean "
                                                                "probabilities)"))
    for title, (path, note) in figures.items():
        lines += [f"### {title}", "", note, "", f"![{title}]({path.name})", ""]
    return "\n".join(lines)
