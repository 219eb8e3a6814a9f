"""Low-rank task vectors: approximation error and accuracy vs rank r.

    python benchmarks/lowrank_accuracy.py --out benchmarks/results/lowrank_accuracy.json

For every prepared task t and rank r, every matrix block of tau_t is replaced by its rank-r truncated SVD (vectors
kept dense) and the fine-tuned model theta_0 + tau_t^(r) is evaluated on t's test split: how much of the
fine-tuning gain survives at rank r. The relative Frobenius error is over the matrix blocks of all tasks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pyro_tvc.artifacts import ArtifactPaths, load_bank, load_clip, load_head, prepared_tasks
from pyro_tvc.backbones import image_encoder
from pyro_tvc.compose.components import ComponentLayout, lowrank_error
from pyro_tvc.data import load_embedded
from pyro_tvc.evaluation import accuracy
from pyro_tvc.runtime import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/pyro-tvc-tiny"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lowrank_accuracy.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = ArtifactPaths(args.artifacts)
    model, _ = load_clip(paths.clip)
    encoder = image_encoder(model)
    theta0 = {k: v.clone() for k, v in encoder.state_dict().items()}
    tasks = prepared_tasks(paths)
    bank = load_bank(paths, tasks)
    records = []
    for rank in [*args.ranks, None]:
        layout = ComponentLayout.from_bank(bank, rank=rank)
        accs = {}
        for t, task in enumerate(tasks):
            head, _ = load_head(paths.head(task))
            state = dict(theta0)
            for name, comp in layout.params.items():
                state[name] = theta0[name] + comp.dense[t]
            encoder.load_state_dict(state)
            accs[task] = accuracy(encoder, head, load_embedded(task).test)
        encoder.load_state_dict(theta0)
        rec = {"rank": rank, "relative_error": 0.0 if rank is None else lowrank_error(bank, rank),
               "accuracy": accs, "mean_accuracy": sum(accs.values()) / len(accs)}
        records.append(rec)
        print(f"rank {rank!s:>4}: error {rec['relative_error']:.3f}, mean fine-tuned accuracy {rec['mean_accuracy']:.2f}",
              file=sys.stderr)
    write_json(args.out, records)  # atomic, creates the folder


if __name__ == "__main__":
    main()
