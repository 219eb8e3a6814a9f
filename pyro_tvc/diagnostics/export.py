"""Export posterior draws of a trained run as an ArviZ DataTree with named dims and coords.

Groups (dims in brackets; one chain; which groups exist depends on the guide, :mod:`pyro_tvc.variants`):

* ``posterior``: ``coef`` [chain, draw, obs, task, block] (ungated draws of q(lambda | x)) and ``included`` (1 where
  the draw is not exactly zero); with a gate also ``coef_gated`` and ``included_gated``. Absent for point-estimate
  guides (``point_only``), whose "draws" would all be one value.
* ``prior``: ``coef`` and ``included`` drawn from the run's own model at the coefficient site, same dims as the
  posterior, so ``arviz_plots.plot_prior_posterior`` / ``plot_dist`` compare them directly.
* ``posterior_predictive``: ``class_probs`` [chain, draw, obs, class] (and ``class_probs_gated`` with a gate).
* ``observed_data``: the data variable ``label`` [obs] (the true class index).
* ``point``: the single-model coefficients ``coef_point`` [obs, task, block] and ``class_probs_point`` [obs, class].
* ``training``: ``tempered_loss_per_datum`` [step] and ``val_single_model_accuracy`` [epoch] (%) from metrics.json.

``obs`` coords are the inputs' indices in the split; ``obs_label`` (true class) and ``dataset`` are extra coords on
``obs``. The coordinate is deliberately not called ``label``: a coordinate named like the observed variable would
replace it (issue 12, case 8). ``obs`` (not ``sample``) avoids ArviZ 1.x's clash with its own sample dims.

The draws are independent samples of a variational distribution, not a Markov chain: ``r_hat`` and ESS do not apply;
the Monte-Carlo standard error of a mean of S draws is ``sd / sqrt(S)`` (:mod:`pyro_tvc.diagnostics.summaries`).
Files are NetCDF (h5netcdf engine) and reload with :func:`load_datatree`.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import xarray as xr
from arviz_base import from_dict
from pyro import poutine

from pyro_tvc.diagnostics.run_files import load_problem, load_run, resolve_run  # noqa: F401 - re-exported
from pyro_tvc.infer import Problem, ungated
from pyro_tvc.variants import get_variant

COEF_SITE = "coef"  # the models' coefficient site (pyro_tvc.models.vtvc.COEF_SITE)
VARIATIONAL_NOTE = ("independent draws of a variational posterior (one chain): r_hat and ESS do not apply; "
                    "Monte-Carlo standard error of a mean = sd / sqrt(draws)")


class _PriorOnly:
    """A stand-in likelihood with the composer's shape and a one-class output: tracing the model with it draws the
    coefficients from the prior without running the composed network (the prior does not depend on the images)."""

    def __init__(self, num_tasks: int, num_blocks: int):
        self.num_tasks, self.num_blocks = num_tasks, num_blocks

    def __call__(self, inputs, coefficients):
        return dist.Categorical(logits=coefficients.new_zeros(*coefficients.shape[:-2], 1))


@torch.no_grad()
def prior_draws(problem: Problem, inputs: torch.Tensor, features: torch.Tensor, num_draws: int) -> torch.Tensor:
    """``num_draws`` draws of lambda from the run's model prior (learned prior parameters included),
    ``[S, N, T, B]``, by tracing the model once per draw at the coefficient site."""
    T, B = problem.composer.coefficient_shape
    n = len(inputs)
    kw = problem.kwargs("test", torch.arange(n, device=inputs.device)) | {"likelihood": _PriorOnly(T, B)}
    out = []
    for _ in range(num_draws):
        trace = poutine.trace(problem.model).get_trace(inputs, features, None, **kw)
        out.append(trace.nodes[COEF_SITE]["value"].reshape(-1, T, B).expand(n, T, B))
    return torch.stack(out)


@torch.no_grad()
def _draws(problem: Problem, features: torch.Tensor, num_draws: int, gated: bool) -> torch.Tensor:
    guide = problem.guide
    if gated:
        return guide.sampling_distribution(features).sample((num_draws,))
    with ungated(guide):
        posterior = guide.posterior(features)
    draws = posterior.sample((num_draws,))
    return draws.expand(num_draws, len(features), -1) if draws.ndim == 2 else draws


def _heads(problem: Problem, split: str, idx: torch.Tensor):
    """The problem's head context for rows ``idx`` of ``split`` (several heads when the target mixes tasks)."""
    heads_for = getattr(problem, "heads_for", None)
    return heads_for(split, idx) if heads_for is not None else contextlib.nullcontext()


@torch.no_grad()
def _probs(problem: Problem, x: torch.Tensor, lam: torch.Tensor, split: str, idx: torch.Tensor,
           chunk: int = 20) -> torch.Tensor:
    """Class probabilities ``[S, N, C]`` of draws ``lam [S, N, T, B]`` (in chunks of draws: memory)."""
    with _heads(problem, split, idx):
        return torch.cat([problem.likelihood.logits(x, lam[s:s + chunk]).softmax(-1)
                          for s in range(0, len(lam), chunk)])


@torch.no_grad()
def posterior_datatree(problem: Problem, obs_indices: list[int] | None = None, num_draws: int = 200,
                       split: str = "test", metrics: dict | None = None, seed: int = 0):
    """Draw ``num_draws`` coefficient samples (posterior and prior) for the chosen inputs of ``split`` and build the
    DataTree described in the module docstring. ``metrics``: the run's metrics.json (for the ``training`` group).

    Raises:
        ValueError: ``num_draws`` < 2, no inputs, or an index outside the split.
    """
    x_all, f_all, y_all = problem.splits[split]
    obs_indices = list(obs_indices) if obs_indices is not None else list(range(min(16, len(y_all))))
    if num_draws < 2:
        raise ValueError(f"num_draws must be at least 2 (a spread needs two draws), got {num_draws}")
    if not obs_indices or min(obs_indices) < 0 or max(obs_indices) >= len(y_all):
        raise ValueError(f"obs_indices must be a non-empty list of indices in 0..{len(y_all) - 1}, got {obs_indices}")
    variant = get_variant(problem.cfg.guide)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    idx = torch.as_tensor(obs_indices)
    x, f, y = x_all[idx], f_all[idx], y_all[idx]
    T, B = problem.composer.coefficient_shape
    n = len(idx)
    groups = {}
    if not variant.point_only:
        post, pred = {}, {}
        for suffix, gated in (("", False), ("_gated", True)) if variant.has_gate else (("", False),):
            lam = _draws(problem, f, num_draws, gated).reshape(num_draws, n, T, B)
            post[f"coef{suffix}"] = lam.cpu().numpy()[None]
            post[f"included{suffix}"] = (lam != 0).to(torch.int8).cpu().numpy()[None]
            pred[f"class_probs{suffix}"] = _probs(problem, x, lam, split, idx).cpu().numpy()[None]
        lam0 = prior_draws(problem, x, f, num_draws)
        groups.update(posterior=post, posterior_predictive=pred,
                      prior={"coef": lam0.cpu().numpy()[None],
                             "included": (lam0 != 0).to(torch.int8).cpu().numpy()[None]})
    groups["observed_data"] = {"label": y.cpu().numpy()}
    coords = {"obs": idx.numpy(), "task": list(problem.composer.task_names),
              "block": list(problem.composer.block_names), "class": list(problem.classes)}
    dims = {k: ["obs", "task", "block"] for k in ("coef", "coef_gated", "included", "included_gated")}
    dims |= {"class_probs": ["obs", "class"], "class_probs_gated": ["obs", "class"], "label": ["obs"]}
    tree = from_dict(groups, coords=coords, dims=dims)
    extra = {"obs_label": ("obs", y.cpu().numpy()), "dataset": ("obs", np.array([problem.cfg.target] * n))}
    for group in groups:
        tree[group] = tree[group].to_dataset().assign_coords(extra)
    lam_point = problem.guide.point_estimate(f)
    lam_point = lam_point.expand(n, T, B) if lam_point.ndim == 2 else lam_point
    probs_point = _probs(problem, x, lam_point[None], split, idx)[0]
    tree["point"] = xr.Dataset(
        {"coef_point": (("obs", "task", "block"), lam_point.cpu().numpy()),
         "class_probs_point": (("obs", "class"), probs_point.cpu().numpy())},
        coords={k: coords[k] for k in ("obs", "task", "block", "class")}).assign_coords(extra)
    metrics = metrics or {}
    loss = np.asarray(metrics.get("tempered_loss_per_datum", metrics.get("neg_elbo_per_datum", [])), dtype=float)
    epochs = metrics.get("epochs", [])
    val = [e.get("val_single_model_accuracy", e.get("val_gated_accuracy", np.nan)) for e in epochs]
    tree["training"] = xr.Dataset(
        {"tempered_loss_per_datum": (("step",), loss), "val_single_model_accuracy": (("epoch",), np.asarray(val, float))},
        coords={"step": np.arange(len(loss)), "epoch": np.asarray([e["epoch"] for e in epochs], dtype=int)})
    tree.attrs.update({"target": problem.cfg.target, "guide": problem.cfg.guide, "kl_weight": problem.cfg.kl_weight,
                       "split": split, "num_draws": num_draws, "seed": seed, "draws": VARIATIONAL_NOTE,
                       "has_gate": int(variant.has_gate), "point_only": int(variant.point_only),
                       "per_input": int(variant.per_input)})
    return tree


def save_datatree(tree, path: Path) -> None:
    """Write ``tree`` to NetCDF atomically: a hidden temporary file in the same folder (created with the umask's
    permissions, unlike ``tempfile.mkstemp``'s 0600), renamed when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tree.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_datatree(path: Path):
    """Read a DataTree written by :func:`save_datatree` fully into memory (the file is closed afterwards)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `pyro-tvc diagnose RUN_DIR` first")
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        return tree.load()
