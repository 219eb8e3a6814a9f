"""Guide for the conditional-prior model (models/conditional.py): a residual, label-aware posterior.

    p(lambda | x)    = SpikeAndSlab(l_p(x), mu_p(x), sigma_p(x))                      the model's prior network
    q(lambda | x, y) = SpikeAndSlab(l_p + c dl, mu_p + c dmu, cap * sigmoid(r_p + c dr))   (dl, dmu, dr) = shift(x, e_y)

The shift network reads the normalised feature, the label's class embedding ``e_y`` (row y of the frozen zero-shot
head's weight, in the same space as the feature, so no per-class parameters are needed and any number of classes
works) and their product. Its output layer starts at zero, so ``q = p`` at step 0 (KL exactly 0), and its output is
multiplied by ``shift_multiplier`` c: Adam's step is invariant to the gradient's scale, so c scales the shift's
effective learning rate relative to the prior network's. Why a residual and a small c (issue 11): a separate
posterior network drifted far from the prior under Adam at lr 1e-2 relative to the capped scales, the KL exploded,
and switching every gate off became the cheapest escape; a residual posterior with a 100x smaller step did not.

Labels: training needs them (q reads y); without labels (``pyro.infer.Predictive`` for prediction, under
``torch.no_grad``) q falls back to the prediction distribution ``p(lambda | x)``. ``labels=None`` while the module is
in training mode and gradients are enabled is an error (a training step that would silently fit q = p).

This guide owns the prior network and offers the model as :meth:`ConditionalGuide.model`; both register the whole
module under ``name``. The optional gate acts on q in training and on ``p(lambda | x)`` for prediction.
"""
from __future__ import annotations

import pyro
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from pyro_tvc.guides.gated import GateConfig, GatedSpikeAndSlab, gate_masks
from pyro_tvc.models.conditional import ConditionalPriorNet, conditional_prior_model
from pyro_tvc.models.distributions import SpikeAndSlab
from pyro_tvc.models.vtvc import COEF_SITE


def class_embeddings(likelihood) -> torch.Tensor:
    """``[C, D]`` label embeddings: the frozen head's class weights (``likelihood.head.weight``)."""
    weight = getattr(getattr(likelihood, "head", None), "weight", None)
    if weight is None:
        raise ValueError("the conditional guide reads labels through likelihood.head.weight [C, D]; this likelihood "
                         "has none")
    return weight


class ConditionalGuide(nn.Module):
    """Args: ``feature_dim`` D (= the head's class-embedding dim), ``num_tasks`` T, ``num_blocks`` B; ``hidden``
    width of both networks; ``init_inclusion``, ``init_scale``, ``max_scale``: the prior network's step-0 inclusion
    and scale and its scale cap; ``shift_multiplier`` c > 0; ``gate``: None or a :class:`GateConfig`.
    Raises ValueError on values outside those ranges."""

    def __init__(self, feature_dim: int, num_tasks: int, num_blocks: int, hidden: int = 256,
                 init_inclusion: float = 0.5, init_scale: float = 0.02, max_scale: float = 0.1,
                 shift_multiplier: float = 0.01, estimator: str = "straight_through", temperature: float = 0.5,
                 gate: GateConfig | None = None, name: str = "conditional"):
        super().__init__()
        if not shift_multiplier > 0:
            raise ValueError(f"shift_multiplier must be positive, got {shift_multiplier}")
        K = num_tasks * num_blocks
        self.num_tasks, self.num_blocks, self.name = num_tasks, num_blocks, name
        self.shift_multiplier, self.estimator, self.temperature, self.gate = (shift_multiplier, estimator,
                                                                              temperature, gate)
        self.prior_net = ConditionalPriorNet(feature_dim, K, hidden, init_inclusion, init_scale, max_scale)
        self.shift_trunk = nn.Sequential(nn.Linear(3 * feature_dim, hidden), nn.GELU())
        self.shift_out = nn.Linear(hidden, 3 * K)
        nn.init.zeros_(self.shift_out.weight)
        nn.init.zeros_(self.shift_out.bias)
        self.feature_norm = nn.LayerNorm(feature_dim, elementwise_affine=False)

    # --- the pieces ---------------------------------------------------------------------------------------------
    def prior_params(self, features: torch.Tensor):
        """``(inclusion_logits, loc, scale)`` of ``p(lambda | x)``, each ``[N, K]``."""
        return self.prior_net(features)

    def posterior_params(self, features: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor):
        """``(inclusion_logits, loc, scale)`` of ``q(lambda | x, y)``; ``embeddings [C, D]`` (see class_embeddings)."""
        raw = self.prior_net.raw(self.prior_net.hidden_features(features))
        f = self.feature_norm(features)
        e = F.normalize(embeddings[labels].to(f.dtype), dim=-1) * f.shape[-1] ** 0.5  # the feature's scale
        shift = self.shift_out(self.shift_trunk(torch.cat([f, e, f * e], -1))).unflatten(-1, (3, -1)).unbind(-2)
        return self.prior_net.constrain(*(r + self.shift_multiplier * s for r, s in zip(raw, shift)))

    def _params(self, features, labels, likelihood):
        if labels is None:
            if self.training and torch.is_grad_enabled():
                raise ValueError("the conditional guide needs labels in training (got labels=None with gradients "
                                 "on); for prediction call it under torch.no_grad() or after .eval()")
            return self.prior_params(features)
        return self.posterior_params(features, labels, class_embeddings(likelihood))

    # --- Pyro ---------------------------------------------------------------------------------------------------
    def forward(self, inputs, features, labels=None, *, likelihood=None, num_data: int, indices=None, prior=None,
                kl_weight: float = 1.0):
        pyro.module(self.name, self)
        n = features.shape[0]
        params = self._params(features, labels, likelihood)
        gated = self.gate is not None and self.gate.gate_in_training
        q = (GatedSpikeAndSlab(*params, self.gate, estimator=self.estimator, temperature=self.temperature) if gated
             else SpikeAndSlab(*params, estimator=self.estimator, temperature=self.temperature))
        with pyro.plate("data", num_data, subsample=indices if indices is not None else torch.arange(n)):
            with poutine.scale(scale=kl_weight):
                return pyro.sample(COEF_SITE, q)

    def model(self, inputs, features, labels, **kwargs):
        """The conditional-prior model whose prior network this guide owns (registered under the same name)."""
        pyro.module(self.name, self)
        return conditional_prior_model(inputs, features, labels, prior_net=self.prior_net, register_as=None, **kwargs)

    # --- gate and prediction (from p(lambda | x)) ---------------------------------------------------------------
    @torch.no_grad()
    def masks(self, features: torch.Tensor):
        """``(pruned, reliable)`` bool ``[N, T, B]`` of the gate on ``p(lambda | x)`` (default gate if none set)."""
        pruned, reliable = gate_masks(*self.prior_params(features), self.gate or GateConfig())
        shape = (self.num_tasks, self.num_blocks)
        return pruned.unflatten(-1, shape), reliable.unflatten(-1, shape)

    @torch.no_grad()
    def point_estimate(self, features: torch.Tensor) -> torch.Tensor:
        """``lambda [N, T, B]`` from ``p(lambda | x)``: hard gate if gated (reliable or unpruned with gamma > 1/2),
        else the median (``mu`` where ``gamma > 1/2``); exact 0 elsewhere."""
        logits, loc, scale = self.prior_params(features)
        keep = logits > 0
        if self.gate is not None:
            pruned, reliable = gate_masks(logits, loc, scale, self.gate)
            keep = reliable | (~pruned & keep)
        return torch.where(keep, loc, torch.zeros_like(loc)).unflatten(-1, (self.num_tasks, self.num_blocks))

    def posterior(self, features: torch.Tensor) -> SpikeAndSlab:
        """The prediction distribution ``p(lambda | x)`` (what Predictive draws without labels), ``[N]`` x ``[K]``."""
        return SpikeAndSlab(*self.prior_params(features), estimator=self.estimator, temperature=self.temperature)

    def sampling_distribution(self, features: torch.Tensor) -> SpikeAndSlab:
        """:meth:`posterior`, gated when the gate acts."""
        if self.gate is None or not self.gate.gate_in_training:
            return self.posterior(features)
        return GatedSpikeAndSlab(*self.prior_params(features), self.gate, estimator=self.estimator,
                                 temperature=self.temperature)

    @torch.no_grad()
    def kl_per_input(self, features, labels, likelihood) -> torch.Tensor:
        """``KL(q(lambda | x, y) || p(lambda | x))`` in nats, ``[N]``: how much the label moves the posterior."""
        q = SpikeAndSlab(*self.posterior_params(features, labels, class_embeddings(likelihood)))
        return torch.distributions.kl_divergence(q, SpikeAndSlab(*self.prior_params(features)))
