"""Classification heads for batches that mix tasks (task addition: each input is scored by its own task's head).

:class:`MultiHead` pads every task's logits to the largest class count with a large negative value, so one
``Categorical`` covers a mixed batch and the padded classes get probability ~0 (exp(-1e4) underflows to 0).
Which head scores which input is set for the duration of a step with :meth:`MultiHead.using`, because the Pyro
model only passes features to the head; Monte-Carlo draws folded into the batch (``[S * N]`` rows) reuse the ids.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from pyro_tvc.backbones import ZeroShotHead

PAD_LOGIT = -1e4


class MultiHead:
    """Frozen zero-shot heads of several tasks.

    Args:
        heads: one :class:`ZeroShotHead` per task (``weight [C_t, D]``), in task-id order.
        names: the tasks' names (same order).
    """

    def __init__(self, heads: list[ZeroShotHead], names: list[str]):
        if not heads or len(heads) != len(names):
            raise ValueError(f"MultiHead needs one head per task name, got {len(heads)} heads for {len(names)} names")
        self.names = list(names)
        self.num_classes = [h.weight.shape[0] for h in heads]
        cmax, dim = max(self.num_classes), heads[0].weight.shape[1]
        weight = torch.zeros(len(heads), cmax, dim, device=heads[0].weight.device, dtype=heads[0].weight.dtype)
        valid = torch.zeros(len(heads), cmax, dtype=torch.bool, device=weight.device)
        for t, h in enumerate(heads):
            weight[t, :h.weight.shape[0]] = h.weight
            valid[t, :h.weight.shape[0]] = True
        self.weight, self.valid = weight, valid
        self.scale = torch.tensor([h.logit_scale for h in heads], device=weight.device, dtype=weight.dtype)
        self._task_ids: torch.Tensor | None = None

    def to(self, device) -> "MultiHead":
        self.weight, self.valid, self.scale = self.weight.to(device), self.valid.to(device), self.scale.to(device)
        return self

    @contextlib.contextmanager
    def using(self, task_ids: torch.Tensor | None):
        """Score the next calls' rows with the heads of ``task_ids [N]`` (None: every row uses head 0)."""
        previous, self._task_ids = self._task_ids, task_ids
        try:
            yield self
        finally:
            self._task_ids = previous

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """``features [M, D]`` -> logits ``[M, C_max]``; M may be a multiple of the ids' length (folded draws)."""
        n = features.shape[0]
        ids = self._task_ids
        if ids is None:
            ids = torch.zeros(n, dtype=torch.long, device=features.device)
        elif n != ids.shape[0]:
            if n % ids.shape[0]:
                raise ValueError(f"MultiHead: {n} feature rows for {ids.shape[0]} task ids")
            ids = ids.repeat(n // ids.shape[0])
        logits = self.scale[ids, None] * torch.einsum("nd,ncd->nc", F.normalize(features, dim=-1), self.weight[ids])
        return logits.masked_fill(~self.valid[ids], PAD_LOGIT)
