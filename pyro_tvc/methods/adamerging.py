"""AdaMerging (Yang et al., "AdaMerging: adaptive model merging for multi-task learning", ICLR 2024; github
EnnengYang/AdaMerging), layer-wise: one coefficient per (task vector, parameter block), initialised at 0.3 and
learned without labels by minimising the Shannon entropy of the merged model's predictions on the unlabeled test
inputs (Adam, lr 1e-3, 500 steps, 16 inputs per task per step, coefficients clipped to [0, 1] as in their code).
Serves target composition and task addition (it has no negation objective)."""
from __future__ import annotations

import torch

from pyro_tvc.compose.engine import Composer
from pyro_tvc.methods.atlas import merged_logits
from pyro_tvc.methods.base import ComposedPredictor, FitResult, MethodContext, TaskData, Timer
from pyro_tvc.runtime import progress

PER_TASK_BATCH = 16


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over inputs of ``H(softmax(logits)) = -sum_c p_c log p_c`` in nats; ``logits [N, C] -> []``."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def balanced_batch(data: TaskData, per_task: int, generator: torch.Generator) -> TaskData:
    """``per_task`` random inputs of every task present in ``data`` (with replacement when a task has fewer)."""
    parts = []
    for t in torch.unique(data.task_ids).tolist():
        rows = torch.nonzero(data.task_ids == t).squeeze(-1).cpu()
        pick = rows[torch.randint(len(rows), (per_task,), generator=generator)]
        parts.append(pick)
    return data.subset(torch.cat(parts).to(data.labels.device))


def fit(ctx: MethodContext) -> FitResult:
    with Timer() as timer:
        composer = Composer(ctx.encoder, ctx.bank)
        coef = torch.full(composer.coefficient_shape, ctx.cfg.adamerging_init, device=ctx.device,
                          dtype=ctx.dtype, requires_grad=True)
        optim = torch.optim.Adam([coef], lr=ctx.cfg.adamerging_lr)
        gen = torch.Generator().manual_seed(ctx.seed)
        trace = []
        for _ in progress(range(ctx.cfg.adamerging_steps), quiet=ctx.quiet, desc="AdaMerging"):
            batch = balanced_batch(ctx.unlabeled, PER_TASK_BATCH, gen)
            optim.zero_grad()
            loss = prediction_entropy(merged_logits(composer, ctx, coef, batch))
            loss.backward()
            optim.step()
            with torch.no_grad():
                coef.clamp_(0.0, 1.0)
            trace.append(loss.item())
    learned = {"coefficient_mean": coef.mean().item(), "entropy_first": trace[0], "entropy_last": trace[-1]}
    return FitResult({"single": ComposedPredictor(composer, ctx.heads, coef.detach())}, learned, timer.seconds)


def register_all(register) -> None:
    from pyro_tvc.methods import Method

    register(Method("adamerging", "AdaMerging", fit, protocols=("target", "addition"),
                    description="layer-wise coefficients by test-time entropy minimisation"))
