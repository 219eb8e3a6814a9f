"""Each baseline against an independent check on a tiny hand-made case (issue 9's acceptance)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pyro_tvc.backbones import ZeroShotHead
from pyro_tvc.compose.engine import Composer
from pyro_tvc.heads import MultiHead
from pyro_tvc.methods.adamerging import prediction_entropy
from pyro_tvc.methods.atlas import fit as atlas_fit, train_coefficients
from pyro_tvc.methods.base import MethodConfig, MethodContext, TaskData
from pyro_tvc.methods.task_arithmetic import fit as ta_fit
from pyro_tvc.methods.ties import elect_and_merge, ties_merge, trim
from pyro_tvc.methods.zero_shot import fit as zs_fit
from pyro_tvc.protocols.negation import select_negation
from pyro_tvc.task_vectors import TaskVector, TaskVectorBank


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4)).double()


def tiny_bank(net, T=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    vectors = [TaskVector({k: 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                           for k, v in net.named_parameters()}, {"task": f"t{t}"}) for t in range(T)]
    return TaskVectorBank.from_vectors(vectors)


def tiny_context(net, bank, n=24, classes=3, seed=2, **kw):
    gen = torch.Generator().manual_seed(seed)
    head = ZeroShotHead(F.normalize(torch.randn(classes, 4, generator=gen, dtype=torch.float64), dim=-1), 10.0)
    heads = MultiHead([head], ["target"])
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    data = TaskData(x, x, torch.randint(classes, (n,), generator=gen), torch.zeros(n, dtype=torch.long))
    return MethodContext(net, bank, heads, data, data, data, MethodConfig(epochs=2, batch_size=8), seed=0, **kw)


def test_ties_trim_elect_merge_by_hand():
    # two tasks, one 2x2 block and one 2-vector: 6 values per task, k = 50 % keeps the top 3 of each task
    stacked = {"w": torch.tensor([[[3.0, -1.0], [0.5, -4.0]], [[-2.0, 0.2], [1.0, 5.0]]]),
               "b": torch.tensor([[2.0, 0.1], [-3.0, 0.3]])}
    t = trim(stacked, 50.0)
    # task 0 magnitudes 3, 1, .5, 4, 2, .1 -> keep 4, 3, 2; task 1: 2, .2, 1, 5, 3, .3 -> keep 5, 3, 2
    assert torch.equal(t["w"], torch.tensor([[[3.0, 0.0], [0.0, -4.0]], [[-2.0, 0.0], [0.0, 5.0]]]))
    assert torch.equal(t["b"], torch.tensor([[2.0, 0.0], [-3.0, 0.0]]))
    m = elect_and_merge(t)
    # w[0,0]: 3 + -2 = 1 > 0 -> keep 3 -> 3; w[1,1]: -4 + 5 = 1 > 0 -> keep 5; b[0]: 2 - 3 < 0 -> keep -3
    assert torch.equal(m["w"], torch.tensor([[3.0, 0.0], [0.0, 5.0]]))
    assert torch.equal(m["b"], torch.tensor([-3.0, 0.0]))
    # agreeing values are averaged (disjoint mean), not summed
    same = elect_and_merge({"v": torch.tensor([[2.0, -1.0], [4.0, 0.0]])})
    assert torch.equal(same["v"], torch.tensor([3.0, -1.0]))
    with pytest.raises(ValueError, match="TIES k"):
        trim(stacked, 0.0)


def test_ties_merge_bank_is_one_vector():
    net = tiny_net()
    merged = ties_merge(tiny_bank(net), 20.0)
    assert merged.task_names == ("ties",) and all(v.shape[0] == 1 for v in merged.stacked.values())


def test_task_arithmetic_equals_explicitly_merged_state_dict():
    net, bank = tiny_net(), None
    bank = tiny_bank(net)
    ctx = tiny_context(net, bank)
    result = ta_fit(ctx)
    scale = result.learned["scale"]
    # explicit: theta_0 + s * sum_t tau_t through TaskVector arithmetic and a plain forward
    theta0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    total = bank.vector("t0") + bank.vector("t1") + bank.vector("t2")
    merged = {k: theta0[k] + scale * total.params[k] for k in theta0}
    feats = functional_call(net, merged, (ctx.select.images,))
    expected = ctx.heads(feats).softmax(-1)
    assert torch.allclose(result.predictors["single"].probs(ctx.select), expected, atol=1e-10)
    # the chosen scale is the best of the grid on the selection split, by brute force
    best = max(result.learned["selection_curve"], key=lambda cs: cs[1])[1]
    assert math.isclose(dict(result.learned["selection_curve"])[scale], best)


def test_atlas_frozen_at_zero_equals_zero_shot():
    net = tiny_net()
    bank = tiny_bank(net)
    ctx = tiny_context(net, bank)
    composer = Composer(net, bank)
    coef, _ = train_coefficients(ctx, composer, torch.zeros(composer.coefficient_shape, dtype=torch.float64),
                                 lambda c, b: (c * 0).sum(), epochs=1, lr=0.1, desc="frozen")
    assert torch.equal(coef, torch.zeros_like(coef))
    zs = zs_fit(ctx).predictors["single"].probs(ctx.select)
    plain = ctx.heads(net(ctx.select.images)).softmax(-1)
    assert torch.allclose(zs, plain, atol=1e-12)
    learned = atlas_fit(ctx)
    probs = learned.predictors["single"].probs(ctx.select)
    acc = (probs.argmax(-1) == ctx.select.labels).float().mean()
    assert acc >= (plain.argmax(-1) == ctx.select.labels).float().mean()  # val selection never loses to epoch 0


def test_atlas_parts_with_different_coefficients_equal_hand_merged_network():
    net = tiny_net()
    bank = tiny_bank(net, T=2)
    K = 3
    composer = Composer(net, bank, parts=K)
    T, B = composer.coefficient_shape
    assert B == K * len(bank.block_names)
    theta0 = dict(net.named_parameters())
    # recover every part's membership from one-hot merges and check it is a partition shared by the tasks
    masks = {}
    for p in bank.block_names:
        parts = []
        for k in range(K):
            b = composer.block_names.index(f"{p}[{k}]")
            for t in range(T):
                coef = torch.zeros(T, B, dtype=torch.float64)
                coef[t, b] = 1.0
                delta = composer.merged_parameters(coef)[p] - theta0[p]
                tau = bank.stacked[p][t]
                member = (delta != 0)
                assert torch.allclose(delta[member], tau[member])  # a part of tau_t, nothing else
                if t == 0:
                    parts.append(member)
                else:
                    assert torch.equal(member, parts[k])  # the same partition for every task
        total = torch.stack(parts).sum(0)
        assert torch.equal(total, torch.ones_like(total))  # disjoint and covering
        masks[p] = parts
    coef = torch.randn(T, B, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    hand = {p: theta0[p] + sum(coef[t, composer.block_names.index(f"{p}[{k}]")] * masks[p][k] * bank.stacked[p][t]
                                for t in range(T) for k in range(K)) for p in bank.block_names}
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = functional_call(net, hand, (x,))
    assert torch.allclose(composer(x, coef), expected, atol=1e-10)
    assert torch.allclose(composer(x, coef.expand(4, T, B)), expected, atol=1e-10)  # per-sample fast path


def test_adamerging_entropy_against_direct_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    direct = float(sum(-(pi * math.log(pi)) for row in p.tolist() for pi in row)) / 2
    assert math.isclose(prediction_entropy(logits).item(), direct, rel_tol=1e-12)
    assert math.isclose(prediction_entropy(torch.zeros(1, 4)).item(), math.log(4), rel_tol=1e-6)


def test_negation_selection_rule_on_hand_made_curve():
    # (target acc, control acc) per candidate; control zero-shot 60 -> floor 57
    curve = [(80.0, 60.0), (50.0, 58.0), (30.0, 56.9), (40.0, 57.0), (40.0, 59.0)]
    assert select_negation(curve, 60.0) == 3  # 30 violates the floor; 40 ties go to the earlier one
    assert select_negation([(10.0, 1.0)], 60.0) is None


def test_multihead_scores_each_row_with_its_own_head():
    gen = torch.Generator().manual_seed(0)
    h0 = ZeroShotHead(F.normalize(torch.randn(2, 4, generator=gen), dim=-1), 5.0)
    h1 = ZeroShotHead(F.normalize(torch.randn(3, 4, generator=gen), dim=-1), 7.0)
    mh = MultiHead([h0, h1], ["a", "b"])
    feats = torch.randn(4, 4, generator=gen)
    ids = torch.tensor([0, 1, 1, 0])
    with mh.using(ids):
        out = mh(feats)
        folded = mh(feats.repeat(2, 1))  # Monte-Carlo draws folded into the batch reuse the ids
    for i, t in enumerate(ids.tolist()):
        ref = (h0, h1)[t](feats[i:i + 1])[0]
        assert torch.allclose(out[i, :len(ref)], ref, atol=1e-5)
        assert (out[i, len(ref):] <= -1e3).all()
    assert torch.allclose(folded[4:], out)
    assert torch.allclose(out.softmax(-1)[0, 2], torch.tensor(0.0))
