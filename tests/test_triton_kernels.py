"""The fused Triton composition kernel, run on the CPU by Triton's interpreter, against a naive per-sample reference.

No environment variable is needed: pyro_tvc.compose.triton_linear wraps its kernels in Triton's InterpretedFunction
itself when ``interpret=True`` (see its docstring for why TRITON_INTERPRET=1 would have to precede ``import triton``),
so nothing here changes how other tests run. Shapes are tiny and deliberately not multiples of the tile sizes, so
that every mask is exercised.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from pyro_tvc.compose import layers  # noqa: E402
from pyro_tvc.compose import triton_linear  # noqa: E402
from pyro_tvc.compose.engine import Composer  # noqa: E402
from pyro_tvc.compose.triton_linear import fused_composed_linear  # noqa: E402
from tests.test_compose import HandBuilt, explicit_per_sample, random_bank  # noqa: E402

BLOCKS = (2, 16, 16, 16)  # 2 samples per program: with 3 samples the second group is partial


def naive(x3, w0, comps, coef, bias):
    """Independent reference: build every W_i explicitly and apply F.linear sample by sample."""
    outs = []
    for i in range(x3.shape[0]):
        w_i = w0.clone()
        for c in range(comps.shape[0]):
            w_i = w_i + coef[i, c] * comps[c]
        outs.append(F.linear(x3[i], w_i, None if bias is None else bias[i]))
    return torch.stack(outs)


def problem(n, L, k, o, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, k, generator=g, dtype=dtype).requires_grad_()
    w0 = torch.randn(o, k, generator=g, dtype=dtype)
    comps = torch.randn(C, o, k, generator=g, dtype=dtype)
    coef = torch.randn(n, C, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(n, o, generator=g, dtype=dtype).requires_grad_()
    return x, w0, comps, coef, bias


@pytest.mark.parametrize("with_bias,samples_per_program", [(True, 2), (False, 1), (True, 4)])
def test_outputs_and_gradients_match_naive_reference(with_bias, samples_per_program):
    # 3 samples, 5 tokens, in 20, out 24 against 16-wide tiles: partial tiles in every dimension.
    x, w0, comps, coef, bias = problem(3, 5, 20, 24, 3, torch.float32)
    bias = bias if with_bias else None
    blocks = (samples_per_program,) + BLOCKS[1:]
    y = fused_composed_linear(x, w0, comps, coef, bias, blocks=blocks, interpret=True)
    ref = naive(x, w0, comps, coef, bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(ref)
    wrt = (x, coef) + ((bias,) if with_bias else ())
    got = torch.autograd.grad(y, wrt, dy)
    expected = torch.autograd.grad(ref, wrt, dy)
    for name, g, e in zip(("x", "coef", "bias"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4, msg=name)


def test_gradcheck_float64():
    x, w0, comps, coef, bias = problem(2, 3, 4, 5, 2, torch.float64, seed=1)
    assert torch.autograd.gradcheck(
        lambda x, coef, bias: fused_composed_linear(x, w0, comps, coef, bias, blocks=BLOCKS, interpret=True),
        (x, coef, bias), fast_mode=True)


def test_strided_weights_and_several_token_tiles():
    """A transposed base weight (as the ViT projection passes it), transposed components, 40 tokens (3 tiles), and
    a stride-0 output gradient."""
    x, w0, comps, coef, _ = problem(2, 40, 18, 17, 2, torch.float64, seed=2)
    w0_t = w0.T.contiguous().T  # same values, column-major
    comps_t = comps.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w0_t.is_contiguous() and not comps_t.is_contiguous()
    y = fused_composed_linear(x, w0_t, comps_t, coef, blocks=BLOCKS, interpret=True)
    ref = naive(x, w0, comps, coef, None)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(y, (x, coef), dy, retain_graph=True),
                               torch.autograd.grad(ref, (x, coef), dy, retain_graph=True))
    # y.sum() hands backward an expanded gradient (all strides 0)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), (x, coef)), torch.autograd.grad(ref.sum(), (x, coef)))


def test_composer_routes_linear_layers_through_the_kernel(monkeypatch):
    """The engine's fast path with the kernel forced (interpreter) equals per-sample explicit merging, and the
    kernel is really called for the layers on tokens (attention in/out projections)."""
    torch.manual_seed(0)
    net = HandBuilt().double()
    bank = random_bank(net, 3)
    calls = []
    real = triton_linear.fused_composed_linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_linear, "fused_composed_linear", counting)
    monkeypatch.setattr(layers, "FUSED_KERNEL", "interpret")
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    lam = (0.5 * torch.randn(3, bank.num_tasks, bank.num_blocks, dtype=torch.float64)).requires_grad_()
    out = Composer(net, bank, method="fast")(x, lam)
    ref = explicit_per_sample(net, bank, x, lam)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), lam)[0], torch.autograd.grad(ref.sum(), lam)[0])
    assert len(calls) == 2  # in_proj and out_proj of the attention, on [3, 9, 4] tokens


def test_cpu_default_never_touches_the_kernel_or_the_dispatcher(monkeypatch):
    from pyro_tvc.compose import dispatch

    def forbidden(*args, **kwargs):
        raise AssertionError("called on CPU")

    monkeypatch.setattr(triton_linear, "fused_composed_linear", forbidden)
    monkeypatch.setattr(dispatch, "use_fused_kernel", forbidden)
    assert layers.FUSED_KERNEL == "auto"
    torch.manual_seed(0)
    net = HandBuilt()
    bank = random_bank(net, 2)
    lam = 0.5 * torch.randn(2, bank.num_tasks, bank.num_blocks)
    x = torch.randn(2, 2, 3, 3)
    torch.testing.assert_close(Composer(net, bank, "fast")(x, lam), explicit_per_sample(net, bank, x, lam),
                               rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_named():
    x, w0, comps, coef, bias = problem(2, 3, 4, 5, 2, torch.float32)
    with pytest.raises(ValueError, match="CUDA device"):
        fused_composed_linear(x, w0, comps, coef)
    with pytest.raises(ValueError, match=r"coef must be \[2, 2\]"):
        fused_composed_linear(x, w0, comps, coef[:, :1], interpret=True)
    with pytest.raises(ValueError, match="comps"):
        fused_composed_linear(x, w0, comps[:, :4], coef, interpret=True)
    with pytest.raises(ValueError, match="frozen"):
        fused_composed_linear(x, w0.requires_grad_(), comps, coef, interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        fused_composed_linear(x, w0.detach(), comps, coef, blocks=(2, 16, 24, 16), interpret=True)


def test_kernels_compile_for_hopper_without_a_gpu():
    """Ahead-of-time compilation for sm_90 catches what the interpreter cannot (types, constexprs, layouts)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tl = triton.language
    kernels = [(triton_linear._composed_matmul_kernel, {"HAS_BIAS": True}),
               (triton_linear._coef_grad_kernel, {})]
    for (fn, extra), precision in zip(kernels, ("tf32x3", "tf32")):  # the default without and with TF32
        consts = {**extra, "ACC": tl.float32, "PRECISION": precision, "SAMPLES": 2,
                  "BLOCK_L": 64, "BLOCK_R": 64, "BLOCK_K": 32}
        names = inspect.getfullargspec(fn).args
        signature = {n: "constexpr" if n in consts else ("*fp32" if n.endswith("_ptr") else "i32") for n in names}
        source = ASTSource(triton.jit(fn), signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        except RuntimeError as e:  # no ptxas in this Triton build
            if "ptxas" in str(e):
                pytest.skip(f"cannot compile here: {e}")
            raise
        assert "mma" in compiled.asm["ptx"], fn.__name__  # the dot runs on the tensor cores
