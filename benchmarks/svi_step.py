"""One VTVC SVI step vs one task-level (aTLAS-style) step on the same batch, measured in one run.

    python benchmarks/svi_step.py --out benchmarks/results/svi_step.json

Task-level step: coefficients ``[T, B]`` shared by the batch, cross-entropy through the merged network, Adam.
SVI step: amortized gated spike-and-slab guide, per-sample coefficients ``[N, T, B]``, one particle,
``TraceMeanField_ELBO``, ClippedAdam. Both use the same composition engine, batch and device. Median of repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO

sys.path.insert(0, str(Path(__file__).parent))
from common import artefact_args  # noqa: E402

from pyro_tvc.infer import TrainConfig, build_problem  # noqa: E402
from pyro_tvc.runtime import write_json  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    artefact_args(parser)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/svi_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = []
    for rank in (None, 16, 4):
        pyro.clear_param_store()
        cfg = TrainConfig(artifacts=args.artifacts, target=args.target, out=Path("/tmp/unused"), rank=rank,
                          max_train=args.batch_size * 2, quiet=True, device="cpu")
        problem = build_problem(cfg)
        x, f, y = (t[:args.batch_size] for t in problem.splits["train"])
        idx = torch.arange(len(y))
        svi = SVI(problem.model, problem.guide, pyro.optim.ClippedAdam({"lr": 1e-3}),
                  TraceMeanField_ELBO(max_plate_nesting=1))
        svi_ms = median_ms(lambda: svi.step(x, f, y, **problem.kwargs("train", idx)), args.repeats)
        T, B = problem.composer.coefficient_shape
        lam = torch.zeros(T, B, requires_grad=True)
        opt = torch.optim.Adam([lam], lr=1e-3)

        def task_level_step():
            loss = F.cross_entropy(problem.likelihood.logits(x, lam), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        task_ms = median_ms(task_level_step, args.repeats)
        rec = {"rank": rank, "batch": len(y), "n_tasks": T, "n_blocks": B, "svi_step_ms": svi_ms,
               "task_level_step_ms": task_ms, "ratio": svi_ms / task_ms, "threads": torch.get_num_threads()}
        records.append(rec)
        print(json.dumps(rec), file=sys.stderr)
    write_json(args.out, records)  # atomic, creates the folder


if __name__ == "__main__":
    main()
