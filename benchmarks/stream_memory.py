"""Peak memory of the commands on a 20,000-image, 224 px ImageFolder (issue 10): streamed vs in memory.

Builds the folder once from real images of the shipped sets (cifar10, gtsrb, eurosat5, resisc45_12, dtd10; upscaled
to 224 px with bicubic resampling, horizontal flips for the second copy of an image; JPEG, quality 90), then runs
each measurement in a fresh Python process that reports its own peak RSS (``ru_maxrss``):

* ``footprint``: ``train`` on a 200-image folder of the same kind: the model's (and the library's) own footprint;
* ``train`` and ``benchmark`` (target composition, zero-shot + Task Arithmetic + aTLAS) on the 20,000-image folder,
  with the default memory budget and with ``PYRO_TVC_IMAGE_MEMORY_MB=0`` (every split streamed);
* ``stream_224``: one streamed pass over all 20,000 images at 224 px (ViT-B-32's input side) through the
  ``DataLoader``; held in memory these would be 12 GB of float32.

    .venv/bin/python benchmarks/stream_memory.py            # writes benchmarks/results/stream_memory.json

Run it alone (it is CPU-bound); a few minutes on 2 cores once the folder exists.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cifar10", "gtsrb", "eurosat5", "resisc45_12", "dtd10")
SIDE = 224
PROBE = r"""
import resource, sys, time
_t0 = time.perf_counter()
exec(sys.argv[1])
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - _t0)
"""


def build_folder(root: Path, count: int) -> Path:
    """``root/<task> <class>/<i>.jpg``: ``count`` images at 224 px, as evenly spread over the classes as the sets
    allow (done once; a folder holding ``count`` images is reused)."""
    from PIL import Image

    from pyro_tvc.data import EMBEDDED_DIR

    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == count:
        return root
    pool = []
    for task in SOURCES:
        with np.load(EMBEDDED_DIR / f"{task}.npz") as d:
            classes = [str(c) for c in d["classes"]]
            for x, y in ((d["train_images"], d["train_labels"]), (d["test_images"], d["test_labels"])):
                pool += [(f"{task} {classes[c]}", img) for img, c in zip(x, y)]
    order = np.random.RandomState(0).permutation(len(pool))
    for i in range(count):
        name, img = pool[order[i % len(pool)]]
        im = Image.fromarray(img).convert("RGB").resize((SIDE, SIDE), Image.BICUBIC)
        if i >= len(pool):
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i}.jpg", quality=90)
    return root


def measure(code: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; its peak RSS in MiB and wall seconds."""
    out = subprocess.run([sys.executable, "-c", PROBE, code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})}, check=False)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_RSS_KIB")]
    if out.returncode or not line:
        raise RuntimeError(f"measurement failed ({out.returncode}): {out.stderr[-2000:]}")
    _, kib, secs = line[-1].split()
    return {"peak_rss_mib": round(int(kib) / 1024, 1), "seconds": round(float(secs), 1)}


def cli(args: list[str]) -> str:
    return f"from pyro_tvc.cli import main; assert main({args!r}) == 0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts" / "pyro-tvc-tiny")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/pyro-tvc-stream-memory"))
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stream_memory.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    big = build_folder(args.folder / "twenty_thousand", args.images)
    small = build_folder(args.folder / "two_hundred", 200)
    work = args.folder / "runs"
    pool = ["--tasks", "mnist", "eurosat5", "fashion_mnist"]

    def train(folder: Path, tag: str) -> list[str]:
        return ["train", "--artifacts", str(args.artifacts), "--target", str(folder), *pool, "--epochs", "1",
                "--max-train", "2000", "--eval-samples", "2", "--out", str(work / tag), "--overwrite", "--quiet",
                "--device", "cpu"]

    def bench(tag: str) -> list[str]:
        return ["benchmark", "--artifacts", str(args.artifacts), "--out", str(work / tag), "--overwrite",
                "--protocols", "target", "--targets", str(big), "--pool", "mnist", "eurosat5", "fashion_mnist",
                "--methods", "zero_shot", "task_arithmetic", "atlas", "--seeds", "1", "--max-train", "2000",
                "--quiet", "--device", "cpu"]

    stream_224 = (f"from pyro_tvc.data.custom import load_custom; from pyro_tvc.data.streaming import LazyImages;"
                  f"task = load_custom({str(big)!r}, {SIDE}); n = 0\n"
                  f"for split in (task.train, task.val, task.test):\n"
                  f"    for x in LazyImages(split).batches(256): n += len(x)\n"
                  f"assert n == {args.images}, n")
    streamed = {"PYRO_TVC_IMAGE_MEMORY_MB": "0"}
    rows = {"footprint": measure(cli(train(small, "footprint")))}
    rows["train_20k_default_budget"] = measure(cli(train(big, "train-default")))
    rows["train_20k_streamed"] = measure(cli(train(big, "train-streamed")), streamed)
    rows["benchmark_20k_streamed"] = measure(cli(bench("bench-streamed")), streamed)
    rows["stream_224_all_20k"] = measure(stream_224)
    base = rows["footprint"]["peak_rss_mib"]
    for r in rows.values():
        r["above_footprint_mib"] = round(r["peak_rss_mib"] - base, 1)
    record = {
        "what": __doc__.split("\n")[0],
        "images": args.images, "side_px": SIDE, "format": "JPEG q90, RGB",
        "in_memory_float32_gib": {"at_224": round(args.images * 3 * SIDE * SIDE * 4 / 2**30, 2),
                                  "at_32 (tiny model input)": round(args.images * 3 * 32 * 32 * 4 / 2**30, 3)},
        "limit_above_footprint_mib": 2048,
        "rows": rows,
        "max_above_footprint_mib": max(r["above_footprint_mib"] for r in rows.values()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
