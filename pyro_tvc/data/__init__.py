"""Dataset registry: the embedded image sets shipped with the package, and real benchmark sets from disk.

Every task is exposed the same way, as :class:`TaskSplits` (class names plus ``train``/``val``/``test`` torch
datasets yielding ``(image [3, H, W] float, label int)``), so that the rest of the library never knows where the
images came from. ``val`` is always carved deterministically from ``train`` (seeded, stratified).

Embedded tasks (``pyro_tvc/data/embedded/<task>.npz``, 32x32, see its README) load entirely into memory.
Real tasks come from ``--data-root`` through torchvision or ``ImageFolder`` and are never downloaded: a missing
set raises :class:`DatasetNotFoundError` naming the expected location.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_TASKS = ("mnist", "fashion_mnist", "kmnist", "digits", "cifar10", "gtsrb", "eurosat5", "resisc45_12", "dtd10")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was expected; the message names the task and the path."""


@dataclass
class TaskSplits:
    """One classification task: class names and three disjoint splits."""

    name: str
    classes: list[str]
    train: Dataset
    val: Dataset
    test: Dataset
    skipped: int = 0  # unreadable files left out (tasks by path with --skip-bad-images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_val_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``labels`` into (train, val), taking ``val_fraction`` of every class (at least one)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.RandomState(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(round(val_fraction * len(members)))) if len(members) > 1 else 0
        val.append(members[:n_val])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W]`` or ``[N, H, W, 3]`` -> CLIP-normalised float ``[N, 3, H, W]``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def embedded_manifest() -> dict:
    return json.loads((EMBEDDED_DIR / "MANIFEST.json").read_text())


def load_embedded(name: str, val_fraction: float = 0.1, seed: int = 0, max_train: int | None = None) -> TaskSplits:
    """Load an embedded task fully into memory. ``max_train`` keeps a deterministic subset (for fast modes)."""
    path = EMBEDDED_DIR / f"{name}.npz"
    if name not in EMBEDDED_TASKS or not path.exists():
        raise DatasetNotFoundError(
            f"embedded task {name!r} not found at {path}; embedded tasks are: {', '.join(EMBEDDED_TASKS)}")
    with np.load(path) as d:
        classes = [str(c) for c in d["classes"]]
        train_labels = d["train_labels"]
        train_idx, val_idx = stratified_val_indices(train_labels, val_fraction, seed)
        if max_train is not None and len(train_idx) > max_train:
            train_idx = np.sort(np.random.RandomState(seed).permutation(train_idx)[:max_train])
        images = d["train_images"]

        def split(idx: np.ndarray) -> TensorDataset:
            return TensorDataset(images_to_tensor(images[idx]), torch.from_numpy(train_labels[idx]).long())

        test = TensorDataset(images_to_tensor(d["test_images"]), torch.from_numpy(d["test_labels"]).long())
        return TaskSplits(name, classes, split(train_idx), split(val_idx), test)


# --- real benchmark sets (torchvision / ImageFolder), never downloaded ------------------------------------------

def _tv(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, name)


def _official(cls_name: str, train_kw: dict, test_kw: dict) -> Callable:
    def load(root: Path, transform):
        cls = _tv(cls_name)
        return cls(str(root), transform=transform, download=False, **train_kw), \
            cls(str(root), transform=transform, download=False, **test_kw)
    return load


def _single(cls_name: str | None, subdir: str | None = None) -> Callable:
    """A set without an official test split: seeded 80/20 split of one dataset."""
    def load(root: Path, transform):
        if cls_name is None:
            from torchvision.datasets import ImageFolder

            full = ImageFolder(str(root / subdir), transform=transform)
        else:
            full = _tv(cls_name)(str(root), transform=transform, download=False)
        perm = np.random.RandomState(0).permutation(len(full))
        n_test = len(full) // 5
        return Subset(full, np.sort(perm[n_test:])), Subset(full, np.sort(perm[:n_test]))
    return load


REAL_TASKS: dict[str, Callable] = {
    "MNIST": _official("MNIST", {"train": True}, {"train": False}),
    "SVHN": _official("SVHN", {"split": "train"}, {"split": "test"}),
    "GTSRB": _official("GTSRB", {"split": "train"}, {"split": "test"}),
    "DTD": _official("DTD", {"split": "train"}, {"split": "test"}),
    "Cars": _official("StanfordCars", {"split": "train"}, {"split": "test"}),
    "EuroSAT": _single("EuroSAT"),
    "SUN397": _single("SUN397"),
    "RESISC45": _single(None, "resisc45"),
}


def _targets(ds: Dataset) -> np.ndarray:
    if isinstance(ds, Subset):
        return _targets(ds.dataset)[np.asarray(ds.indices)]
    for attr in ("targets", "labels", "_labels", "_samples"):
        if hasattr(ds, attr):
            values = getattr(ds, attr)
            if attr == "_samples":
                values = [s[1] for s in values]
            return np.asarray(values)
    return np.asarray([ds[i][1] for i in range(len(ds))])


def _classes(ds: Dataset) -> list[str]:
    base = ds.dataset if isinstance(ds, Subset) else ds
    classes = list(getattr(base, "classes", []))
    # torchvision's MNIST names its classes '0 - zero'; prompts read better with the bare digit.
    return [c.split(" - ")[0] if " - " in c else c.replace("_", " ") for c in classes]


def load_real(name: str, data_root: Path, transform, val_fraction: float = 0.1, seed: int = 0) -> TaskSplits:
    """Load a real benchmark set from ``data_root`` (torchvision layout; RESISC45 as ``data_root/resisc45/<class>/``)."""
    if name not in REAL_TASKS:
        raise DatasetNotFoundError(f"unknown real task {name!r}; known: {', '.join(REAL_TASKS)}")
    data_root = Path(data_root)
    try:
        train_full, test = REAL_TASKS[name](data_root, transform)
    except (RuntimeError, FileNotFoundError) as err:
        raise DatasetNotFoundError(
            f"{name}: not found under {data_root} (pyro-tvc never downloads; place the torchvision layout there). "
            f"Loader said: {err}") from err
    train_idx, val_idx = stratified_val_indices(_targets(train_full), val_fraction, seed)
    return TaskSplits(name, _classes(train_full), Subset(train_full, train_idx), Subset(train_full, val_idx), test)


def load_task(name: str, data_root: Path | None = None, transform=None, image_size: int = 32,
              skip_bad_images: bool = False, **kw) -> TaskSplits:
    """A task by path (:mod:`pyro_tvc.data.custom`, decoded at ``image_size``), else an embedded task when
    ``data_root`` is None, else a real one from disk."""
    from pyro_tvc.data.custom import is_task_path, load_custom

    if is_task_path(name):
        return load_custom(name, image_size, skip_bad_images=skip_bad_images, **kw)
    if data_root is None:
        return load_embedded(name, **kw)
    kw.pop("max_train", None)
    return load_real(name, data_root, transform, **kw)


# --- batching ---------------------------------------------------------------------------------------------------

def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                    num_workers: int = 0):
    """Yield ``(images, labels)`` batches. In-memory ``TensorDataset``s are sliced directly (no per-item overhead)."""
    if isinstance(dataset, TensorDataset):
        images, labels = dataset.tensors
        order = torch.randperm(len(labels), generator=generator) if shuffle else torch.arange(len(labels))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield images[idx], labels[idx]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                         num_workers=num_workers)
    yield from loader


def infinite_batches(dataset: Dataset, batch_size: int, generator: torch.Generator | None = None):
    """Endless shuffled batches (a new permutation each epoch)."""
    while True:
        yield from iterate_batches(dataset, batch_size, shuffle=True, generator=generator)


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """All labels of a split, without decoding images where the dataset allows it."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    return _targets(dataset)
