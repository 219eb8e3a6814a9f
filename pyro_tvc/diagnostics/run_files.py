"""Find what a run folder needs (its config, its artefact folder, the checkpoint to load) and rebuild its problem.

Everything here is checked before any model is built, so a command that reads a run fails in a second with one line
saying what is missing and what to pass instead, not after a minute of set-up.

The artefact folder is looked for, in order:

1. ``artifacts=`` (``--artifacts``) when given: it must hold the theta_0 the run was trained on (sha256 recorded in
   ``config.json`` as ``theta0_sha256``);
2. the path recorded in ``config.json`` (absolute since the run-folder rework; older runs recorded a path relative to
   the working directory, tried from here and from the run folder's ancestors);
3. by theta_0 hash among ``<ancestor>/artifacts/*`` for every ancestor of the run folder and the working directory
   (a run folder copied elsewhere in the same checkout, or a checkout moved as a whole).

The checkpoint is the run's final one by default: ``checkpoint_final`` recorded in ``config.json`` (else
``epoch<epochs>.pt``). Never "the highest-numbered file": a folder reused by an older run may hold more epochs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

CLIP_FILE = "clip.safetensors"


@dataclass(frozen=True)
class RunSource:
    """A run folder resolved to files: ``config`` (``config.json`` as a dict), ``artifacts`` (folder),
    ``found_by`` (how the artefacts were found), ``checkpoint`` (file) and its ``epoch`` (None if not ``epoch<k>.pt``)."""

    run_dir: Path
    config: dict
    artifacts: Path
    found_by: str
    checkpoint: Path
    epoch: int | None

    def describe(self) -> str:
        """One line for logs and reports: which checkpoint, which artefacts and how they were found."""
        epoch = f", epoch {self.epoch}" if self.epoch is not None else ""
        return (f"checkpoint {self.checkpoint.name}{epoch} of {self.run_dir}; artefacts {self.artifacts} "
                f"(found by {self.found_by})")


def theta0_sha256(folder: Path) -> str | None:
    """The theta_0 hash in ``folder/clip.safetensors``'s metadata, read without loading tensors; None if absent."""
    path = Path(folder) / CLIP_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("theta0_sha256")
    except Exception:  # noqa: BLE001 - an unreadable file is "not this artefact folder", reported by the caller
        return None


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: pass a folder written by `pyro-tvc train`")
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json): pass a folder written by "
                                f"`pyro-tvc train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); the run folder is damaged") from None


def _matches(folder: Path, want: str | None) -> bool:
    sha = theta0_sha256(folder)
    return sha is not None and (want is None or sha == want)


def _find_artifacts(config: dict, run_dir: Path, explicit: Path | None) -> tuple[Path, str]:
    want = config.get("theta0_sha256")
    if explicit is not None:
        explicit = Path(explicit).resolve()
        sha = theta0_sha256(explicit)
        if sha is None:
            raise FileNotFoundError(f"--artifacts {explicit}: no {CLIP_FILE} there; expected a folder written by "
                                    f"`pyro-tvc prepare`")
        if want is not None and sha != want:
            raise ValueError(f"--artifacts {explicit}: holds theta_0 {sha[:12]}…, but the run {run_dir} was trained "
                             f"on theta_0 {want[:12]}…; pass the artefact folder the run used")
        return explicit, "--artifacts"
    ancestors = [run_dir.resolve(), *run_dir.resolve().parents, Path.cwd(), *Path.cwd().parents]
    recorded = config.get("artifacts")
    if recorded:
        path = Path(recorded)
        tries = [path] if path.is_absolute() else [Path.cwd() / path, *(a / path for a in ancestors)]
        for p in tries:
            if _matches(p, want):
                return p.resolve(), "the path recorded in config.json"
    if want is not None:
        for a in dict.fromkeys(ancestors):
            root = a / "artifacts"
            for p in sorted(root.iterdir()) if root.is_dir() else []:
                if p.is_dir() and _matches(p, want):
                    return p.resolve(), f"theta_0 hash {want[:12]}… under {root}"
    what = f"with theta_0 {want[:12]}…" if want else "(no theta_0 hash recorded)"
    raise FileNotFoundError(f"artefact folder of run {run_dir} not found: recorded {recorded!r} is missing or holds "
                            f"another theta_0, and no artifacts/* folder above it matches {what}; pass --artifacts DIR")


def _find_checkpoint(config: dict, run_dir: Path, checkpoint: str) -> Path:
    folder = run_dir / "checkpoints"
    if checkpoint == "final":
        name = config.get("checkpoint_final")
        if name is None:  # runs written before checkpoint_final was recorded
            name = "final.pt" if (folder / "final.pt").is_file() else (
                f"epoch{config['epochs']}.pt" if "epochs" in config else None)
        if name is None:
            raise ValueError(f"{run_dir}/config.json records neither checkpoint_final nor epochs; pass --checkpoint")
        path = folder / name if not Path(name).is_absolute() else Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"final checkpoint {path} of run {run_dir} not found (the run did not finish?); "
                                    f"pass --checkpoint epoch<k> to load another")
        return path
    if re.fullmatch(r"(epoch)?\d+", checkpoint):
        path = folder / f"epoch{checkpoint.removeprefix('epoch')}.pt"
    else:
        path = Path(checkpoint)
        if not path.is_absolute() and not path.is_file():
            path = folder / checkpoint
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found for run {run_dir} (looked for {path}); "
                                f"expected 'final', epoch<k> or a file; present: {found or 'none'}")
    return path


def resolve_run(run_dir: Path, artifacts: Path | None = None, checkpoint: str = "final") -> RunSource:
    """Check a run folder and find its artefacts and checkpoint (see the module docstring); loads no model.

    Raises:
        FileNotFoundError: no such run folder, no artefact folder found, or no such checkpoint.
        ValueError: ``artifacts`` holds another theta_0 than the run's, or a damaged ``config.json``.
    """
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    folder, found_by = _find_artifacts(config, run_dir, artifacts)
    path = _find_checkpoint(config, run_dir, checkpoint)
    m = re.fullmatch(r"epoch(\d+)\.pt", path.name)
    epoch = int(m.group(1)) if m else None
    if epoch is None and checkpoint == "final" and (run_dir / "results.json").is_file():
        epoch = json.loads((run_dir / "results.json").read_text()).get("selected_epoch")  # best-validation epoch
    return RunSource(run_dir, config, folder, found_by, path, epoch)


def load_problem(source: RunSource, device: str = "cpu"):
    """Rebuild the run's :class:`~pyro_tvc.infer.Problem` and load ``source.checkpoint`` into its guide (and Pyro's
    param store, which is cleared first)."""
    import pyro

    from pyro_tvc.infer import GateConfig, TrainConfig, build_problem, load_checkpoint, restore_params

    fields = TrainConfig.__dataclass_fields__
    kw = {k: v for k, v in source.config.items() if k in fields}
    if isinstance(kw.get("gate"), dict):
        kw["gate"] = GateConfig(**kw["gate"])
    kw.update(artifacts=source.artifacts, out=source.run_dir, device=device, quiet=True)
    pyro.clear_param_store()
    problem = build_problem(TrainConfig(**kw))
    restore_params(problem, load_checkpoint(source.checkpoint, device))
    return problem


def load_run(run_dir: Path, artifacts: Path | None = None, checkpoint: str = "final", device: str = "cpu"):
    """:func:`resolve_run` then :func:`load_problem`: the run's problem with the chosen checkpoint's parameters."""
    return load_problem(resolve_run(run_dir, artifacts, checkpoint), device)
