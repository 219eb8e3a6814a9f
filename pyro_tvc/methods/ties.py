"""TIES-Merging (Yadav et al., "TIES-Merging: resolving interference when merging models", NeurIPS 2023; github
prateeky2806/ties-merging): trim every task vector to its top-k % magnitudes (k = 20), elect one sign per parameter
(the sign of the summed trimmed values), average only the values that agree with it (disjoint mean), and add the
merged vector with one scale chosen on the validation split."""
from __future__ import annotations

import torch

from pyro_tvc.compose.engine import Composer
from pyro_tvc.methods.base import ComposedPredictor, FitResult, MethodContext, Timer, select_on_grid
from pyro_tvc.task_vectors import TaskVectorBank

FIT_GRID = [0.0] + [round(0.1 * i, 1) for i in range(1, 21)]
NEGATION_GRID = [round(-0.1 * i, 1) for i in range(21)]


def trim(stacked: dict[str, torch.Tensor], k_percent: float) -> dict[str, torch.Tensor]:
    """Keep, in every task vector separately (over all its blocks), the ``k_percent`` % largest magnitudes.

    ``stacked[block]``: ``[T, *shape]``. Ties at the threshold are kept (so slightly more than k % may survive).

    Raises:
        ValueError: ``k_percent`` outside (0, 100].
    """
    if not 0 < k_percent <= 100:
        raise ValueError(f"TIES k must be in (0, 100] percent, got {k_percent}")
    flat = torch.cat([v.flatten(1) for v in stacked.values()], dim=1)  # [T, P]
    keep = max(1, int(round(flat.shape[1] * k_percent / 100.0)))
    threshold = flat.abs().topk(keep, dim=1).values[:, -1]  # [T]
    return {b: torch.where(v.abs() >= threshold.view(-1, *[1] * (v.ndim - 1)), v, torch.zeros_like(v))
            for b, v in stacked.items()}


def elect_and_merge(trimmed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sign election (sign of the sum over tasks) and disjoint mean over the tasks that agree with it."""
    merged = {}
    for b, v in trimmed.items():
        sign = torch.sign(v.sum(0))
        agree = (torch.sign(v) == sign) & (v != 0)
        count = agree.sum(0)
        merged[b] = torch.where(count > 0, (v * agree).sum(0) / count.clamp_min(1), torch.zeros_like(v[0]))
    return merged


def ties_merge(bank: TaskVectorBank, k_percent: float = 20.0) -> TaskVectorBank:
    """The merged vector as a one-task bank (``[1, *shape]`` per block)."""
    merged = elect_and_merge(trim(bank.stacked, k_percent))
    return TaskVectorBank(("ties",), bank.block_names, {b: merged[b].unsqueeze(0) for b in bank.block_names},
                          bank.meta)


def fit(ctx: MethodContext) -> FitResult:
    with Timer() as timer:
        composer = Composer(ctx.encoder, ties_merge(ctx.bank, ctx.cfg.ties_k))
        ones = torch.ones(composer.coefficient_shape, device=ctx.device, dtype=ctx.dtype)
        grid = NEGATION_GRID if ctx.objective == "negate" else FIT_GRID
        scale, pred, curve = select_on_grid(ctx, grid, lambda s: ComposedPredictor(composer, ctx.heads, s * ones,
                                                                                   report_zeros=False))
    return FitResult({"single": pred}, {"scale": scale, "k_percent": ctx.cfg.ties_k, "selection_curve": curve},
                     timer.seconds)


def register_all(register) -> None:
    from pyro_tvc.methods import Method

    register(Method("ties", "TIES", fit, description="trim top-20 %, elect signs, disjoint mean, scale on val"))
