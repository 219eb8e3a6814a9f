"""Run-time plumbing shared by every command: device choice, seeding, atomic files, progress bars."""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to ``torch.device`` (validated)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available on this machine (use --device auto or cpu)")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        import pyro

        pyro.set_rng_seed(seed)
    except ImportError:  # pragma: no cover - pyro is a hard dependency, kept import-light here
        pass
    return torch.Generator().manual_seed(seed)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def progress(iterable=None, quiet: bool = False, **kw):
    """tqdm progress bar on stderr, silenced by ``--quiet`` (and when stderr is not a terminal in CI logs)."""
    # Off a terminal (CI logs, files) redraw rarely instead of writing hundreds of carriage-return lines.
    kw.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 15.0)
    return tqdm(iterable, disable=quiet, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
