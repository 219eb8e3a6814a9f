"""Task-level mean-field spike-and-slab guide: one ``q(lambda [T, B])`` shared by every input (no amortization)."""
from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from torch.distributions import constraints

from pyro_tvc.models.distributions import SpikeAndSlab
from pyro_tvc.models.vtvc import COEF_SITE


class TaskLevelGuide:
    def __init__(self, num_tasks: int, num_blocks: int, init_inclusion: float = 0.5, init_loc: float = 0.0,
                 init_scale: float = 0.05, estimator: str = "straight_through", prefix: str = "task_level"):
        self.num_tasks, self.num_blocks, self.prefix = num_tasks, num_blocks, prefix
        K = num_tasks * num_blocks
        self.init = (torch.full((K,), math.log(init_inclusion / (1 - init_inclusion))), torch.full((K,), init_loc),
                     torch.full((K,), init_scale))
        self.estimator = estimator

    def params(self):
        logits = pyro.param(f"{self.prefix}_inclusion_logits", self.init[0].clone())
        loc = pyro.param(f"{self.prefix}_loc", self.init[1].clone())
        scale = pyro.param(f"{self.prefix}_scale", self.init[2].clone(), constraint=constraints.positive)
        return logits, loc, scale

    def posterior(self, features=None):
        return SpikeAndSlab(*self.params(), estimator=self.estimator)

    def __call__(self, inputs, features, labels=None, *, likelihood=None, num_data, indices=None, prior=None,
                 kl_weight: float = 1.0):
        with poutine.scale(scale=kl_weight):
            return pyro.sample(COEF_SITE, self.posterior())

    @torch.no_grad()
    def point_estimate(self, features=None):
        logits, loc, _ = self.params()
        return torch.where(logits > 0, loc, torch.zeros_like(loc)).reshape(self.num_tasks, self.num_blocks)
