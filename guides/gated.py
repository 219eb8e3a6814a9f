"""The gated guide: filter coefficients on importance and reliability before sampling.

Per coefficient, from the amortized posterior ``(gamma, mu, sigma)``:

* importance ``I = gamma * |mu|`` (expected magnitude), reliability ``cv = sigma / |mu|`` (coefficient of variation);
* **pruned**: ``I < importance_min`` -> exactly 0;
* **reliable**: not pruned, ``gamma >= inclusion_min`` and ``cv <= cv_max`` -> taken deterministically as ``mu``;
* otherwise **sampled** from the spike-and-slab posterior.

Unlike the prototype's rule (threshold ``tau0 (1 + beta tanh(cv))`` never above ``2 tau0``, so it called coefficients
with cv ~ 3 reliable), "reliable" here is an explicit cap on cv and a floor on gamma: a coefficient is used as its mean
only when its posterior really is concentrated and included. docs/gating.md gives the reasoning and measurements.

The gate is an *estimator* option, not a variational family: a point mass at ``mu`` has no density against the
slab, so the ELBO is always that of the ungated posterior (its KL is the exact mixture KL; its expected log
likelihood is estimated with gated draws, which is biased when the gate fires). The bias and variance of the
gated gradient are measured against the ungated estimator in benchmarks/gradient_variance.py. At test time the
hard gate gives one model per input with exact zeros (:meth:`GatedSpikeSlabGuide.point_estimate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import tyro

from pyro_tvc.guides.amortized import AmortizedSpikeSlabGuide
from pyro_tvc.models.distributions import SpikeAndSlab


@dataclass
class GateConfig:
    """Thresholds of the importance/reliability gate (docs/inference.md).

    Args:
        importance_min: A coefficient is pruned (exactly 0) when gamma * |mu| is below this.
        inclusion_min: Reliable needs inclusion probability gamma >= this.
        cv_max: Reliable needs a coefficient of variation sigma / |mu| <= this.
    """

    importance_min: float = 0.01
    inclusion_min: float = 0.9
    cv_max: float = 0.25
    # Switched off by infer.ungated for the unbiased estimator; not a user option.
    gate_in_training: Annotated[bool, tyro.conf.Suppress] = True


def gate_masks(logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, cfg: GateConfig):
    """Bool masks ``(pruned, reliable)`` of the shape of ``loc``; the rest are sampled."""
    gamma = torch.sigmoid(logits)
    importance = gamma * loc.abs()
    pruned = importance < cfg.importance_min
    reliable = ~pruned & (gamma >= cfg.inclusion_min) & (scale <= cfg.cv_max * loc.abs())
    return pruned, reliable


class GatedSpikeAndSlab(SpikeAndSlab):
    """Spike-and-slab whose draws are gated: pruned -> 0, reliable -> ``loc`` (gradient to ``loc`` kept).

    ``log_prob`` and the KL (registered for the parent class) are those of the ungated posterior."""

    def __init__(self, inclusion_logits, loc, scale, gate: GateConfig, **kw):
        super().__init__(inclusion_logits, loc, scale, **kw)
        self.gate = gate

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return GatedSpikeAndSlab(self.inclusion_logits.expand(shape), self.loc.expand(shape),
                                 self.scale.expand(shape), self.gate, estimator=self.estimator,
                                 temperature=self.temperature, validate_args=False)

    def masks(self):
        return gate_masks(self.inclusion_logits.detach(), self.loc.detach(), self.scale.detach(), self.gate)

    def rsample(self, sample_shape=torch.Size()):
        draw = super().rsample(sample_shape)
        pruned, reliable = self.masks()
        draw = torch.where(reliable, self.loc.expand_as(draw), draw)
        # Pruned coefficients are exactly 0 but keep the gradient of their draw (straight-through): a hard prune in
        # training blocks every gradient to them, and at initialisation (mu = 0) it prunes everything forever.
        return torch.where(pruned, draw - draw.detach(), draw)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)


class GatedSpikeSlabGuide(AmortizedSpikeSlabGuide):
    """Amortized spike-and-slab guide with the importance/reliability gate (see the module docstring)."""

    def __init__(self, *args, gate: GateConfig | None = None, **kw):
        super().__init__(*args, **kw)
        self.gate = gate or GateConfig()

    def sampling_distribution(self, features):
        if not self.gate.gate_in_training:
            return self.posterior(features)
        logits, loc, scale = self.net(features)
        return GatedSpikeAndSlab(logits, loc, scale, self.gate, estimator=self.estimator, temperature=self.temperature)

    @torch.no_grad()
    def masks(self, features):
        """``(pruned, reliable)`` bool ``[N, T, B]``."""
        pruned, reliable = gate_masks(*self.net(features), self.gate)
        shape = (self.num_tasks, self.num_blocks)
        return pruned.unflatten(-1, shape), reliable.unflatten(-1, shape)

    @torch.no_grad()
    def point_estimate(self, features):
        """Hard gate: ``mu`` for reliable coefficients and for unpruned ones with ``gamma > 1/2``; exact 0 otherwise."""
        logits, loc, scale = self.net(features)
        pruned, reliable = gate_masks(logits, loc, scale, self.gate)
        keep = reliable | (~pruned & (logits > 0))
        return torch.where(keep, loc, torch.zeros_like(loc)).unflatten(-1, (self.num_tasks, self.num_blocks))


@torch.no_grad()
def gate_statistics(guide, features: torch.Tensor) -> dict:
    """What the gate of ``guide`` (any guide with ``masks(features)`` and ``point_estimate(features)``) marks on the
    inputs ``features [N, D]``: fractions (0..1) of all coefficients pruned, reliable, sampled and included (nonzero
    in the single model), and the fraction of the included ones that are reliable (issue 11's measure). Masks of
    shape ``[T, B]`` (a task-level gate) count once per input."""
    pruned, reliable = guide.masks(features)
    included = guide.point_estimate(features) != 0
    pruned, reliable = pruned.expand_as(included), reliable.expand_as(included)
    n_included = included.sum().item()
    return {"gate_fraction_pruned": pruned.float().mean().item(),
            "gate_fraction_reliable": reliable.float().mean().item(),
            "gate_fraction_sampled": (~pruned & ~reliable).float().mean().item(),
            "gate_fraction_included": included.float().mean().item(),
            "gate_reliable_among_included": (reliable & included).sum().item() / n_included if n_included else None}
