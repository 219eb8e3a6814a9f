"""Registry of inference variants: a Pyro model paired with the guide that fits it.

``pyro-tvc train --guide NAME`` (and every VTVC-family method of ``pyro-tvc benchmark``) looks the name up here, so a
new model or guide is one :func:`register` call next to its definition, not an edit of the training loop.

A guide built by ``build_guide(feature_dim, num_tasks, num_blocks, cfg)`` must be callable as
``guide(inputs, features, labels, *, likelihood, num_data, indices, prior, kl_weight)`` (the model's signature) and
offer ``point_estimate(features) -> lambda [N, T, B]`` or ``[T, B]`` for single-model prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Variant:
    """``model``: Pyro model; ``build_guide(D, T, B, cfg)``: the guide; ``default_kl_weight``: the KL weight used
    when the config leaves it unset (1 = the true ELBO); ``has_gate``: the guide has an importance/reliability gate
    (so gated and ungated predictions differ); ``per_input``: coefficients differ per input."""

    name: str
    model: Callable
    build_guide: Callable[[int, int, int, Any], Any]
    default_kl_weight: float = 1.0
    has_gate: bool = False
    per_input: bool = True
    point_only: bool = False  # a point estimate, not a posterior: no ELBO, no MC spread
    description: str = ""


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in VARIANTS:
        raise ValueError(f"inference variant {variant.name!r} is already registered")
    VARIANTS[variant.name] = variant
    return variant


def get_variant(name: str) -> Variant:
    _register_builtin()
    if name not in VARIANTS:
        raise ValueError(f"unknown guide {name!r}; known: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name]


def variant_names() -> list[str]:
    _register_builtin()
    return sorted(VARIANTS)


_BUILTIN_DONE = False


def _register_builtin() -> None:
    """The first-generation variants (docs/inference.md); later ones register from their own modules."""
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    from pyro_tvc.guides import (AmortizedGaussianGuide, AmortizedPointGuide, AmortizedSpikeSlabGuide,
                                 GatedSpikeSlabGuide, TaskLevelGuide)
    from pyro_tvc.models import gaussian_prior_model, task_level_model, vtvc_model

    def amortized(cls, **extra):
        def build(D, T, B, cfg):
            return cls(D, T, B, hidden=cfg.hidden, init_scale=cfg.init_scale, max_scale=cfg.max_scale,
                       init_inclusion=cfg.inclusion_prob, **{k: getattr(cfg, v) for k, v in extra.items()})
        return build

    register(Variant("gated", vtvc_model, amortized(GatedSpikeSlabGuide, gate="gate"), default_kl_weight=1e-3,
                     has_gate=True, description="spike-and-slab prior, amortized posterior with the gate (VTVC)"))
    register(Variant("spike_slab", vtvc_model, amortized(AmortizedSpikeSlabGuide), default_kl_weight=1e-3,
                     description="spike-and-slab prior, amortized posterior, no gate (VTVC ungated)"))
    register(Variant("point", vtvc_model, amortized(AmortizedPointGuide), default_kl_weight=1e-3, point_only=True,
                     description="deterministic sample-specific meta-net (MAP under the prior)"))
    register(Variant("gaussian", gaussian_prior_model, amortized(AmortizedGaussianGuide), default_kl_weight=1e-3,
                     description="ablation: Gaussian prior and posterior instead of spike-and-slab"))
    register(Variant("task_level", task_level_model,
                     lambda D, T, B, cfg: TaskLevelGuide(T, B, init_scale=cfg.init_scale,
                                                         init_inclusion=cfg.inclusion_prob),
                     default_kl_weight=1e-3, per_input=False,
                     description="one spike-and-slab posterior for all inputs (task-level variational composition)"))
    # Second-generation models register themselves on import (Bayesian core v2).
    try:
        import pyro_tvc.models.v2_registry  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "pyro_tvc.models.v2_registry":
            raise
