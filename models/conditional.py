"""Conditional-prior VTVC model: the prior over an input's coefficients depends on the input.

Generative story (Bayesian core v2, issue 11; the conditional-VAE form of variational meta-learning):

    lambda_i ~ p(lambda | x_i) = SpikeAndSlab(prior_net(f(x_i; theta_0)))     [K = T * B]
    y_i      ~ likelihood(x_i, lambda_i)

The prior network reads the pre-trained feature and outputs, per coefficient, an inclusion logit, a mean and a scale
(capped at ``max_scale``); its weights are model parameters fitted by SVI (empirical Bayes). Predictions come from
``p(lambda | x)``; the posterior ``q(lambda | x, y)`` (guides/conditional.py) also reads the label in training, and
the KL between the two is the exact spike-and-slab KL of :func:`pyro_tvc.models.spike_and_slab_kl`. Per input the
ELBO charges only the information the *label* adds beyond ``p(lambda | x)``, which one label can pay for; an
unconditional prior charges all of the per-input signal (hundreds of nats, docs/inference.md).

The network is owned by the guide object, which offers the model as ``guide.model`` (as in Pyro's CVAE example:
model and guide share ``prior_net``); :func:`conditional_prior_model` takes it explicitly.
"""
from __future__ import annotations

import math
from typing import Callable

import pyro
import torch
from pyro import poutine
from torch import nn

from pyro_tvc.models.distributions import SpikeAndSlab
from pyro_tvc.models.vtvc import COEF_SITE, PriorConfig, _observe


class ConditionalPriorNet(nn.Module):
    """``features [N, D] -> (inclusion_logits, loc, scale)``, each ``[N, K]``: the parameters of ``p(lambda | x)``.

    LayerNorm -> Linear -> GELU trunk, one linear output layer with zero weights and biases set so that step 0 is a
    known solution for every input: inclusion ``init_inclusion``, loc 0 (theta_0, the zero-shot model), scale
    ``init_scale``. Scale is ``max_scale * sigmoid(.)``: MC draws of hundreds of coefficients with large scales wreck
    the composed network (docs/inference.md), and the prior's scale is learned, not fixed.
    Raises ValueError unless ``0 < init_inclusion < 1`` and ``0 < init_scale < max_scale``.
    """

    def __init__(self, feature_dim: int, num_coefficients: int, hidden: int = 256, init_inclusion: float = 0.5,
                 init_scale: float = 0.02, max_scale: float = 0.1):
        super().__init__()
        if not 0.0 < init_inclusion < 1.0:
            raise ValueError(f"init_inclusion (prior inclusion probability) must be in (0, 1), got {init_inclusion}")
        if not 0 < init_scale < max_scale:
            raise ValueError(f"need 0 < init_scale < max_scale, got {init_scale} and {max_scale}")
        self.num_coefficients, self.max_scale = num_coefficients, max_scale
        self.trunk = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU())
        self.out = nn.Linear(hidden, 3 * num_coefficients)
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            bias = self.out.bias.view(3, num_coefficients)
            bias[0] = math.log(init_inclusion / (1 - init_inclusion))
            bias[1] = 0.0
            bias[2] = math.log(init_scale / (max_scale - init_scale))

    def hidden_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.trunk(features)

    def raw(self, hidden: torch.Tensor):
        """Unconstrained ``(inclusion_logits, loc, scale_logit)`` from the trunk's output."""
        return self.out(hidden).unflatten(-1, (3, self.num_coefficients)).unbind(-2)

    def constrain(self, logits, loc, scale_logit):
        return logits, loc, self.max_scale * torch.sigmoid(scale_logit)

    def forward(self, features: torch.Tensor):
        return self.constrain(*self.raw(self.hidden_features(features)))


def conditional_prior_model(inputs: torch.Tensor, features: torch.Tensor, labels: torch.Tensor | None, *,
                            likelihood: Callable, num_data: int, indices: torch.Tensor | None = None,
                            prior: PriorConfig = PriorConfig(), kl_weight: float = 1.0,
                            prior_net: ConditionalPriorNet | None = None,
                            register_as: str | None = "conditional_prior") -> None:
    """``lambda_i ~ p(lambda | x_i)``, ``y_i ~ likelihood(x_i, lambda_i)`` (module docstring).

    Args: as :func:`pyro_tvc.models.vtvc_model` (``prior`` is unused: the prior is the network's output);
    ``prior_net``: the :class:`ConditionalPriorNet`, registered with ``pyro.module(register_as, prior_net)``; None
    when the caller has registered it already (the guide that owns it registers itself, prior network included,
    under one name in both model and guide, so each parameter exists once in the param store).
    Raises ValueError without ``prior_net``.
    """
    if prior_net is None:
        raise ValueError("conditional_prior_model needs prior_net (use the model offered by its guide: guide.model)")
    T, B = likelihood.num_tasks, likelihood.num_blocks
    n = inputs.shape[0]
    if register_as is not None:
        pyro.module(register_as, prior_net)
    logits, loc, scale = prior_net(features)
    with pyro.plate("data", num_data, subsample=indices if indices is not None else torch.arange(n)):
        with poutine.scale(scale=kl_weight):
            lam = pyro.sample(COEF_SITE, SpikeAndSlab(logits, loc, scale))
        _observe(likelihood, inputs, lam.reshape(*lam.shape[:-1], T, B), labels)
