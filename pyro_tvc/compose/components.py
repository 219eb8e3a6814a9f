"""Coefficient layout and per-parameter components of a task-vector bank.

A bank holds ``tau[t, p]`` for T tasks and every parameter tensor p. Coefficients are ``lambda [N, T, B]``:
one per (task, block). With ``parts=1`` a block is a parameter tensor (aTLAS); with ``parts=K`` every parameter
is split into K random disjoint parts, each its own block (aTLAS x K), so B = K x (number of parameters).

For the engine each parameter p becomes a stack of *components* ``comps_p [C_p, *shape]`` (C_p = T x K, ordered
task-major) plus the positions ``index_p [C_p]`` of their coefficients in the flattened ``lambda.reshape(N, T*B)``,
so that ``theta_i[p] = theta_0[p] + sum_c lambda_flat[i, index_p[c]] * comps_p[c]``.

Low-rank option (beyond the paper): every matrix-shaped component (linear weights, the projection, the patch conv
viewed as ``[out, in*k*k]``) is replaced by its rank-r truncated SVD ``U diag(S) V^T``; vectors stay dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyro_tvc.task_vectors import TaskVectorBank


@dataclass
class ParamComponents:
    """Components of one parameter tensor.

    ``dense [C, *shape]`` always (low-rank reconstructions when ``factors`` is set);
    ``factors = (U [C, out, r], S [C, r], Vh [C, r, in])`` for low-rank matrix parameters, else None;
    ``index [C]`` long: positions in ``lambda.reshape(N, T*B)``.
    """

    name: str
    dense: torch.Tensor
    index: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def coefficients(self, flat_lambda: torch.Tensor) -> torch.Tensor:
        """``flat_lambda [..., T*B]`` -> ``[..., C]``."""
        return flat_lambda.index_select(-1, self.index)

    def delta(self, coef: torch.Tensor) -> torch.Tensor:
        """``coef [N, C]`` -> per-sample offset ``[N, *shape]`` (``coef [C]`` -> ``[*shape]``)."""
        flat = coef @ self.dense.reshape(self.dense.shape[0], -1)
        return flat.reshape(*coef.shape[:-1], *self.dense.shape[1:])

    def to(self, device=None, dtype=None) -> "ParamComponents":
        factors = None if self.factors is None else tuple(f.to(device=device, dtype=dtype) for f in self.factors)
        return ParamComponents(self.name, self.dense.to(device=device, dtype=dtype), self.index.to(device), factors)


def partition_masks(shape: torch.Size, parts: int, generator: torch.Generator) -> torch.Tensor:
    """Bool ``[parts, *shape]``: each element of the tensor belongs to exactly one random part."""
    owner = torch.randint(parts, tuple(shape), generator=generator)
    return torch.stack([owner == k for k in range(parts)])


def truncated_svd(matrices: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[C, out, in]`` -> ``U [C, out, r], S [C, r], Vh [C, r, in]`` with ``r = min(rank, out, in)``."""
    U, S, Vh = torch.linalg.svd(matrices.double(), full_matrices=False)
    r = min(rank, S.shape[-1])
    dtype = matrices.dtype
    return U[..., :r].to(dtype).contiguous(), S[..., :r].to(dtype).contiguous(), Vh[..., :r, :].to(dtype).contiguous()


@dataclass
class ComponentLayout:
    """The coefficient layout (task and block names) and the components of every composed parameter."""

    task_names: tuple[str, ...]
    block_names: tuple[str, ...]
    params: dict[str, ParamComponents]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @classmethod
    def from_bank(cls, bank: TaskVectorBank, parts: int = 1, rank: int | None = None, seed: int = 0) -> "ComponentLayout":
        if parts < 1:
            raise ValueError(f"parts must be >= 1, got {parts}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1 (or None for full rank), got {rank}")
        gen = torch.Generator().manual_seed(seed)
        T = bank.num_tasks
        block_names: list[str] = []
        first_block: dict[str, int] = {}
        for p in bank.block_names:
            first_block[p] = len(block_names)
            block_names += [p] if parts == 1 else [f"{p}[{k}]" for k in range(parts)]
        B = len(block_names)
        params = {}
        for p in bank.block_names:
            tau = bank.stacked[p]  # [T, *shape]
            if parts > 1:
                masks = partition_masks(tau.shape[1:], parts, gen).to(tau.dtype)  # [K, *shape]
                comps = (tau[:, None] * masks[None]).reshape(T * parts, *tau.shape[1:])
            else:
                comps = tau
            index = torch.tensor([t * B + first_block[p] + k for t in range(T) for k in range(parts)], dtype=torch.long)
            factors = None
            if rank is not None and comps.ndim >= 3:
                U, S, Vh = truncated_svd(comps.reshape(comps.shape[0], comps.shape[1], -1), rank)
                factors = (U, S, Vh)
                comps = torch.einsum("cor,cr,cri->coi", U, S, Vh).reshape(comps.shape)
            params[p] = ParamComponents(p, comps.contiguous(), index, factors)
        return cls(tuple(bank.task_names), tuple(block_names), params)

    def to(self, device=None, dtype=None) -> "ComponentLayout":
        return ComponentLayout(self.task_names, self.block_names,
                               {k: v.to(device, dtype) for k, v in self.params.items()})

    def flatten(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Validate ``[N, T, B]`` (or ``[T, B]``) and flatten the last two dims."""
        T, B = self.num_tasks, self.num_blocks
        if coefficients.ndim not in (2, 3) or tuple(coefficients.shape[-2:]) != (T, B):
            raise ValueError(f"coefficients must have shape [N, {T}, {B}] or [{T}, {B}] "
                             f"(tasks {T}, blocks {B}); got {tuple(coefficients.shape)}")
        return coefficients.reshape(*coefficients.shape[:-2], T * B)


def lowrank_error(bank: TaskVectorBank, rank: int) -> float:
    """Relative Frobenius error ``||tau - tau_r|| / ||tau||`` over every matrix block of every task."""
    num, den = 0.0, 0.0
    for p in bank.block_names:
        tau = bank.stacked[p]
        if tau.ndim < 3:
            continue
        mats = tau.reshape(tau.shape[0], tau.shape[1], -1)
        U, S, Vh = truncated_svd(mats, rank)
        approx = torch.einsum("cor,cr,cri->coi", U, S, Vh)
        num += (mats - approx).pow(2).sum().item()
        den += mats.pow(2).sum().item()
    return (num / den) ** 0.5 if den > 0 else 0.0
