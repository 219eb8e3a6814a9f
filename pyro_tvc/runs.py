"""Run folders: creation rules (no silent overwrite), and the record that makes a run reproducible and portable.

A run folder holds ``command.txt``, ``config.json`` (the resolved config: absolute paths, the resolved device, the
theta_0 hash that finds the artefacts again after a copy, package versions and the git commit), metrics, results and
checkpoints. Every command that writes one goes through :func:`prepare_run_folder`.
"""
from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from pyro_tvc.runtime import command_line

PACKAGES = ("pyro-tvc", "torch", "pyro-ppl", "open_clip_torch", "arviz", "numpy")
_COMMAND: list[str] | None = None


def set_command(argv: list[str]) -> None:
    """Record the command as the CLI parsed it (``pyro-tvc NAME ARGS...``), for command.txt and config.json."""
    global _COMMAND
    _COMMAND = list(argv)


def recorded_command() -> str:
    """The command that made this run: the CLI's argv when run through it, else the process's argv."""
    return shlex.join(_COMMAND) if _COMMAND is not None else command_line()


def prepare_run_folder(out: Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``out`` for a new run, or accept an existing one when asked.

    Raises:
        ValueError: ``out`` exists, is not empty and neither flag is given; or both flags are given; or ``resume``
            is given and ``out`` holds no run.
    """
    out = Path(out)
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other: choose one")
    busy = out.exists() and any(out.iterdir())
    if resume:
        if not (out / "config.json").is_file():
            raise ValueError(f"--resume: {out} holds no run to resume (no config.json)")
        return out
    if busy:
        if not overwrite:
            raise ValueError(f"output folder {out} is not empty: pass --overwrite to replace it, --resume to continue "
                             f"it, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(recorded_command() + "\n")
    return out


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the source tree pyro_tvc runs from (with ``+dirty`` when it has uncommitted changes)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def run_config_record(cfg, problem) -> dict:
    """The resolved training config plus what identifies its inputs and its software."""
    from pyro_tvc.artifacts import CLIP_FORMAT, ArtifactPaths, _checked_metadata

    from pyro_tvc.data.custom import is_task_path

    record = jsonable(cfg)
    if is_task_path(cfg.target):
        record["target"] = str(Path(cfg.target).expanduser().resolve())
    clip_meta = _checked_metadata(ArtifactPaths(Path(cfg.artifacts)).clip, CLIP_FORMAT, "CLIP")
    record |= {"device": str(problem.splits["train"][2].device),
               "tasks": list(problem.composer.task_names), "blocks": len(problem.composer.block_names),
               "theta0_sha256": clip_meta.get("theta0_sha256"), "data": getattr(problem, "data_choices", {}),
               "checkpoint_final": "final.pt", "versions": package_versions(), "git_commit": git_commit(),
               "command": recorded_command()}
    return record
