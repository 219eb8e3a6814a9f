import pytest
import torch

from pyro_tvc.artifacts import ArtifactPaths, load_clip
from pyro_tvc.checkpoints import image_encoder_state, load_state_dict
from pyro_tvc.task_vectors import TaskVector, TaskVectorBank, TaskVectorError, state_dict_sha256


def _state(seed, shapes=(("a", (3, 4)), ("b", (5,)))):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes}


def test_apply_reproduces_finetuned_bit_for_bit_on_real_vectors(prepared):
    from pyro_tvc.backbones import image_encoder

    model, _ = load_clip(ArtifactPaths(prepared).clip)
    theta0 = image_encoder(model).state_dict()
    for path in (prepared / "task_vectors").glob("*.safetensors"):
        tv = TaskVector.load(path)
        theta_t = {k: theta0[k] + tv.params[k] for k in theta0}  # the independent reference: plain addition
        rebuilt = tv.apply_to(theta0)
        assert all(torch.equal(rebuilt[k], theta_t[k]) for k in theta0)
        # and from the state dicts: tau = theta_t - theta_0, theta_0 + tau == theta_t exactly
        again = TaskVector.from_state_dicts(theta0, theta_t).apply_to(theta0)
        assert all(torch.equal(again[k], theta_t[k]) for k in theta0)


def test_algebra_against_elementwise_reference():
    p0, p1, p2 = _state(0), _state(1), _state(2)
    t1, t2 = TaskVector.from_state_dicts(p0, p1, "one"), TaskVector.from_state_dicts(p0, p2, "two")
    for k in p0:
        assert torch.allclose((t1 + t2).params[k], (p1[k] - p0[k]) + (p2[k] - p0[k]))
        assert torch.allclose((t1 - t2).params[k], p1[k] - p2[k], atol=1e-6)
        assert torch.equal((-t1).params[k], -(p1[k] - p0[k]))
        assert torch.allclose((0.5 * t1).params[k], 0.5 * (p1[k] - p0[k]))
        assert torch.allclose((t1 * 2).params[k], 2 * (p1[k] - p0[k]))
    negated = (-t1).apply_to(p0)
    assert all(torch.allclose(negated[k], 2 * p0[k] - p1[k], atol=1e-6) for k in p0)


def test_safetensors_round_trip_keeps_values_and_metadata(tmp_path):
    tv = TaskVector.from_state_dicts(_state(0), _state(1), task="mnist", backbone="tiny")
    tv.save(tmp_path / "tv.safetensors")
    back = TaskVector.load(tmp_path / "tv.safetensors")
    assert back.meta == tv.meta and back.meta["theta0_sha256"] == state_dict_sha256(_state(0))
    assert all(torch.equal(back.params[k], tv.params[k]) for k in tv.params)


def test_hash_is_order_independent_and_content_sensitive():
    s = _state(0)
    assert state_dict_sha256(s) == state_dict_sha256(dict(reversed(list(s.items()))))
    s2 = {k: v.clone() for k, v in s.items()}
    s2["a"][0, 0] += 1e-7
    assert state_dict_sha256(s) != state_dict_sha256(s2)


def test_bank_stacks_per_block_and_selects():
    p0 = _state(0)
    tvs = [TaskVector.from_state_dicts(p0, _state(i), f"t{i}") for i in (1, 2, 3)]
    bank = TaskVectorBank.from_vectors(tvs)
    assert bank.num_tasks == 3 and bank.block_names == ("a", "b") and bank.stacked["a"].shape == (3, 3, 4)
    assert torch.equal(bank.stacked["b"][1], tvs[1].params["b"])
    sub = bank.select(["t3", "t1"])
    assert torch.equal(sub.stacked["a"][0], tvs[2].params["a"])
    with pytest.raises(TaskVectorError, match="unknown tasks"):
        bank.select(["nope"])


@pytest.mark.parametrize("bad, match", [
    ({"a": torch.zeros(3, 4)}, "different keys"),
    ({"a": torch.zeros(4, 3), "b": torch.zeros(5)}, "shape mismatch at 'a'"),
    ({"a": torch.zeros(3, 4, dtype=torch.float64), "b": torch.zeros(5)}, "dtype mismatch at 'a'"),
])
def test_mismatched_state_dicts_are_refused(bad, match):
    with pytest.raises(TaskVectorError, match=match):
        TaskVector.from_state_dicts(_state(0), bad)


def test_mixing_backbones_or_theta0_is_refused():
    a = TaskVector.from_state_dicts(_state(0), _state(1), "x", backbone="tiny")
    b = TaskVector.from_state_dicts(_state(0), _state(2), "y", backbone="ViT-B-32")
    c = TaskVector.from_state_dicts(_state(5), _state(2), "z", backbone="tiny")
    with pytest.raises(TaskVectorError, match="backbone"):
        a + b
    with pytest.raises(TaskVectorError, match="theta0_sha256"):
        TaskVectorBank.from_vectors([a, c])
    with pytest.raises(TaskVectorError, match="another theta_0"):
        a.apply_to(_state(5))


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(TaskVectorError, match="not a pyro-tvc task vector"):
        TaskVector.load(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        TaskVector.load(tmp_path / "missing.safetensors")


def test_checkpoint_formats(tmp_path):
    state = {"visual.conv1.weight": torch.randn(2, 3), "logit_scale": torch.ones(())}
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "openclip.pt")
    for name in ("plain.pt", "openclip.pt"):
        loaded = load_state_dict(tmp_path / name)
        assert torch.equal(loaded["visual.conv1.weight"], state["visual.conv1.weight"])
        assert set(image_encoder_state(loaded)) == {"conv1.weight"}
    module = torch.nn.Linear(2, 2)
    torch.save(module, tmp_path / "module.pt")  # a whole pickled torch module: rebuilt without running its code
    assert torch.equal(load_state_dict(tmp_path / "module.pt")["weight"], module.weight)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "nope.pt")
