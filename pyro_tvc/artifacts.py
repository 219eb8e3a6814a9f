"""Where ``pyro-tvc prepare`` puts its outputs, and how every later command loads them back.

Layout of an artefact folder (default ``artifacts/<model>``)::

    clip.safetensors              theta_0: the whole CLIP (metadata: model, open_clip version, sha256 of image tower)
    heads/<task>.safetensors      frozen zero-shot head (weight [C, D]; metadata: classes, logit_scale)
    task_vectors/<task>.safetensors   one task vector per task (metadata: task, backbone, theta0_sha256)
    table.json, table.md          zero-shot and fine-tuned test accuracy per task
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pyro_tvc.backbones import ZeroShotHead, create_clip, image_encoder
from pyro_tvc.task_vectors import TaskVector, TaskVectorBank, atomic_save_safetensors, state_dict_sha256

CLIP_FORMAT = "pyro-tvc-clip/1"
HEAD_FORMAT = "pyro-tvc-head/1"


@dataclass(frozen=True)
class ArtifactPaths:
    root: Path

    @property
    def clip(self) -> Path:
        return self.root / "clip.safetensors"

    def head(self, task: str) -> Path:
        return self.root / "heads" / f"{task}.safetensors"

    def task_vector(self, task: str) -> Path:
        return self.root / "task_vectors" / f"{task}.safetensors"

    @property
    def table_json(self) -> Path:
        return self.root / "table.json"

    @property
    def table_md(self) -> Path:
        return self.root / "table.md"


def save_clip(model: torch.nn.Module, model_name: str, path: Path) -> str:
    """Save a CLIP state dict; returns the sha256 of its image tower (the theta_0 of every task vector)."""
    theta0_sha = state_dict_sha256(image_encoder(model).state_dict())
    meta = {"format": CLIP_FORMAT, "model": model_name, "open_clip_version": open_clip.__version__,
            "theta0_sha256": theta0_sha}
    atomic_save_safetensors(model.state_dict(), path, meta)
    return theta0_sha


def _checked_metadata(path: Path, expected_format: str, kind: str) -> dict[str, str]:
    """Metadata of an artefact file, after checking that it exists and has the expected format tag."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `pyro-tvc prepare` first")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != expected_format:
        raise ValueError(f"{path}: not a pyro-tvc {kind} file (format {meta.get('format')!r})")
    return meta


def load_clip(path: Path, device="cpu") -> tuple[torch.nn.Module, str]:
    """Rebuild the CLIP saved by :func:`save_clip` and verify the image tower's hash. Returns (model, model_name)."""
    meta = _checked_metadata(path, CLIP_FORMAT, "CLIP")
    model = create_clip(meta["model"])
    model.load_state_dict(load_file(str(path)))
    sha = state_dict_sha256(image_encoder(model).state_dict())
    if sha != meta["theta0_sha256"]:
        raise ValueError(f"{path}: image-tower hash {sha[:12]}… does not match its manifest {meta['theta0_sha256'][:12]}…")
    return model.to(device).eval(), meta["model"]


def save_head(head: ZeroShotHead, classes: list[str], path: Path) -> None:
    atomic_save_safetensors({"weight": head.weight}, path, {"format": HEAD_FORMAT, "classes": json.dumps(classes),
                                                            "logit_scale": repr(head.logit_scale)})


def load_head(path: Path, device="cpu") -> tuple[ZeroShotHead, list[str]]:
    meta = _checked_metadata(path, HEAD_FORMAT, "head")
    weight = load_file(str(path))["weight"].to(device)
    return ZeroShotHead(weight, float(meta["logit_scale"])), json.loads(meta["classes"])


def load_bank(paths: ArtifactPaths, tasks: list[str], theta0_sha256: str | None = None) -> TaskVectorBank:
    """Stack the task vectors of ``tasks``; refuses vectors built on another theta_0."""
    vectors = [TaskVector.load(paths.task_vector(t)) for t in tasks]
    if theta0_sha256 is not None:
        for v in vectors:
            if v.meta.get("theta0_sha256") != theta0_sha256:
                raise ValueError(f"task vector {v.task!r} was built on another theta_0 than {paths.clip}")
    return TaskVectorBank.from_vectors(vectors)


def prepared_tasks(paths: ArtifactPaths) -> list[str]:
    return sorted(p.stem for p in (paths.root / "task_vectors").glob("*.safetensors"))
