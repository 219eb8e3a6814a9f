"""Build the embedded image sets in ``pyro_tvc/data/embedded/`` from ``../shared/data``.

Run once by a maintainer (``python scripts/vendor_data.py --source ../shared/data``); the output is committed,
so a fresh clone never needs ``../shared``. Every image is resized to 32x32 (the tiny CLIP's resolution),
grayscale sets stay single-channel, and each split is capped (deterministic subset, seed 0) to keep the
repository small. One ``<task>.npz`` per task holds ``train_images, train_labels, test_images, test_labels,
classes``; ``MANIFEST.json`` records the sha256 of every source and output file.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

TASKS = ["mnist", "fashion_mnist", "kmnist", "digits", "cifar10", "gtsrb", "eurosat5", "resisc45_12", "dtd10"]
SIZE = 32
MAX_TRAIN = 4000
MAX_TEST = 1000


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    idx_name = {"train": "train", "test": "t10k"}[split]
    images_idx = folder / f"{idx_name}-images-idx3-ubyte.gz"
    if images_idx.exists():
        labels_idx = folder / f"{idx_name}-labels-idx1-ubyte.gz"
        return load_idx(images_idx), load_idx(labels_idx).astype(np.int64), [images_idx, labels_idx]
    npz = folder / f"{split}.npz"
    with np.load(npz) as d:
        return d["images"], d["labels"].astype(np.int64), [npz]


def resize(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, 3] -> uint8 [N, SIZE, SIZE] or [N, SIZE, SIZE, 3]."""
    if images.shape[1:3] == (SIZE, SIZE):
        return images
    out = [np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for im in images]
    return np.stack(out)


def subset(labels: np.ndarray, cap: int, rng: np.random.RandomState) -> np.ndarray:
    if len(labels) <= cap:
        return np.arange(len(labels))
    return np.sort(rng.permutation(len(labels))[:cap])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("pyro_tvc/data/embedded"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"image_size": SIZE, "max_train": MAX_TRAIN, "max_test": MAX_TEST, "tasks": {}}
    for task in TASKS:
        folder = args.source / task
        classes = (folder / "classes.txt").read_text(encoding="utf-8").splitlines()
        arrays, sources = {}, [folder / "classes.txt"]
        for split, cap in (("train", MAX_TRAIN), ("test", MAX_TEST)):
            images, labels, files = load_split(folder, split)
            keep = subset(labels, cap, np.random.RandomState(0))
            arrays[f"{split}_images"] = resize(images[keep])
            arrays[f"{split}_labels"] = labels[keep]
            arrays[f"{split}_source_rows"] = keep
            sources += files
        out = args.out / f"{task}.npz"
        np.savez_compressed(out, classes=np.array(classes), **arrays)
        manifest["tasks"][task] = {
            "n_classes": len(classes),
            "n_train": int(len(arrays["train_labels"])),
            "n_test": int(len(arrays["test_labels"])),
            "channels": 1 if arrays["train_images"].ndim == 3 else 3,
            "sha256": sha256(out),
            "sources": {str(p.relative_to(args.source)): sha256(p) for p in sources},
        }
        print(f"{task}: {manifest['tasks'][task]['n_train']} train / {manifest['tasks'][task]['n_test']} test, "
              f"{out.stat().st_size / 1e6:.1f} MB")
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
