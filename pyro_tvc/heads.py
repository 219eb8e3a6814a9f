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
        self.stacked_weight, self.valid = weight, valid
        self.scale = torch.tensor([h.logit_scale for h in heads], device=weight.device, dtype=weight.dtype)
        self._task_ids: torch.Tensor | None = None

    @property
    def num_classes_max(self) -> int:
        return self.stacked_weight.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """``[C, D]`` class embeddings of the single head (as :class:`ZeroShotHead`); a mixed-task head has no single
        class-embedding matrix (use :meth:`label_embeddings`)."""
        if len(self.names) != 1:
            raise AttributeError("MultiHead of several tasks has no single weight; use label_embeddings(labels)")
        return self.stacked_weight[0]

    def label_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` class embedding of each row's label under its own task's head (ids set by :meth:`using`)."""
        ids = self._task_ids if self._task_ids is not None else torch.zeros_like(labels)
        return self.stacked_weight[ids, labels]

    def to(self, device) -> "MultiHead":
        self.stacked_weight, self.valid = self.stacked_weight.to(device), self.valid.to(device)
        self.scale = self.scale.to(device)
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
        logits = self.scale[ids, None] * torch.einsum("nd,ncd->nc", F.normalize(features, dim=-1),
                                                      self.stacked_weight[ids])
        return logits.masked_fill(~self.valid[ids], PAD_LOGIT)
