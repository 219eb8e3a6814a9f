"""Fused per-sample composed linear map on tokens (Triton): ``W_i`` is composed tile by tile on chip, never stored.

For sample i with tokens ``x_i [L, in]`` the composed layer is ``y_i = x_i W_i^T + b_i`` with
``W_i = W_0 + sum_c coef[i, c] comps[c]`` (DESIGN.md section 3; VTVC's per-sample composition, Zhang et al., NeurIPS
2025). The PyTorch weight-space path (:mod:`pyro_tvc.compose.layers`) writes every ``W_i [out, in]`` to memory and
reads it back, so it is bound by memory bandwidth (docs/compose.md: 3.2x plain on ViT-B/32 for 1.14x the FLOPs).
Here each program loads a tile of ``W_0`` and of the C components once, composes the ``W_i`` tiles of a small group
of samples in registers and feeds them straight into a batched ``tl.dot``, in the spirit of the per-sample (segmented)
GEMMs of LoRA serving (Punica's SGMV, S-LoRA): programs of neighbouring sample groups run side by side on the same
weight tile, so the components are read from HBM about once per layer and served from L2 to the other groups.

Backward (the base weight and the components are frozen):

* ``dx_i = dy_i W_i``: the forward kernel again, with ``W`` read transposed (swapped strides);
* ``dcoef[i, c] = sum_{o,k} (dy_i^T x_i)[o, k] comps[c][o, k]``: each program forms one tile of ``dy_i^T x_i`` and
  reduces it against every component tile; the per-tile partial sums ``[N, tiles, C]`` are added in PyTorch
  (deterministic, no atomics);
* ``dbias_i = sum_l dy_i[l]``.

The kernels are plain functions wrapped on demand, either by ``triton.jit`` (CUDA) or by Triton's interpreter
(``interpret=True``: CPU tensors, for tests). Measured with Triton 3.8: ``TRITON_INTERPRET=1`` is read when
``@triton.jit`` decorates a function, and ``triton.language`` decorates some of its own helpers (``tl.zeros``,
``tl.sum``) at import, which then fail inside an interpreted kernel unless the variable was set before the first
``import triton``. The kernels therefore use only language builtins (``tl.full``, ``tl.reduce`` with Triton's own sum
combiner, which the interpreter maps to numpy) and are wrapped by ``InterpretedFunction`` explicitly: no environment
variable, nothing that leaks into other tests.
"""
from __future__ import annotations

import functools

import torch

try:  # Triton ships with CUDA builds of torch; without it only the PyTorch paths exist.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

# Tile sizes (samples per program, tokens, output features, reduced features) for CUDA; tl.dot needs the last
# three >= 16. Leads, not tuned on a GPU yet: benchmarks/gpu_check.py sweeps the samples per program.
DEFAULT_BLOCKS = (2, 64, 64, 32)
NUM_WARPS = 8


def triton_available() -> bool:
    """True when ``import triton`` works (kernels can be built; running them needs CUDA or ``interpret=True``)."""
    return triton is not None


def _composed_matmul_kernel(a_ptr, w0_ptr, comps_ptr, coef_ptr, bias_ptr, out_ptr,
                            N, L, R, K, C,
                            s_an, s_al, s_ak,
                            s_wr, s_wk,
                            s_cc, s_cr, s_ck,
                            s_qn, s_qc,
                            s_bn, s_br,
                            s_on, s_ol, s_or,
                            HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, SAMPLES: tl.constexpr,
                            BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[i, l, r] = sum_k a[i, l, k] (w0[r, k] + sum_c coef[i, c] comps[c, r, k]) (+ bias[i, r])``.

    Grid ``(cdiv(N, SAMPLES), cdiv(L, BLOCK_L), cdiv(R, BLOCK_R))``. A program serves SAMPLES samples: every tile of
    ``W_0`` and of each component is loaded once and composed into SAMPLES per-sample tiles (a batched ``tl.dot``), so
    cache traffic is ``(C + 1) / SAMPLES`` weight tiles per sample instead of ``C + 1``. The sample group is the
    fastest grid axis, so programs running at the same time also share tiles in L2."""
    offs_g = tl.program_id(0) * SAMPLES + tl.arange(0, SAMPLES)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_g = offs_g < N
    mask_gl = mask_g[:, None, None] & (offs_l < L)[None, :, None]
    mask_r = offs_r < R
    acc = tl.full((SAMPLES, BLOCK_L, BLOCK_R), 0.0, ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_g[:, None, None] * s_an + offs_l[None, :, None] * s_al + offs_k[None, None, :] * s_ak,
                    mask=mask_gl & mask_k[None, None, :], other=0.0)
        # Weight tiles are loaded as [BLOCK_K, BLOCK_R] (i.e. W^T) so that they enter tl.dot as they are.
        mask_w = mask_k[:, None] & mask_r[None, :]
        w0 = tl.load(w0_ptr + offs_k[:, None] * s_wk + offs_r[None, :] * s_wr, mask=mask_w, other=0.0)
        w = tl.full((SAMPLES, BLOCK_K, BLOCK_R), 0.0, ACC) + w0.to(ACC)[None, :, :]
        for c in range(C):
            q = tl.load(coef_ptr + offs_g * s_qn + c * s_qc, mask=mask_g, other=0.0).to(ACC)
            comp = tl.load(comps_ptr + c * s_cc + offs_k[:, None] * s_ck + offs_r[None, :] * s_cr, mask=mask_w, other=0.0)
            w += q[:, None, None] * comp.to(ACC)[None, :, :]
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_g[:, None] * s_bn + offs_r[None, :] * s_br,
                       mask=mask_g[:, None] & mask_r[None, :], other=0.0)
        acc += bias.to(ACC)[:, None, :]
    tl.store(out_ptr + offs_g[:, None, None] * s_on + offs_l[None, :, None] * s_ol + offs_r[None, None, :] * s_or,
             acc.to(out_ptr.dtype.element_ty), mask=mask_gl & mask_r[None, None, :])


def _coef_grad_kernel(dy_ptr, x_ptr, comps_ptr, part_ptr,
                      N, L, R, K, C,
                      s_dn, s_dl, s_dr,
                      s_xn, s_xl, s_xk,
                      s_cc, s_cr, s_ck,
                      s_pn, s_pt,
                      ACC: tl.constexpr, PRECISION: tl.constexpr, SAMPLES: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``part[i, t, c] = sum_{(r, k) in tile t} (dy_i^T x_i)[r, k] comps[c, r, k]``, tile ``t = pid_r * nk + pid_k``.

    Grid ``(cdiv(N, SAMPLES), cdiv(R, BLOCK_R), cdiv(K, BLOCK_K))``; ``part`` is ``[N, tiles, C]`` with unit stride
    over c. Each component tile is loaded once per program and reduced against SAMPLES tiles of ``dy_i^T x_i``."""
    offs_g = tl.program_id(0) * SAMPLES + tl.arange(0, SAMPLES)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_g = offs_g < N
    mask_r = offs_r < R
    mask_k = offs_k < K
    g = tl.full((SAMPLES, BLOCK_R, BLOCK_K), 0.0, ACC)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        dy_t = tl.load(dy_ptr + offs_g[:, None, None] * s_dn + offs_r[None, :, None] * s_dr
                       + offs_l[None, None, :] * s_dl,
                       mask=mask_g[:, None, None] & mask_r[None, :, None] & mask_l[None, None, :],
                       other=0.0)  # [SAMPLES, BLOCK_R, BLOCK_L]: tiles of dy_i^T
        x = tl.load(x_ptr + offs_g[:, None, None] * s_xn + offs_l[None, :, None] * s_xl + offs_k[None, None, :] * s_xk,
                    mask=mask_g[:, None, None] & mask_l[None, :, None] & mask_k[None, None, :], other=0.0)
        g += tl.dot(dy_t, x.to(dy_t.dtype), input_precision=PRECISION, out_dtype=ACC)
    tile = pid_r * tl.num_programs(2) + pid_k
    mask = mask_r[:, None] & mask_k[None, :]
    for c in range(C):
        comp = tl.load(comps_ptr + c * s_cc + offs_r[:, None] * s_cr + offs_k[None, :] * s_ck, mask=mask, other=0.0)
        prod = g * comp.to(ACC)[None, :, :]
        # tl.reduce with Triton's own sum combiner (tl.sum is a jit helper: see the module docstring).
        total = tl.reduce(tl.reduce(prod, 2, tl.standard._sum_combine), 1, tl.standard._sum_combine)
        tl.store(part_ptr + offs_g * s_pn + tile * s_pt + c, total, mask=mask_g)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """``(composed_matmul, coef_grad)``, compiled for CUDA or run by Triton's interpreter on CPU tensors."""
    if triton is None:
        raise RuntimeError("the fused composition kernel needs Triton (it ships with CUDA builds of torch)")
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_composed_matmul_kernel), InterpretedFunction(_coef_grad_kernel)
    return triton.jit(_composed_matmul_kernel), triton.jit(_coef_grad_kernel)


def _acc_and_precision(dtype: torch.dtype, precision: str | None):
    """Accumulator type and ``tl.dot`` input precision. float32 follows torch's switch: TF32 where torch allows it,
    else ``tf32x3`` (three TF32 products, about float32 accuracy on the tensor cores; ``ieee`` would run the dot on
    the CUDA cores, far slower than cuBLAS's SGEMM)."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if precision is None:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return tl.float32, precision


def _launch_matmul(a, w0, comps, coef, bias, transpose_w: bool, blocks, interpret: bool,
                   precision: str | None = None) -> torch.Tensor:
    """``a [N, L, K]`` times per-sample ``W_i^T`` (``W_i [R, K]``; with ``transpose_w`` ``W_i^T [R, K]``) -> ``[N, L, R]``."""
    n, L, K = a.shape
    C = comps.shape[0]
    s_wr, s_wk = w0.stride()
    s_cc, s_cr, s_ck = comps.stride()
    R = w0.shape[0]
    if transpose_w:  # use W^T [in, out] as the [R, K] matrix without copying it
        R = w0.shape[1]
        s_wr, s_wk, s_cr, s_ck = s_wk, s_wr, s_ck, s_cr
    out = torch.empty(n, L, R, device=a.device, dtype=a.dtype)
    gs, bl, br, bk = blocks
    acc, precision = _acc_and_precision(a.dtype, precision)
    matmul, _ = _kernels(interpret)
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    s_bn, s_br = bias.stride() if bias is not None else (0, 0)
    grid = (triton.cdiv(n, gs), triton.cdiv(L, bl), triton.cdiv(R, br))
    matmul[grid](a, w0, comps, coef, bias_arg, out, n, L, R, K, C, *a.stride(), s_wr, s_wk, s_cc, s_cr, s_ck,
                 *coef.stride(), s_bn, s_br, *out.stride(), HAS_BIAS=bias is not None, ACC=acc, PRECISION=precision,
                 SAMPLES=gs, BLOCK_L=bl, BLOCK_R=br, BLOCK_K=bk, num_warps=NUM_WARPS)
    return out


def _launch_coef_grad(dy, x, comps, blocks, interpret: bool, precision: str | None = None) -> torch.Tensor:
    """``dy [N, L, out]``, ``x [N, L, in]``, ``comps [C, out, in]`` -> ``[N, C]`` (accumulated in float32/64)."""
    n, L, R = dy.shape
    K = x.shape[2]
    C = comps.shape[0]
    gs, bl, br, bk = blocks
    grid = (triton.cdiv(n, gs), triton.cdiv(R, br), triton.cdiv(K, bk))
    acc, precision = _acc_and_precision(dy.dtype, precision)
    part_dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    part = torch.empty(n, grid[1] * grid[2], C, device=dy.device, dtype=part_dtype)
    _, coef_grad = _kernels(interpret)
    coef_grad[grid](dy, x, comps, part, n, L, R, K, C, *dy.stride(), *x.stride(), *comps.stride(),
                    part.stride(0), part.stride(1), ACC=acc, PRECISION=precision, SAMPLES=gs,
                    BLOCK_L=bl, BLOCK_R=br, BLOCK_K=bk, num_warps=NUM_WARPS)
    return part.sum(1)


class FusedComposedLinear(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; gradients flow to ``x``, ``coef`` and ``bias`` (base and components
    are frozen). Saves only ``x`` and ``coef`` besides the frozen weights: no per-sample weight, ever."""

    @staticmethod
    def forward(ctx, x3, w0, comps, coef, bias, blocks, interpret, precision):
        ctx.save_for_backward(x3, w0, comps, coef)
        ctx.blocks, ctx.interpret, ctx.precision = blocks, interpret, precision
        return _launch_matmul(x3, w0, comps, coef, bias, False, blocks, interpret, precision)

    @staticmethod
    def backward(ctx, dy):
        x3, w0, comps, coef = ctx.saved_tensors
        dx = dcoef = dbias = None
        if ctx.needs_input_grad[0]:
            dx = _launch_matmul(dy, w0, comps, coef, None, True, ctx.blocks, ctx.interpret, ctx.precision)
        if ctx.needs_input_grad[3]:
            dcoef = _launch_coef_grad(dy, x3, comps, ctx.blocks, ctx.interpret, ctx.precision).to(coef.dtype)
        if ctx.needs_input_grad[4]:
            dbias = dy.sum(1)
        return dx, None, None, dcoef, dbias, None, None, None


def fused_composed_linear(x3: torch.Tensor, w0: torch.Tensor, comps: torch.Tensor, coef: torch.Tensor,
                          bias: torch.Tensor | None = None, *, blocks: tuple[int, int, int, int] | None = None,
                          interpret: bool = False, precision: str | None = None) -> torch.Tensor:
    """Per-sample composed linear map, ``W_i`` never in global memory.

    Args:
        x3: tokens ``[N, L, in]`` (float32, float16, bfloat16; float64 under the interpreter).
        w0: base weight ``[out, in]``, frozen.
        comps: components ``[C, out, in]`` (task vectors of this weight), frozen.
        coef: coefficients ``[N, C]``.
        bias: per-sample bias ``[N, out]`` or None.
        blocks: ``(samples per program, tokens, out, in)`` tile sizes, powers of two (the last three >= 16);
            default :func:`default_blocks`.
        interpret: run through Triton's CPU interpreter (CPU tensors; slow, for tests).
        precision: ``tl.dot`` input precision for float32 (``tf32``, ``tf32x3``, ``ieee``); default: ``tf32`` where
            ``torch.backends.cuda.matmul.allow_tf32`` is set, else ``tf32x3``.

    Returns:
        ``[N, L, out]``: ``y[i] = x3[i] (w0 + sum_c coef[i, c] comps[c])^T + bias[i]``.

    Raises:
        ValueError: shapes disagree, a tensor is on the wrong device, or the frozen weights require grad.
    """
    if triton is None:
        raise RuntimeError("fused_composed_linear needs Triton (it ships with CUDA builds of torch)")
    n, L, k = x3.shape
    if w0.ndim != 2 or comps.ndim != 3 or tuple(comps.shape[1:]) != tuple(w0.shape) or w0.shape[1] != k:
        raise ValueError(f"fused_composed_linear: expected x3 [N, L, in], w0 [out, in], comps [C, out, in]; got "
                         f"{tuple(x3.shape)}, {tuple(w0.shape)}, {tuple(comps.shape)}")
    if tuple(coef.shape) != (n, comps.shape[0]):
        raise ValueError(f"fused_composed_linear: coef must be [{n}, {comps.shape[0]}], got {tuple(coef.shape)}")
    if bias is not None and tuple(bias.shape) != (n, w0.shape[0]):
        raise ValueError(f"fused_composed_linear: bias must be [{n}, {w0.shape[0]}], got {tuple(bias.shape)}")
    if w0.requires_grad or comps.requires_grad:
        raise ValueError("fused_composed_linear: the base weight and components must be frozen (requires_grad=False)")
    tensors = (x3, w0, comps, coef) + (() if bias is None else (bias,))
    if interpret:
        if any(t.is_cuda for t in tensors):
            raise ValueError("fused_composed_linear: interpret=True runs on CPU tensors only")
    elif not all(t.is_cuda for t in tensors):
        raise ValueError("fused_composed_linear: every tensor must be on a CUDA device (or pass interpret=True)")
    blocks = tuple(blocks) if blocks is not None else default_blocks(L)
    if (len(blocks) != 4 or any(b < 1 or b & (b - 1) for b in blocks) or min(blocks[1:]) < 16):
        raise ValueError(f"fused_composed_linear: blocks must be four powers of two (samples, tokens, out, in), "
                         f"the last three >= 16; got {blocks}")
    if precision not in (None, "tf32", "tf32x3", "ieee"):
        raise ValueError(f"fused_composed_linear: precision must be tf32, tf32x3 or ieee, got {precision!r}")
    return FusedComposedLinear.apply(x3, w0, comps, coef, bias, blocks, interpret, precision)


def default_blocks(tokens: int) -> tuple[int, int, int, int]:
    """Tile sizes for ``tokens`` per sample: one token tile per sample when it fits (each ``W_i`` tile is then
    composed once per sample), at least 16 (``tl.dot``), at most 64."""
    bl = max(16, min(64, 1 << max(0, tokens - 1).bit_length()))
    return DEFAULT_BLOCKS[0], bl, DEFAULT_BLOCKS[2], DEFAULT_BLOCKS[3]
