"""The composition engine against independent references: explicit weight merging and per-sample forwards."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from pyro_tvc.artifacts import ArtifactPaths, load_bank, load_clip, prepared_tasks
from pyro_tvc.backbones import image_encoder
from pyro_tvc.compose.components import lowrank_error
from pyro_tvc.compose.engine import Composer
from pyro_tvc.task_vectors import TaskVector, TaskVectorBank, TaskVectorError


class HandBuilt(nn.Module):
    """A general conv (not a patchify), attention, LayerNorm and linear layers: every fast-path layer type."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # [N, 9, 4]
        h = self.ln(h + self.attn(h, h, h, need_weights=False)[0])
        return self.fc(h.mean(1))


def random_bank(module: nn.Module, n_tasks: int, scale: float = 0.3, seed: int = 0) -> TaskVectorBank:
    g = torch.Generator().manual_seed(seed)
    vecs = [TaskVector({k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in module.named_parameters()},
                       {"task": f"t{i}"}) for i in range(n_tasks)]
    return TaskVectorBank.from_vectors(vecs)


def explicit_per_sample(module, bank, x, lam):
    """Independent reference: for each sample, merge theta_i = theta_0 + sum lam tau by hand and run the module."""
    base = dict(module.named_parameters())
    outs = []
    for i in range(x.shape[0]):
        params = {name: base[name] + sum(lam[i, t, b] * bank.stacked[name][t] for t in range(bank.num_tasks))
                  for b, name in enumerate(bank.block_names)}
        outs.append(functional_call(module, params, (x[i:i + 1],)))
    return torch.cat(outs)


@pytest.fixture(scope="module")
def tiny_clip(prepared):
    model, _ = load_clip(ArtifactPaths(prepared).clip)
    paths = ArtifactPaths(prepared)
    return image_encoder(model), load_bank(paths, prepared_tasks(paths))


def _check_methods(module, bank, x, rtol, atol):
    T, B = bank.num_tasks, bank.num_blocks
    lam = (0.5 * torch.randn(x.shape[0], T, B, dtype=x.dtype)).requires_grad_()
    ref = explicit_per_sample(module, bank, x, lam)
    ref_grad, = torch.autograd.grad(ref.square().sum(), lam)
    for method in ("naive", "reference", "fast"):
        out = Composer(module, bank, method=method)(x, lam)
        grad, = torch.autograd.grad(out.square().sum(), lam)
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, msg=method)
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol * 10, msg=method)


def test_methods_agree_on_hand_built_network():
    torch.manual_seed(0)
    net = HandBuilt()
    _check_methods(net, random_bank(net, 3), torch.randn(5, 2, 3, 3), rtol=1e-4, atol=1e-5)


def test_methods_agree_on_tiny_clip(tiny_clip):
    encoder, bank = tiny_clip
    _check_methods(encoder, bank, torch.randn(4, 3, 32, 32), rtol=1e-4, atol=1e-4)


def test_gradient_wrt_inputs_matches(tiny_clip):
    encoder, bank = tiny_clip
    lam = 0.3 * torch.randn(3, bank.num_tasks, bank.num_blocks)
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    g_ref, = torch.autograd.grad(explicit_per_sample(encoder, bank, x, lam).sum(), x)
    g_fast, = torch.autograd.grad(Composer(encoder, bank, "fast")(x, lam).sum(), x)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64_fast_path():
    torch.manual_seed(0)
    net = HandBuilt().double()
    bank = random_bank(net, 2)
    composer = Composer(net, bank, method="fast")
    lam = (0.5 * torch.randn(2, 2, bank.num_blocks, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda lam, x: composer(x, lam), (lam, x))
    lowrank = Composer(net, bank, method="fast", rank=1)
    assert torch.autograd.gradcheck(lambda lam: lowrank(x.detach(), lam), (lam,))


def test_task_level_equals_weight_merging(tiny_clip):
    encoder, bank = tiny_clip
    lam = 0.4 * torch.randn(bank.num_tasks, bank.num_blocks)
    merged = {k: v.clone() for k, v in encoder.state_dict().items()}
    for t, task in enumerate(bank.task_names):
        for b, name in enumerate(bank.block_names):
            merged[name] += lam[t, b] * bank.vector(task).params[name]
    x = torch.randn(6, 3, 32, 32)
    expected = functional_call(encoder, merged, (x,))
    torch.testing.assert_close(Composer(encoder, bank)(x, lam), expected, rtol=1e-5, atol=1e-5)
    # and N = 1 per sample with the same coefficients broadcast
    per_sample = Composer(encoder, bank)(x, lam.expand(6, -1, -1))
    torch.testing.assert_close(per_sample, expected, rtol=1e-4, atol=1e-4)


def test_lowrank_at_full_rank_equals_full_rank(tiny_clip):
    encoder, bank = tiny_clip
    lam = 0.5 * torch.randn(3, bank.num_tasks, bank.num_blocks)
    x = torch.randn(3, 3, 32, 32)
    full = Composer(encoder, bank, "fast")(x, lam)
    torch.testing.assert_close(Composer(encoder, bank, "fast", rank=512)(x, lam), full, rtol=1e-4, atol=1e-4)
    assert lowrank_error(bank, 512) < 1e-6
    errors = [lowrank_error(bank, r) for r in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_partitions_with_equal_part_coefficients_equal_one_block(tiny_clip):
    encoder, bank = tiny_clip
    lam = 0.5 * torch.randn(2, bank.num_tasks, bank.num_blocks)
    x = torch.randn(2, 3, 32, 32)
    whole = Composer(encoder, bank, "fast")(x, lam)
    parted = Composer(encoder, bank, "fast", parts=3)
    assert parted.coefficient_shape == (bank.num_tasks, 3 * bank.num_blocks)
    torch.testing.assert_close(parted(x, lam.repeat_interleave(3, dim=-1)), whole, rtol=1e-4, atol=1e-4)
    # a single part switched off differs
    lam3 = lam.repeat_interleave(3, dim=-1).clone()
    lam3[:, :, 0] = 0
    assert not torch.allclose(parted(x, lam3), whole)


def test_shape_errors_are_clear(tiny_clip):
    encoder, bank = tiny_clip
    composer = Composer(encoder, bank)
    T, B = composer.coefficient_shape
    with pytest.raises(ValueError, match=rf"\[N, {T}, {B}\]"):
        composer(torch.randn(2, 3, 32, 32), torch.zeros(2, T, B + 1))
    with pytest.raises(ValueError, match="for 3 samples but x has 2"):
        composer(torch.randn(2, 3, 32, 32), torch.zeros(3, T, B))
    with pytest.raises(ValueError, match="method must be one of"):
        Composer(encoder, bank, method="magic")
    other = random_bank(nn.Linear(3, 3), 2)
    with pytest.raises(TaskVectorError, match="not found in the module"):
        Composer(encoder, other)


def test_unsupported_layer_in_fast_path_names_it():
    class Odd(nn.Module):  # a layer type without a fast forward (nn.Embedding has one since the text path)
        def __init__(self):
            super().__init__()
            self.bilinear = nn.Bilinear(3, 3, 2)

        def forward(self, x):
            return self.bilinear(x, x)

    odd = Odd()
    composer = Composer(odd, random_bank(odd, 1), method="fast")
    with pytest.raises(NotImplementedError, match="Bilinear"):
        composer(torch.randn(1, 3), torch.zeros(1, 1, 2))
    x = torch.randn(1, 3)
    out = Composer(odd, random_bank(odd, 1), method="reference")(x, torch.zeros(1, 1, 2))
    torch.testing.assert_close(out, odd(x))


def test_chunked_weight_space_matches_unchunked(tiny_clip, monkeypatch):
    """Composing per-sample weights in chunks of samples (memory cap) changes nothing but memory."""
    from pyro_tvc.compose import layers

    encoder, bank = tiny_clip
    lam = (0.3 * torch.randn(5, bank.num_tasks, bank.num_blocks)).requires_grad_()
    x = torch.randn(5, 3, 32, 32)
    composer = Composer(encoder, bank, "fast")
    whole = composer(x, lam)
    g_whole, = torch.autograd.grad(whole.sum(), lam)
    monkeypatch.setattr(layers, "WEIGHT_CHUNK_BYTES", 1)
    monkeypatch.setattr(layers, "GRAD_MIN_CHUNK_BYTES", 1)
    with torch.no_grad():
        torch.testing.assert_close(composer(x, lam), whole, rtol=1e-5, atol=1e-5)
    chunked = composer(x, lam)
    g_chunked, = torch.autograd.grad(chunked.sum(), lam)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-4, atol=1e-5)
