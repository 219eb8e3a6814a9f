"""Multi-process training (issue 10): `torchrun --nproc_per_node=2 pyro-tvc train` with gloo on CPU gives the same
parameters as one process with the same global batch and seed."""
import json
import os
import shutil
from pathlib import Path
import subprocess
import sys

import pytest
import torch

ARGS = ["train", "--target", "digits", "--guide", "point", "--epochs", "2", "--max-train", "96", "--batch-size",
        "32", "--eval-samples", "2", "--quiet", "--device", "cpu", "--seed", "3"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(prepared, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch"
    single, multi = tmp_path / "single", tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "pyro_tvc", *ARGS, "--artifacts", str(prepared), "--out", str(single)],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "pyro_tvc", *ARGS, "--artifacts",
                          str(prepared), "--out", str(multi)], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(single / "checkpoints" / "epoch2.pt", weights_only=False)["params"]
    b = torch.load(multi / "checkpoints" / "epoch2.pt", weights_only=False)["params"]
    assert a.keys() == b.keys() and a
    moved = max((a[k] - torch.load(single / "checkpoints" / "epoch1.pt", weights_only=False)["params"][k])
                .abs().max().item() for k in a)
    assert moved > 1e-3  # the parameters really trained
    for k in a:  # same global batches: equal up to float summation order (stated tolerance 1e-4)
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)
    cfg = json.loads((multi / "config.json").read_text())
    assert cfg["world_size"] == 2 and not (multi / "checkpoints" / "rank1").exists()


@pytest.mark.slow
def test_benchmark_under_torchrun_shares_cells_and_rank0_reports(prepared, tmp_path):
    import pandas as pd

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    args = ["benchmark", "--artifacts", str(prepared), "--protocols", "target", "--targets", "digits", "mnist",
            "--methods", "zero_shot", "task_arithmetic", "ties", "--seeds", "1", "--max-train", "64", "--quiet",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "pyro_tvc", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "pyro_tvc", *args, "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (pd.read_csv(tmp_path / d / "results.csv") for d in ("one", "two"))
    key = ["protocol", "method", "prediction", "task", "seed", "metric"]
    acc = lambda df: df[df.metric == "accuracy"].sort_values(key).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(acc(a), acc(b))
    assert len(list((tmp_path / "two" / "cells").glob("*.json"))) == 6
