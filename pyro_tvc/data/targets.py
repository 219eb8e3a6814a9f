"""A target's labelled splits for learning a composition: embedded by name or your own by path, optionally few-shot.

``train`` and ``benchmark`` load a target through :func:`load_target`, so a task folder works
everywhere a task name does, and ``--shots k`` means the same thing in every command.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import TensorDataset

from pyro_tvc.data import EMBEDDED_TASKS, dataset_labels, load_task
from pyro_tvc.data.custom import is_task_path, task_name
from pyro_tvc.data.streaming import LazyImages, file_stats_digest, fit_in_memory, rows_digest, take


def _images_and_labels(dataset, identity: str | None = None) -> tuple:
    """``(images, labels [N])`` of a split: the tensors of an in-memory one, a :class:`LazyImages` of a file one."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    if identity is not None:  # a real set: its files' stats, and for a seeded split its rows
        identity = f"{identity}:{file_stats_digest(dataset)}"
        if hasattr(dataset, "indices"):
            identity = rows_digest(identity, np.asarray(dataset.indices))
    return LazyImages(dataset, identity=identity), torch.as_tensor(dataset_labels(dataset)).long()


def real_split_identity(data_root, name: str, transform) -> str:
    """A real set's identity for the feature cache: its resolved location, name and preprocessing (the transform's
    text without memory addresses); each split adds its rows and the (path, size, mtime) of its files."""
    import re
    from pathlib import Path

    return f"real:{Path(data_root).resolve()}:{name}:{re.sub(r' at 0x[0-9a-fA-F]+', '', repr(transform))}"


def few_shot_indices(labels: np.ndarray, shots: int, seed: int, classes: list[str] | None = None) -> np.ndarray:
    """``shots`` indices per class, drawn without replacement (seeded, stratified; aTLAS's few-shot setting).

    Raises:
        ValueError: ``shots`` < 1 or larger than the smallest class (the message names the class and its size).
    """
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    rng = np.random.RandomState(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            name = f"{c} ({classes[c]!r})" if classes is not None and c < len(classes) else str(c)
            raise ValueError(f"--shots {shots} is larger than class {name}'s {len(members)} training images")
        picked.append(rng.choice(members, shots, replace=False))
    return np.sort(np.concatenate(picked))


@dataclass
class TargetData:
    """``name``, ``classes`` and ``splits[split] = (images [N, 3, S, S], labels [N])`` for train/val/test (images: a
    tensor, or a :class:`~pyro_tvc.data.streaming.LazyImages` when the split exceeds the memory budget);
    ``choices``: how the splits were made (shots, where val came from, skipped files), recorded in run configs."""

    name: str
    classes: list[str]
    splits: dict
    choices: dict = field(default_factory=dict)


def load_target(spec: str, seed: int = 0, shots: int | None = None, max_train: int | None = None,
                image_size: int = 32, skip_bad_images: bool = False, data_root=None,
                transform=None) -> TargetData:
    """Load a target by name (embedded, or a real set under ``data_root`` read with ``transform``, the model's
    preprocessing) or by path (ImageFolder / .npz / .csv).

    Val is carved from train before the shots are drawn (10 % of every class, seeded), so it never holds a shot;
    when that leaves val without images (a class of 1-2 images), val is the shots themselves and ``choices`` says so.

    Raises:
        ValueError: an unreadable task (see :mod:`pyro_tvc.data.custom`), or ``shots`` larger than a class.
    """
    real = data_root is not None and not is_task_path(spec) and spec not in EMBEDDED_TASKS
    data = load_task(spec, data_root if real else None, transform, image_size=image_size,
                     skip_bad_images=skip_bad_images, seed=seed, max_train=None if shots else max_train)
    identity = real_split_identity(data_root, spec, transform) if real else None
    splits = {k: _images_and_labels(getattr(data, k), identity and f"{identity}/{k}") for k in ("train", "val", "test")}
    images, labels = splits["train"]
    if not shots and max_train is not None and len(labels) > max_train:  # real sets come whole from disk
        keep = torch.from_numpy(np.sort(np.random.RandomState(seed).permutation(len(labels))[:max_train]))
        splits["train"] = (take(images, keep), labels[keep])
    choices = {"shots": shots, "val_source": "held out of train", "skipped_files": data.skipped}
    if shots:
        images, labels = splits["train"]
        idx = torch.from_numpy(few_shot_indices(labels.numpy(), shots, seed, data.classes))
        splits["train"] = (take(images, idx), labels[idx])
        if len(splits["val"][1]) == 0:
            splits["val"] = splits["train"]
            choices["val_source"] = "the shots (too few images to hold any out)"
    splits = {k: (fit_in_memory(x), y) for k, (x, y) in splits.items()}
    choices["streamed_splits"] = sorted(k for k, (x, _) in splits.items() if isinstance(x, LazyImages))
    return TargetData(task_name(spec) if is_task_path(spec) else spec, data.classes, splits, choices)
