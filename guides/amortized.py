"""Amortized guides: an inference network reads the pre-trained feature ``f(x; theta_0) [N, D]`` and outputs, for
every coefficient (t, b), an inclusion logit, a mean and a scale.

Network (:class:`CoefficientNet`): LayerNorm -> Linear -> GELU shared trunk, then one linear layer to ``3 K``
outputs. The prototype used three separate two-layer heads; one shared trunk costs a third of the compute, and the
three parameters of one coefficient are naturally correlated (a coefficient that matters has a large |mean|, high
inclusion and a small relative scale). The output layer starts at zero weights with biases set so that step 0 is a
known solution: ``loc = init_loc`` (0: theta_0, the zero-shot model), ``scale = init_scale``,
``inclusion = init_inclusion`` for every input.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_tvc.models.distributions import SpikeAndSlab
from pyro_tvc.models.vtvc import COEF_SITE



class CoefficientNet(nn.Module):
    """``features [N, D] -> (inclusion_logits, loc, scale)``, each ``[N, K]``."""

    def __init__(self, feature_dim: int, num_coefficients: int, hidden: int = 256, init_inclusion: float = 0.5,
                 init_loc: float = 0.0, init_scale: float = 0.05, max_scale: float = 0.2):
        super().__init__()
        if not 0 < init_scale < max_scale:
            raise ValueError(f"need 0 < init_scale < max_scale, got {init_scale} and {max_scale}")
        self.num_coefficients, self.max_scale = num_coefficients, max_scale
        self.trunk = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU())
        self.out = nn.Linear(hidden, 3 * num_coefficients)
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            bias = self.out.bias.view(3, num_coefficients)
            bias[0] = math.log(init_inclusion / (1 - init_inclusion))
            bias[1] = init_loc
            bias[2] = math.log(init_scale / (max_scale - init_scale))  # sigmoid^-1(init_scale / max_scale)

    def forward(self, features: torch.Tensor):
        logits, loc, raw_scale = self.out(self.trunk(features)).unflatten(-1, (3, self.num_coefficients)).unbind(-2)
        # A smooth cap on the posterior scale restricts the family (the ELBO stays a valid bound): without it Adam
        # drives sigma towards the prior's scale on every coefficient the single label of an input cannot inform,
        # and Monte-Carlo draws of 448 coefficients wreck the composed network (docs/inference.md).
        return logits, loc, self.max_scale * torch.sigmoid(raw_scale)


class AmortizedGuide(nn.Module):
    """Base: holds the network, registers it with Pyro, and opens the same plate as the model."""

    def __init__(self, feature_dim: int, num_tasks: int, num_blocks: int, hidden: int = 256,
                 init_inclusion: float = 0.5, init_loc: float = 0.0, init_scale: float = 0.05, max_scale: float = 0.2,
                 name: str = "guide"):
        super().__init__()
        self.num_tasks, self.num_blocks, self.name = num_tasks, num_blocks, name
        self.net = CoefficientNet(feature_dim, num_tasks * num_blocks, hidden, init_inclusion, init_loc, init_scale,
                                  max_scale)

    def posterior(self, features: torch.Tensor) -> dist.Distribution:
        """``q(lambda | x)`` with batch shape ``[N]`` and event shape ``[K]``."""
        raise NotImplementedError

    def sampling_distribution(self, features: torch.Tensor) -> dist.Distribution:
        """The distribution the guide samples from in training (the posterior unless a subclass gates it)."""
        return self.posterior(features)

    def forward(self, inputs, features, labels=None, *, likelihood=None, num_data: int, indices=None, prior=None,
                kl_weight: float = 1.0):
        pyro.module(self.name, self)
        n = features.shape[0]
        with pyro.plate("data", num_data, subsample=indices if indices is not None else torch.arange(n)):
            with poutine.scale(scale=kl_weight):
                return pyro.sample(COEF_SITE, self.sampling_distribution(features))

    @torch.no_grad()
    def point_estimate(self, features: torch.Tensor) -> torch.Tensor:
        """A deterministic ``lambda [N, T, B]`` for single-model prediction."""
        raise NotImplementedError


class AmortizedSpikeSlabGuide(AmortizedGuide):
    """``q(lambda | x) = prod_k (1 - gamma_k(x)) delta_0 + gamma_k(x) Normal(mu_k(x), sigma_k(x))``."""

    def __init__(self, *args, estimator: str = "straight_through", temperature: float = 0.5, **kw):
        super().__init__(*args, **kw)
        self.estimator, self.temperature = estimator, temperature

    def posterior(self, features):
        logits, loc, scale = self.net(features)
        return SpikeAndSlab(logits, loc, scale, estimator=self.estimator, temperature=self.temperature)

    @torch.no_grad()
    def point_estimate(self, features):
        """Posterior median of each coefficient: ``mu`` where ``gamma > 1/2``, else exactly 0."""
        logits, loc, _ = self.net(features)
        return torch.where(logits > 0, loc, torch.zeros_like(loc)).unflatten(-1, (self.num_tasks, self.num_blocks))


class AmortizedGaussianGuide(AmortizedGuide):
    """Gaussian ``q(lambda | x)`` (no spike), for the Gaussian-prior ablation."""

    def posterior(self, features):
        _, loc, scale = self.net(features)
        return dist.Normal(loc, scale).to_event(1)

    @torch.no_grad()
    def point_estimate(self, features):
        return self.net(features)[1].unflatten(-1, (self.num_tasks, self.num_blocks))


class AmortizedPointGuide(AmortizedGuide):
    """``q = delta(mu(x))``: the deterministic sample-specific meta-net baseline (MAP under the prior)."""

    def posterior(self, features):
        return dist.Delta(self.net(features)[1]).to_event(1)

    @torch.no_grad()
    def point_estimate(self, features):
        return self.net(features)[1].unflatten(-1, (self.num_tasks, self.num_blocks))
