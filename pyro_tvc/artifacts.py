"""Where ``pyro-tvc prepare`` puts its outputs, and how every later command loads them back.

Layout of an artefact folder (default ``artifacts/<model>``)::

    clip.safetensors              theta_0: the whole CLIP (metadata: model, open_clip version, sha256 of image tower
                                  and of the whole model, recipe)
    heads/<task>.safetensors      frozen zero-shot head (weight [C, D]; metadata: classes, logit_scale, recipe)
    task_vectors/<task>.safetensors   one task vector per task (metadata: task, backbone, theta0_sha256, recipe)
    table.json, table.md          zero-shot and fine-tuned test accuracy per task (each row keyed by its recipe)

Every file records the recipe that made it (:mod:`pyro_tvc.recipes`); ``prepare`` reuses a file only when the
recipe it would use now is the same.
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
from pyro_tvc.recipes import RECIPE_KEY, canonical_json
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


def save_clip(model: torch.nn.Module, model_name: str, path: Path, recipe: dict | None = None) -> str:
    """Save a CLIP state dict; returns the sha256 of its image tower (the theta_0 of every task vector).

    Metadata: model name, open_clip version, ``theta0_sha256`` (image tower), ``clip_sha256`` (whole model, the
    key of the zero-shot heads) and the ``recipe`` that made it (:mod:`pyro_tvc.recipes`).
    """
    theta0_sha = state_dict_sha256(image_encoder(model).state_dict())
    meta = {"format": CLIP_FORMAT, "model": model_name, "open_clip_version": open_clip.__version__,
            "theta0_sha256": theta0_sha, "clip_sha256": state_dict_sha256(model.state_dict())}
    if recipe is not None:
        meta[RECIPE_KEY] = canonical_json(recipe)
    atomic_save_safetensors(model.state_dict(), path, meta)
    return theta0_sha


def clip_metadata(path: Path) -> dict[str, str]:
    """The manifest of a saved CLIP (without loading its tensors)."""
    return _checked_metadata(path, CLIP_FORMAT, "CLIP")


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


def save_head(head: ZeroShotHead, classes: list[str], path: Path, recipe: dict | None = None) -> None:
    meta = {"format": HEAD_FORMAT, "classes": json.dumps(classes), "logit_scale": repr(head.logit_scale)}
    if recipe is not None:
        meta[RECIPE_KEY] = canonical_json(recipe)
    atomic_save_safetensors({"weight": head.weight}, path, meta)


def vector_metadata(path: Path) -> dict[str, str]:
    """The metadata of a saved task vector (without loading its tensors)."""
    from pyro_tvc.task_vectors import FORMAT

    return _checked_metadata(path, FORMAT, "task vector")


def head_metadata(path: Path) -> dict[str, str]:
    return _checked_metadata(path, HEAD_FORMAT, "head")


def head_classes(path: Path) -> list[str]:
    """The class names a saved head was built for, in label order (without loading its weight)."""
    return json.loads(_checked_metadata(path, HEAD_FORMAT, "head")["classes"])


def check_head_classes(paths: ArtifactPaths, name: str, classes: list[str], spec: str, prepare: str) -> None:
    """Refuse your own task ``spec`` (registered as ``name``) when its prepared head was built for other classes: the
    folder changed after ``prepare`` and its labels no longer index the head's rows. No head file: nothing to check.

    Raises:
        ValueError: the class lists differ (one line naming both and the ``prepare`` command to re-run).
    """
    if not paths.head(name).is_file():
        return
    prepared = head_classes(paths.head(name))
    if classes != prepared:
        raise ValueError(f"{spec}: its classes ({len(classes)}: {classes[:4]}) differ from those its head was prepared "
                         f"for ({len(prepared)}: {prepared[:4]}); re-run `{prepare} --tasks {spec} --out {paths.root}`")


def load_head(path: Path, device="cpu") -> tuple[ZeroShotHead, list[str]]:
    meta = _checked_metadata(path, HEAD_FORMAT, "head")
    weight = load_file(str(path))["weight"].to(device)
    return ZeroShotHead(weight, float(meta["logit_scale"])), json.loads(meta["classes"])


def target_head(paths: ArtifactPaths, clip: torch.nn.Module, model_name: str, name: str, classes: list[str],
                device="cpu") -> ZeroShotHead:
    """The prepared zero-shot head of ``name`` when it exists with these ``classes``, else one built now from the
    class names through theta_0's text tower (a target needs a head, not a vector of its own; nothing is written).

    Raises:
        ValueError: a prepared head of ``name`` with other classes (a different task under the same name).
    """
    from pyro_tvc.backbones import tokenizer_for, zero_shot_head

    if paths.head(name).exists():
        head, prepared = load_head(paths.head(name), device)
        if prepared != list(classes):
            raise ValueError(f"{paths.head(name)}: the prepared head of {name!r} has classes {prepared[:5]}..., the "
                             f"data has {list(classes)[:5]}...; rename the task folder or re-run prepare")
        return head
    return zero_shot_head(clip, tokenizer_for(model_name), list(classes), name)


def load_bank(paths: ArtifactPaths, tasks: list[str], theta0_sha256: str | None = None) -> TaskVectorBank:
    """Stack the task vectors of ``tasks``; refuses unknown tasks, non-finite vectors and another theta_0.

    Raises:
        FileNotFoundError: a task has no vector in ``paths`` (names it and the prepared tasks).
        TaskVectorError: NaN/inf values (naming task and blocks), mixed backbones or theta_0.
    """
    available = prepared_tasks(paths)
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise FileNotFoundError(f"no task vector for {unknown} in {paths.root / 'task_vectors'}; prepared tasks: "
                                f"{available} (run `pyro-tvc prepare --tasks ...` or `pyro-tvc import-vector`)")
    vectors = [TaskVector.load(paths.task_vector(t)) for t in tasks]
    if theta0_sha256 is not None:
        for v in vectors:
            if v.meta.get("theta0_sha256") != theta0_sha256:
                raise ValueError(f"task vector {v.task!r} was built on another theta_0 (sha256 "
                                 f"{str(v.meta.get('theta0_sha256'))[:12]}…) than the one prepared in {paths.root} "
                                 f"({theta0_sha256[:12]}…); re-run `pyro-tvc prepare` for it")
    return TaskVectorBank.from_vectors(vectors)


def artefact_identity(path: Path) -> str | None:
    """What a result computed from the head or task vector at ``path`` depends on (a benchmark cell's cache key).

    The sha256 of the recipe it records (equal recipes make the same artefact up to float noise), or of the file itself
    when it records none or only ``{"kind": "import"}`` (an imported vector: the recipe says nothing about which);
    None when there is no file.
    """
    from pyro_tvc.checkpoints import file_sha256
    from pyro_tvc.recipes import recipe_sha256, stored_recipe

    if not path.is_file():
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)  # rewritten: read again
    if key not in _IDENTITIES:
        with safe_open(str(path), "pt") as f:
            recipe = stored_recipe(f.metadata() or {})
        unrecorded = recipe is None or recipe == {"kind": "import"}
        _IDENTITIES[key] = "file:" + file_sha256(path) if unrecorded else "recipe:" + recipe_sha256(recipe)
    return _IDENTITIES[key]


_IDENTITIES: dict[tuple, str] = {}


def prepared_tasks(paths: ArtifactPaths) -> list[str]:
    return sorted(p.stem for p in (paths.root / "task_vectors").glob("*.safetensors"))
