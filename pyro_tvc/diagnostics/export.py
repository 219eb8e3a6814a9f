"""Rebuild a trained run and export posterior draws as an ArviZ DataTree with named dims and coords.

Groups (dims in brackets; one chain):

* ``posterior``: ``coef`` and ``coef_gated`` [chain, draw, obs, task, block], ``included`` and ``included_gated``
  (1 where the draw is not exactly zero);
* ``posterior_predictive``: ``class_probs`` and ``class_probs_gated`` [chain, draw, obs, class];
* ``observed_data``: ``label`` [obs];
* ``point``: the hard-gated deterministic coefficients ``coef_point`` [obs, task, block] and ``class_probs_point``;
* ``elbo_trace``: ``neg_elbo_per_datum`` [step] from training.

``obs`` carries coords ``label`` and ``dataset``. ``obs`` (not ``sample``) avoids ArviZ 1.x's clash with its own
sample dims. Files are NetCDF (h5netcdf engine) and reload with :func:`load_datatree`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyro
import torch
import xarray as xr
from arviz_base import from_dict

from pyro_tvc.infer import (GateConfig, Problem, TrainConfig, build_problem, load_checkpoint, restore_params,
                             ungated)


def _find_artifacts(recorded: str, run_dir: Path) -> Path:
    """The artefact folder a run recorded: as written (absolute, or relative to the working directory), else relative
    to one of the run folder's ancestors (a run recorded from the repository root, opened from notebooks/)."""
    path = Path(recorded)
    if path.is_absolute() or path.exists():
        return path
    for ancestor in run_dir.resolve().parents:
        if (ancestor / path).exists():
            return ancestor / path
    raise FileNotFoundError(f"artefact folder {recorded!r} recorded by {run_dir} not found; pass artifacts=...")


def load_run(run_dir: Path, device: str = "cpu", artifacts: Path | None = None) -> Problem:
    """Rebuild the problem of a run folder and load the last checkpoint's parameters into its guide."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json): run `pyro-tvc train` first")
    raw = json.loads(cfg_path.read_text())
    fields = TrainConfig.__dataclass_fields__
    kw = {k: v for k, v in raw.items() if k in fields}
    kw["gate"] = GateConfig(**raw["gate"])
    kw["artifacts"] = Path(artifacts) if artifacts is not None else _find_artifacts(raw["artifacts"], run_dir)
    kw["out"], kw["device"], kw["quiet"] = run_dir, device, True
    cfg = TrainConfig(**kw)
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch*.pt"), key=lambda p: int(p.stem[5:]))
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no epoch*.pt")
    pyro.clear_param_store()
    problem = build_problem(cfg)
    restore_params(problem, load_checkpoint(checkpoints[-1], device))
    return problem


@torch.no_grad()
def _draws(problem: Problem, features: torch.Tensor, num_draws: int, gated: bool) -> torch.Tensor:
    guide = problem.guide
    if gated and hasattr(guide, "sampling_distribution"):
        return guide.sampling_distribution(features).sample((num_draws,))
    with ungated(guide):
        posterior = guide.posterior(features)
    draws = posterior.sample((num_draws,))
    return draws.expand(num_draws, len(features), -1) if draws.ndim == 2 else draws


@torch.no_grad()
def posterior_datatree(problem: Problem, obs_indices: list[int] | None = None, num_draws: int = 200,
                       split: str = "test", elbo_trace: list[float] | None = None, seed: int = 0):
    """Draw ``num_draws`` coefficient samples per chosen input (gated and ungated) and build the DataTree."""
    torch.manual_seed(seed)
    x_all, f_all, y_all = problem.splits[split]
    idx = torch.as_tensor(obs_indices if obs_indices is not None else range(min(16, len(y_all))))
    x, f, y = x_all[idx], f_all[idx], y_all[idx]
    T, B = problem.composer.coefficient_shape
    data, point = {}, {}
    for suffix, gated in (("", False), ("_gated", True)):
        lam = _draws(problem, f, num_draws, gated).reshape(num_draws, len(idx), T, B)
        probs = torch.cat([problem.likelihood.logits(x, lam[s:s + 20]).softmax(-1)
                           for s in range(0, num_draws, 20)])
        data[f"coef{suffix}"] = lam.cpu().numpy()[None]
        data[f"included{suffix}"] = (lam != 0).to(torch.int8).cpu().numpy()[None]
        data[f"class_probs{suffix}"] = probs.cpu().numpy()[None]
    lam_point = problem.guide.point_estimate(f)
    lam_point = lam_point.expand(len(idx), T, B) if lam_point.ndim == 2 else lam_point
    point["coef_point"] = lam_point.cpu().numpy()
    point["class_probs_point"] = problem.likelihood.logits(x, lam_point).softmax(-1).cpu().numpy()
    coords = {"obs": idx.numpy(), "task": list(problem.composer.task_names), "block": list(problem.composer.block_names),
              "class": problem.classes}
    dims = {"coef": ["obs", "task", "block"], "coef_gated": ["obs", "task", "block"],
            "included": ["obs", "task", "block"], "included_gated": ["obs", "task", "block"],
            "class_probs": ["obs", "class"], "class_probs_gated": ["obs", "class"], "label": ["obs"]}
    tree = from_dict({
        "posterior": {k: data[k] for k in ("coef", "coef_gated", "included", "included_gated")},
        "posterior_predictive": {k: data[k] for k in ("class_probs", "class_probs_gated")},
        "observed_data": {"label": y.cpu().numpy()},
    }, coords=coords, dims=dims)
    tree.attrs.update({"target": problem.cfg.target, "guide": problem.cfg.guide, "kl_weight": problem.cfg.kl_weight,
                       "split": split})
    extra = {"label": ("obs", y.cpu().numpy()), "dataset": ("obs", np.array([problem.cfg.target] * len(idx)))}
    for group in ("posterior", "posterior_predictive", "observed_data"):
        tree[group] = tree[group].to_dataset().assign_coords(extra)
    tree["point"] = xr.Dataset(
        {"coef_point": (("obs", "task", "block"), point["coef_point"]),
         "class_probs_point": (("obs", "class"), point["class_probs_point"])},
        coords={k: coords[k] for k in ("obs", "task", "block", "class")}).assign_coords(extra)
    trace = np.asarray(elbo_trace if elbo_trace is not None else [], dtype=float)
    tree["elbo_trace"] = xr.Dataset({"neg_elbo_per_datum": (("step",), trace)}, coords={"step": np.arange(len(trace))})
    return tree


def save_datatree(tree, path: Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(".tmp.nc")
    tree.to_netcdf(tmp, engine="h5netcdf")
    tmp.replace(path)


def load_datatree(path: Path):
    return xr.open_datatree(path, engine="h5netcdf").load()
