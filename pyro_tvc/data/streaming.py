"""Images read from their files on demand, so that a task of your own is never held in memory as one tensor.

* :class:`ImageFiles`: a torch ``Dataset`` over ``(path, label)`` pairs; each item is decoded when asked for (PIL,
  RGB, CLIP's resize of the shorter side and centre crop to the model's input side, CLIP's normalisation).
* :class:`LazyImages`: the ``images [N, 3, S, S]`` of a split as the rest of the library sees them. ``len``,
  ``shape``, ``device`` and ``x[idx]`` behave as for a tensor, but ``x[idx]`` decodes only those rows (in a few
  threads) and returns a tensor on ``device``; :meth:`LazyImages.subset` is a lazy view; ``torch.cat`` of lazy
  (and in-memory) parts stays lazy; :meth:`LazyImages.batches` streams every row in order through a ``DataLoader``.
* :func:`fit_in_memory`: a split small enough for the memory budget (``PYRO_TVC_IMAGE_MEMORY_MB``, default 1024 MiB)
  is decoded once and kept as a tensor (fast epochs); a larger one stays lazy (bounded memory, decoded every epoch).

Peak memory on a 20,000-image 224 px folder: ``benchmarks/stream_memory.py`` and ``docs/scale.md``.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

PREPROCESSING = "pil-rgb/bicubic-shorter-side/centre-crop/clip-norm/v1"  # part of the feature cache's key
DEFAULT_MEMORY_MB = 1024
_POOL: ThreadPoolExecutor | None = None


def memory_budget_bytes() -> int:
    """Bytes of decoded float32 pixels a split may occupy before it is streamed instead (``PYRO_TVC_IMAGE_MEMORY_MB``).

    Raises:
        ValueError: the variable is not a non-negative number.
    """
    raw = os.environ.get("PYRO_TVC_IMAGE_MEMORY_MB", str(DEFAULT_MEMORY_MB))
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise ValueError(f"PYRO_TVC_IMAGE_MEMORY_MB={raw!r}; expected a number of MiB >= 0 (0 streams every split)")
    return int(mb * 2**20)


def loader_workers() -> int:
    """DataLoader worker processes for streaming passes (``PYRO_TVC_LOADER_WORKERS``; default: none on 2 cores or
    fewer, else half the cores up to 8)."""
    raw = os.environ.get("PYRO_TVC_LOADER_WORKERS")
    if raw is not None and raw.strip().isdigit():
        return int(raw)
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


def _threads() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:  # PIL releases the GIL while it decodes and resizes, so threads overlap the files
        _POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="pyro-tvc-decode")
    return _POOL


class ImageFiles(Dataset):
    """``(image [3, S, S] float32, label)`` for each ``(path, label)`` of ``items``, decoded on access.

    Raises (on access):
        CustomTaskError: the file is not a readable image.
    """

    def __init__(self, items: list[tuple[Path, int]], size: int):
        self.paths = [Path(p) for p, _ in items]
        self.labels = np.asarray([int(c) for _, c in items], dtype=np.int64)
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from pyro_tvc.data import images_to_tensor
        from pyro_tvc.data.custom import decode_image

        return images_to_tensor(decode_image(self.paths[i], self.size)[None])[0], int(self.labels[i])

    def subset(self, idx) -> "ImageFiles":
        out = ImageFiles([], self.size)
        idx = np.asarray(idx, dtype=np.int64)
        out.paths, out.labels = [self.paths[i] for i in idx], self.labels[idx]
        return out

    def fingerprint(self) -> str:
        """sha256 of (preprocessing, Pillow's version, input side, every file's path, size and modification time):
        the data's identity for the feature cache without reading the pixels (make's rule: a changed file has a new
        mtime; a copy that keeps size and mtime, ``cp -p``, counts as the same file)."""
        import PIL

        h = hashlib.sha256(f"{PREPROCESSING}|pillow {PIL.__version__}|{self.size}".encode())
        for p in self.paths:
            st = p.stat()
            h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()


class LazyImages:
    """A split's images ``[N, 3, S, S]`` that decode on indexing. Build it from an :class:`ImageFiles` (or any
    dataset yielding ``(image, label)``); ``x[idx]`` returns a float32 tensor on ``self.device``."""

    def __init__(self, dataset: Dataset, device="cpu", identity: str | None = None):
        self.dataset = dataset
        self.device = torch.device(device)
        self.identity = identity  # the data's identity for the feature cache when the dataset has no fingerprint
        side = getattr(dataset, "size", None)
        side = side if isinstance(side, int) else (None if len(dataset) else 1)
        # an ImageFiles knows its shape; another dataset shows it by its first item
        item = torch.zeros(3, side, side) if isinstance(side, int) else self._item(0)
        self.shape = torch.Size((len(dataset), *item.shape))
        self.dtype = item.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyImages(shape={tuple(self.shape)}, device={self.device}, streamed from {type(self.dataset).__name__})"

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def to(self, device) -> "LazyImages":
        out = LazyImages.__new__(LazyImages)
        out.__dict__.update(self.__dict__)
        out.device = torch.device(device)
        return out

    def _rows(self, idx) -> np.ndarray:
        if isinstance(idx, torch.Tensor):
            idx = idx.detach().cpu().numpy()
        if isinstance(idx, slice):
            return np.arange(len(self))[idx]
        rows = np.asarray(idx)
        rows = np.flatnonzero(rows) if rows.dtype == np.bool_ else rows.astype(np.int64)
        return np.where(rows < 0, rows + len(self), rows)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self[[int(idx)]][0]
        rows = self._rows(idx)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} out of range for {len(self)} images")
        images = list(_threads().map(self._item, rows))
        if not images:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype, device=self.device)
        return torch.stack(images).to(self.device)

    def _item(self, row) -> torch.Tensor:
        try:
            return self.dataset[int(row)][0]
        except ValueError:
            raise  # ours (CustomTaskError) already names the file
        except Exception as err:  # noqa: BLE001 - torchvision/PIL raise OSError, SyntaxError ... without the path
            raise ValueError(f"{_source_of(self.dataset, int(row))}: not a readable image ({type(err).__name__}: "
                             f"{err})") from err

    def subset(self, idx) -> "LazyImages":
        """The rows ``idx`` as another lazy split (nothing is decoded)."""
        from torch.utils.data import Subset

        rows = self._rows(idx)
        if hasattr(self.dataset, "subset"):
            return LazyImages(self.dataset.subset(rows), self.device)
        identity = None if self.identity is None else rows_digest(self.identity, rows)
        return LazyImages(Subset(self.dataset, rows.tolist()), self.device, identity)

    def batches(self, batch_size: int = 256):
        """Every row in order, ``batch_size`` at a time, through a ``DataLoader`` (:func:`loader_workers` workers)."""
        # a generator of its own: iterating a DataLoader draws from the global RNG otherwise, and a cold or warm
        # feature cache would then change the guide's initialisation (and desynchronise torchrun ranks)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, num_workers=loader_workers(),
                                             generator=torch.Generator())
        for x, _ in loader:
            yield x.to(self.device)

    def materialise(self) -> torch.Tensor:
        return torch.cat(list(self.batches())) if len(self) else self[[]]

    def fingerprint(self) -> str | None:
        """The data's identity for the feature cache; None when unknown (then nothing is cached)."""
        fp = getattr(self.dataset, "fingerprint", None)
        return fp() if fp is not None else self.identity

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.cat:
            dim = (kwargs or {}).get("dim", args[1] if len(args) > 1 else 0)
            if dim != 0 or (kwargs or {}).get("out") is not None:
                raise TypeError("streamed images concatenate along rows only (dim=0, no out=)")
            return concat(list(args[0]))
        return NotImplemented


class _Concat(Dataset):
    """Several lazy or in-memory parts one after the other (a mixed-task split of task addition or negation)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        part, row = self.parts[k], i - int(self.offsets[k])
        if isinstance(part, LazyImages):  # read in the calling thread: a nested pool map could wait on itself
            return part.dataset[row][0], 0
        return part[row].cpu(), 0

    def fingerprint(self) -> str | None:
        h = hashlib.sha256()
        for p in self.parts:
            fp = p.fingerprint() if isinstance(p, LazyImages) else _pixels_digest(p)
            if fp is None:
                return None
            h.update(fp.encode())
        return h.hexdigest()


def _source_of(dataset, row: int) -> str:
    """The file behind ``dataset[row]`` when the dataset says (torchvision's ``samples``/``imgs``/``_samples``)."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset, row = dataset.dataset, int(dataset.indices[row])
    for attr in ("samples", "imgs", "_samples"):
        items = getattr(dataset, attr, None)
        if items is not None and row < len(items):
            return str(items[row][0])
    return f"row {row} of {type(dataset).__name__}"


def file_stats_digest(dataset) -> str:
    """sha256 of the (path, size, mtime) of the files a torchvision dataset lists (``samples``/``imgs``/
    ``_samples``), or of every file under its ``root`` folder (sets stored in a few binary files): a replaced file
    changes it."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    paths = None
    for attr in ("samples", "imgs", "_samples"):
        items = getattr(dataset, attr, None)
        if items is not None:
            paths = [Path(str(i[0])) for i in items]
            break
    if paths is None and getattr(dataset, "root", None) is not None:
        paths = sorted(p for p in Path(dataset.root).rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in paths or []:
        st = p.stat()
        h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def rows_digest(identity: str, rows: np.ndarray) -> str:
    h = hashlib.sha256(identity.encode())
    h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()


def _pixels_digest(images: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    return h.hexdigest()


def concat(parts: list) -> "LazyImages | torch.Tensor":
    """``torch.cat`` along rows of lazy and in-memory image splits: lazy when any part is."""
    if not any(isinstance(p, LazyImages) for p in parts):
        return torch.cat(parts)
    device = next(p.device for p in parts if isinstance(p, LazyImages))
    return LazyImages(_Concat(parts), device)


def fit_in_memory(images: "LazyImages | torch.Tensor") -> "LazyImages | torch.Tensor":
    """``images`` decoded into one tensor when its float32 pixels fit :func:`memory_budget_bytes`, else as it is."""
    if not isinstance(images, LazyImages):
        return images
    nbytes = int(np.prod(images.shape)) * images.dtype.itemsize
    return images.materialise() if nbytes <= memory_budget_bytes() else images


def take(images: "LazyImages | torch.Tensor", idx) -> "LazyImages | torch.Tensor":
    """Rows ``idx`` of a split without decoding a lazy one."""
    return images.subset(idx) if isinstance(images, LazyImages) else images[idx]
