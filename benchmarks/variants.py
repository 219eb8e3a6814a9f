"""Every guide variant on one target: accuracy, sparsity and the true ELBO (KL weight 1, ungated posterior).

    python benchmarks/variants.py --out benchmarks/results/variants.json

Same data, task vectors, epochs and KL weight for all; composition through rank-16 factors by default (--rank 0:
full rank) to keep the whole comparison to a few minutes on 2 cores. The ELBO of each variant is that of its own
model (Gaussian prior for ``gaussian``, one shared lambda for ``task_level``); the point guide has no ELBO (a point
mass has no density against the slab), so its value is reported as null.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pyro_tvc.infer import GUIDES, TrainConfig, train
from pyro_tvc.runtime import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/pyro-tvc-tiny"))
    parser.add_argument("--target", default="mnist")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/variants.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = []
    for guide in GUIDES:
        cfg = TrainConfig(artifacts=args.artifacts, target=args.target, out=Path("runs") / f"variants-{guide}",
                          guide=guide, epochs=args.epochs, rank=args.rank or None, eval_samples=8, quiet=True)
        r = train(cfg)
        rec = {k: r.get(k) for k in ("guide", "zero_shot_accuracy", "mc_accuracy", "gated_accuracy", "sparsity",
                                     "true_elbo_per_datum", "train_seconds")}
        if guide == "point":
            rec["true_elbo_per_datum"] = None
        rec["rank"] = args.rank or None
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr)
    write_json(args.out, records)  # atomic, creates the folder


if __name__ == "__main__":
    main()
