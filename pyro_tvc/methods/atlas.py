"""aTLAS (F. Z. Zhang et al., "Knowledge composition using task vectors with learned anisotropic scaling",
NeurIPS 2024; github fredzzhang/atlas): one learned coefficient per (task vector, parameter block), shared by
every input, ``theta = theta_0 + sum_tb lambda[t, b] tau[t, b]``, initialised at 0 (= zero-shot) and trained by
gradient descent on the learning split; the epoch with the best validation score is kept. Negation uses aTLAS's
loss ``-CE(target) + CE(control)`` and its selection rule (lowest target accuracy with the control >= 95 % of
zero-shot)."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from pyro_tvc.compose.engine import Composer
from pyro_tvc.methods.base import (ComposedPredictor, FitResult, MethodContext, TaskData, Timer, objective_loss,
                                   selection_score)
from pyro_tvc.runtime import progress


def epoch_batches(data: TaskData, batch_size: int, generator: torch.Generator) -> Iterator[TaskData]:
    order = torch.randperm(len(data), generator=generator).to(data.labels.device)
    for s in range(0, len(data), batch_size):
        yield data.subset(order[s:s + batch_size])


def merged_logits(composer: Composer, ctx: MethodContext, coef: torch.Tensor, batch: TaskData) -> torch.Tensor:
    """Logits of the task-level composition ``coef [T, B]`` on ``batch``, differentiable w.r.t. ``coef``."""
    feats = composer(batch.images, coef)
    with ctx.heads.using(batch.task_ids):
        return ctx.heads(feats)


def train_coefficients(ctx: MethodContext, composer: Composer, init: torch.Tensor, loss_fn: Callable,
                       epochs: int, lr: float, desc: str, clamp: tuple[float, float] | None = None,
                       select: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """Adam on task-level coefficients ``[T, B]``; after every epoch score them on ``ctx.select`` and keep the
    best (or the last when ``select`` is False). ``loss_fn(coef, batch) -> scalar``; ``clamp`` bounds the values."""
    coef = init.clone().requires_grad_(True)
    optim = torch.optim.Adam([coef], lr=lr)
    gen = torch.Generator().manual_seed(ctx.seed)
    best, history = None, []
    n_batches = -(-len(ctx.learn) // ctx.cfg.batch_size)
    bar = progress(total=epochs * n_batches, quiet=ctx.quiet, desc=desc)
    for epoch in range(epochs):
        for batch in epoch_batches(ctx.learn, ctx.cfg.batch_size, gen):
            optim.zero_grad()
            loss = loss_fn(coef, batch)
            loss.backward()
            optim.step()
            if clamp is not None:
                with torch.no_grad():
                    coef.clamp_(*clamp)
            bar.update(1)
        score = None
        if select:
            probs = ComposedPredictor(composer, ctx.heads, coef).probs(ctx.select)
            score = selection_score(ctx, probs, ctx.select)
        history.append({"epoch": epoch + 1, "val_score": score})
        if not select or (score is not None and (best is None or score > best[0])):
            best = (score, coef.detach().clone())
    bar.close()
    return (best[1] if best is not None else torch.zeros_like(init)), history


def fit(ctx: MethodContext) -> FitResult:
    with Timer() as timer:
        composer = Composer(ctx.encoder, ctx.bank)
        init = torch.zeros(composer.coefficient_shape, device=ctx.device, dtype=ctx.dtype)
        coef, history = train_coefficients(
            ctx, composer, init,
            lambda c, b: objective_loss(ctx, merged_logits(composer, ctx, c, b), b.labels, b.task_ids),
            ctx.cfg.epochs, ctx.cfg.atlas_lr, desc="aTLAS")
    learned = {"coefficient_mean": coef.mean().item(), "coefficient_abs_mean": coef.abs().mean().item(),
               "history": history}
    return FitResult({"single": ComposedPredictor(composer, ctx.heads, coef)}, learned, timer.seconds)


def register_all(register) -> None:
    from pyro_tvc.methods import Method

    register(Method("atlas", "aTLAS", fit, description="task-level per-block coefficients, gradient descent"))
