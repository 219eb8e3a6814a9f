"""Every registered inference variant on one or more targets and seeds: accuracy, NLL, calibration, sparsity, the
true ELBO (KL weight 1, ungated posterior) and what the gate marks.

    python benchmarks/variants.py --out benchmarks/results/variants.json                 # every variant, mnist, seed 0
    python benchmarks/variants.py --guides conditional point --targets mnist dtd10 --seeds 0 1 2 --epochs 6

Each variant trains at its own default KL weight (1e-3 for the first generation, 1 = the true ELBO for the v2 models)
unless ``--kl-weight`` is given; composition through rank-16 factors by default (``--rank 0``: full rank). The ELBO
is that of each variant's own model; point-only variants (the meta-net) have none (null). ``--set NAME=VALUE`` sets
any training-config field, including the v2 hyper-parameters read by their guide builders (models/v2_registry.py).

Per run: MC and single-model accuracy and NLL, ECE and AUROC of the predictive entropy for errors (MC predictive),
sparsity of the single model, true ELBO per input, train seconds; for gated guides (any guide with ``masks``) the
fractions pruned / reliable / sampled / included, and reliable among the included; for the conditional model the mean
``KL(q(lambda|x,y) || p(lambda|x))`` per test input (how much the label moves the posterior); for the hierarchical
model the learned deviation scale.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

from pyro_tvc.diagnostics.summaries import auroc, expected_calibration_error
from pyro_tvc.guides.gated import gate_statistics
from pyro_tvc.infer import (TrainConfig, build_problem, evaluate, fit, predictive_probs, true_elbo_per_datum)
from pyro_tvc.models import DEVIATION_SCALE_PARAM
from pyro_tvc.runtime import seed_everything, write_json
from pyro_tvc.variants import get_variant, variant_names


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def apply_set(cfg, extra: dict) -> None:
    """Set training-config fields from ``--set``; ``gate.inclusion_min=0.7`` sets a field of a nested config.

    Raises:
        ValueError: an unknown field.
    """
    def has_field(obj, part: str) -> bool:
        return dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}

    for name, value in extra.items():
        *outer, last = name.split(".")
        target = cfg
        for part in outer:
            target = getattr(target, part) if has_field(target, part) else None
        if not has_field(target, last):
            raise ValueError(f"--set {name}: no such training-config field")
        if dataclasses.is_dataclass(getattr(target, last)):
            raise ValueError(f"--set {name}: a group of options; set its fields ({name}.FIELD=VALUE)")
        setattr(target, last, value)


def run_one(args, guide_name: str, target: str, seed: int, extra: dict) -> dict:
    seed_everything(seed)
    pyro.clear_param_store()
    cfg = TrainConfig(artifacts=args.artifacts, target=target, out=Path("runs") / f"variants-{guide_name}",
                      guide=guide_name, tasks=args.tasks, epochs=args.epochs, lr=args.lr, rank=args.rank or None,
                      kl_weight=args.kl_weight, eval_samples=args.eval_samples, max_train=args.max_train, seed=seed,
                      quiet=True, device="cpu")
    apply_set(cfg, extra)
    problem = build_problem(cfg)
    # v2 guides bring their model (the conditional prior network is shared by model and guide): guides/conditional.py
    problem.model = getattr(problem.guide, "model", problem.model)
    t0 = time.perf_counter()
    _, epochs = fit(problem)
    seconds = time.perf_counter() - t0
    variant = get_variant(guide_name)
    rec = {"guide": guide_name, "target": target, "seed": seed, "kl_weight": cfg.kl_weight, "epochs": args.epochs,
           "lr": args.lr, "rank": args.rank or None, "set": extra, **evaluate(problem, "test"),
           "train_seconds": seconds, "val_curve": [next((v for k, v in e.items() if k.startswith("val_")), None) for e in epochs]}
    _, _, y = problem.splits["test"]
    probs = predictive_probs(problem, "test", cfg.eval_samples).mean(0).numpy()
    labels = y.numpy()
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(-1)
    rec["mc_ece"] = expected_calibration_error(probs, labels)
    rec["mc_auroc_entropy_for_errors"] = auroc(entropy, probs.argmax(-1) != labels)
    rec["true_elbo_per_datum"] = None if variant.point_only else true_elbo_per_datum(problem)
    f_test = problem.splits["test"][1]
    if hasattr(problem.guide, "masks"):
        rec.update(gate_statistics(problem.guide, f_test))
    if hasattr(problem.guide, "kl_per_input"):
        rec["kl_q_p_per_input"] = problem.guide.kl_per_input(f_test, y, problem.likelihood).mean().item()
    store = pyro.get_param_store()
    if DEVIATION_SCALE_PARAM in store:
        rec["deviation_scale_mean"] = store[DEVIATION_SCALE_PARAM].mean().item()
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/pyro-tvc-tiny"))
    parser.add_argument("--targets", nargs="+", default=["mnist"])
    parser.add_argument("--guides", nargs="+", default=None, help="registered variants (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task vectors (default: every prepared one but the target)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--kl-weight", type=float, default=None, help="default: each variant's own")
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--max-train", type=int, default=None, help="subsample the training split (smoke runs)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/variants.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = parse_set(args.set)
    records = []
    for target in args.targets:
        for seed in args.seeds:
            for guide in args.guides or variant_names():
                rec = run_one(args, guide, target, seed, extra)
                records.append(rec)
                print(json.dumps(rec), file=sys.stderr)
                write_json(args.out, records)  # atomic, after every run: an interrupted sweep keeps what it has


if __name__ == "__main__":
    main()
