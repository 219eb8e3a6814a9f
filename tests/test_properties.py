"""Property tests (hypothesis) of the task-vector algebra and the checkpoint readers: round trips and refusals.

References are elementwise torch arithmetic on the generated tensors and the generated state dicts themselves.
IEEE addition is commutative and ``x - y == x + (-y)`` exactly, so those identities are checked bit for bit;
identities that round (distributivity, ``theta_0 + (theta_t - theta_0)``) within a bound.
"""
import os
import pickle
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pyro_tvc.checkpoints import CheckpointError, image_encoder_state, load_state_dict, read_checkpoint
from pyro_tvc.task_vectors import (NonFiniteError, TaskVector, TaskVectorBank, TaskVectorError, check_compatible,
                                   check_finite, state_dict_sha256)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

names = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9_]{1,6}){0,2}", fullmatch=True),
                 min_size=1, max_size=4, unique=True)
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def state_dicts(draw, dtype=None, keys=None, finite=True):
    """``{name: tensor}`` with random names, shapes (0-dim and empty included), float dtypes and values."""
    keys = keys or draw(names)
    dtype = dtype or draw(st.sampled_from(FLOATS))
    out = {}
    for k in keys:
        shape = draw(shapes)
        n = 1
        for s in shape:
            n *= s
        values = draw(st.lists(st.floats(-1e3, 1e3, allow_nan=not finite, allow_infinity=not finite, width=16),
                               min_size=n, max_size=n))
        out[k] = torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)
    return out


@st.composite
def vector_pairs(draw):
    """Two task vectors on the same theta_0 (same keys, shapes, dtype)."""
    p0 = draw(state_dicts(dtype=torch.float64))
    like = {k: v.shape for k, v in p0.items()}

    def another():
        return {k: torch.tensor(draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=v.numel(),
                                              max_size=v.numel())), dtype=torch.float64).reshape(like[k])
                for k, v in p0.items()}

    return p0, TaskVector.from_state_dicts(p0, another(), "a"), TaskVector.from_state_dicts(p0, another(), "b")


def _bits_equal(x, y):
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(-1).view(torch.uint8) if x.numel() else x,
                                                                     y.view(-1).view(torch.uint8) if y.numel() else y)


# --- algebra ----------------------------------------------------------------------------------------------------

@FAST
@given(vector_pairs(), st.floats(-4, 4))
def test_algebra_identities(pair, scale):
    p0, a, b = pair
    for k in p0:
        assert torch.equal((a + b).params[k], a.params[k] + b.params[k])
        assert torch.equal((a + b).params[k], (b + a).params[k])
        assert torch.equal((a - b).params[k], (a + (-b)).params[k])
        assert torch.equal((-(-a)).params[k], a.params[k])
        assert torch.equal((scale * a).params[k], scale * a.params[k])
        assert torch.equal((1 * a).params[k], a.params[k])
        left, right = (scale * (a + b)).params[k], (scale * a + scale * b).params[k]
        assert torch.allclose(left, right, rtol=1e-12, atol=1e-9)


@FAST
@given(vector_pairs())
def test_apply_inverts_from_state_dicts(pair):
    p0, a, _ = pair
    finetuned = {k: p0[k] + a.params[k] for k in p0}
    rebuilt = TaskVector.from_state_dicts(p0, finetuned).apply_to(p0)
    for k in p0:  # theta_0 + (theta_t - theta_0) rounds twice: within a few ulps of the operands' magnitude
        bound = 4 * torch.finfo(torch.float64).eps * (p0[k].abs() + finetuned[k].abs())
        assert bool(((rebuilt[k] - finetuned[k]).abs() <= bound).all())


@FAST
@given(state_dicts(), st.data())
def test_safetensors_round_trip_is_bit_exact(params, data):
    task = data.draw(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True))
    tv = TaskVector(params, {"task": task, "backbone": "tiny", "theta0_sha256": "0" * 64})
    with tempfile.TemporaryDirectory() as d:
        tv.save(Path(d) / "tv.safetensors")
        back = TaskVector.load(Path(d) / "tv.safetensors")
    assert back.meta == tv.meta and set(back.params) == set(params)
    assert all(_bits_equal(back.params[k], v) for k, v in params.items())


@FAST
@given(state_dicts(dtype=torch.float32), st.data())
def test_hash_ignores_order_and_sees_every_element(state, data):
    assert state_dict_sha256(state) == state_dict_sha256(dict(reversed(list(state.items()))))
    key = data.draw(st.sampled_from(sorted(state)))
    assume(state[key].numel() > 0)
    changed = {k: v.clone() for k, v in state.items()}
    flat = changed[key].view(-1)
    i = data.draw(st.integers(0, flat.numel() - 1))
    flat[i] = flat[i] + 1.0 if abs(float(flat[i])) < 1e6 else 0.0
    assert state_dict_sha256(changed) != state_dict_sha256(state)


@FAST
@given(st.lists(state_dicts(dtype=torch.float32, keys=["w", "b.c"]), min_size=1, max_size=4), st.data())
def test_bank_stacks_and_selects(finetuned, data):
    shapes_ok = all(f["w"].shape == finetuned[0]["w"].shape and f["b.c"].shape == finetuned[0]["b.c"].shape
                    for f in finetuned)
    assume(shapes_ok)
    p0 = {k: torch.zeros_like(v) for k, v in finetuned[0].items()}
    vectors = [TaskVector.from_state_dicts(p0, f, f"t{i}") for i, f in enumerate(finetuned)]
    bank = TaskVectorBank.from_vectors(vectors)
    order = data.draw(st.permutations([v.task for v in vectors]))
    sub = bank.select(order)
    for j, task in enumerate(order):
        i = int(task[1:])
        for k in p0:
            assert torch.equal(bank.stacked[k][i], finetuned[i][k])
            assert torch.equal(sub.stacked[k][j], finetuned[i][k])


@FAST
@given(state_dicts(dtype=torch.float32), st.data())
def test_incompatible_state_dicts_are_refused(state, data):
    other = {k: v.clone() for k, v in state.items()}
    key = data.draw(st.sampled_from(sorted(state)))
    how = data.draw(st.sampled_from(["drop", "add", "shape", "dtype"]))
    if how == "drop":
        del other[key]
    elif how == "add":
        other[key + "_extra"] = torch.zeros(1)
    elif how == "shape":
        other[key] = torch.zeros(*state[key].shape, 2)
    else:
        other[key] = state[key].double()
    with pytest.raises(TaskVectorError):
        check_compatible(state, other)
    with pytest.raises(TaskVectorError):
        TaskVector.from_state_dicts(state, other)


@FAST
@given(state_dicts(dtype=torch.float32), st.data())
def test_any_nan_or_inf_is_refused_naming_its_block(state, data):
    key = data.draw(st.sampled_from(sorted(state)))
    assume(state[key].numel() > 0)
    i = data.draw(st.integers(0, state[key].numel() - 1))
    state[key].view(-1)[i] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    with pytest.raises(NonFiniteError, match=key.replace(".", r"\.")):
        check_finite(state, "x")


# --- checkpoint readers -------------------------------------------------------------------------------------------

WRAPS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 2},
    "model+optimizer": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}, "epoch": 3},
    "model_state_dict": lambda sd: {"model_state_dict": sd},
    "net": lambda sd: {"net": sd, "step": 5},
}


@FAST
@given(state_dicts(dtype=torch.float32), st.sampled_from(sorted(WRAPS)),
       st.lists(st.sampled_from(["module.", "_orig_mod."]), max_size=3), st.booleans())
def test_wrapped_checkpoints_round_trip(state, wrap, prefixes, as_safetensors):
    prefix = "".join(prefixes)
    stored = {prefix + k: v for k, v in state.items()}
    with tempfile.TemporaryDirectory() as d:
        if as_safetensors:
            from safetensors.torch import save_file

            path = Path(d) / "ft.safetensors"
            save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
        else:
            path = Path(d) / "ft.pt"
            torch.save(WRAPS[wrap](stored), path)
        loaded = load_state_dict(path)
    assert set(loaded) == set(state) and all(_bits_equal(loaded[k], v) for k, v in state.items())


@FAST
@given(state_dicts(dtype=torch.float32), st.lists(st.from_regex(r"[a-z]{1,5}", fullmatch=True), max_size=3))
def test_visual_subtree_found_at_any_depth(state, path):
    outer = ".".join(path) + "." if path else ""
    full = {f"{outer}visual.{k}": v for k, v in state.items()} | {f"{outer}text_projection": torch.zeros(1)}
    assert image_encoder_state(full, reference_keys=set(state)) == state
    assert image_encoder_state(full) == state


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_every_truncation_is_refused_in_one_line(data):
    state = {"a": torch.arange(600, dtype=torch.float32), "b": torch.ones(3, 3)}
    fmt = data.draw(st.sampled_from(["pt", "safetensors"]))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x.{fmt}"
        if fmt == "pt":
            torch.save({"state_dict": state}, path)
        else:
            from safetensors.torch import save_file

            save_file(state, str(path))
        blob = path.read_bytes()
        cut = data.draw(st.integers(1, len(blob) - 1))
        path.write_bytes(blob[:cut])
        with pytest.raises(CheckpointError) as info:
            load_state_dict(path)
    assert "\n" not in str(info.value)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=400))
def test_arbitrary_bytes_never_escape_as_another_error(blob):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.pt"
        path.write_bytes(blob)
        try:
            obj = read_checkpoint(path)
        except CheckpointError as err:
            assert "\n" not in str(err)
            return
    # the rare byte string that is a valid pickle of plain data: then it holds no state dict, or one of tensors
    try:
        state = load_state_dict_from_obj(obj)
    except CheckpointError:
        return
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def load_state_dict_from_obj(obj):
    from pyro_tvc.checkpoints import state_dict_from

    return state_dict_from(obj, "bytes")


class _Payload:
    """Pickles as a call of ``func(*args)``: what a hostile checkpoint does."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile(marker: Path):
    script = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "os.system": (os.system, (f"touch {marker}",)),
        "eval": (eval, (script,)),
        "exec": (exec, (script,)),
        "subprocess.call": (subprocess.call, (["touch", str(marker)],)),
        "shutil.rmtree": (shutil.rmtree, (str(marker.parent / "victim"),)),
        "Path.write_text": (Path.write_text, (marker, "ran")),
    }


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["os.system", "eval", "exec", "subprocess.call", "shutil.rmtree", "Path.write_text"]),
       st.sampled_from(["top", "nested", "in_state_dict"]), st.integers(2, pickle.HIGHEST_PROTOCOL))
def test_hostile_pickles_are_refused_and_never_run(kind, where, protocol):
    with tempfile.TemporaryDirectory() as d:
        marker, victim = Path(d) / "MARKER", Path(d) / "victim"
        victim.mkdir()
        func, args = _hostile(marker)[kind]
        payload = _Payload(func, args)
        obj = {"top": payload, "nested": {"model": {"x": [payload]}},
               "in_state_dict": {"state_dict": {"w": torch.zeros(1), "evil": payload}}}[where]
        torch.save(obj, Path(d) / "evil.pt", pickle_protocol=protocol)
        with pytest.raises(CheckpointError, match="--allow-pickle") as info:
            read_checkpoint(Path(d) / "evil.pt")
        assert "\n" not in str(info.value)
        assert not marker.exists() and victim.is_dir()
