import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyro_tvc.artifacts import ArtifactPaths, load_clip, load_head
from pyro_tvc.cli import COMMANDS, main
from tests.conftest import SMOKE_TASKS

REPO = Path(__file__).resolve().parents[1]


def test_prepare_writes_every_artefact(prepared):
    paths = ArtifactPaths(prepared)
    table = json.loads(paths.table_json.read_text())
    assert [r["task"] for r in table["rows"]] == SMOKE_TASKS
    for r in table["rows"]:
        assert 0 <= r["zero_shot"] <= 100 and 0 <= r["fine_tuned"] <= 100
        head, classes = load_head(paths.head(r["task"]))
        assert head.weight.shape[0] == len(classes) == r["classes"]
    assert "| **average** |" in paths.table_md.read_text()
    model, name = load_clip(paths.clip)
    assert name == "pyro-tvc-tiny"


def test_prepare_rerun_is_cached(prepared):
    from pyro_tvc.prepare import PrepareConfig, run_prepare

    before = {p: p.stat().st_mtime_ns for p in prepared.rglob("*.safetensors")}
    t0 = time.perf_counter()
    run_prepare(PrepareConfig(out=prepared, tasks=SMOKE_TASKS, pretrain_steps=20, finetune_steps=20, batch_size=64,
                              max_train=300, quiet=True, device="cpu"))
    assert time.perf_counter() - t0 < 15
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*.safetensors")} == before


def test_corrupted_clip_is_detected(prepared, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = ArtifactPaths(prepared).clip
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(src))
    state["visual.proj"] = state["visual.proj"] + 1.0
    save_file(state, str(tmp_path / "clip.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not match its manifest"):
        load_clip(tmp_path / "clip.safetensors")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: pyro-tvc " + command in out and "default" in out


def test_version_and_module_entry_point():
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "pyro_tvc", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"pyro-tvc {version('pyro-tvc')}"


def test_unknown_command_is_one_line_exit_2(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'trian'" in err[0] and "train" in err[0]


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    code = main(["prepare", "--out", str(tmp_path), "--model", "ViT-B-32", "--pretrained", str(tmp_path / "no.pt")])
    assert code == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_wheel_installs_models_and_guides_as_subpackages(tmp_path):
    """Build the wheel, install it without deps in a scratch venv, and import it from there.

    The scratch venv reaches the test venv's dependencies through a plain path line in a .pth file: that appends
    the directory to sys.path without running its .pth files, so the editable install of the source tree stays out.
    """
    import sysconfig

    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("pyro_tvc-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    scratch_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip()
    Path(scratch_site, "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
                   check=True, capture_output=True)
    code = ("import pyro_tvc, pyro_tvc.models, pyro_tvc.guides, pyro_tvc.data, pathlib;"
            "print(pathlib.Path(pyro_tvc.__file__).parent);"
            "print(pathlib.Path(pyro_tvc.models.__file__).parent.name)")
    out = subprocess.run([py, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path).stdout.split()
    assert str(venv) in out[0], "pyro_tvc must come from the wheel, not the source tree"
    assert out[1] == "models"
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "pyro_tvc/models/__init__.py" in names and "pyro_tvc/guides/__init__.py" in names
    assert "pyro_tvc/data/embedded/mnist.npz" in names and "pyro_tvc/model_configs/pyro-tvc-tiny.json" in names
    assert "pyro_tvc/data/text_embedded/rte/test.jsonl.gz" in names and "pyro_tvc/data/text_embedded/MANIFEST.json" in names
    assert not any(n.startswith(("models/", "guides/")) for n in names)


def test_train_smoke_writes_run_folder(prepared, trained_run):
    out = trained_run
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["eurosat5", "mnist"]
    assert 0.0 <= results["exact_zero_fraction"] <= 1.0 and results["true_elbo_per_datum"] < 0
    assert results["mc_accuracy_se"] >= 0 and results["selected_epoch"] == 1
    assert (out / "checkpoints" / "epoch1.pt").exists() and (out / "command.txt").exists()
    assert (out / "checkpoints" / "final.pt").exists()
    from pyro_tvc.infer import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "epoch1.pt")  # weights_only=True
    assert state["epoch"] == 1 and any(k.startswith("guide") for k in state["params"])
    assert main(["train", "--artifacts", str(prepared), "--target", "svhn", "--out", str(out)]) == 2


def test_prepare_real_path_with_pretrained_file_and_data_root(tmp_path):
    """The real-benchmark code path (--pretrained FILE --data-root DIR, torchvision/ImageFolder loading, the model's
    own preprocessing) on a tiny stand-in: a saved tiny CLIP and a two-class RESISC45 folder."""
    import numpy as np
    import torch
    from PIL import Image

    from pyro_tvc.backbones import create_clip
    from pyro_tvc.prepare import PrepareConfig, run_prepare

    torch.manual_seed(0)
    torch.save(create_clip().state_dict(), tmp_path / "clip.pt")
    rng = np.random.default_rng(0)
    for c, colour in (("beach", 200), ("forest", 40)):
        (tmp_path / "data" / "resisc45" / c).mkdir(parents=True)
        for i in range(15):
            img = np.clip(rng.normal(colour, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "data" / "resisc45" / c / f"{i}.png")
    table = run_prepare(PrepareConfig(out=tmp_path / "out", pretrained=tmp_path / "clip.pt",
                                      data_root=tmp_path / "data", tasks=["RESISC45"], finetune_steps=3,
                                      batch_size=8, quiet=True, device="cpu"))
    row = table["rows"][0]
    assert row["task"] == "RESISC45" and row["classes"] == 2
    assert (tmp_path / "out" / "task_vectors" / "RESISC45.safetensors").exists()
    with pytest.raises(ValueError, match="--pretrained"):
        run_prepare(PrepareConfig(out=tmp_path / "out2", data_root=tmp_path / "data", tasks=["RESISC45"]))


def test_import_vector_from_checkpoints(prepared, tmp_path, capsys):
    import shutil

    import torch

    from pyro_tvc.artifacts import ArtifactPaths, load_clip
    from pyro_tvc.task_vectors import TaskVector

    art = tmp_path / "art"
    shutil.copytree(prepared, art)
    model, _ = load_clip(ArtifactPaths(art).clip)
    with torch.no_grad():
        model.visual.proj.add_(0.5)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ft.pt")
    assert main(["import-vector", str(tmp_path / "ft.pt"), "--task", "custom", "--artifacts", str(art)]) == 0
    tv = TaskVector.load(ArtifactPaths(art).task_vector("custom"))
    assert torch.allclose(tv.params["proj"], torch.full_like(tv.params["proj"], 0.5), atol=1e-6)
    assert tv.params["conv1.weight"].abs().max() == 0
    torch.save(model.visual, tmp_path / "module.pt")  # a whole pickled open_clip module: read without running code
    assert main(["import-vector", str(tmp_path / "module.pt"), "--task", "pickled", "--artifacts", str(art)]) == 0


@pytest.mark.parametrize("args, message", [
    (["--targets", "gtsrb"], "--targets ['gtsrb']: not among the demo's --tasks"),
    (["--diagnose-target", "dtd10"], "--diagnose-target ['dtd10']: not among the demo's --tasks"),
    (["--tasks", "mnist", "--targets", "mnist", "--diagnose-target", "mnist"], "give at least 2 tasks"),
])
def test_demo_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--artifacts", str(tmp_path / "art"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and not (tmp_path / "art").exists()


@pytest.mark.slow
def test_demo_end_to_end_at_tiny_scale(tmp_path, capsys):
    """The README's main command, shrunk: prepare (3 tasks on a theta_0 of all 9), both tables, a diagnosed run."""
    art, out, tasks = tmp_path / "art", tmp_path / "demo", ["mnist", "digits", "eurosat5"]
    code = main(["demo", "--artifacts", str(art), "--out", str(out), "--pretrain-steps", "3", "--finetune-steps", "3",
                 "--tasks", *tasks, "--targets", "mnist",
                 "--max-train", "48", "--epochs", "1", "--eval-samples", "2", "--adamerging-steps", "2", "--methods",
                 "zero_shot", "task_arithmetic", "vtvc_gated", "--quiet", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Target composition" in printed and "Task addition" in printed
    assert sorted(p.stem for p in (art / "task_vectors").glob("*.safetensors")) == sorted(tasks)
    from pyro_tvc.artifacts import clip_metadata

    clip_recipe = json.loads(clip_metadata(art / "clip.safetensors")["recipe"])
    assert len(clip_recipe["pretrain_tasks"]) == 9  # the full prepare's theta_0
    assert (out / "vtvc-mnist" / "diagnostics" / "index.md").exists()
    import pandas as pd

    df = pd.read_csv(out / "benchmark" / "results.csv")
    assert set(df[df.protocol == "addition"].task) - {"ALL"} == set(tasks)
