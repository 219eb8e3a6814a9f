"""Guide for the hierarchical model (models/hierarchical.py): mean-field ``q(Lambda)``, amortized ``q(delta_i | x_i)``.

    q(Lambda)        = prod_k (1 - gamma_k) delta_0 + gamma_k Normal(mu_k, sigma_k^2)   free parameters per coefficient
    q(delta_i | x_i) = Normal(m(x_i), v(x_i)^2)                                       an inference network

``Lambda``'s parameters are stored divided by ``global_step_multiplier`` and multiplied back in the forward pass:
Adam's step is invariant to the gradient's scale, so this multiplies their effective learning rate (the optimizer's
rate is global) without touching the network's. Without it the global inclusion logits barely move in a few hundred
steps (issue 11: at most ~0.35 in 87 steps at lr 1e-2), and a gate that reads them has nothing to select.

Step 0 is a known solution: ``q(Lambda)`` has inclusion ``init_inclusion``, mean 0, scale ``init_scale``, and
``q(delta_i | x_i) = p(delta_i) = Normal(0, s_0^2)`` (zero KL for the deviations), i.e. nearly the zero-shot model.

The gate (:class:`~pyro_tvc.guides.gated.GateConfig`) acts on ``q(Lambda)``, whose uncertainty shrinks with the size
of the data set: reliable global coefficients are used as their mean, pruned ones are exact zeros for every input
(and so are their deviations). As in guides/gated.py it is an estimator option: the ELBO is that of the ungated
posterior, and ``pyro_tvc.infer.ungated`` switches it off for the unbiased estimate.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_tvc.guides.gated import GateConfig, GatedSpikeAndSlab, gate_masks
from pyro_tvc.models.distributions import SpikeAndSlab
from pyro_tvc.models.hierarchical import (DEVIATION_SITE, GLOBAL_SITE, check_deviation_args, compose_coefficients,
                                          hierarchical_model)


class HierarchicalGuide(nn.Module):
    """Args: ``feature_dim`` D of the pre-trained features, ``num_tasks`` T, ``num_blocks`` B; ``init_inclusion``,
    ``init_scale``: step-0 ``q(Lambda)``; ``max_scale``: cap of the deviations' posterior scale ``v``;
    ``deviation_scale``: initial ``s`` (and ``v``), in coefficient units, ``0 < deviation_scale < max_scale``;
    ``deviation_per``: ``"task"`` | ``"block"``; ``global_step_multiplier`` (> 0) for ``q(Lambda)``; ``gate``: None
    (plain posterior) or a :class:`GateConfig`. Raises ValueError on values outside those ranges."""

    def __init__(self, feature_dim: int, num_tasks: int, num_blocks: int, hidden: int = 256,
                 init_inclusion: float = 0.5, init_scale: float = 0.02, max_scale: float = 0.1,
                 deviation_scale: float = 0.05, deviation_per: str = "block", global_step_multiplier: float = 10.0,
                 estimator: str = "straight_through", temperature: float = 0.5, gate: GateConfig | None = None,
                 name: str = "hierarchical"):
        super().__init__()
        check_deviation_args(deviation_scale, deviation_per)
        if not 0.0 < init_inclusion < 1.0:
            raise ValueError(f"init_inclusion must be in (0, 1), got {init_inclusion}")
        if not 0 < init_scale:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if not deviation_scale < max_scale:
            raise ValueError(f"need deviation_scale < max_scale (cap of q(delta)'s scale), got {deviation_scale} "
                             f"and {max_scale}")
        if not global_step_multiplier > 0:
            raise ValueError(f"global_step_multiplier must be positive, got {global_step_multiplier}")
        K = num_tasks * num_blocks
        self.num_tasks, self.num_blocks, self.name = num_tasks, num_blocks, name
        self.max_scale, self.deviation_scale_init, self.deviation_per = max_scale, deviation_scale, deviation_per
        self.global_step_multiplier = global_step_multiplier
        self.estimator, self.temperature, self.gate = estimator, temperature, gate
        init = torch.tensor([math.log(init_inclusion / (1 - init_inclusion)), 0.0, math.log(init_scale)])
        self.global_raw = nn.Parameter((init[:, None] / global_step_multiplier).repeat(1, K))  # [3, K]
        self.trunk = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU())
        self.out = nn.Linear(hidden, 2 * K)
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            bias = self.out.bias.view(2, K)
            bias[0] = 0.0
            bias[1] = math.log(deviation_scale / (max_scale - deviation_scale))

    # --- the pieces -------------------------------------------------------------------------------------------
    def global_params(self):
        """``(inclusion_logits, loc, scale)`` of ``q(Lambda)``, each ``[K]``."""
        logits, loc, log_scale = (self.global_step_multiplier * self.global_raw).unbind(0)
        return logits, loc, log_scale.exp()

    def global_posterior(self) -> SpikeAndSlab:
        return SpikeAndSlab(*self.global_params(), estimator=self.estimator, temperature=self.temperature)

    def deviation_params(self, features: torch.Tensor):
        """``(m, v)`` of ``q(delta_i | x_i)``, each ``[N, K]``."""
        loc, raw_scale = self.out(self.trunk(features)).unflatten(-1, (2, -1)).unbind(-2)
        return loc, self.max_scale * torch.sigmoid(raw_scale)

    def _global_sampling_distribution(self):
        if self.gate is None or not self.gate.gate_in_training:
            return self.global_posterior()
        return GatedSpikeAndSlab(*self.global_params(), self.gate, estimator=self.estimator,
                                 temperature=self.temperature)

    def posterior(self, features: torch.Tensor) -> "ComposedCoefficients":
        """The implied posterior of ``lambda_i`` (draws only: ``.sample(shape) -> [*shape, N, K]``), ungated."""
        return ComposedCoefficients(self.global_posterior(), dist.Normal(*self.deviation_params(features)))

    def sampling_distribution(self, features: torch.Tensor) -> "ComposedCoefficients":
        """As :meth:`posterior`, with the gate on ``q(Lambda)`` when it acts in training."""
        return ComposedCoefficients(self._global_sampling_distribution(),
                                    dist.Normal(*self.deviation_params(features)))

    # --- Pyro ---------------------------------------------------------------------------------------------------
    def forward(self, inputs, features, labels=None, *, likelihood=None, num_data: int, indices=None, prior=None,
                kl_weight: float = 1.0):
        pyro.module(self.name, self)
        n = features.shape[0]
        with poutine.scale(scale=kl_weight):  # same site order as the model (TraceMeanField_ELBO checks it)
            global_coef = pyro.sample(GLOBAL_SITE, self._global_sampling_distribution())
        loc, scale = self.deviation_params(features)
        with pyro.plate("data", num_data, subsample=indices if indices is not None else torch.arange(n)):
            with poutine.scale(scale=kl_weight):
                pyro.sample(DEVIATION_SITE, dist.Normal(loc, scale).to_event(1))
        return global_coef

    def model(self, inputs, features, labels, **kwargs):
        """The model this guide fits, with this guide's ``s`` initialisation and grouping."""
        return hierarchical_model(inputs, features, labels, deviation_scale_init=self.deviation_scale_init,
                                  deviation_per=self.deviation_per, **kwargs)

    # --- gate and prediction ------------------------------------------------------------------------------------
    @torch.no_grad()
    def masks(self, features=None):
        """``(pruned, reliable)`` bool ``[T, B]`` of the gate on ``q(Lambda)`` (the default gate if none is set)."""
        pruned, reliable = gate_masks(*self.global_params(), self.gate or GateConfig())
        shape = (self.num_tasks, self.num_blocks)
        return pruned.reshape(shape), reliable.reshape(shape)

    @torch.no_grad()
    def point_estimate(self, features: torch.Tensor) -> torch.Tensor:
        """``lambda [N, T, B]``: the task-level point (hard gate if gated, else the median: ``mu`` where
        ``gamma > 1/2``, exact 0 elsewhere) plus the posterior mean deviation where it is nonzero."""
        logits, loc, scale = self.global_params()
        keep = logits > 0
        if self.gate is not None:
            pruned, reliable = gate_masks(logits, loc, scale, self.gate)
            keep = reliable | (~pruned & keep)
        global_point = torch.where(keep, loc, torch.zeros_like(loc))
        lam = compose_coefficients(global_point, self.deviation_params(features)[0])
        return lam.unflatten(-1, (self.num_tasks, self.num_blocks))


class ComposedCoefficients:
    """Draws of ``lambda_i = Lambda + 1[Lambda != 0] delta_i`` for every input (for diagnostics; no density)."""

    def __init__(self, global_dist, deviation_dist):
        self.global_dist, self.deviation_dist = global_dist, deviation_dist

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """``[*sample_shape, N, K]``."""
        shape = torch.Size(sample_shape)
        global_coef = self.global_dist.sample(shape).unsqueeze(-2)
        return compose_coefficients(global_coef, self.deviation_dist.sample(shape))
