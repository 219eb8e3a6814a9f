"""Which form computes a composed linear layer fastest, per layer shape and device; and ``--rank auto``.

A composed linear map on tokens, ``y_i = x_i (W_0 + sum_c coef[i, c] comps[c])^T`` for ``x [N, L, in]``, has four
exact-or-approximate forms (docs/compose.md):

* ``weight``: compose every ``W_i`` with one GEMM, then one batched GEMM (PyTorch; W_i goes through memory);
* ``activation``: one GEMM against ``[W_0; comps]`` (``C + 1`` times the FLOPs, no per-sample weight);
* ``lowrank``: rank-r factors of the components, two GEMMs (an approximation: only where the layout has factors);
* ``fused``: the Triton kernel of :mod:`pyro_tvc.compose.triton_linear` (CUDA only; W_i composed on chip).

:func:`predict_ms` is a roofline cost model (each op costs the larger of its FLOPs over the device's matrix rate and
its bytes over the device's bandwidth); :func:`choose_linear` checks it with a short measurement of the real
implementations on the real shape, keeps the measured fastest, and caches the :class:`Choice` per (shape, device,
dtype, grad, candidates). :func:`auto_rank` picks the smallest rank whose validation accuracy is within a tolerance
of full rank.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

STRATEGIES = ("weight", "activation", "lowrank", "fused")


@dataclass(frozen=True)
class LinearShape:
    """One composed linear layer: ``samples`` N, ``tokens`` L per sample, ``in_features``, ``out_features``,
    ``components`` C (tasks x parts), and ``rank`` r of its low-rank factors (None: no factors)."""

    samples: int
    tokens: int
    in_features: int
    out_features: int
    components: int
    rank: int | None = None


@dataclass(frozen=True)
class DeviceProfile:
    """Throughputs of one device: ``matmul_flops`` (FLOP/s of a large GEMM), ``elementwise_flops`` (FLOP/s outside
    the matrix units), ``bandwidth`` (bytes/s of main memory), ``cache_bandwidth`` (bytes/s of the last-level cache,
    which serves weight tiles re-read by neighbouring samples), ``launch_s`` (seconds per kernel launch / op)."""

    matmul_flops: float
    elementwise_flops: float
    bandwidth: float
    cache_bandwidth: float
    launch_s: float


# Leads, not measurements (H200.md, docs/compose.md): fp32 GEMM without TF32 ~ 60 TFLOP/s, CUDA cores ~ 60 TFLOP/s,
# HBM ~ 4.3 TB/s measured by copy, L2 taken as ~ 3x HBM; a 2-core CPU ~ 50 GFLOP/s and ~ 10 GB/s.
CUDA_PROFILE = DeviceProfile(60e12, 60e12, 4.3e12, 12e12, 5e-6)
CPU_PROFILE = DeviceProfile(50e9, 10e9, 10e9, 30e9, 5e-6)


def _op(flops: float, nbytes: float, profile: DeviceProfile, elementwise: bool = False) -> float:
    rate = profile.elementwise_flops if elementwise else profile.matmul_flops
    return max(flops / rate, nbytes / profile.bandwidth) + profile.launch_s


def predict_ms(shape: LinearShape, profile: DeviceProfile, element_bytes: int = 4,
               fused_samples: int = 2) -> dict[str, float]:
    """Forward milliseconds of every form that applies to ``shape`` (``lowrank`` only with a rank).

    Per op ``max(FLOPs / rate, bytes / bandwidth) + launch``; the fused kernel's compose step runs on the
    elementwise units and its ``C + 1`` weight tiles are read from cache once per group of ``fused_samples``
    samples (one program), from memory once in all."""
    N, L, I, O, C = shape.samples, shape.tokens, shape.in_features, shape.out_features, shape.components
    e = element_bytes
    acts = N * L * (I + O) * e
    weight_set = I * O * e
    out = {
        # addmm: W = W_0 + coef @ comps writes N weights; bmm reads them back.
        "weight": _op(2 * N * C * I * O, (C + 1) * weight_set + N * weight_set, profile)
        + _op(2 * N * L * I * O, N * weight_set + acts, profile),
        # one GEMM to [N, L, (C+1) O], then the coefficient-weighted sum over C (elementwise).
        "activation": _op(2 * N * L * I * O * (C + 1), (C + 1) * weight_set + N * L * (I + (C + 1) * O) * e, profile)
        + _op(2 * N * L * C * O, N * L * (C + 2) * O * e, profile, elementwise=True),
    }
    if shape.rank is not None:
        r = shape.rank
        out["lowrank"] = (_op(2 * N * L * I * O, weight_set + acts, profile)
                          + _op(2 * N * L * I * C * r, N * L * (I + C * r) * e + C * r * I * e, profile)
                          + _op(2 * N * L * C * r * O, N * L * (C * r + 2 * O) * e + C * r * O * e, profile))
    compose = 2 * N * C * I * O / profile.elementwise_flops
    groups = math.ceil(N / fused_samples)
    tiles = max(groups * (C + 1) * weight_set / profile.cache_bandwidth,
                ((C + 1) * weight_set + acts) / profile.bandwidth)
    out["fused"] = compose + max(2 * N * L * I * O / profile.matmul_flops, tiles) + profile.launch_s
    return {k: 1e3 * v for k, v in out.items()}


@dataclass
class Choice:
    """The form chosen for one layer: ``strategy``; the model's ``predicted_ms`` and the ``measured_ms`` of the
    candidates that were timed; ``model_agreed``: whether the model's fastest was also the measured fastest."""

    strategy: str
    predicted_ms: dict[str, float]
    measured_ms: dict[str, float] = field(default_factory=dict)
    model_agreed: bool = True


_CACHE: dict[tuple, Choice] = {}


def clear_cache() -> None:
    _CACHE.clear()


def fused_possible(device: torch.device) -> bool:
    """The fused kernel can run here: a CUDA device and Triton importable."""
    if torch.device(device).type != "cuda":
        return False
    from pyro_tvc.compose.triton_linear import triton_available

    return triton_available()


def _inputs(shape: LinearShape, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=dtype).to(device)

    N, L, I, O, C = shape.samples, shape.tokens, shape.in_features, shape.out_features, shape.components
    return rnd(N, L, I), rnd(O, I), rnd(C, O, I), rnd(N, C)


def _implementation(strategy: str, shape: LinearShape, x3, w0, dense, coef) -> Callable[[torch.Tensor], torch.Tensor]:
    """``coef -> y [N, L, out]`` through ``strategy`` (the code the engine runs, not a re-implementation)."""
    from pyro_tvc.compose import layers
    from pyro_tvc.compose.components import ParamComponents

    if strategy == "weight":
        return lambda q: layers._weight_space(x3, w0, dense, q, None)
    if strategy == "activation":
        C, O = dense.shape[0], w0.shape[0]
        stacked = torch.cat([w0[None], dense]).reshape((C + 1) * O, -1)

        def activation(q):
            z = F.linear(x3, stacked).unflatten(-1, (C + 1, O))
            return z[..., 0, :] + torch.einsum("nc,nlco->nlo", q, z[..., 1:, :])
        return activation
    if strategy == "lowrank":
        r = shape.rank
        C, O, I = dense.shape
        factors = (torch.randn(C, O, r, dtype=w0.dtype, device=w0.device), torch.ones(C, r, dtype=w0.dtype, device=w0.device),
                   torch.randn(C, r, I, dtype=w0.dtype, device=w0.device))
        comps = ParamComponents("dispatch", dense, torch.arange(C), factors)
        return lambda q: layers._lowrank_linear(x3, layers.Composed(w0, comps, q), None).reshape(x3.shape[0], x3.shape[1], O)
    if strategy == "fused":
        from pyro_tvc.compose.triton_linear import fused_composed_linear

        return lambda q: fused_composed_linear(x3, w0, dense, q)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def measure_ms(strategy: str, shape: LinearShape, device, dtype=torch.float32, grad: bool = False,
               repeats: int = 3) -> float:
    """Median milliseconds of one forward (``grad``: forward + backward w.r.t. the coefficients) on random inputs."""
    device = torch.device(device)
    x3, w0, dense, coef = _inputs(shape, device, dtype)
    fn = _implementation(strategy, shape, x3, w0, dense, coef)

    def once():
        if grad:
            with torch.enable_grad():
                q = coef.detach().requires_grad_()
                fn(q).sum().backward()
        else:
            with torch.no_grad():
                fn(coef)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()  # warm-up: compiles the Triton kernel, fills allocator caches
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def choose_linear(shape: LinearShape, device, dtype=torch.float32, grad: bool = False,
                  candidates: Sequence[str] = STRATEGIES, profile: DeviceProfile | None = None,
                  measure: bool = True, top: int = 2) -> Choice:
    """The fastest form for ``shape`` on ``device``, cached.

    The cost model ranks the candidates that apply (``fused`` only on CUDA with Triton, ``lowrank`` only with a
    rank); with ``measure`` the ``top`` predicted ones are timed (:func:`measure_ms`) and the measured fastest wins.

    Raises:
        ValueError: an unknown candidate, or none applies.
    """
    device = torch.device(device)
    unknown = [c for c in candidates if c not in STRATEGIES]
    if unknown:
        raise ValueError(f"choose_linear: unknown candidates {unknown}; expected a subset of {STRATEGIES}")
    if profile is None:
        profile = CUDA_PROFILE if device.type == "cuda" else CPU_PROFILE
    key = (shape, str(device), dtype, grad, tuple(candidates), profile, measure, top)
    if key in _CACHE:
        return _CACHE[key]
    element_bytes = torch.empty((), dtype=dtype).element_size()
    from pyro_tvc.compose.triton_linear import DEFAULT_BLOCKS

    predicted = predict_ms(shape, profile, element_bytes, fused_samples=DEFAULT_BLOCKS[0])
    allowed = [c for c in candidates if c in predicted and (c != "fused" or fused_possible(device))]
    if not allowed:
        raise ValueError(f"choose_linear: none of {list(candidates)} applies to {shape} on {device}")
    ranked = sorted(allowed, key=predicted.__getitem__)
    choice = Choice(ranked[0], {c: predicted[c] for c in allowed})
    if measure and len(ranked) > 1:
        choice.measured_ms = {c: measure_ms(c, shape, device, dtype, grad) for c in ranked[:max(1, top)]}
        choice.strategy = min(choice.measured_ms, key=choice.measured_ms.__getitem__)
        choice.model_agreed = choice.strategy == ranked[0]
    _CACHE[key] = choice
    return choice


def use_fused_kernel(samples: int, tokens: int, in_features: int, out_features: int, components: int,
                     device, dtype) -> bool:
    """The hook of :func:`pyro_tvc.compose.layers.composed_linear` (CUDA only): fused kernel or PyTorch weight space,
    whichever is faster for this layer under the current grad mode (both timed once per shape, then cached)."""
    shape = LinearShape(samples, tokens, in_features, out_features, components)
    choice = choose_linear(shape, device, dtype, grad=torch.is_grad_enabled(), candidates=("weight", "fused"))
    return choice.strategy == "fused"


# --- --rank auto --------------------------------------------------------------------------------------------------

@dataclass
class RankChoice:
    """``rank`` (None: full rank, no smaller rank was close enough), the ``full_accuracy`` and every evaluated
    ``accuracies[rank]`` (percent)."""

    rank: int | None
    full_accuracy: float
    accuracies: dict[int, float]


def auto_rank(val_accuracy: Callable[[int | None], float], ranks: Sequence[int] = (4, 8, 16, 32, 64),
              tolerance: float = 0.5) -> RankChoice:
    """The smallest rank whose validation accuracy is within ``tolerance`` points of full rank (``--rank auto``).

    Args:
        val_accuracy: ``rank -> validation accuracy in percent`` (``None`` = full rank), e.g. a short training run
            on the target at that rank; called once for full rank, then for ranks in increasing order until one is
            within ``tolerance``.
        ranks: candidate ranks (positive integers).
        tolerance: accepted loss of accuracy, percentage points (inclusive).

    Raises:
        ValueError: a rank is not a positive integer, the tolerance is negative, or an accuracy is not a finite
            number in [0, 100].
    """
    if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
        raise ValueError(f"auto_rank: ranks must be positive integers, got {list(ranks)}")
    if not tolerance >= 0:
        raise ValueError(f"auto_rank: tolerance must be >= 0 percentage points, got {tolerance}")

    def evaluate(rank):
        acc = float(val_accuracy(rank))
        if not (math.isfinite(acc) and 0.0 <= acc <= 100.0):
            raise ValueError(f"auto_rank: val_accuracy({rank}) returned {acc}; expected a percentage in [0, 100]")
        return acc

    full = evaluate(None)
    accuracies: dict[int, float] = {}
    for r in sorted(set(ranks)):
        accuracies[r] = evaluate(r)
        if accuracies[r] >= full - tolerance:
            return RankChoice(r, full, accuracies)
    return RankChoice(None, full, accuracies)
