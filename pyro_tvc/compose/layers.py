"""Fast composed forwards: each layer computes its per-sample output without N copies of the network.

Every parameter of a CLIP ViT enters its layer linearly, so for sample i the layer output is exact with the
composed parameter ``W_i = W_0 + sum_c coef[i, c] comps[c]``. Per layer type:

* linear map on tokens ``x [N, L, in]`` (L >= 2): *weight space*. ``W_i`` is one GEMM
  (``coef [N, C] @ comps [C, out*in]``), then one batched GEMM; cost ~ (1 + C/L) x plain. ``W_i`` is transient:
  the pair runs under ``torch.utils.checkpoint`` so backward recomputes it instead of keeping N weight copies.
* linear map on one vector per sample ``x [N, in]`` (L = 1, e.g. the final projection): *activation space*,
  ``x W_0^T + sum_c coef[i, c] (x comps_c^T)`` as one GEMM against ``[W_0; comps]`` (same cost, no W_i at all).
* low-rank components: ``x W_0^T + ((x V) * (coef ⊗ S)) U^T``: two dense GEMMs for all samples at once.
* vectors (biases, LayerNorm affine, class/positional embeddings): the per-sample tensor itself (cheap).
* embedding tables (BERT's word/position/type embeddings): only the looked-up rows are composed,
  ``E_0[ids] + sum_c coef[i, c] comps_c[ids]`` (one gather of ``[C, d]`` rows per token; low rank: ``U_c[ids]``).

The forwards are installed by :func:`patched_forwards`, which temporarily replaces ``forward`` on the modules
that own composed parameters; :data:`FAST_FORWARDS` says which module types are supported.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyro_tvc.compose.components import ParamComponents

# Bytes of transient per-sample weights composed at once; larger batches are composed in chunks of samples.
# Without grad a generous cap. With grad the weights are recomputed in backward, where their gradient doubles them,
# so the cap follows the layer's input activations (at least GRAD_MIN_CHUNK_BYTES): training's peak memory then stays
# close to that of a plain forward+backward.
WEIGHT_CHUNK_BYTES = 256 * 2**20
GRAD_MIN_CHUNK_BYTES = 4 * 2**20

# The fused Triton kernel for the weight-space form (pyro_tvc/compose/triton_linear.py, W_i never in memory):
# "auto" lets pyro_tvc.compose.dispatch choose it for tensors on CUDA when Triton imports (CPU: never consulted);
# "on" always on CUDA (benchmarks); "off" never; "interpret" always, through Triton's CPU interpreter (tests: slow).
FUSED_KERNEL = "auto"


def _route_fused(x3: torch.Tensor, w0: torch.Tensor, dense: torch.Tensor) -> bool:
    if FUSED_KERNEL == "interpret":
        return True
    if FUSED_KERNEL not in ("auto", "on") or not x3.is_cuda or w0.requires_grad or dense.requires_grad:
        return False
    if FUSED_KERNEL == "on":
        return True
    from pyro_tvc.compose.dispatch import use_fused_kernel

    return use_fused_kernel(x3.shape[0], x3.shape[1], w0.shape[1], w0.shape[0], dense.shape[0], x3.device, x3.dtype)


def _samples_per_chunk(x3: torch.Tensor, w0: torch.Tensor, grad: bool) -> int:
    per_sample = w0.numel() * w0.element_size()
    budget = max(GRAD_MIN_CHUNK_BYTES, x3.numel() * x3.element_size()) if grad else WEIGHT_CHUNK_BYTES
    return max(1, budget // per_sample)


class Composed:
    """One composed parameter for the current call: base tensor, its components and ``coef [N, C]``."""

    def __init__(self, base: torch.Tensor, comps: ParamComponents, coef: torch.Tensor):
        self.base, self.comps, self.coef = base, comps, coef

    def per_sample(self) -> torch.Tensor:
        """``[N, *shape]``."""
        return self.base + self.comps.delta(self.coef)


def _param(module: nn.Module, name: str):
    """The composed parameter ``name`` of ``module`` for this call, or its plain tensor (shared by all samples)."""
    state = getattr(module, "_pyro_tvc_composed", {})
    return state.get(name, getattr(module, name))


def _per_sample_vector(p, ndim: int) -> torch.Tensor | None:
    """A 1-D parameter as ``[N, 1, ..., 1, d]`` broadcastable against an ``ndim``-dim activation (None stays None)."""
    if p is None:
        return None
    if isinstance(p, Composed):
        v = p.per_sample()
        return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])
    return p


def _weight_space(x3: torch.Tensor, base: torch.Tensor, dense: torch.Tensor, coef: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x3 [n, L, in]`` through per-sample ``W_i = base + coef_i @ dense`` (+ ``bias [n, out]``) -> ``[n, L, out]``."""
    weights = torch.addmm(base.reshape(1, -1), coef, dense.reshape(dense.shape[0], -1)).reshape(-1, *base.shape)
    if bias is None:
        return torch.bmm(x3, weights.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x3, weights.transpose(1, 2))


def _bias_per_sample(bias, n: int) -> torch.Tensor | None:
    """``[n, out]`` (composed or shared bias), or None."""
    if bias is None:
        return None
    return bias.per_sample() if isinstance(bias, Composed) else bias.expand(n, -1)


def _lowrank_linear(x3: torch.Tensor, weight: Composed, bias) -> torch.Tensor:
    """``x3 [n, L, in] -> [n * L, out]`` through ``W_0 + sum_c coef_c U_c diag(S_c) V_c^T`` and the bias.

    Two GEMMs against existing weights (concatenating ``[W_0; V]`` would copy W_0 on every call and keep the copy
    for backward), then one fused GEMM + add for the factor term, into which a composed bias is folded as extra
    columns (its coefficients times its components) instead of another pass over the output."""
    U, S, Vh = weight.comps.factors  # [C, out, r], [C, r], [C, r, in]
    n, L = x3.shape[:2]
    C, r = S.shape
    out = weight.base.shape[0]
    V_cat = Vh.reshape(C * r, -1)  # [C*r, in], a view
    U_cat = U.permute(1, 0, 2).reshape(out, C * r)  # [out, C*r]
    h = F.linear(x3, V_cat) * (weight.coef[:, :, None] * S[None]).reshape(n, 1, C * r)
    base_bias = bias.base if isinstance(bias, Composed) else bias
    if isinstance(bias, Composed):
        h = torch.cat([h, bias.coef[:, None, :].expand(n, L, -1)], dim=-1)
        U_cat = torch.cat([U_cat, bias.comps.dense.T], dim=1)
    return torch.addmm(F.linear(x3, weight.base, base_bias).reshape(-1, out), h.reshape(n * L, -1), U_cat.T)


def composed_linear(x: torch.Tensor, weight, bias) -> torch.Tensor:
    """``x [N, *, in]`` -> ``[N, *, out]`` with per-sample (or shared) weight ``[out, in]`` and bias ``[out]``."""
    n = x.shape[0]
    if not isinstance(weight, Composed):
        if isinstance(bias, Composed):
            return F.linear(x, weight) + _per_sample_vector(bias, x.ndim)
        return F.linear(x, weight, bias)
    w0, comps, coef = weight.base, weight.comps, weight.coef
    x3 = x.reshape(n, -1, x.shape[-1])
    if comps.factors is not None:
        return _lowrank_linear(x3, weight, bias).reshape(*x.shape[:-1], w0.shape[0])
    if x.ndim == 2:
        C = comps.dense.shape[0]
        stacked = torch.cat([w0[None], comps.dense]).reshape((C + 1) * w0.shape[0], -1)
        z = F.linear(x, stacked).reshape(n, C + 1, w0.shape[0])
        y = z[:, 0] + torch.einsum("nc,nco->no", coef, z[:, 1:])
        b = _per_sample_vector(bias, y.ndim)
        return y if b is None else y + b
    b = _bias_per_sample(bias, n)
    if _route_fused(x3, w0, comps.dense):
        from pyro_tvc.compose.triton_linear import fused_composed_linear

        y = fused_composed_linear(x3, w0, comps.dense, coef, b, interpret=FUSED_KERNEL == "interpret")
        return y.reshape(*x.shape[:-1], -1)
    grad = torch.is_grad_enabled()
    chunk = _samples_per_chunk(x3, w0, grad)
    outs = []
    for s in range(0, n, chunk):
        args = (x3[s:s + chunk], w0, comps.dense, coef[s:s + chunk], None if b is None else b[s:s + chunk])
        outs.append(checkpoint(_weight_space, *args, use_reentrant=False) if grad else _weight_space(*args))
    return torch.cat(outs).reshape(*x.shape[:-1], -1)


# --- module forwards ----------------------------------------------------------------------------------------------

def linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return composed_linear(x, _param(module, "weight"), _param(module, "bias"))


def layer_norm_forward(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    w, b = _param(module, "weight"), _param(module, "bias")
    if not isinstance(w, Composed) and not isinstance(b, Composed):
        return F.layer_norm(x, module.normalized_shape, w, b, module.eps)
    if len(module.normalized_shape) != 1:
        raise NotImplementedError("fast composition supports LayerNorm over the last dim only; use method='reference'")
    y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    w, b = _per_sample_vector(w, x.ndim), _per_sample_vector(b, x.ndim)
    if w is not None and b is not None:
        return torch.addcmul(b, y, w)  # one pass instead of a multiply and an add
    y = y * w if w is not None else y
    return y + b if b is not None else y


def conv2d_forward(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patch embedding (kernel == stride, no padding): unfold into patches, then a composed linear map.
    Any other conv: per-sample weights through one grouped convolution (groups = N)."""
    n = x.shape[0]
    weight, bias = _param(module, "weight"), _param(module, "bias")
    k, s = module.kernel_size, module.stride
    is_patchify = (k == s and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1)
    if is_patchify:
        patches = F.unfold(x, k, stride=s)  # [N, Cin*kh*kw, P]
        gh, gw = (x.shape[2] - k[0]) // s[0] + 1, (x.shape[3] - k[1]) // s[1] + 1
        if isinstance(weight, Composed):
            c = weight.comps
            w = Composed(weight.base.flatten(1), ParamComponents(c.name, c.dense.flatten(2), c.index, c.factors),
                         weight.coef)
        else:
            w = weight.flatten(1)
        y = composed_linear(patches.transpose(1, 2), w, bias)  # [N, P, out]
        return y.transpose(1, 2).reshape(n, -1, gh, gw)
    w = weight.per_sample() if isinstance(weight, Composed) else weight.expand(n, *weight.shape)
    b = bias.per_sample() if isinstance(bias, Composed) else (None if bias is None else bias.expand(n, -1))
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
                 module.stride, module.padding, module.dilation, module.groups * n)
    return y.reshape(n, -1, *y.shape[2:])


def _rows(p, start: int, stop: int):
    """Rows ``[start, stop)`` of a composed (or plain) matrix/vector, for the q/k/v parts of ``in_proj``."""
    if not isinstance(p, Composed):
        return None if p is None else p[start:stop]
    c = p.comps
    factors = None if c.factors is None else (c.factors[0][:, start:stop], c.factors[1], c.factors[2])
    return Composed(p.base[start:stop], ParamComponents(c.name, c.dense[:, start:stop], c.index, factors), p.coef)


def multihead_attention_forward(module: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                                need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """Batch-first ``nn.MultiheadAttention`` with composed in/out projections (``[N, L, E]`` in and out)."""
    if not module.batch_first:
        raise NotImplementedError("fast composition needs batch_first=True attention; use method='reference'")
    if module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
        raise NotImplementedError("fast composition supports plain nn.MultiheadAttention only; use method='reference'")
    n, L, E = query.shape
    h = module.num_heads
    w_in, b_in = _param(module, "in_proj_weight"), _param(module, "in_proj_bias")
    if query is key and key is value:
        q, k, v = composed_linear(query, w_in, b_in).chunk(3, dim=-1)
    else:
        q, k, v = (composed_linear(t, _rows(w_in, i * E, (i + 1) * E), _rows(b_in, i * E, (i + 1) * E))
                   for i, t in enumerate((query, key, value)))
    q, k, v = (t.reshape(n, t.shape[1], h, E // h).transpose(1, 2) for t in (q, k, v))
    mask = attn_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask, float("-inf"))
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(key_padding_mask.bool(), float("-inf"))[:, None, None, :]
        mask = pad if mask is None else mask + pad
    dropout = module.dropout if module.training else 0.0
    weights = None
    if need_weights:
        scores = q @ k.transpose(-1, -2) / math.sqrt(E // h)
        if mask is not None:
            scores = scores + mask
        if is_causal and attn_mask is None:
            scores = scores.masked_fill(torch.ones(L, k.shape[2], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        probs = F.dropout(scores.softmax(-1), dropout, module.training)
        out = probs @ v
        weights = probs.mean(1) if average_attn_weights else probs
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=is_causal and attn_mask is None)
    out = out.transpose(1, 2).reshape(n, L, E)
    proj = module.out_proj
    out = composed_linear(out, _param(proj, "weight"), _param(proj, "bias"))
    return out, weights


def vision_transformer_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer.forward`` with composed class/positional embeddings and projection."""
    if module.attn_pool is not None or module.output_tokens:
        raise NotImplementedError("fast composition supports ViTs without attentional pooling or token outputs")
    n = x.shape[0]
    x = module.conv1(x)
    x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)  # [N, P, width]
    cls = _param(module, "class_embedding")
    cls = cls.per_sample() if isinstance(cls, Composed) else cls.expand(n, -1)
    x = torch.cat([cls[:, None, :].to(x.dtype), x], dim=1)
    pos = _param(module, "positional_embedding")
    x = x + (pos.per_sample() if isinstance(pos, Composed) else pos).to(x.dtype)
    x = module.patch_dropout(x)
    x = module.ln_pre(x)
    x = module.transformer(x)
    pooled, _ = module._pool(x)
    proj = _param(module, "proj")
    if proj is None:
        return pooled
    if isinstance(proj, Composed):  # x @ proj == linear with weight proj^T
        c = proj.comps
        factors = None if c.factors is None else (c.factors[2].transpose(1, 2), c.factors[1], c.factors[0].transpose(1, 2))
        proj_t = Composed(proj.base.T, ParamComponents(c.name, c.dense.transpose(1, 2), c.index, factors), proj.coef)
        return composed_linear(pooled, proj_t, None)
    return pooled @ proj


def embedding_forward(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``ids [N, *]`` -> ``[N, *, d]`` through the per-sample table ``E_i = E_0 + sum_c coef[i, c] comps_c``: only the
    looked-up rows of the components are gathered (never ``N`` tables)."""
    weight = _param(module, "weight")
    if module.max_norm is not None:
        raise NotImplementedError("fast composition does not support nn.Embedding(max_norm=...); use method='reference'")
    if not isinstance(weight, Composed):
        return F.embedding(ids, weight)
    comps, coef = weight.comps, weight.coef
    n = coef.shape[0]
    if ids.shape[0] != n:  # ids shared by the batch (BERT's position ids [1, L]): each sample its own table
        ids = ids.expand(n, *ids.shape[1:])
    base = F.embedding(ids, weight.base)
    C = coef.shape[1]
    if comps.factors is not None:  # rows of U, scaled by coef (x) S, then V^T: [N, *, C*r] @ [C*r, d]
        U, S, Vh = comps.factors
        r = S.shape[1]
        rows = U[:, ids].movedim(0, -2)  # [N, *, C, r]: only the looked-up rows
        scale = (coef[:, :, None] * S[None]).reshape(n, *([1] * (ids.ndim - 1)), C, r)
        return base + (rows * scale).flatten(-2) @ Vh.reshape(C * r, -1)
    rows = comps.dense[:, ids]  # [C, N, *, d]: only the looked-up rows of each component
    return base + torch.einsum("cn...d,nc->n...d", rows, coef)


def _vision_transformer_type():
    from open_clip.transformer import VisionTransformer

    return VisionTransformer


FAST_FORWARDS: list[tuple[Callable[[], type], Callable]] = [
    (lambda: nn.Linear, linear_forward),
    (lambda: nn.LayerNorm, layer_norm_forward),
    (lambda: nn.Conv2d, conv2d_forward),
    (lambda: nn.Embedding, embedding_forward),
    (lambda: nn.MultiheadAttention, multihead_attention_forward),
    (_vision_transformer_type, vision_transformer_forward),
]


def fast_forward_for(module: nn.Module) -> Callable | None:
    for get_type, fn in FAST_FORWARDS:
        if isinstance(module, get_type()):
            return fn
    return None


@contextlib.contextmanager
def patched_forwards(root: nn.Module, composed: dict[str, Composed]):
    """Within the block, modules owning composed parameters run their composed forward."""
    owners: dict[nn.Module, dict[str, Composed]] = {}
    for name, comp in composed.items():
        owner_name, _, local = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        owners.setdefault(owner, {})[local] = comp
    # nn.MultiheadAttention reads its out_proj's parameters directly (never calls out_proj.forward), so a composed
    # out_proj needs its parent attention patched too.
    for attention in root.modules():
        if isinstance(attention, nn.MultiheadAttention) and attention.out_proj in owners:
            owners.setdefault(attention, {})
    patched = []
    try:
        for owner, params in owners.items():
            fn = fast_forward_for(owner)
            if fn is None:
                raise NotImplementedError(
                    f"fast composition does not support parameters of {type(owner).__name__} "
                    f"({', '.join(params)}); use method='reference'")
            owner._pyro_tvc_composed = params
            owner.forward = fn.__get__(owner)
            patched.append(owner)
        yield
    finally:
        for owner in patched:
            del owner.forward
            del owner._pyro_tvc_composed
