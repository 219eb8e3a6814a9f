"""Issue 12, cases 4, 6 and 7, and the bad inputs of docs/bad-inputs.md that are not checkpoint files.

Non-finite weights refused at bank load and composition; every written file follows the umask; prepared artefacts
keyed to what made them (stale caches rebuilt or refused, and said); arguments validated before any work; an
unwritable or full output folder gives one line and leaves nothing half-written.
"""
import json
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pyro_tvc.artifacts import ArtifactPaths, load_bank, load_clip
from pyro_tvc.backbones import create_clip
from pyro_tvc.prepare import PrepareConfig, run_prepare
from pyro_tvc.runtime import OutputError, atomic_output, atomic_write_text, check_writable_folder, write_json
from pyro_tvc.task_vectors import (FORMAT, NonFiniteError, TaskVector, TaskVectorBank, TaskVectorError,
                                   atomic_save_safetensors)


def _state(seed, shapes=(("a", (3, 4)), ("b", (5,)))):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes}


# --- case 4: non-finite weights ---------------------------------------------------------------------------------

def _raw_vector_file(path, params, task):
    """A task-vector file written without pyro-tvc's checks (as a buggy tool or a bad disk would leave it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(params, str(path), metadata={"format": FORMAT, "task": task, "backbone": "tiny", "theta0_sha256": "x"})


def test_case4_nan_vector_refused_at_bank_load_naming_task_and_block(tmp_path):
    paths = ArtifactPaths(tmp_path)
    good, bad = _state(1), _state(2)
    bad["b"][3] = float("nan")
    _raw_vector_file(paths.task_vector("good"), good, "good")
    _raw_vector_file(paths.task_vector("broken"), bad, "broken")
    with pytest.raises(NonFiniteError, match=r"task vector 'broken' .*1 block\(s\): b$"):
        load_bank(paths, ["good", "broken"])
    assert load_bank(paths, ["good"]).num_tasks == 1


def test_vector_of_another_theta0_refused_naming_the_folder_not_a_file_of_one_modality(tmp_path):
    paths = ArtifactPaths(tmp_path)
    _raw_vector_file(paths.task_vector("good"), _state(1), "good")  # built on theta_0 "x"
    assert load_bank(paths, ["good"], theta0_sha256="x").num_tasks == 1
    folder = re.escape(str(tmp_path))
    with pytest.raises(ValueError, match=rf"'good' was built on another theta_0 .* prepared in {folder} \(yyyy"):
        load_bank(paths, ["good"], theta0_sha256="y" * 64)


def test_case4_nan_bank_refused_at_composition_naming_task_and_blocks():
    from pyro_tvc.compose.engine import Composer

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    names = [n for n, _ in module.named_parameters()]
    stacked = {n: torch.zeros(2, *p.shape) for n, p in module.named_parameters()}
    stacked["1.weight"][1, 0, 0] = float("inf")
    stacked["0.bias"][1, 2] = float("nan")
    bank = TaskVectorBank(("clean", "poisoned"), tuple(names), stacked)  # built directly: no loader checks ran
    with pytest.raises(NonFiniteError, match=r"task vector 'poisoned' has NaN/inf values in 2 block\(s\): 0.bias, "
                                             r"1.weight"):
        Composer(module, bank)
    # why it matters: a zero coefficient does not silence the poisoned vector
    assert torch.isnan(0.0 * stacked["0.bias"][1]).any()


def test_case4_from_state_dicts_refuses_nan():
    ft = _state(1)
    ft["a"][0, 0] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"fine-tuned state dict of task 'mnist' .*: a$"):
        TaskVector.from_state_dicts(_state(0), ft, task="mnist")


def test_bank_of_mixed_backbones_is_refused():
    a = TaskVector.from_state_dicts(_state(0), _state(1), "x", backbone="pyro-tvc-tiny")
    b = TaskVector.from_state_dicts(_state(0), _state(2), "y", backbone="ViT-B-32")
    with pytest.raises(TaskVectorError, match="'x' and 'y' disagree on backbone"):
        TaskVectorBank.from_vectors([a, b])


def test_unknown_task_at_bank_load_lists_prepared_tasks(tmp_path):
    paths = ArtifactPaths(tmp_path)
    TaskVector.from_state_dicts(_state(0), _state(1), "mnist").save(paths.task_vector("mnist"))
    with pytest.raises(FileNotFoundError, match=r"no task vector for \['svhn'\].*prepared tasks: \['mnist'\]"):
        load_bank(paths, ["mnist", "svhn"])


# --- case 6: file modes follow the umask --------------------------------------------------------------------------

@contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_case6_every_writer_follows_the_umask(tmp_path, mask):
    writers = {
        "json": lambda p: write_json(p, {"a": 1}),
        "text": lambda p: atomic_write_text(p, "x"),
        "safetensors": lambda p: atomic_save_safetensors({"w": torch.zeros(2)}, p, {"format": "t"}),
        "vector": lambda p: TaskVector.from_state_dicts(_state(0), _state(1), "t").save(p),
    }
    with _umask(mask):
        (tmp_path / "reference").write_text("x")  # what the OS gives any file the user writes
        expected = (tmp_path / "reference").stat().st_mode & 0o777
        for name, write in writers.items():
            write(tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == expected == 0o666 & ~mask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*writers, "reference"])  # no temporary left


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "table.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.json"]


# --- unwritable and full output folders ---------------------------------------------------------------------------

@pytest.fixture()
def tmpfs(tmp_path):
    """A 64 KiB tmpfs (a full disk in miniature) and a read-only one; skipped where mounting is not allowed."""
    mounts = {"small": tmp_path / "small", "readonly": tmp_path / "readonly"}
    done = []
    try:
        for name, opts in (("small", "size=64k"), ("readonly", "ro,size=64k")):
            mounts[name].mkdir()
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mounts[name])], capture_output=True)
            if r.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
            done.append(mounts[name])
        yield mounts
    finally:
        for m in done:
            subprocess.run(["umount", str(m)], check=False)


def test_full_disk_gives_one_line_and_no_partial_file(tmpfs):
    target = tmpfs["small"] / "task_vectors" / "big.safetensors"
    with pytest.raises(OutputError, match=r"cannot write .*big.safetensors: No space left on device") as info:
        atomic_save_safetensors({"w": torch.zeros(64, 1024)}, target, {"format": "t"})  # 256 KiB > 64 KiB
    assert "\n" not in str(info.value)
    assert list(target.parent.iterdir()) == []
    with pytest.raises(OutputError, match="No space left on device"):
        write_json(tmpfs["small"] / "table.json", {"x": "y" * 200_000})
    assert not (tmpfs["small"] / "table.json").exists()


def test_read_only_output_folder_is_refused_before_any_work(tmpfs):
    with pytest.raises(OutputError, match=r"--out .*readonly/art: not a writable folder \(Read-only file system\)"):
        run_prepare(PrepareConfig(out=tmpfs["readonly"] / "art", tasks=["digits"], device="cpu", quiet=True))


def test_output_folder_blocked_by_a_file(tmp_path):
    (tmp_path / "file").write_text("I am not a folder")
    with pytest.raises(OutputError, match=r"--out .*file/art: not a writable folder"):
        check_writable_folder(tmp_path / "file" / "art")
    with pytest.raises(OutputError, match=r"cannot write .*file/x.json"):
        write_json(tmp_path / "file" / "x.json", {})


# --- PrepareConfig: every argument checked before any work --------------------------------------------------------

CONFIG_CASES = [
    ({"pretrain_steps": 0}, r"--pretrain-steps 0: expected an integer >= 1"),
    ({"finetune_steps": -5}, r"--finetune-steps -5: expected an integer >= 1"),
    ({"batch_size": 0}, r"--batch-size 0"),
    ({"batch_size": True}, r"--batch-size True"),
    ({"max_train": 0}, r"--max-train 0"),
    ({"seed": -1}, r"--seed -1: expected an integer >= 0 and < 4294967296"),
    ({"seed": 2**32}, r"--seed 4294967296"),
    ({"pretrain_lr": 0.0}, r"--pretrain-lr 0.0: expected a number in \(0, 1\]"),
    ({"finetune_lr": float("nan")}, r"--finetune-lr nan"),
    ({"finetune_lr": 3.0}, r"--finetune-lr 3.0"),
    ({"pretrain_fraction": 1.5}, r"--pretrain-fraction 1.5"),
    ({"tasks": []}, r"--tasks: expected at least one task"),
    ({"tasks": ["mnist", "mnist"]}, r"--tasks: \['mnist'\] given more than once"),
    ({"tasks": ["mnist", "svhn"]}, r"--tasks: unknown \['svhn'\]; embedded tasks are: mnist, "),
    ({"model": "ViT-Nope"}, r"--model 'ViT-Nope': unknown open_clip model"),
    ({"model": "ViT-B-32"}, r"--model ViT-B-32 needs --pretrained FILE \(only pyro-tvc-tiny is pre-trained locally\)"),
    ({"pretrained": "missing.pt"}, r"--pretrained missing.pt: no such file"),
    ({"data_root": "no-data"}, r"--data-root no-data: no such folder"),
]


@pytest.mark.parametrize("change, match", CONFIG_CASES,
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in CONFIG_CASES])
def test_prepare_config_out_of_range_refused_before_any_work(tmp_path, change, match):
    out = tmp_path / "art"
    with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
        run_prepare(PrepareConfig(out=out, device="cpu", quiet=True, **change))
    assert "\n" not in str(info.value)
    assert not out.exists()


# --- case 7: stale caches -------------------------------------------------------------------------------------------

def _checkpoint(path, seed):
    torch.manual_seed(seed)
    torch.save(create_clip().state_dict(), path)
    return path


def _cfg(out, **kw):
    base = dict(out=out, tasks=["digits"], finetune_steps=2, batch_size=16, max_train=40, quiet=True, device="cpu")
    return PrepareConfig(**(base | kw))


def _mtimes(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}


def test_case7_prepare_keys_every_artefact_to_what_made_it(tmp_path, capsys):
    a, b = _checkpoint(tmp_path / "A.pt", 0), _checkpoint(tmp_path / "B.pt", 1)
    out = tmp_path / "art"
    paths = ArtifactPaths(out)
    run_prepare(_cfg(out, pretrained=a))
    first = _mtimes(out)

    assert run_prepare(_cfg(out, pretrained=a))["notes"] == []  # same inputs: everything reused
    assert _mtimes(out) == first

    clip_bytes = paths.clip.read_bytes()
    with pytest.raises(ValueError, match=r"theta_0 there was made from other inputs \(pretrained_sha256 .* -> .*\); "
                                         r"pass --rebuild"):
        run_prepare(_cfg(out, pretrained=b))
    assert paths.clip.read_bytes() == clip_bytes  # refused: nothing touched

    table = run_prepare(_cfg(out, pretrained=b, rebuild=True))
    model_b = torch.load(b, weights_only=True)
    rebuilt, _ = load_clip(paths.clip)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model_b.items())
    assert [n.split(" (")[0] for n in table["notes"]] == [
        "rebuilding theta_0", "rebuilding the zero-shot head of 'digits'", "rebuilding the task vector of 'digits'"]
    assert "rebuilding theta_0 (pretrained_sha256" in capsys.readouterr().err  # printed, not only recorded

    paths.clip.unlink()  # the case: theta_0 deleted, heads of B must not be reused with A
    table = run_prepare(_cfg(out, pretrained=a))
    assert any(n.startswith("rebuilding the zero-shot head of 'digits' (clip_sha256") for n in table["notes"])
    assert json.loads(paths.table_json.read_text())["theta0_sha256"] == table["theta0_sha256"]

    head_mtime = paths.head("digits").stat().st_mtime_ns
    old_row = table["rows"][0]
    table = run_prepare(_cfg(out, pretrained=a, finetune_steps=3))
    assert table["notes"] == ["rebuilding the task vector of 'digits' (finetune_steps 2 -> 3)"]
    assert paths.head("digits").stat().st_mtime_ns == head_mtime  # the head did not depend on fine-tuning
    assert table["rows"][0]["recipe_sha256"] != old_row["recipe_sha256"]


def test_case7_embedded_theta0_keyed_to_pretraining_settings(tmp_path):
    out = tmp_path / "art"
    run_prepare(_cfg(out, pretrain_steps=2))
    with pytest.raises(ValueError, match=r"made from other inputs \(pretrain_steps 2 -> 3\)"):
        run_prepare(_cfg(out, pretrain_steps=3))
    with pytest.raises(ValueError, match=r"max_train 40 -> 50"):
        run_prepare(_cfg(out, pretrain_steps=2, max_train=50))


def test_case7_artefacts_without_recipe_are_not_trusted(tmp_path):
    """Files of a pyro-tvc without recipes (or of another tool) are stale by definition."""
    from pyro_tvc.artifacts import save_clip

    out = tmp_path / "art"
    torch.manual_seed(0)
    save_clip(create_clip(), "pyro-tvc-tiny", ArtifactPaths(out).clip)  # no recipe recorded
    with pytest.raises(ValueError, match="it records no recipe"):
        run_prepare(_cfg(out, pretrain_steps=2))


def test_imported_vector_is_kept_by_prepare(tmp_path):
    from pyro_tvc.checkpoints import import_task_vector

    a = _checkpoint(tmp_path / "A.pt", 0)
    out = tmp_path / "art"
    run_prepare(_cfg(out, pretrained=a))
    model, _ = load_clip(ArtifactPaths(out).clip)
    with torch.no_grad():
        model.visual.proj.add_(1.0)
    torch.save(model.state_dict(), tmp_path / "ft.pt")
    import_task_vector(tmp_path / "ft.pt", out, "digits")
    table = run_prepare(_cfg(out, pretrained=a))
    assert table["notes"][0].startswith("keeping the imported task vector of 'digits'")
    tv = TaskVector.load(ArtifactPaths(out).task_vector("digits"))
    assert torch.allclose(tv.params["proj"], torch.ones_like(tv.params["proj"]))


def _image_folder(root, per_class):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in (("beach", 200), ("forest", 40)):
        (root / "resisc45" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(rng.normal(colour, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "resisc45" / c / f"{i}.png")


def test_case7_real_data_keys_and_theta0_reuse_without_pretrained(tmp_path):
    a = _checkpoint(tmp_path / "A.pt", 0)
    out, data = tmp_path / "art", tmp_path / "data"
    _image_folder(data, 10)
    real = dict(out=out, data_root=data, tasks=["RESISC45"], finetune_steps=2, batch_size=8, quiet=True, device="cpu")
    run_prepare(PrepareConfig(pretrained=a, **real))
    assert run_prepare(PrepareConfig(**real))["notes"] == []  # no --pretrained: the theta_0 in --out is used
    _image_folder(data, 15)  # the data set grew: the vector made from the old one is stale
    notes = run_prepare(PrepareConfig(**real))["notes"]
    assert len(notes) == 1 and notes[0].startswith("rebuilding the task vector of 'RESISC45' (data {")
    with pytest.raises(ValueError, match=r"holds 'pyro-tvc-tiny', not 'ViT-B-32': use another --out"):
        run_prepare(PrepareConfig(**(real | {"model": "ViT-B-32"})))
    with pytest.raises(ValueError, match=r"pass --pretrained FILE"):
        run_prepare(PrepareConfig(**(real | {"model": "ViT-B-32", "out": tmp_path / "new"})))
    assert not (tmp_path / "new").exists()


def test_empty_split_is_refused_naming_task_and_split(tmp_path):
    a = _checkpoint(tmp_path / "A.pt", 0)
    _image_folder(tmp_path / "data", 2)  # 4 images: the 80/20 split leaves no test image
    with pytest.raises(ValueError, match=r"task 'RESISC45' under .*data: empty test split \(sizes \{'train': 2, "
                                         r"'val': 2, 'test': 0\}, 2 classes\)"):
        run_prepare(PrepareConfig(out=tmp_path / "art", pretrained=a, data_root=tmp_path / "data", tasks=["RESISC45"],
                                  finetune_steps=2, batch_size=8, quiet=True, device="cpu"))


def test_subset_prepare_shares_theta0_and_vectors_with_full_prepare(tmp_path):
    """The demo pre-trains on every task but fine-tunes a few: a later full prepare reuses all of it, and a subset
    prepare after the full one keeps the other tasks' table rows."""
    out, everything = tmp_path / "art", ["digits", "mnist"]
    demo = run_prepare(_cfg(out, pretrain_steps=2, tasks=["digits"], pretrain_tasks=everything))
    first = _mtimes(out)
    full = run_prepare(_cfg(out, pretrain_steps=2, tasks=everything))
    assert full["notes"] == [] and full["theta0_sha256"] == demo["theta0_sha256"]
    assert {k: v for k, v in _mtimes(out).items() if k in first} == first  # theta_0, digits' head and vector reused
    again = run_prepare(_cfg(out, pretrain_steps=2, tasks=["digits"], pretrain_tasks=everything))
    assert [r["task"] for r in again["rows"]] == ["digits", "mnist"]
    with pytest.raises(ValueError, match=r"--pretrain-tasks: unknown \['svhn'\]"):
        run_prepare(_cfg(out, pretrain_steps=2, pretrain_tasks=["svhn"]))
