"""Bayesian core v2 variants (issue 11), registered in :mod:`pyro_tvc.variants` on its first use.

Each guide here owns or configures its model and offers it as ``guide.model`` (the conditional prior network is a
model parameter that the residual posterior also reads); ``Variant.model`` is the plain model function for code that
calls it directly. Hyper-parameters read from the training config (with these defaults when a field is absent):

* ``deviation_scale`` (float, 0.05): initial s of ``delta_i ~ Normal(0, s^2)``, learned by type-II ML; > 0.
* ``deviation_per`` (str, "block"): one s per task and block (``block``) or per task (``task``).
* ``global_step_multiplier`` (float, 10.0): effective-learning-rate multiplier of ``q(Lambda)``'s parameters.
* ``shift_multiplier`` (float, 0.01): effective-learning-rate multiplier of the conditional posterior's label shift.
"""
from __future__ import annotations

from pyro_tvc.guides.conditional import ConditionalGuide
from pyro_tvc.guides.hierarchical import HierarchicalGuide
from pyro_tvc.models.conditional import conditional_prior_model
from pyro_tvc.models.hierarchical import hierarchical_model
from pyro_tvc.variants import Variant, register


def _hierarchical(gated: bool):
    def build(D, T, B, cfg):
        return HierarchicalGuide(D, T, B, hidden=cfg.hidden, init_inclusion=cfg.inclusion_prob,
                                 init_scale=cfg.init_scale, max_scale=cfg.max_scale,
                                 deviation_scale=getattr(cfg, "deviation_scale", 0.05),
                                 deviation_per=getattr(cfg, "deviation_per", "block"),
                                 global_step_multiplier=getattr(cfg, "global_step_multiplier", 10.0),
                                 gate=cfg.gate if gated else None)
    return build


def _conditional(gated: bool):
    def build(D, T, B, cfg):
        return ConditionalGuide(D, T, B, hidden=cfg.hidden, init_inclusion=cfg.inclusion_prob,
                                init_scale=cfg.init_scale, max_scale=cfg.max_scale,
                                shift_multiplier=getattr(cfg, "shift_multiplier", 0.01),
                                gate=cfg.gate if gated else None)
    return build


register(Variant("hierarchical", hierarchical_model, _hierarchical(False), default_kl_weight=1.0,
                 description="task-level spike-and-slab Lambda shared by all inputs + per-input deviations "
                             "(learned scale); true ELBO"))
register(Variant("hierarchical_gated", hierarchical_model, _hierarchical(True), default_kl_weight=1.0, has_gate=True,
                 description="hierarchical prior, gate on the task-level posterior q(Lambda); true ELBO"))
register(Variant("conditional", conditional_prior_model, _conditional(False), default_kl_weight=1.0,
                 description="conditional prior p(lambda|x), residual posterior q(lambda|x,y) reading the label; "
                             "true ELBO"))
register(Variant("conditional_gated", conditional_prior_model, _conditional(True), default_kl_weight=1.0,
                 has_gate=True, description="conditional prior with the gate (on q in training, on p for prediction); "
                                            "true ELBO"))
