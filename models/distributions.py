"""The spike-and-slab family with an exact atom at zero, and its closed-form KL.

``SpikeAndSlab(inclusion_logits, loc, scale)`` over ``lambda [..., K]`` (event dim 1, built in rather than through
``.to_event``, which would drop the custom ``score_parts``):

    p(lambda_k) = (1 - gamma_k) delta_0(lambda_k) + gamma_k Normal(lambda_k; loc_k, scale_k),  gamma = sigmoid(logits)

Its density is taken w.r.t. (counting measure at 0) + Lebesgue: ``log(1 - gamma)`` at exactly 0 and
``log gamma + log Normal`` elsewhere, so log q - log p is a valid log density ratio between two members.

Sampling estimators (``estimator=``):

* ``"straight_through"`` (default, for training): ``rsample`` draws a *hard* Bernoulli gate through Gumbel noise
  (so the loss value is an unbiased ELBO estimate and the value has exact zeros) and passes gradients through the
  relaxed sigmoid ``sigmoid((logit + noise) / temperature)``: the gradient of the inclusion logits is biased.
* ``"score_function"``: the gate is not reparameterised; ``score_parts`` carries ``log Bernoulli(z)`` as its
  score-function term, so ``Trace_ELBO`` gives unbiased (high-variance) gate gradients. The reference in tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from pyro.distributions.score_parts import ScoreParts
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import broadcast_all

ESTIMATORS = ("straight_through", "score_function")


class SpikeAndSlab(TorchDistribution):
    arg_constraints = {"inclusion_logits": constraints.real, "loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector

    def __init__(self, inclusion_logits, loc, scale, estimator: str = "straight_through", temperature: float = 0.5,
                 validate_args=None):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.inclusion_logits, self.loc, self.scale = broadcast_all(inclusion_logits, loc, scale)
        if self.loc.ndim < 1:
            raise ValueError("SpikeAndSlab needs at least one (event) dimension: parameters of shape [..., K]")
        self.estimator, self.temperature = estimator, temperature
        shape = self.loc.shape
        super().__init__(batch_shape=shape[:-1], event_shape=shape[-1:], validate_args=validate_args)

    @property
    def has_rsample(self) -> bool:
        # Both modes reparameterise the slab; only straight-through also (approximately) reparameterises the gate.
        return self.estimator == "straight_through"

    @property
    def inclusion_prob(self) -> torch.Tensor:
        return torch.sigmoid(self.inclusion_logits)

    @property
    def mean(self) -> torch.Tensor:
        return self.inclusion_prob * self.loc

    @property
    def variance(self) -> torch.Tensor:
        g = self.inclusion_prob
        return g * (self.scale ** 2 + self.loc ** 2) - (g * self.loc) ** 2

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return SpikeAndSlab(self.inclusion_logits.expand(shape), self.loc.expand(shape), self.scale.expand(shape),
                            self.estimator, self.temperature, validate_args=False)

    def _gate_and_slab(self, sample_shape):
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-12, 1 - 1e-12)
        noisy = self.inclusion_logits + (u.log() - (-u).log1p())  # logistic noise: P(noisy > 0) = gamma
        hard = (noisy > 0).to(self.loc.dtype)
        slab = self.loc + self.scale * torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return noisy, hard, slab

    def sample(self, sample_shape=torch.Size()):
        if self.estimator == "score_function":
            # Partially reparameterised: Pyro calls sample() when has_rsample is False, and the slab must still
            # carry its pathwise gradient; the gate's gradient comes from score_parts.
            return self.rsample(sample_shape)
        with torch.no_grad():
            _, hard, slab = self._gate_and_slab(sample_shape)
            return hard * slab

    def rsample(self, sample_shape=torch.Size()):
        noisy, hard, slab = self._gate_and_slab(sample_shape)
        if self.estimator == "score_function":
            return hard * slab  # gradients reach loc/scale only; the gate is scored in score_parts
        soft = torch.sigmoid(noisy / self.temperature)
        gate = hard + (soft - soft.detach())  # value exactly 0/1; gradient of the relaxed gate
        return gate * slab

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        is_zero = value == 0
        slab = -((value - self.loc) ** 2) / (2 * self.scale ** 2) - self.scale.log() - 0.5 * math.log(2 * math.pi)
        lp = torch.where(is_zero, F.logsigmoid(-self.inclusion_logits), F.logsigmoid(self.inclusion_logits) + slab)
        return lp.sum(-1)

    def score_parts(self, value):
        log_prob = self.log_prob(value)
        if self.estimator == "straight_through":
            return ScoreParts(log_prob=log_prob, score_function=0, entropy_term=log_prob)
        included = (value != 0).to(self.loc.dtype)
        gate_log_prob = -F.binary_cross_entropy_with_logits(self.inclusion_logits, included, reduction="none").sum(-1)
        return ScoreParts(log_prob=log_prob, score_function=gate_log_prob, entropy_term=log_prob)


def spike_and_slab_kl(q: SpikeAndSlab, p: SpikeAndSlab) -> torch.Tensor:
    """Exact KL between two spike-and-slab mixtures sharing the atom at 0, summed over the event dim:
    ``KL_Bernoulli(gamma_q || gamma_p) + gamma_q * KL(Normal(mu_q, s_q) || Normal(mu_p, s_p))``."""
    gq = torch.sigmoid(q.inclusion_logits)
    log_gq, log_1m_gq = F.logsigmoid(q.inclusion_logits), F.logsigmoid(-q.inclusion_logits)
    log_gp, log_1m_gp = F.logsigmoid(p.inclusion_logits), F.logsigmoid(-p.inclusion_logits)
    kl_gate = gq * (log_gq - log_gp) + (1 - gq) * (log_1m_gq - log_1m_gp)
    var_ratio = (q.scale / p.scale) ** 2
    kl_slab = 0.5 * (var_ratio + ((q.loc - p.loc) / p.scale) ** 2 - 1 - var_ratio.log())
    return (kl_gate + gq * kl_slab).sum(-1)


register_kl(SpikeAndSlab, SpikeAndSlab)(spike_and_slab_kl)
