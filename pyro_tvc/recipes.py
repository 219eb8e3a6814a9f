"""Cache keys of prepared artefacts: every file records the *recipe* that made it, so no cache can go stale.

A recipe is a small JSON-able dict of what an artefact depends on: hashes of its inputs (checkpoint file sha256,
open_clip model config, data manifest, the theta_0 / head it was built on) and the hyper-parameters that shaped it.
It is stored as JSON in the artefact's safetensors metadata (key ``recipe``). ``pyro-tvc prepare`` compares the
stored recipe with the one it would use now, reuses the file only when they are equal, and otherwise says which
inputs changed (:func:`describe_change`) before rebuilding (heads, task vectors, table rows) or refusing (theta_0,
unless ``--rebuild``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import open_clip

RECIPE_KEY = "recipe"


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON (paths and other objects as strings): equal recipes, equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def recipe_sha256(recipe: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()


def stored_recipe(meta: Mapping[str, str]) -> dict | None:
    """The recipe in an artefact's metadata, or None (made by a pyro-tvc without recipes, or unreadable)."""
    try:
        recipe = json.loads(meta[RECIPE_KEY])
    except (KeyError, TypeError, ValueError):
        return None
    return recipe if isinstance(recipe, dict) else None


def same_recipe(meta: Mapping[str, str], recipe: Mapping[str, Any]) -> bool:
    stored = stored_recipe(meta)
    return stored is not None and canonical_json(stored) == canonical_json(recipe)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return text if len(text) <= 60 else text[:57] + "…"


def describe_change(meta: Mapping[str, str], recipe: Mapping[str, Any]) -> str:
    """What differs between the stored recipe and ``recipe``, e.g. ``finetune_steps 20 -> 300``."""
    stored = stored_recipe(meta)
    if stored is None:
        return "it records no recipe (made by an older pyro-tvc or another tool)"
    changed = [k for k in sorted(set(stored) | set(recipe))
               if canonical_json(stored.get(k)) != canonical_json(recipe.get(k))]
    parts = [f"{k} {_short(stored.get(k))} -> {_short(recipe.get(k))}" for k in changed[:4]]
    return ", ".join(parts) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def model_config_sha256(model_name: str) -> str:
    """Hash of the open_clip architecture config (a changed config is another theta_0)."""
    return recipe_sha256(open_clip.get_model_config(model_name) or {"name": model_name})


def embedded_data_sha256(task: str) -> str:
    """The embedded task's content hash from the shipped manifest (``pyro_tvc/data/embedded/MANIFEST.json``)."""
    from pyro_tvc.data import embedded_manifest

    return embedded_manifest()["tasks"][task]["sha256"]


def real_data_identity(data_root: Path, task: str, classes: list[str], sizes: dict[str, int]) -> dict:
    """A cheap identity of a real data set on disk: resolved location, classes and split sizes.

    Hashing every image of SUN397 on each run would cost minutes; a re-labelled or re-sized set changes this.
    """
    return {"root": str(Path(data_root).resolve()), "task": task, "classes_sha256": recipe_sha256(classes),
            "sizes": dict(sizes)}


def custom_data_identity(spec) -> dict:
    """A cheap identity of a task given by path: its resolved location and the (relative path, size, mtime) of every
    file it reads (for a CSV, of the CSV and of the images it lists), hashed."""
    import csv

    root = Path(spec).expanduser().resolve()
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        files = [root]
        if root.suffix == ".csv":
            with open(root, newline="") as fh:
                files += [(root.parent / r["path"]).resolve() for r in csv.DictReader(fh) if r.get("path")]
    stats = [(str(p.relative_to(root) if root.is_dir() else p), p.stat().st_size, p.stat().st_mtime_ns)
             for p in files if p.is_file()]
    return {"path": str(root), "files_sha256": recipe_sha256(stats)}
