"""Variance and bias of ELBO-gradient estimators w.r.t. the guide's parameters, gated vs ungated.

    python benchmarks/gradient_variance.py --out benchmarks/results/gradient_variance.json
    python benchmarks/gradient_variance.py --guide conditional_gated --rank 16 --out OUT.json
    python benchmarks/gradient_variance.py --guide conditional_gated --set gate.inclusion_min=0.7 \
        --gate-sweep 0.9:0.25 0.7:0.25 0.5:0.25 --out OUT.json     # train with another gate; measure several

A gated guide (``--guide``: any registered variant whose guide has a gate, e.g. ``gated``, ``hierarchical_gated``,
``conditional_gated``; trained at the variant's default KL weight unless ``--kl-weight`` is given) is first trained
briefly on the target (so that the gate has something to select), then on one fixed batch each estimator's
surrogate gradient w.r.t. every trained parameter is drawn ``--repeats`` times:

* ``ungated_st``: straight-through spike-and-slab draws, analytic KL (``TraceMeanField_ELBO``): the training default;
* ``gated_st``: the same with gated draws (reliable -> mean, pruned -> 0);
* ``score_function``: gate not reparameterised, ``Trace_ELBO`` (MC KL): unbiased, the reference for the mean.

Reported per estimator: total variance ``E||g - mean(g)||^2`` (per repeat), and the mean gradient's cosine with,
and relative distance to, the score-function mean; the gate's fractions pruned / reliable / sampled (reliable also
among the unpruned), and the test accuracy of the trained guide. ``--gate-sweep INCLUSION_MIN:CV_MAX ...`` measures
the gated estimator of the same trained guide again with each pair of thresholds. Ratios gated/ungated and the
cosine between the gated and ungated mean gradients are the headline numbers (the acceptance of issue 11:
variance <= 0.5x, cosine >= 0.95).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

sys.path.insert(0, str(Path(__file__).parent))
from common import artefact_args  # noqa: E402

from pyro_tvc.infer import TrainConfig, build_problem, evaluate, fit, ungated  # noqa: E402
from pyro_tvc.runtime import seed_everything, write_json  # noqa: E402
from variants import apply_set, parse_set  # noqa: E402

from pyro_tvc.guides.gated import gate_statistics  # noqa: E402


def gradients(problem, elbo, x, f, y, idx, repeats: int) -> torch.Tensor:
    params = [p for p in problem.guide.parameters()]
    grads = []
    for _ in range(repeats):
        loss = elbo.differentiable_loss(problem.model, problem.guide, x, f, y, **problem.kwargs("train", idx))
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten() for gi, p in zip(g, params)]))
    return torch.stack(grads)


def summary(g: torch.Tensor, reference_mean: torch.Tensor) -> dict:
    mean = g.mean(0)
    return {"total_variance": (g - mean).pow(2).sum(1).mean().item(), "mean_norm": mean.norm().item(),
            "cosine_to_reference": torch.nn.functional.cosine_similarity(mean, reference_mean, dim=0).item(),
            "relative_distance_to_reference": ((mean - reference_mean).norm() / reference_mean.norm()).item()}


def threshold_pair(text: str) -> tuple[float, float]:
    """``"0.7:0.25"`` -> ``(inclusion_min, cv_max)``; inclusion_min in (0, 1), cv_max > 0."""
    try:
        inclusion_min, cv_max = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected INCLUSION_MIN:CV_MAX, e.g. 0.7:0.25") from None
    if not (0 < inclusion_min < 1 and cv_max > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected inclusion_min in (0, 1) and cv_max > 0")
    return inclusion_min, cv_max


def sweep_point(problem, elbo, x, f, y, idx, repeats: int, inclusion_min: float, cv_max: float,
                ungated_g: torch.Tensor) -> dict:
    """The gated straight-through estimator of the trained guide with other reliability thresholds (the gate is an
    estimator option: the parameters stay those trained with the run's own thresholds)."""
    gate, guide = problem.guide.gate, problem.guide
    trained = (gate.inclusion_min, gate.cv_max, guide.estimator)
    gate.inclusion_min, gate.cv_max, guide.estimator = inclusion_min, cv_max, "straight_through"
    try:
        g = gradients(problem, elbo, x, f, y, idx, repeats)
        stats = gate_statistics(guide, f)
    finally:
        gate.inclusion_min, gate.cv_max, guide.estimator = trained
    gated, ungated = summary(g, ungated_g.mean(0)), summary(ungated_g, ungated_g.mean(0))
    return {"inclusion_min": inclusion_min, "cv_max": cv_max,
            "variance_ratio_gated_to_ungated": gated["total_variance"] / ungated["total_variance"],
            "cosine_gated_to_ungated_mean": gated["cosine_to_reference"],
            "gate_reliable_among_included": stats["gate_reliable_among_included"],
            "gate_fraction_sampled": stats["gate_fraction_sampled"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    artefact_args(parser)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--kl-weight", type=float, default=None, help="default: the variant's own")
    parser.add_argument("--guide", default="gated", help="a registered variant with a gate")
    parser.add_argument("--rank", type=int, default=0, help="rank of the composition (0: full)")
    parser.add_argument("--max-train", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="training-config fields")
    parser.add_argument("--gate-sweep", nargs="*", default=[], metavar="INCLUSION_MIN:CV_MAX", type=threshold_pair,
                        help="after training, measure the gated estimator again with each of these thresholds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gradient_variance.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    cfg = TrainConfig(artifacts=args.artifacts, target=args.target, out=Path("runs/_gradient_variance"),
                      guide=args.guide, epochs=args.train_epochs, max_train=args.max_train, lr=args.lr,
                      kl_weight=args.kl_weight, rank=args.rank or None, eval_samples=2, quiet=True, device="cpu")
    apply_set(cfg, parse_set(args.set))
    problem = build_problem(cfg)
    if getattr(problem.guide, "gate", None) is None:
        raise ValueError(f"--guide {args.guide!r} has no gate; choose a gated variant")
    problem.model = getattr(problem.guide, "model", problem.model)  # v2 guides bring their model
    fit(problem)
    x, f, y = (t[:args.batch_size] for t in problem.splits["train"])
    idx = torch.arange(len(y))
    mean_field = TraceMeanField_ELBO(max_plate_nesting=1)
    with ungated(problem.guide):
        ungated_g = gradients(problem, mean_field, x, f, y, idx, args.repeats)
    gated_g = gradients(problem, mean_field, x, f, y, idx, args.repeats)
    problem.guide.estimator = "score_function"
    with ungated(problem.guide):
        sf_g = gradients(problem, Trace_ELBO(max_plate_nesting=1), x, f, y, idx, args.repeats * 5)
    reference = sf_g.mean(0)
    result = {
        "guide": args.guide, "target": args.target, "batch": len(y), "repeats": args.repeats,
        "kl_weight": cfg.kl_weight, "train_epochs": args.train_epochs, "max_train": args.max_train,
        "rank": args.rank or None, "set": args.set, **gate_statistics(problem.guide, f),
        "test": evaluate(problem, "test"),  # what the thresholds cost in accuracy (one seed)
        "ungated_st": summary(ungated_g, reference), "gated_st": summary(gated_g, reference),
        "score_function": summary(sf_g, reference),
    }
    result["cosine_gated_to_ungated_mean"] = torch.nn.functional.cosine_similarity(
        gated_g.mean(0), ungated_g.mean(0), dim=0).item()
    result["reference_mean_standard_error_norm"] = (sf_g.std(0) / len(sf_g) ** 0.5).norm().item()
    result["variance_ratio_gated_to_ungated"] = result["gated_st"]["total_variance"] / result["ungated_st"]["total_variance"]
    result["variance_ratio_score_function_to_ungated"] = (result["score_function"]["total_variance"]
                                                          / result["ungated_st"]["total_variance"])
    result["gate_sweep"] = [sweep_point(problem, mean_field, x, f, y, idx, args.repeats, *pair, ungated_g)
                            for pair in args.gate_sweep]
    write_json(args.out, result)  # atomic, creates the folder
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
