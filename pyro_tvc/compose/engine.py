"""The composition engine: outputs of per-sample composed networks ``theta_i = theta_0 + sum_tb lambda[i,t,b] tau[t,b]``.

One interface, three interchangeable methods (exactly equal up to float rounding; see tests/test_compose.py):

* ``naive``: a Python loop that materialises every ``theta_i`` and runs a batch-1 forward (the authors'
  prototype; a benchmark baseline only);
* ``reference``: ``torch.func.functional_call`` under ``torch.func.vmap`` over per-sample parameters (exact,
  simple, memory grows with N x |theta|);
* ``fast``: per-layer composition that never materialises N networks (:mod:`pyro_tvc.compose.layers`); with
  ``rank=r`` it composes through rank-r factors of the task vectors (the low-rank path).

Task-level coefficients ``[T, B]`` (aTLAS, task arithmetic) merge the weights once and run one plain forward.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call, vmap

from pyro_tvc.compose.components import ComponentLayout
from pyro_tvc.compose.layers import Composed, patched_forwards
from pyro_tvc.task_vectors import NonFiniteError, TaskVectorBank, TaskVectorError

METHODS = ("naive", "reference", "fast")


def _check_bank_finite(bank: TaskVectorBank) -> None:
    """Refuse NaN/inf in the bank: ``0 * NaN = NaN`` poisons every output, even of tasks with zero coefficients.

    Raises:
        NonFiniteError: naming the first task affected and its blocks.
    """
    bad: dict[str, list[str]] = {}
    for b in bank.block_names:
        finite = torch.isfinite(bank.stacked[b].reshape(bank.num_tasks, -1)).all(dim=1)
        for t in torch.nonzero(~finite).flatten().tolist():
            bad.setdefault(bank.task_names[t], []).append(b)
    if bad:
        task, blocks = next(iter(bad.items()))
        others = f"; also tasks {sorted(set(bad) - {task})}" if len(bad) > 1 else ""
        raise NonFiniteError(f"cannot compose: task vector {task!r} has NaN/inf values in {len(blocks)} block(s): "
                             f"{', '.join(blocks[:5])}{others}")


class Composer(nn.Module):
    """Run inputs through their own composed networks.

    Args:
        module: theta_0, e.g. an open_clip image encoder (``model.visual``) or any ``nn.Module`` whose first input
            dim is the sample dim. Frozen here (its parameters are not trained by the engine).
        bank: T task vectors whose blocks are (a subset of) ``module``'s parameter names.
        method: ``naive`` | ``reference`` | ``fast``.
        parts: split every parameter into this many random parts, one coefficient each (aTLAS x K).
        rank: compose through rank-r truncated SVD factors of every matrix block (``None``: full rank).
        seed: seed of the random partition.

    ``forward(x [N, ...], coefficients [N, T, B] or [T, B]) -> module(x) with composed parameters [N, ...]``.
    """

    def __init__(self, module: nn.Module, bank: TaskVectorBank, method: str = "fast", parts: int = 1,
                 rank: int | None = None, seed: int = 0):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        named = dict(module.named_parameters())
        missing = [b for b in bank.block_names if b not in named]
        if missing:
            raise TaskVectorError(f"task-vector blocks not found in the module: {missing[:5]}")
        for b in bank.block_names:
            if tuple(bank.stacked[b].shape[1:]) != tuple(named[b].shape):
                raise TaskVectorError(f"block {b!r}: task vectors have shape {tuple(bank.stacked[b].shape[1:])}, "
                                      f"module has {tuple(named[b].shape)}")
        _check_bank_finite(bank)
        param = next(module.parameters())
        self.module = module.requires_grad_(False)
        self.method = method
        self.layout = ComponentLayout.from_bank(bank, parts=parts, rank=rank, seed=seed).to(param.device, param.dtype)

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.layout.task_names

    @property
    def block_names(self) -> tuple[str, ...]:
        return self.layout.block_names

    @property
    def coefficient_shape(self) -> tuple[int, int]:
        """``(T, B)``."""
        return self.layout.num_tasks, self.layout.num_blocks

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        sample = fn(torch.zeros(()))
        param = next(self.module.parameters())
        self.layout = self.layout.to(sample.device, param.dtype)
        return self

    def merged_parameters(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Task-level merge: ``coefficients [T, B]`` -> ``{name: theta_0 + sum_tb lambda tau}``."""
        return self._composed_parameters(self.layout.flatten(coefficients))

    def _composed_parameters(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``flat [T*B]`` -> merged parameters; ``flat [N, T*B]`` -> per-sample parameters ``[N, *shape]``."""
        base = dict(self.module.named_parameters())
        return {p: base[p] + c.delta(c.coefficients(flat)) for p, c in self.layout.params.items()}

    def forward(self, x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        flat = self.layout.flatten(coefficients)
        if coefficients.ndim == 2:
            return functional_call(self.module, self.merged_parameters(coefficients), (x,))
        if flat.shape[0] != x.shape[0]:
            raise ValueError(f"coefficients are for {flat.shape[0]} samples but x has {x.shape[0]}")
        return getattr(self, f"_{self.method}")(x, flat)

    def _naive(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(x.shape[0]):
            params = {p: w[0] for p, w in self._composed_parameters(flat[i:i + 1]).items()}
            outs.append(functional_call(self.module, params, (x[i:i + 1],)))
        return torch.cat(outs)

    def _reference(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        params = self._composed_parameters(flat)

        def one(p, xi):
            return functional_call(self.module, p, (xi.unsqueeze(0),)).squeeze(0)

        # Under vmap, nn.MultiheadAttention cannot see that its weights require grad and takes its inference fast
        # path, which has no derivative: switch that path off for the call.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with warnings.catch_warnings():
                # No vmap batching rule for some attention ops: PyTorch warns and loops (measured in benchmarks).
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                return vmap(one)(params, x)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    def _fast(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        base = dict(self.module.named_parameters())
        composed = {p: Composed(base[p], c, c.coefficients(flat)) for p, c in self.layout.params.items()}
        with patched_forwards(self.module, composed):
            return self.module(x)
