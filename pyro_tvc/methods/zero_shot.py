"""Zero-shot: theta_0 with frozen zero-shot heads (every coefficient 0). Radford et al., ICML 2021."""
from __future__ import annotations

import torch

from pyro_tvc.compose.engine import Composer
from pyro_tvc.methods.base import ComposedPredictor, FitResult, MethodContext


def fit(ctx: MethodContext) -> FitResult:
    composer = Composer(ctx.encoder, ctx.bank)
    coef = torch.zeros(composer.coefficient_shape, device=ctx.device, dtype=ctx.dtype)
    return FitResult({"single": ComposedPredictor(composer, ctx.heads, coef, report_zeros=False)})


def register_all(register) -> None:
    from pyro_tvc.methods import Method

    register(Method("zero_shot", "Zero-shot", fit, learned=False, description="theta_0, zero-shot heads"))
