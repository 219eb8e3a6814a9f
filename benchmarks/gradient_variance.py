"""Variance and bias of ELBO-gradient estimators w.r.t. the guide's parameters, gated vs ungated.

    python benchmarks/gradient_variance.py --out benchmarks/results/gradient_variance.json

A gated guide is first trained briefly on the target (so that the gate has something to select), then on one fixed
batch each estimator's surrogate gradient is drawn ``--repeats`` times:

* ``ungated_st``: straight-through spike-and-slab draws, analytic KL (``TraceMeanField_ELBO``): the training default;
* ``gated_st``: the same with gated draws (reliable -> mean, pruned -> 0);
* ``score_function``: gate not reparameterised, ``Trace_ELBO`` (MC KL): unbiased, the reference for the mean.

Reported per estimator: total variance ``E||g - mean(g)||^2`` (per repeat), and the mean gradient's cosine with,
and relative distance to, the score-function mean. Ratios gated/ungated are the headline numbers.
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

from pyro_tvc.infer import TrainConfig, build_problem, fit, ungated  # noqa: E402
from pyro_tvc.runtime import write_json  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    artefact_args(parser)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gradient_variance.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(artifacts=args.artifacts, target=args.target, out=Path("runs/_gradient_variance"),
                      epochs=args.train_epochs, max_train=1024, lr=1e-2, kl_weight=args.kl_weight, eval_samples=2,
                      quiet=True, device="cpu")
    problem = build_problem(cfg)
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
    pruned, reliable = problem.guide.masks(f)
    result = {
        "target": args.target, "batch": len(y), "repeats": args.repeats, "kl_weight": args.kl_weight,
        "gate_fraction_pruned": pruned.float().mean().item(), "gate_fraction_reliable": reliable.float().mean().item(),
        "ungated_st": summary(ungated_g, reference), "gated_st": summary(gated_g, reference),
        "score_function": summary(sf_g, reference),
    }
    result["cosine_gated_to_ungated_mean"] = torch.nn.functional.cosine_similarity(
        gated_g.mean(0), ungated_g.mean(0), dim=0).item()
    result["reference_mean_standard_error_norm"] = (sf_g.std(0) / len(sf_g) ** 0.5).norm().item()
    result["variance_ratio_gated_to_ungated"] = result["gated_st"]["total_variance"] / result["ungated_st"]["total_variance"]
    result["variance_ratio_score_function_to_ungated"] = (result["score_function"]["total_variance"]
                                                          / result["ungated_st"]["total_variance"])
    write_json(args.out, result)  # atomic, creates the folder
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
