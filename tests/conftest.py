import logging
from pathlib import Path

import pyro
import pytest
import torch

logging.getLogger().setLevel(logging.ERROR)
torch.set_num_threads(2)

SMOKE_TASKS = ["digits", "eurosat5", "mnist"]


@pytest.fixture(autouse=True)
def _pyro_hygiene():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A tiny but real `prepare` run (3 tasks, few steps): theta_0, heads, task vectors, table."""
    from pyro_tvc.prepare import PrepareConfig, run_prepare

    out = tmp_path_factory.mktemp("artifacts")
    run_prepare(PrepareConfig(out=out, tasks=SMOKE_TASKS, pretrain_steps=20, finetune_steps=20, batch_size=64,
                              max_train=300, quiet=True, device="cpu"))
    return out


@pytest.fixture(scope="session")
def trained_run(prepared, tmp_path_factory) -> Path:
    """A one-epoch `pyro-tvc train` run on a small subset (target digits, the other smoke tasks' vectors)."""
    from pyro_tvc.cli import main

    out = tmp_path_factory.mktemp("runs") / "digits-gated"
    code = main(["train", "--artifacts", str(prepared), "--target", "digits", "--out", str(out), "--epochs", "1",
                 "--max-train", "128", "--eval-samples", "2", "--quiet", "--device", "cpu"])
    assert code == 0
    return out
