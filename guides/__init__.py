"""VTVC Pyro guides (importable as ``pyro_tvc.guides``)."""
from pyro_tvc.guides.amortized import (AmortizedGaussianGuide, AmortizedGuide, AmortizedPointGuide,
                                       AmortizedSpikeSlabGuide, CoefficientNet)
from pyro_tvc.guides.gated import GateConfig, GatedSpikeAndSlab, GatedSpikeSlabGuide, gate_masks
from pyro_tvc.guides.task_level import TaskLevelGuide
from pyro_tvc.guides.hierarchical import HierarchicalGuide
from pyro_tvc.guides.conditional import ConditionalGuide

__all__ = ["AmortizedGuide", "AmortizedSpikeSlabGuide", "AmortizedGaussianGuide", "AmortizedPointGuide",
           "CoefficientNet", "GateConfig", "GatedSpikeAndSlab", "GatedSpikeSlabGuide", "gate_masks", "TaskLevelGuide",
           "HierarchicalGuide", "ConditionalGuide"]
