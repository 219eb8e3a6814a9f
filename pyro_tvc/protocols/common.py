"""Evaluation shared by the protocols: every prediction of a fitted method on the test inputs, as tidy records."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from pyro_tvc.diagnostics.summaries import auroc, expected_calibration_error, predictive_entropy
from pyro_tvc.evaluation import nll
from pyro_tvc.methods.base import FitResult, TaskData, per_task_accuracy
from pyro_tvc.text.metrics import score as paper_score

# what a method learned that the tables report (FitResult.learned keys; docs/glossary.md)
LEARNED_METRICS = ("true_elbo_per_datum", "gate_fraction_pruned", "gate_fraction_reliable", "gate_fraction_sampled",
                   "gate_fraction_included",
                   "gate_reliable_among_included", "kl_q_p_per_input", "selected_epoch")


@dataclass(frozen=True)
class Reads:
    """What one cell of a protocol reads besides theta_0: the task vectors, the heads and the tasks' data (and, for
    task addition, the prepared fine-tuned accuracies). The benchmark's cache key covers exactly these."""

    vectors: list[str]
    heads: list[str]
    data: list[str]
    finetuned: list[str] = field(default_factory=list)


def record(protocol, method, prediction, task, seed, metric, value) -> dict:
    return {"protocol": protocol, "method": method, "prediction": prediction, "task": task, "seed": seed,
            "metric": metric, "value": None if value is None else float(value)}


def evaluate_fit(protocol: str, method: str, seed: int, result: FitResult, test: TaskData,
                 task_names: list[str], tasks_to_report: list[str] | None = None,
                 paper_metrics: Mapping[str, str] | None = None) -> list[dict]:
    """Accuracy (%), NLL (nats), ECE (%), AUROC of the entropy for errors and the paper metric named in
    ``paper_metrics`` (task -> ``mcc``/``f1``; the workspace's) per task, exact-zero fraction and inference time per
    test input (ms) of every prediction of ``result``; plus, for the main prediction, the fit's train time (s, task
    ``ALL``) and the scalars of :data:`LEARNED_METRICS` that the method reports (under the target's name when the
    fit has one reported task, else ``ALL``)."""
    main = next(iter(result.predictors))
    rows = [record(protocol, method, main, "ALL", seed, "train_seconds", result.train_seconds)]
    report = tasks_to_report or task_names
    learned_on = report[0] if len(report) == 1 else "ALL"  # the one target a fit learned on, when there is one
    rows += [record(protocol, method, main, learned_on, seed, k, result.learned[k]) for k in LEARNED_METRICS
             if isinstance(result.learned.get(k), (int, float))]
    for kind, predictor in result.predictors.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            probs = predictor.probs(test)
        ms = 1000.0 * (time.perf_counter() - t0) / max(1, len(test))
        accs = per_task_accuracy(probs, test, len(task_names))
        for t, name in enumerate(task_names):
            if name in report:
                rows.append(record(protocol, method, kind, name, seed, "accuracy", accs[t]))
                mine = test.task_ids == t
                if mine.any() and not torch.isnan(probs[mine]).any():
                    rows.append(record(protocol, method, kind, name, seed, "nll", nll(probs[mine], test.labels[mine])))
                    p, y = probs[mine].cpu().numpy(), test.labels[mine].cpu().numpy()
                    rows.append(record(protocol, method, kind, name, seed, "ece",
                                       100.0 * expected_calibration_error(p, y)))
                    # does the predictive entropy flag the errors? (nan when every input is right or wrong)
                    score = auroc(predictive_entropy(p), p.argmax(-1) != y)
                    if not math.isnan(score):
                        rows.append(record(protocol, method, kind, name, seed, "auroc_entropy_error", score))
                    if name in (paper_metrics or {}):  # MCC for CoLA, F1 for MRPC (GLUE's metrics)
                        rows.append(record(protocol, method, kind, name, seed,
                                           *paper_score(paper_metrics[name], p.argmax(-1), y)))
        rows.append(record(protocol, method, kind, "ALL", seed, "inference_ms_per_input", ms))
        zeros = predictor.exact_zero_fraction(test)
        if zeros is not None:
            rows.append(record(protocol, method, kind, "ALL", seed, "exact_zero_fraction", zeros))
    return rows

