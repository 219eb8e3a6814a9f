"""Checkpoint readers and ``import_task_vector`` on the files people really have (issue 12, cases 1-4).

Fixtures are built here: a random tiny CLIP saved as theta_0 (no ``prepare`` run), legacy whole-module pickles
whose classes no longer exist, wrapped training checkpoints, a TorchScript archive, and hostile pickles.
References are independent of the readers: the tensors the fixtures were made from, subtracted directly.
"""
import os
import sys
import textwrap
import warnings

import pytest
import torch

from pyro_tvc.artifacts import ArtifactPaths, save_clip
from pyro_tvc.backbones import TINY_MODEL, create_clip
from pyro_tvc.checkpoints import (CheckpointError, import_task_vector, image_encoder_state, load_state_dict,
                                  read_checkpoint)
from pyro_tvc.task_vectors import NonFiniteError, TaskVector, TaskVectorError


@pytest.fixture(scope="module")
def theta0_clip():
    torch.manual_seed(0)
    return create_clip()


@pytest.fixture()
def artifacts(theta0_clip, tmp_path):
    root = tmp_path / "art"
    save_clip(theta0_clip, TINY_MODEL, ArtifactPaths(root).clip)
    return root


def _finetuned(theta0_clip, shift=0.25, seed=1):
    """A 'fine-tuned' copy of the CLIP: every image-tower tensor moved by a seeded random amount."""
    model = create_clip()
    model.load_state_dict(theta0_clip.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(shift * torch.randn(p.shape, generator=g))
    return model


def _expected_vector(theta0_clip, finetuned):
    base, ft = theta0_clip.visual.state_dict(), finetuned.visual.state_dict()
    return {k: ft[k] - base[k] for k in base}


def _assert_vector(path, expected):
    tv = TaskVector.load(path)
    assert set(tv.params) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(tv.params[k], v, atol=1e-6), k


def _throwaway_package(root, name, source):
    pkg = root / name.split(".")[0]
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (root / (name.replace(".", "/") + ".py")).write_text(textwrap.dedent(source))


def _forget(prefix, path):
    """Remove a throw-away package from sys.path and sys.modules: the pickle then names a class that is gone."""
    sys.path.remove(str(path))
    for mod in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[mod]


MARKER_CLASS = '''
import torch

MARKER = {marker!r}


class ImageEncoder(torch.nn.Module):
    """Like task_vectors' src.modeling.ImageEncoder, plus code that must never run when the file is read."""

    def __init__(self, model, preprocess):
        super().__init__()
        self.model = model
        self.train_preprocess = preprocess
        self.val_preprocess = preprocess
        self.cache_dir = "/somewhere/else"

    def __setstate__(self, state):
        open(MARKER, "w").write("code from the checkpoint ran")
        super().__setstate__(state)
'''


@pytest.mark.parametrize("still_importable", [False, True])
def test_case1_task_vectors_pickle_imports_without_allow_pickle_or_running_its_code(
        theta0_clip, artifacts, tmp_path, still_importable):
    from open_clip.transform import image_transform

    marker = tmp_path / "MARKER"
    pkg_root = tmp_path / "legacy"
    _throwaway_package(pkg_root, "src.modeling", MARKER_CLASS.format(marker=str(marker)))
    sys.path.insert(0, str(pkg_root))
    try:
        from src.modeling import ImageEncoder  # the throw-away module

        finetuned = _finetuned(theta0_clip)
        wrapper = create_clip()
        wrapper.load_state_dict(finetuned.state_dict())
        del wrapper.transformer  # task_vectors drops the text tower (keep_lang=False)
        torch.save(ImageEncoder(wrapper, image_transform(32, is_train=False)), tmp_path / "mnist.pt")
    finally:
        if not still_importable:
            _forget("src", pkg_root)
    try:
        out = import_task_vector(tmp_path / "mnist.pt", artifacts, "mnist")
    finally:
        if still_importable:
            _forget("src", pkg_root)
    assert not marker.exists(), "reading the checkpoint ran its __setstate__"
    _assert_vector(out, _expected_vector(theta0_clip, finetuned))


def test_case1_old_open_clip_visual_transformer_is_read(theta0_clip, artifacts, tmp_path, monkeypatch):
    import open_clip.model

    finetuned = _finetuned(theta0_clip, seed=2)

    class VisualTransformer(torch.nn.Module):  # the class name of open_clip < 2.0, gone today
        pass

    VisualTransformer.__module__, VisualTransformer.__qualname__ = "open_clip.model", "VisualTransformer"
    legacy = VisualTransformer.__new__(VisualTransformer)
    legacy.__dict__.update(finetuned.visual.__dict__)
    monkeypatch.setattr(open_clip.model, "VisualTransformer", VisualTransformer, raising=False)
    torch.save(legacy, tmp_path / "visual.pt")
    monkeypatch.undo()
    assert not hasattr(open_clip.model, "VisualTransformer")
    obj = read_checkpoint(tmp_path / "visual.pt")
    assert type(obj).pickled_name == "open_clip.model.VisualTransformer"
    out = import_task_vector(tmp_path / "visual.pt", artifacts, "old")
    _assert_vector(out, _expected_vector(theta0_clip, finetuned))


def test_case1_pre_1_6_torch_file_of_a_whole_module_is_read(theta0_clip, tmp_path):
    finetuned = _finetuned(theta0_clip, seed=8)
    torch.save(finetuned.visual, tmp_path / "old_format.pt", _use_new_zipfile_serialization=False)
    state = load_state_dict(tmp_path / "old_format.pt")
    expected = finetuned.visual.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], v) for k, v in expected.items())


def test_malformed_module_state_in_a_pickle_gives_one_line(tmp_path):
    """A file decides what a stand-in's attributes hold: a non-mapping ``_buffers`` and a module that contains
    itself must end in the one-line refusal, not in AttributeError or RecursionError."""
    _throwaway_package(tmp_path / "pkgs", "src.odd", '''
        class Weird:
            pass

        class Net:
            def __init__(self):
                self._parameters = {}
                self._buffers = Weird()
                self._non_persistent_buffers_set = Weird()
                self._modules = {"again": self}
    ''')
    sys.path.insert(0, str(tmp_path / "pkgs"))
    try:
        from src.odd import Net

        torch.save(Net(), tmp_path / "odd.pt")
    finally:
        _forget("src", tmp_path / "pkgs")
    with pytest.raises(CheckpointError, match=r"no state dict found in an object of src.odd.Net") as info:
        load_state_dict(tmp_path / "odd.pt")
    assert "\n" not in str(info.value)


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ExecCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('x')",)


@pytest.mark.parametrize("payload, names", [(_SystemCall, ("system", "posix")), (_ExecCall, ("exec", "builtins"))])
def test_case1_hostile_pickle_is_refused_in_one_line_and_runs_nothing(tmp_path, payload, names):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / "evil.pt")
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in names) and "--allow-pickle" in message
    assert not marker.exists()


def test_case1_unknown_class_refused_without_flag_and_read_with_it(tmp_path):
    _throwaway_package(tmp_path / "pkgs", "mylab.nets", '''
        import torch

        class Holder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(2, 3)
    ''')
    sys.path.insert(0, str(tmp_path / "pkgs"))
    try:
        from mylab.nets import Holder

        holder = Holder()
        torch.save(holder, tmp_path / "holder.pt")
        with pytest.raises(CheckpointError, match=r"'Holder' from module 'mylab.nets'.*--allow-pickle"):
            load_state_dict(tmp_path / "holder.pt")
        state = load_state_dict(tmp_path / "holder.pt", allow_pickle=True)  # trusted: real unpickling
        assert torch.equal(state["fc.weight"], holder.fc.weight)
    finally:
        _forget("mylab", tmp_path / "pkgs")


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 3},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1},
    lambda sd: {"model_state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    lambda sd: {f"model.visual.{k}": v for k, v in sd.items()} | {"model.logit_scale": torch.ones(())},
    lambda sd: {"net": {f"visual.{k}": v for k, v in sd.items()}, "step": 10},
], ids=["model+optimizer", "state_dict+module.", "model_state_dict+_orig_mod.", "module._orig_mod.",
        "model.visual.", "net+visual."])
def test_case2_wrapped_checkpoints_are_unwrapped(theta0_clip, artifacts, tmp_path, wrap):
    finetuned = _finetuned(theta0_clip, seed=3)
    torch.save(wrap(finetuned.visual.state_dict()), tmp_path / "ft.pt")
    out = import_task_vector(tmp_path / "ft.pt", artifacts, "wrapped")
    _assert_vector(out, _expected_vector(theta0_clip, finetuned))


def test_case2_unknown_layout_lists_keys_found_and_accepted(tmp_path):
    torch.save({"weights": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as info:
        load_state_dict(tmp_path / "odd.pt")
    message = str(info.value)
    assert "'weights'" in message and "'epoch'" in message and "'state_dict'" in message and "\n" not in message


def _torchscript_clip(model, path):
    """An OpenAI-style TorchScript CLIP archive: parameters of the whole model plus OpenAI's extra entries."""
    class Wrapper(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.visual, self.transformer = clip.visual, clip.transformer
            self.token_embedding, self.ln_final = clip.token_embedding, clip.ln_final
            self.positional_embedding = clip.positional_embedding
            self.text_projection, self.logit_scale = clip.text_projection, clip.logit_scale
            self.register_buffer("input_resolution", torch.tensor(32))
            self.register_buffer("context_length", torch.tensor(32))
            self.register_buffer("vocab_size", torch.tensor(49408))

        def forward(self, x):
            return self.visual(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about python values in open_clip's forward
        traced = torch.jit.trace(Wrapper(model).eval(), torch.zeros(1, 3, 32, 32), check_trace=False)
        torch.jit.save(traced, str(path))  # deprecated in favour of torch.export, but what OpenAI's files are


def test_case3_openai_torchscript_file_as_pretrained(theta0_clip, tmp_path):
    source = _finetuned(theta0_clip, seed=4)
    _torchscript_clip(source, tmp_path / "ViT-tiny.pt")
    with pytest.raises(RuntimeError, match="weights_only"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that it dispatches to torch.jit.load, then refuses
        torch.load(tmp_path / "ViT-tiny.pt", weights_only=True)  # the failure the issue reported
    loaded = create_clip(TINY_MODEL, pretrained=tmp_path / "ViT-tiny.pt")
    expected = source.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_case3_torchscript_fine_tuned_imports(theta0_clip, artifacts, tmp_path):
    finetuned = _finetuned(theta0_clip, seed=5)
    _torchscript_clip(finetuned, tmp_path / "ft.pt")
    out = import_task_vector(tmp_path / "ft.pt", artifacts, "jit")
    _assert_vector(out, _expected_vector(theta0_clip, finetuned))


def test_case3_pretrained_of_another_model_is_refused_in_one_line(tmp_path):
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(4, 3, 8, 8)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint of pyro-tvc-tiny: missing keys") as info:
        create_clip(TINY_MODEL, pretrained=tmp_path / "other.pt")
    assert "\n" not in str(info.value)


def test_case4_nan_in_finetuned_checkpoint_is_refused_naming_task_and_block(theta0_clip, artifacts, tmp_path):
    finetuned = _finetuned(theta0_clip, seed=6).visual.state_dict()
    finetuned["transformer.resblocks.1.mlp.c_fc.weight"][0, 0] = float("nan")
    finetuned["proj"][1, 1] = float("inf")
    torch.save(finetuned, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteError, match=r"task 'bad'.*2 block\(s\)") as info:
        import_task_vector(tmp_path / "nan.pt", artifacts, "bad")
    assert "transformer.resblocks.1.mlp.c_fc.weight" in str(info.value) and "proj" in str(info.value)
    assert not ArtifactPaths(artifacts).task_vector("bad").exists()


def test_float16_checkpoint_is_cast_to_theta0_dtype(theta0_clip, artifacts, tmp_path):
    finetuned = _finetuned(theta0_clip, seed=7)
    half = {k: v.half() for k, v in finetuned.visual.state_dict().items()}
    torch.save(half, tmp_path / "half.pt")
    out = import_task_vector(tmp_path / "half.pt", artifacts, "half")
    base = theta0_clip.visual.state_dict()
    _assert_vector(out, {k: half[k].float() - base[k] for k in base})


def test_vector_of_another_backbone_is_refused(theta0_clip, artifacts, tmp_path):
    import open_clip

    torch.manual_seed(0)
    other = open_clip.create_model("ViT-B-32").visual.state_dict()  # random weights; the names are what matter
    torch.save(other, tmp_path / "vitb32.pt")
    with pytest.raises(CheckpointError, match=r"unexpected \['transformer.resblocks.10.*another backbone"):
        import_task_vector(tmp_path / "vitb32.pt", artifacts, "vitb")
    wider = dict(theta0_clip.visual.state_dict()) | {"class_embedding": torch.zeros(256)}  # same names, new width
    torch.save(wider, tmp_path / "wider.pt")
    with pytest.raises(CheckpointError, match=r"shape of 'class_embedding' is \(256,\).*\(128,\).*another backbone"):
        import_task_vector(tmp_path / "wider.pt", artifacts, "wider")


def test_checkpoint_with_other_keys_is_refused(artifacts, tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "fc.pt")
    with pytest.raises(CheckpointError, match=r"missing \[.*unexpected \['fc.weight'\]"):
        import_task_vector(tmp_path / "fc.pt", artifacts, "fc")


@pytest.mark.parametrize("damage", ["truncate_safetensors", "truncate_zip", "empty", "text", "folder"])
def test_unreadable_files_fail_in_one_line(tmp_path, damage):
    from safetensors.torch import save_file

    state = {"a": torch.randn(64, 64)}
    if damage == "truncate_safetensors":
        save_file(state, str(tmp_path / "x.safetensors"))
        path = tmp_path / "x.safetensors"
    elif damage == "truncate_zip":
        torch.save(state, tmp_path / "x.pt")
        path = tmp_path / "x.pt"
    elif damage == "empty":
        path = tmp_path / "x.pt"
        path.write_bytes(b"")
    elif damage == "text":
        path = tmp_path / "x.bin"
        path.write_text("<html>404 Not Found</html>")
    else:
        path = tmp_path / "folder.pt"
        path.mkdir()
    if damage.startswith("truncate"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("task", ["", "../escape", ".hidden", "a/b", "x" * 101, "naïve space"])
def test_bad_task_names_are_refused(artifacts, tmp_path, task):
    with pytest.raises(TaskVectorError, match="task name"):
        import_task_vector(tmp_path / "whatever.pt", artifacts, task)


def test_missing_theta0_or_checkpoint(tmp_path, artifacts):
    torch.save({"a": torch.zeros(1)}, tmp_path / "ft.pt")
    with pytest.raises(FileNotFoundError, match="run `pyro-tvc prepare` first"):
        import_task_vector(tmp_path / "ft.pt", tmp_path / "nothing-here", "t")
    with pytest.raises(FileNotFoundError, match="fine-tuned checkpoint not found"):
        import_task_vector(tmp_path / "missing.pt", artifacts, "t")


def test_image_encoder_state_prefers_the_subtree_matching_theta0():
    inner = {"conv1.weight": torch.zeros(1), "proj": torch.ones(1)}
    state = {f"model.visual.{k}": v for k, v in inner.items()} | {"model.visual_head.x": torch.zeros(1)}
    assert set(image_encoder_state(state, reference_keys=set(inner))) == set(inner)
    assert set(image_encoder_state(inner, reference_keys=set(inner))) == set(inner)
