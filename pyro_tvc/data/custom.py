"""Your own task by path: an ``ImageFolder`` tree, an ``.npz`` in the embedded format, or a CSV of (path, label).

A task given by path is named after the folder (or the file's stem); its class names, taken from the class folders
or the CSV's labels, feed the zero-shot head's prompts (generic templates, :mod:`pyro_tvc.data.prompts`).

Layouts (``docs/custom-tasks.md``):

* ``ROOT/<class>/<image>``: one pool, split 80/20 into train/test (seeded, stratified);
* ``ROOT/train/<class>/...`` and ``ROOT/test/<class>/...`` (optionally ``ROOT/val/<class>/...``): the given splits;
* ``FILE.npz`` with ``classes``, ``train_images``, ``train_labels``, ``test_images``, ``test_labels`` (uint8 images
  ``[N, H, W]`` or ``[N, H, W, 3]``; the embedded sets' format);
* ``FILE.csv`` with a header holding ``path`` and ``label`` (class name) and optionally ``split`` (train/val/test);
  relative paths are read from the CSV's folder.

Images are decoded with PIL, converted to RGB and resized to the model's input size with CLIP's normalisation, when
they are read: a folder's or a CSV's splits are lazy (:mod:`pyro_tvc.data.streaming`), and loading only lists and
checks the files (PIL's ``verify`` and one decode that is not kept, one file at a time). A val
split that is not given is carved from train (10 % of every class, seeded), as for the embedded sets. Every problem
is refused with :class:`CustomTaskError` (a ``ValueError``) naming the file and what was expected; unreadable images
are refused too, unless ``skip_bad_images`` (then they are counted in ``TaskSplits.skipped``).
"""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from pyro_tvc.data.streaming import ImageFiles

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
TEST_SPLIT_SEED = 0  # the test split never depends on a run's seed (a vector fine-tuned by prepare never sees it)


class CustomTaskError(ValueError):
    """A task given by path cannot be read as one; the message names the file and what was expected."""


def is_task_path(spec: str | Path) -> bool:
    """True when ``spec`` names a task by path (it contains a path separator or ends in .npz/.csv), not by name."""
    s = str(spec)
    return "/" in s or "\\" in s or s.endswith((".npz", ".csv")) or s in (".", "..")


def task_name(spec: str | Path) -> str:
    """The task's name: the folder's name, or the file's stem."""
    p = Path(spec).expanduser().resolve()
    return p.stem if p.suffix in (".npz", ".csv") else p.name


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def decode_image(path: Path, size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]`` pixels of one image file (RGB, CLIP's resize and centre crop).

    Raises:
        CustomTaskError: the file is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = _resize_center_crop(im, size)
            return np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on a read-only view)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CustomTaskError(f"{path}: not a readable image ({type(err).__name__}); expected one of "
                              f"{', '.join(IMAGE_SUFFIXES)} (or pass --skip-bad-images)") from err


def _readable(path: Path) -> bool:
    """Whether PIL identifies the file, its data pass the format's own checks (``verify``: chunk CRCs for PNG) and
    its pixels decode (a truncated JPEG or GIF passes ``verify``); one file at a time, nothing kept. Remembered per
    (path, size, mtime) for the process: the benchmark loads a target once to register it and again per seed."""
    st = path.stat()
    return _readable_file(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=None)
def _readable_file(path: str, size: int, mtime_ns: int) -> bool:  # size and mtime: part of the cache key only
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types (SyntaxError, struct.error ...) for damaged files
        return False


def _resize_center_crop(im, size: int):
    """CLIP's preprocessing: shorter side to ``size`` (bicubic), then the central ``size x size`` square."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


class _Reader:
    """Checks files one by one (nothing is decoded into memory) and returns them as a lazy :class:`ImageFiles`,
    skipping (and counting) unreadable ones only when allowed."""

    def __init__(self, size: int, skip_bad: bool):
        self.size, self.skip_bad, self.skipped = size, skip_bad, 0

    def read(self, items: list[tuple[Path, int]], where: str) -> ImageFiles:
        kept = []
        for path, label in items:
            if _readable(path):
                kept.append((path, label))
            elif self.skip_bad:
                self.skipped += 1
            else:
                decode_image(path, self.size)  # raises the one-line error naming the file
                raise CustomTaskError(f"{path}: damaged image data; expected a readable image (or pass "
                                      f"--skip-bad-images)")
        if not kept:
            raise CustomTaskError(f"{where}: no readable image")
        return ImageFiles(kept, self.size)


def _folder_items(folder: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    dirs = _class_dirs(folder)
    if not dirs:
        raise CustomTaskError(f"{folder}: no class sub-folders; expected {folder}/<class>/<image> "
                              f"(or train/ and test/ above the class folders)")
    names = [d.name for d in dirs]
    if classes is not None and names != classes:
        raise CustomTaskError(f"{folder}: class folders {names} differ from train/'s {classes}")
    items = []
    for c, d in enumerate(dirs):
        files = _image_files(d)
        if not files:
            raise CustomTaskError(f"{d}: class {d.name!r} has no images; every class folder needs at least one")
        items += [(f, c) for f in files]
    return names, items


def _stratified_test(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[:int(round(fraction * len(members)))] if len(members) > 1 else members[:0])
    test_idx = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test_idx), test_idx


def _from_folder(root: Path, reader: _Reader) -> tuple[list[str], dict]:
    given = [s for s in SPLITS if (root / s).is_dir()]
    if given and given != ["train", "test"] and set(given) != set(SPLITS):
        raise CustomTaskError(f"{root}: has {'/, '.join(given)}/ folders; expected train/ and test/ (and optionally "
                              f"val/) above the class folders, or class folders only")
    if given:
        classes, items = _folder_items(root / "train", None)
        arrays = {"train": reader.read(items, str(root / "train"))}
        for split in ("val", "test"):
            if (root / split).is_dir():
                arrays[split] = reader.read(_folder_items(root / split, classes)[1], str(root / split))
        return classes, arrays
    classes, items = _folder_items(root, None)
    pool = reader.read(items, str(root))
    train_idx, test_idx = _stratified_test(pool.labels, 0.2, TEST_SPLIT_SEED)
    return classes, {"train": pool.subset(train_idx), "test": pool.subset(test_idx)}


def _from_csv(path: Path, reader: _Reader) -> tuple[list[str], dict]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise CustomTaskError(f"{path}: expected a header with 'path' and 'label' columns (and optionally 'split'), "
                              f"got {list(rows[0]) if rows else 'no rows'}")
    for line, r in enumerate(rows, start=2):
        if not (r.get("path") or "").strip() or not (r.get("label") or "").strip():
            raise CustomTaskError(f"{path}, line {line}: empty 'path' or 'label'")
        r["label"] = r["label"].strip()
    classes = sorted({r["label"] for r in rows})
    per_split: dict[str, list] = {}
    for line, r in enumerate(rows, start=2):
        file = Path(r["path"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not r["path"] or not file.is_file():
            raise CustomTaskError(f"{path}, line {line}: image {str(file)!r} does not exist")
        split = (r.get("split") or "train").strip().lower()
        if split not in SPLITS:
            raise CustomTaskError(f"{path}, line {line}: split {split!r}; expected one of {', '.join(SPLITS)}")
        per_split.setdefault(split, []).append((file, classes.index(r["label"])))
    if "train" not in per_split:
        raise CustomTaskError(f"{path}: no train rows (rows without a 'split' value are train)")
    arrays = {s: reader.read(items, f"{path} ({s} rows)") for s, items in per_split.items()}
    if "test" not in arrays:
        pool = arrays["train"]
        train_idx, test_idx = _stratified_test(pool.labels, 0.2, TEST_SPLIT_SEED)
        arrays["train"], arrays["test"] = pool.subset(train_idx), pool.subset(test_idx)
    return classes, arrays


def _from_npz(path: Path) -> tuple[list[str], dict]:
    need = ("classes", "train_images", "train_labels", "test_images", "test_labels")
    with np.load(path, allow_pickle=False) as d:
        missing = [k for k in need if k not in d]
        if missing:
            raise CustomTaskError(f"{path}: missing arrays {missing}; expected {list(need)} (the embedded format)")
        classes, arrays = [str(c) for c in d["classes"]], {}
        for s in ("train", "test"):
            x, y = d[f"{s}_images"], d[f"{s}_labels"]
            if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
                raise CustomTaskError(f"{path}: {s}_images has dtype {x.dtype} and shape {x.shape}; expected uint8 "
                                      f"[N, H, W] or [N, H, W, 3]")
            if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() >= len(classes))):
                raise CustomTaskError(f"{path}: {s}_labels must be {len(x)} integers in [0, {len(classes)})")
            arrays[s] = (x, y.astype(np.int64))
        return classes, arrays


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[N, H, W(, 3)]`` at ``size x size`` (CLIP's resize and centre crop) when it is not already."""
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([np.asarray(_resize_center_crop(Image.fromarray(im).convert("RGB"), size)) for im in images])


def load_custom(spec: str | Path, image_size: int, val_fraction: float = 0.1, seed: int = 0,
                max_train: int | None = None, skip_bad_images: bool = False):
    """Load a task given by path as :class:`~pyro_tvc.data.TaskSplits` of CLIP-normalised ``[3, S, S]`` images
    (``S = image_size``), with ``skipped`` = the number of unreadable files left out. Folders and CSVs give
    :class:`~pyro_tvc.data.streaming.ImageFiles` splits (every file checked now, decoded when read); an .npz gives
    in-memory tensors.

    Raises:
        CustomTaskError: a missing path, no class folders, an empty class, an unreadable image (without
            ``skip_bad_images``), a CSV without path/label columns or naming a missing file, a malformed .npz, or a
            split without images.
    """
    from pyro_tvc.data import TaskSplits, images_to_tensor, stratified_val_indices

    path = Path(spec).expanduser()
    if not path.exists():
        raise CustomTaskError(f"{spec}: no such folder or file; expected an ImageFolder tree, an .npz or a .csv")
    reader = _Reader(image_size, skip_bad_images)
    if path.is_dir():
        classes, splits = _from_folder(path, reader)
    elif path.suffix == ".csv":
        classes, splits = _from_csv(path, reader)
    elif path.suffix == ".npz":
        classes, arrays = _from_npz(path)
        splits = {k: _InMemory(images_to_tensor(_resized(x, image_size)), torch.from_numpy(y))
                  for k, (x, y) in arrays.items()}
    else:
        raise CustomTaskError(f"{spec}: expected a folder, an .npz or a .csv")
    train = splits["train"]
    if "val" not in splits:
        train_idx, val_idx = stratified_val_indices(train.labels, val_fraction, seed)
        splits["val"], train = train.subset(val_idx), train.subset(train_idx)
    if max_train is not None and len(train) > max_train:
        train = train.subset(np.sort(np.random.RandomState(seed).permutation(len(train))[:max_train]))
    splits["train"] = train
    for split in ("train", "test"):
        if not len(splits[split]):
            raise CustomTaskError(f"{spec}: the {split} split has no images (each class needs 2+ images to be split)")
    return TaskSplits(task_name(path), classes, splits["train"], splits["val"], splits["test"], reader.skipped)


class _InMemory(TensorDataset):
    """An .npz split: ``(images, labels)`` tensors with the same ``labels``/``subset`` as :class:`ImageFiles`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels.long())
        self.labels = labels.numpy()

    def subset(self, idx) -> "_InMemory":
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return _InMemory(self.tensors[0][idx], self.tensors[1][idx])
