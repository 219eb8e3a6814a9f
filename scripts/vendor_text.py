"""Vendor the real text-classification sets of ``../shared/data-text`` into ``pyro_tvc/data/text_embedded/``.

Run once by a maintainer (``python scripts/vendor_text.py --source ../shared/data-text``); the output is committed,
so a fresh clone never needs ``../shared``. Each source file is checked against the sha256 its ``meta.json``
publishes, then stored byte for byte, gzip-compressed without a timestamp (reproducible bytes):
``<task>/{train,test}.jsonl.gz`` and ``<task>/classes.txt``. ``MANIFEST.json`` keeps, per task, the upstream
sha256 of every file (what the loader and the tests check the decompressed bytes against), the counts, whether the
task is a sentence pair, the sources and the licence line of the data set's README.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "pyro_tvc" / "data" / "text_embedded"


def _licences(readme: str) -> dict[str, str]:
    """The licence column of the README's "Sources, splits, licences" table, per task."""
    out = {}
    for line in readme.splitlines():
        m = re.match(r"^\| `(\w+)` \| github\.com/.*\| (.*) \|$", line)
        if m:
            out[m.group(1)] = m.group(2).split(" | ")[-1].strip()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data-text")
    args = parser.parse_args()
    meta = json.loads((args.source / "meta.json").read_text())
    licences = _licences((args.source / "README.md").read_text())
    manifest = {"source": "shared/data-text (see its README.md for every source repository, commit and blob)",
                "tasks": {}}
    for task, m in meta.items():
        folder = OUT / task
        folder.mkdir(parents=True, exist_ok=True)
        for name, expected in m["files"].items():
            data = (args.source / task / name).read_bytes()
            got = hashlib.sha256(data).hexdigest()
            if got != expected["sha256"]:
                raise SystemExit(f"{task}/{name}: sha256 {got} differs from meta.json's {expected['sha256']}")
            if name.endswith(".jsonl"):
                with open(folder / f"{name}.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                                           filename="") as gz:
                    gz.write(data)
            else:
                (folder / name).write_bytes(data)
        manifest["tasks"][task] = {
            "classes": m["classes"], "pair": m["pair"], "n_train": m["n_train"], "n_test": m["n_test"],
            "train_label_counts": m["train_label_counts"], "test_label_counts": m["test_label_counts"],
            "sha256": {k: v["sha256"] for k, v in m["files"].items()},
            "sources": [f"github.com/{s['repo']}/blob/{s['commit']}/{s['path']}" for s in m["sources"]],
            "split": m["split"], "licence": licences.get(task, "see shared/data-text/README.md"),
        }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(meta)} tasks to {OUT}")


if __name__ == "__main__":
    main()
