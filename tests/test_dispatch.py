"""The per-layer dispatcher (cost model, measurement, cache, CPU never fused) and ``--rank auto``."""
import pytest
import torch

from pyro_tvc.compose import dispatch
from pyro_tvc.compose.dispatch import DeviceProfile, LinearShape, auto_rank, choose_linear, predict_ms


@pytest.fixture(autouse=True)
def _empty_cache():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def fake_measurements(monkeypatch, times: dict[str, float]) -> list:
    calls = []

    def fake(strategy, shape, device, dtype=torch.float32, grad=False, repeats=3):
        calls.append((strategy, shape))
        return times[strategy]

    monkeypatch.setattr(dispatch, "measure_ms", fake)
    return calls


def test_choice_is_cached_per_shape(monkeypatch):
    calls = fake_measurements(monkeypatch, {"weight": 2.0, "activation": 1.0, "lowrank": 3.0, "fused": 0.0})
    shape = LinearShape(8, 5, 16, 24, 3)
    first = choose_linear(shape, "cpu", candidates=("weight", "activation"))
    assert len(calls) == 2
    assert choose_linear(shape, "cpu", candidates=("weight", "activation")) is first
    assert len(calls) == 2  # nothing measured again
    choose_linear(LinearShape(8, 6, 16, 24, 3), "cpu", candidates=("weight", "activation"))
    assert len(calls) == 4  # a new shape is measured


def test_cpu_never_selects_the_fused_kernel(monkeypatch):
    # The fake measurement makes "fused" the fastest: it must be excluded, not merely lose.
    calls = fake_measurements(monkeypatch, {"weight": 2.0, "activation": 1.0, "lowrank": 3.0, "fused": 0.0})
    choice = choose_linear(LinearShape(8, 5, 16, 24, 3, rank=2), "cpu", top=4)
    assert choice.strategy == "activation"
    assert "fused" not in choice.predicted_ms and "fused" not in choice.measured_ms
    assert all(s != "fused" for s, _ in calls)
    assert not dispatch.use_fused_kernel(8, 5, 16, 24, 3, torch.device("cpu"), torch.float32)


def test_measurement_overrides_the_model(monkeypatch):
    shape = LinearShape(64, 50, 768, 3072, 8)
    predicted = predict_ms(shape, dispatch.CPU_PROFILE)
    first, second = sorted(("weight", "activation"), key=predicted.__getitem__)
    fake_measurements(monkeypatch, {first: 5.0, second: 1.0})
    choice = choose_linear(shape, "cpu", candidates=("weight", "activation"))
    assert choice.strategy == second and not choice.model_agreed


def test_real_measurement_on_cpu_is_positive_and_picks_a_measured_form():
    choice = choose_linear(LinearShape(4, 3, 16, 8, 2, rank=2), "cpu", grad=True, top=3)
    assert set(choice.measured_ms) == {"weight", "activation", "lowrank"}
    assert all(t > 0 for t in choice.measured_ms.values())
    assert choice.measured_ms[choice.strategy] == min(choice.measured_ms.values())


def test_cost_model_hand_computed_case():
    # Rates of 1 FLOP/s, 1 byte/s, no launch cost: each op costs max(FLOPs, bytes) seconds.
    # N=1, L=2, in=3, out=4, C=1, float32 (4 bytes): weight set 48 bytes, activations 1*2*(3+4)*4 = 56 bytes.
    # weight: addmm 2*1*1*12 = 24 FLOPs vs (C+1)*48 + 1*48 = 144 bytes -> 144;
    #         bmm   2*1*2*12 = 48 FLOPs vs 48 + 56 = 104 bytes -> 104.     total 248 s
    # fused:  compose 24 FLOPs (elementwise) + max(bmm 48 FLOPs, max(1 group*2*48 cache, 2*48 + 56 memory) = 152)
    #         -> 176 s; with 4 samples and 1 sample per program the cache term 4*2*48 = 384 s dominates:
    #         compose 96 + max(bmm 192, max(384, 2*48 + 4*56 = 320)) = 480 s.
    unit = DeviceProfile(1.0, 1.0, 1.0, 1.0, 0.0)
    ms = predict_ms(LinearShape(1, 2, 3, 4, 1), unit, fused_samples=2)
    assert ms["weight"] == pytest.approx(248e3)
    assert ms["fused"] == pytest.approx(176e3)
    assert "lowrank" not in ms
    assert predict_ms(LinearShape(4, 2, 3, 4, 1), unit, fused_samples=1)["fused"] == pytest.approx(480e3)


def test_cost_model_ranks_the_vit_layer_forms_as_the_roofline_says():
    """ViT-B/32 MLP at batch 64, T = 8 with the H200 leads: writing 64 weights through HBM costs more than composing
    on chip when two samples share each component tile, one sample per program is bound by cache traffic instead,
    and the activation form's (C + 1) x FLOPs cost the most."""
    shape = LinearShape(64, 50, 768, 3072, 8)
    ms = predict_ms(shape, dispatch.CUDA_PROFILE, fused_samples=2)
    assert ms["fused"] < ms["weight"] < ms["activation"]
    assert predict_ms(shape, dispatch.CUDA_PROFILE, fused_samples=1)["fused"] > ms["weight"]


def test_unknown_candidate_is_named():
    with pytest.raises(ValueError, match="unknown candidates.*magic"):
        choose_linear(LinearShape(1, 2, 3, 4, 1), "cpu", candidates=("magic",))
    with pytest.raises(ValueError, match="none of"):
        choose_linear(LinearShape(1, 2, 3, 4, 1), "cpu", candidates=("fused",))


def test_auto_rank_picks_the_smallest_rank_within_half_a_point():
    table = {None: 70.0, 4: 60.0, 8: 69.4, 16: 69.5, 32: 70.2, 64: 70.0}
    asked = []

    def val_accuracy(rank):
        asked.append(rank)
        return table[rank]

    choice = auto_rank(val_accuracy)
    assert choice.rank == 16  # 69.4 is 0.6 below full rank; 69.5 is exactly 0.5 below (inclusive)
    assert asked == [None, 4, 8, 16]  # stops at the first rank that is close enough
    assert choice.full_accuracy == 70.0 and choice.accuracies == {4: 60.0, 8: 69.4, 16: 69.5}


def test_auto_rank_returns_full_rank_when_no_rank_is_close():
    choice = auto_rank(lambda r: 80.0 if r is None else 70.0 + (r or 0) / 100, ranks=(16, 4))
    assert choice.rank is None and list(choice.accuracies) == [4, 16]


def test_auto_rank_rejects_bad_input():
    with pytest.raises(ValueError, match="positive integers"):
        auto_rank(lambda r: 50.0, ranks=(0, 4))
    with pytest.raises(ValueError, match="tolerance"):
        auto_rank(lambda r: 50.0, tolerance=-1)
    with pytest.raises(ValueError, match=r"percentage in \[0, 100\]"):
        auto_rank(lambda r: float("nan"))
