"""Hierarchical VTVC model: task-level coefficients shared by every input, per-input deviations around them.

Generative story (Bayesian core v2, issue 11; DESIGN.md section 1), for a data set of ``num_data`` inputs:

    Lambda   ~ SpikeAndSlab(pi, 0, slab_scale)              [K = T * B], one draw for the whole data set
    delta_i  ~ Normal(0, s^2)                               [K] per input, s > 0 per task or per block
    lambda_i = Lambda + 1[Lambda != 0] * delta_i            exact zeros where the task-level spike is off
                                                            (deterministic site ``coef``)
    y_i      ~ likelihood(x_i, lambda_i)

``Lambda`` sits outside the data plate: its KL is paid once per data set, so every label informs it and its
posterior can concentrate (which is what lets a reliability gate act on it). ``delta_i`` sits inside the subsampled
plate (scaled by ``num_data / batch``). ``s`` is a Pyro param (``DEVIATION_SCALE_PARAM``, positive constraint) fitted
by SVI: type-II maximum likelihood. Deviations only move included coefficients, so pruning ``Lambda_k`` removes
coefficient k for every input (the sparsity pattern is task level, the values are per input).

``kl_weight`` scales both latent sites (1 = the true ELBO of this model, the default of its variants).
"""
from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import constraints

from pyro_tvc.models.distributions import SpikeAndSlab
from pyro_tvc.models.vtvc import COEF_SITE, PriorConfig, _observe

GLOBAL_SITE = "global_coef"
DEVIATION_SITE = "deviation"
# The composed lambda_i is recorded as a deterministic site under the name every per-input model uses, so
# Predictive and the diagnostics (prior draws, ArviZ export) see the coefficients, not the deviations.
DEVIATION_SCALE_PARAM = "hierarchical_deviation_scale"
DEVIATION_GROUPINGS = ("task", "block")


def check_deviation_args(deviation_scale: float, deviation_per: str) -> None:
    """ValueError (one line) unless ``deviation_scale > 0`` and ``deviation_per`` is task|block."""
    if not deviation_scale > 0:
        raise ValueError(f"deviation_scale (s of delta_i ~ Normal(0, s^2)) must be positive, got {deviation_scale}")
    if deviation_per not in DEVIATION_GROUPINGS:
        raise ValueError(f"deviation_per must be one of {'|'.join(DEVIATION_GROUPINGS)}, got {deviation_per!r}")


def deviation_scale(num_tasks: int, num_blocks: int, init: float = 0.05, per: str = "block",
                    device=None, dtype=None) -> torch.Tensor:
    """The learned deviation scale ``s`` broadcast to ``[K]`` (Pyro param ``[T, 1]`` or ``[T, B]``)."""
    check_deviation_args(init, per)
    shape = (num_tasks, 1) if per == "task" else (num_tasks, num_blocks)
    s = pyro.param(DEVIATION_SCALE_PARAM,
                   lambda: torch.full(shape, float(init), device=device, dtype=dtype or torch.get_default_dtype()),
                   constraint=constraints.positive)
    return s.expand(num_tasks, num_blocks).reshape(-1)


def compose_coefficients(global_coef: torch.Tensor, deviation: torch.Tensor) -> torch.Tensor:
    """``Lambda [..., 1 or K]`` (particle dims allowed) and ``delta [..., n, K]`` -> ``lambda [..., n, K]``."""
    if global_coef.ndim == 1:
        global_coef = global_coef.unsqueeze(0)
    return global_coef + (global_coef != 0).to(deviation.dtype) * deviation


def hierarchical_model(inputs: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None, *,
                       likelihood: Callable, num_data: int, indices: torch.Tensor | None = None,
                       prior: PriorConfig = PriorConfig(), kl_weight: float = 1.0,
                       deviation_scale_init: float = 0.05, deviation_per: str = "block") -> None:
    """Hierarchical spike-and-slab VTVC model (module docstring).

    Args: as :func:`pyro_tvc.models.vtvc_model`; ``deviation_scale_init`` (> 0) initialises the learned ``s``;
    ``deviation_per``: ``"task"`` (one s per task vector) or ``"block"`` (one per task and block).
    Raises ValueError on ``deviation_scale_init <= 0`` or an unknown ``deviation_per``.
    """
    T, B = likelihood.num_tasks, likelihood.num_blocks
    n = inputs.shape[0]
    dtype = features.dtype
    logits = prior.inclusion_logits(T, B, features.device, dtype)
    zeros = torch.zeros(T * B, dtype=dtype, device=features.device)
    with poutine.scale(scale=kl_weight):
        global_coef = pyro.sample(GLOBAL_SITE, SpikeAndSlab(logits, zeros, torch.full_like(zeros, prior.slab_scale)))
    s = deviation_scale(T, B, deviation_scale_init, deviation_per, features.device, dtype)
    with pyro.plate("data", num_data, subsample=indices if indices is not None else torch.arange(n)):
        with poutine.scale(scale=kl_weight):
            delta = pyro.sample(DEVIATION_SITE, dist.Normal(zeros, s).to_event(1).expand([n]))
        lam = compose_coefficients(global_coef, delta)
        pyro.deterministic(COEF_SITE, lam, event_dim=1)
        _observe(likelihood, inputs, lam.reshape(*lam.shape[:-1], T, B), labels)
