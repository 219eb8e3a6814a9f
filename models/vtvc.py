"""VTVC models: per-sample (or task-level) composition coefficients as latent variables.

Generative story, for each input i of a data set of size ``num_data`` (``pyro.plate`` with the minibatch indices,
so every term is scaled by ``num_data / batch`` and the ELBO is that of the whole data set):

    lambda_i ~ SpikeAndSlab(pi, 0, slab_scale)            [K = T * B coefficients, exact zero spike]
    y_i      ~ likelihood(x_i, lambda_i)                   e.g. Categorical(logits = head(f(x_i; theta_i)))

``kl_weight`` (default 1: the true ELBO) multiplies the latent site through ``poutine.scale`` in both model and
guide; anything else is an explicit, logged tempering and no longer an ELBO.
Variants: :func:`gaussian_prior_model` (slab only, the ablation) and :func:`task_level_model` (one ``lambda [T, B]``
shared by all inputs: task-level variational composition).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from pyro_tvc.models.distributions import SpikeAndSlab

COEF_SITE = "coef"
OBS_SITE = "obs"


@dataclass
class PriorConfig:
    """``inclusion_prob`` pi and the slab's standard deviation; ``learn_inclusion``: pi becomes a Pyro param
    (``"none"`` | ``"global"`` | ``"per_task"``), fitted by SVI (type-II maximum likelihood)."""

    inclusion_prob: float = 0.5
    slab_scale: float = 1.0
    learn_inclusion: str = "none"

    def __post_init__(self):
        if not 0.0 < self.inclusion_prob < 1.0:
            raise ValueError(f"inclusion_prob must be in (0, 1), got {self.inclusion_prob}")
        if self.slab_scale <= 0:
            raise ValueError(f"slab_scale must be positive, got {self.slab_scale}")
        if self.learn_inclusion not in ("none", "global", "per_task"):
            raise ValueError(f"learn_inclusion must be none|global|per_task, got {self.learn_inclusion!r}")

    def inclusion_logits(self, num_tasks: int, num_blocks: int, device=None, dtype=None) -> torch.Tensor:
        """``[T * B]`` prior inclusion logits."""
        init = torch.logit(torch.tensor(self.inclusion_prob, dtype=dtype or torch.get_default_dtype(), device=device))
        if self.learn_inclusion == "none":
            return init.expand(num_tasks * num_blocks)
        shape = (num_tasks, 1) if self.learn_inclusion == "per_task" else (1, 1)
        logits = pyro.param("prior_inclusion_logits", init.expand(shape).clone())
        return logits.expand(num_tasks, num_blocks).reshape(-1)


class ClassificationLikelihood:
    """``y ~ Categorical(logits = head(composer(x, lambda)))`` with a frozen head.

    ``lambda [..., N, T, B]``: leading Monte-Carlo dims are folded into the batch (x is repeated), so S posterior
    draws cost one forward of S * N composed samples. Returns a distribution with batch shape ``[..., N]``.
    """

    def __init__(self, composer, head):
        self.composer, self.head = composer, head

    @property
    def num_tasks(self) -> int:
        return self.composer.coefficient_shape[0]

    @property
    def num_blocks(self) -> int:
        return self.composer.coefficient_shape[1]

    def logits(self, inputs: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """``inputs [N, ...]``, coefficients ``[..., N, T, B]`` (per sample) or ``[T, B]`` (task level) -> ``[..., N, C]``."""
        T, B = self.composer.coefficient_shape
        if coefficients.ndim == 2:
            return self.head(self.composer(inputs, coefficients))
        lead = coefficients.shape[:-2]
        n = inputs.shape[0]
        flat = coefficients.reshape(-1, T, B)
        x = inputs.repeat(flat.shape[0] // n, *([1] * (inputs.ndim - 1))) if flat.shape[0] != n else inputs
        return self.head(self.composer(x, flat)).reshape(*lead, -1)

    def __call__(self, inputs: torch.Tensor, coefficients: torch.Tensor):
        return dist.Categorical(logits=self.logits(inputs, coefficients))


def _observe(likelihood, inputs, coefficients, labels):
    obs_dist = likelihood(inputs, coefficients)
    if isinstance(obs_dist, dist.Categorical):
        pyro.deterministic("probs", obs_dist.probs)
    pyro.sample(OBS_SITE, obs_dist, obs=labels)


def vtvc_model(inputs: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None, *,
               likelihood: Callable, num_data: int, indices: torch.Tensor | None = None,
               prior: PriorConfig = PriorConfig(), kl_weight: float = 1.0) -> None:
    """Spike-and-slab VTVC model.

    Args:
        inputs: ``[N, ...]`` images of the minibatch. features: ``[N, D]`` (unused by the model; the guide's input).
        labels: ``[N]`` or None (predictive). likelihood: ``(inputs, lambda [..., N, T, B]) -> Distribution [..., N]``.
        num_data: size of the whole data set. indices: ``[N]`` positions of the minibatch in it (default 0..N-1).
    """
    T, B = likelihood.num_tasks, likelihood.num_blocks
    n = inputs.shape[0]
    logits = prior.inclusion_logits(T, B, inputs.device, inputs.dtype if inputs.is_floating_point() else None)
    zeros = torch.zeros(T * B, dtype=logits.dtype, device=logits.device)
    prior_dist = SpikeAndSlab(logits, zeros, torch.full_like(zeros, prior.slab_scale))
    with pyro.plate("data", num_data, subsample=indices if indices is not None else torch.arange(n)):
        with poutine.scale(scale=kl_weight):
            lam = pyro.sample(COEF_SITE, prior_dist.expand([n]))
        _observe(likelihood, inputs, lam.reshape(*lam.shape[:-1], T, B), labels)


def gaussian_prior_model(inputs, features, labels, *, likelihood, num_data, indices=None,
                         prior: PriorConfig = PriorConfig(), kl_weight: float = 1.0) -> None:
    """Ablation: ``lambda ~ Normal(0, slab_scale)`` (no spike), otherwise as :func:`vtvc_model`."""
    T, B = likelihood.num_tasks, likelihood.num_blocks
    n = inputs.shape[0]
    with pyro.plate("data", num_data, subsample=indices if indices is not None else torch.arange(n)):
        with poutine.scale(scale=kl_weight):
            lam = pyro.sample(COEF_SITE, dist.Normal(torch.zeros(T * B, device=inputs.device), prior.slab_scale)
                              .to_event(1).expand([n]))
        _observe(likelihood, inputs, lam.reshape(*lam.shape[:-1], T, B), labels)


def task_level_model(inputs, features, labels, *, likelihood, num_data, indices=None,
                     prior: PriorConfig = PriorConfig(), kl_weight: float = 1.0) -> None:
    """One ``lambda [T, B]`` for every input (global latent, outside the data plate)."""
    T, B = likelihood.num_tasks, likelihood.num_blocks
    n = inputs.shape[0]
    logits = prior.inclusion_logits(T, B, inputs.device)
    zeros = torch.zeros(T * B, device=inputs.device)
    with poutine.scale(scale=kl_weight):
        lam = pyro.sample(COEF_SITE, SpikeAndSlab(logits, zeros, torch.full_like(zeros, prior.slab_scale)))
    with pyro.plate("data", num_data, subsample=indices if indices is not None else torch.arange(n)):
        # [T, B] takes the engine's merge-once path; particle dims, if any, broadcast per sample
        coefficients = lam.reshape(T, B) if lam.ndim == 1 else lam.reshape(*lam.shape[:-1], 1, T, B).expand(
            *lam.shape[:-1], n, T, B)
        _observe(likelihood, inputs, coefficients, labels)
