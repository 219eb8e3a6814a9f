"""Individually fine-tuned: each input goes through its own task's fine-tuned encoder ``theta_0 + tau_task``
(the upper bound of target composition and the normaliser of task addition)."""
from __future__ import annotations

import torch

from pyro_tvc.compose.engine import Composer
from pyro_tvc.methods.base import ComposedPredictor, FitResult, MethodContext, Predictor, TaskData

CHUNK = 512  # inputs per forward: a streamed split is decoded a chunk at a time


class FinetunedPredictor(Predictor):
    """Routes the inputs of head-task ``t`` through ``theta_0 + tau_t``; tasks without a vector get NaN rows."""

    def __init__(self, ctx: MethodContext):
        if ctx.own_bank is None:
            raise ValueError("fine-tuned: no task has its own prepared task vector")
        self.composer = Composer(ctx.encoder, ctx.own_bank)
        self.heads, self.own = ctx.heads, list(ctx.own_bank.task_names)

    @torch.no_grad()
    def probs(self, data: TaskData) -> torch.Tensor:
        out = torch.full((len(data), self.heads.num_classes_max), float("nan"), device=data.labels.device,
                         dtype=self.heads.stacked_weight.dtype)
        T, B = self.composer.coefficient_shape
        for t, name in enumerate(self.heads.names):
            rows = torch.nonzero(data.task_ids == t).squeeze(-1)
            if name not in self.own or not len(rows):
                continue
            coef = torch.zeros(T, B, device=out.device, dtype=next(self.composer.module.parameters()).dtype)
            coef[self.own.index(name)] = 1.0
            predictor = ComposedPredictor(self.composer, self.heads, coef)
            for chunk in rows.split(CHUNK):  # a streamed split is decoded a chunk at a time, never whole
                out[chunk] = predictor.probs(data.subset(chunk))
        return out


def fit(ctx: MethodContext) -> FitResult:
    return FitResult({"single": FinetunedPredictor(ctx)})


def register_all(register) -> None:
    from pyro_tvc.methods import Method

    register(Method("finetuned", "Fine-tuned", fit, protocols=("target", "addition"), learned=False,
                    description="each task's own fine-tuned encoder (upper bound)"))
