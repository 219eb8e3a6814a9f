"""VTVC Pyro models (importable as ``pyro_tvc.models``)."""
from pyro_tvc.models.distributions import SpikeAndSlab, spike_and_slab_kl
from pyro_tvc.models.vtvc import (COEF_SITE, OBS_SITE, ClassificationLikelihood, PriorConfig, gaussian_prior_model,
                                  task_level_model, vtvc_model)
from pyro_tvc.models.hierarchical import DEVIATION_SCALE_PARAM, GLOBAL_SITE, hierarchical_model
from pyro_tvc.models.conditional import ConditionalPriorNet, conditional_prior_model

__all__ = ["SpikeAndSlab", "spike_and_slab_kl", "COEF_SITE", "OBS_SITE", "ClassificationLikelihood", "PriorConfig",
           "vtvc_model", "gaussian_prior_model", "task_level_model", "GLOBAL_SITE", "DEVIATION_SCALE_PARAM",
           "hierarchical_model", "ConditionalPriorNet", "conditional_prior_model"]
