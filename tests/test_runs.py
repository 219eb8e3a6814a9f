"""Run folders that cannot mislead: refusal of a non-empty --out, a recorded config that reproduces the run, and
crash safety (SIGKILL mid-epoch, --resume, same parameters as an uninterrupted run)."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from pyro_tvc.cli import main

REPO = Path(__file__).resolve().parents[1]


def _train_args(prepared, out, *extra):
    return ["train", "--artifacts", str(prepared), "--target", "digits", "--out", str(out), "--epochs", "2",
            "--max-train", "96", "--batch-size", "32", "--eval-samples", "2", "--rank", "4", "--quiet",
            "--device", "cpu", *extra]


def _params(run: Path, name: str) -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)["params"]


def test_second_train_into_same_folder_is_refused_then_overwritten(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(prepared, out)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cpu" and Path(config["artifacts"]).is_absolute()
    assert config["theta0_sha256"] and config["versions"]["torch"] and "git_commit" in config
    before = (out / "results.json").read_text()
    capsys.readouterr()
    assert main(_train_args(prepared, out, "--epochs", "1")) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before  # nothing touched
    assert main(_train_args(prepared, out, "--epochs", "1", "--overwrite")) == 0
    assert not (out / "checkpoints" / "epoch2.pt").exists()  # no stale checkpoint of the earlier run


def test_rerunning_the_recorded_config_reproduces_the_metrics(prepared, tmp_path):
    first = tmp_path / "a"
    assert main(_train_args(prepared, first)) == 0
    again = tmp_path / "b"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (first, again))
    for key in ("mc_accuracy", "single_model_accuracy", "mc_nll", "exact_zero_fraction", "true_elbo_per_datum"):
        assert r1[key] == r2[key], key
    # and the recorded command line, with --out elsewhere
    cmd = shlex.split((first / "command.txt").read_text())
    assert cmd[:2] == ["pyro-tvc", "train"]
    third = tmp_path / "c"
    cmd[cmd.index("--out") + 1] = str(third)
    assert main(cmd[1:]) == 0
    assert json.loads((third / "results.json").read_text())["mc_accuracy"] == r1["mc_accuracy"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(prepared, tmp_path):
    whole = tmp_path / "whole"
    assert main(_train_args(prepared, whole, "--epochs", "3")) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYRO_TVC_TEST_KILL_AT_STEP": "7"}  # 3 steps per epoch: dies in the middle of epoch 3
    proc = subprocess.run([sys.executable, "-m", "pyro_tvc", *_train_args(prepared, killed, "--epochs", "3")],
                          env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (killed / "checkpoints" / "epoch2.pt").exists() and not (killed / "checkpoints" / "epoch3.pt").exists()
    assert not (killed / "results.json").exists()
    assert main(_train_args(prepared, killed, "--epochs", "3", "--resume")) == 0
    a, b = _params(whole, "epoch3.pt"), _params(killed, "epoch3.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (whole, killed))
    assert r1["single_model_accuracy"] == r2["single_model_accuracy"]


def test_non_finite_loss_stops_with_a_clear_message(prepared, tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(_train_args(prepared, out, "--lr", "1e30", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "--lr" in err and len(err.strip().splitlines()) == 1
