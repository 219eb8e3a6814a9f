"""Task Arithmetic (Ilharco et al., "Editing models with task arithmetic", ICLR 2023; github
mlfoundations/task_vectors): ``theta = theta_0 + s * sum_t tau_t`` with one scale ``s`` chosen on the validation
split over a grid (their grid: 0 to 1 in steps of 0.05; negation: ``theta_0 - s * tau_target``)."""
from __future__ import annotations

import torch

from pyro_tvc.compose.engine import Composer
from pyro_tvc.methods.base import ComposedPredictor, FitResult, MethodContext, Timer, select_on_grid

FIT_GRID = [round(0.05 * i, 2) for i in range(21)]
NEGATION_GRID = [round(-0.1 * i, 2) for i in range(21)]  # 0 first: always admissible under the control floor


def scale_grid(ctx: MethodContext) -> list[float]:
    return NEGATION_GRID if ctx.objective == "negate" else FIT_GRID


def fit(ctx: MethodContext) -> FitResult:
    with Timer() as timer:
        composer = Composer(ctx.encoder, ctx.bank)
        ones = torch.ones(composer.coefficient_shape, device=ctx.device, dtype=ctx.dtype)
        scale, pred, curve = select_on_grid(ctx, scale_grid(ctx),
                                            lambda s: ComposedPredictor(composer, ctx.heads, s * ones,
                                                                        report_zeros=False))
    return FitResult({"single": pred}, {"scale": scale, "selection_curve": curve}, timer.seconds)


def register_all(register) -> None:
    from pyro_tvc.methods import Method

    register(Method("task_arithmetic", "Task Arithmetic", fit, description="one scale for the summed vectors"))
