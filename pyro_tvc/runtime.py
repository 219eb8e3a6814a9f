"""Run-time plumbing shared by every command: device choice, seeding, atomic files, progress bars."""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from contextlib import contextmanager
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


class OutputError(ValueError):
    """An output file or folder cannot be written (permissions, read-only or full disk, a file in the way)."""


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set and return it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _output_error(path: Path, err: OSError) -> OutputError:
    reason = err.strerror or str(err) or type(err).__name__
    return OutputError(f"cannot write {path}: {reason} (choose another output folder, or free space)")


@contextmanager
def atomic_output(path: Path):
    """Yield a temporary path beside ``path``; on success give it the umask's mode and rename it over ``path``.

    A crash or an error never leaves half a file: the temporary file is removed. ``tempfile.mkstemp`` creates
    files with mode 0600, so the mode is set explicitly to ``0o666 & ~umask``, like any other file the user writes.

    Raises:
        OutputError: the folder cannot be created or written (the message names the path and the reason).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _output_error(path, err) from err
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise _output_error(path, err) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable_folder(folder: Path, option: str = "--out") -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any work starts.

    Raises:
        OutputError: naming ``option``, the folder and the reason.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pyro-tvc-probe.")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputError(f"{option} {folder}: not a writable folder ({err.strerror or type(err).__name__})") from err


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
