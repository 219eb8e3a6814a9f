"""Evaluation shared by the protocols: every prediction of a fitted method on the test inputs, as tidy records."""
from __future__ import annotations

import time

import torch

from pyro_tvc.methods.base import FitResult, TaskData, per_task_accuracy


def record(protocol, method, prediction, task, seed, metric, value) -> dict:
    return {"protocol": protocol, "method": method, "prediction": prediction, "task": task, "seed": seed,
            "metric": metric, "value": None if value is None else float(value)}


def evaluate_fit(protocol: str, method: str, seed: int, result: FitResult, test: TaskData,
                 task_names: list[str], tasks_to_report: list[str] | None = None) -> list[dict]:
    """Accuracy per task (%), exact-zero fraction and inference time per test input (ms) of every prediction of
    ``result``; plus the fit's train time (s) under task ``ALL``."""
    rows = [record(protocol, method, next(iter(result.predictors)), "ALL", seed, "train_seconds",
                   result.train_seconds)]
    report = tasks_to_report or task_names
    for kind, predictor in result.predictors.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            probs = predictor.probs(test)
        ms = 1000.0 * (time.perf_counter() - t0) / max(1, len(test))
        accs = per_task_accuracy(probs, test, len(task_names))
        for t, name in enumerate(task_names):
            if name in report:
                rows.append(record(protocol, method, kind, name, seed, "accuracy", accs[t]))
        rows.append(record(protocol, method, kind, "ALL", seed, "inference_ms_per_input", ms))
        zeros = predictor.exact_zero_fraction(test)
        if zeros is not None:
            rows.append(record(protocol, method, kind, "ALL", seed, "exact_zero_fraction", zeros))
    return rows
