"""The one interface every method implements, and the pieces task-level methods share.

A protocol (``pyro_tvc.protocols``) builds a :class:`MethodContext` (theta_0's image encoder, the pool of task
vectors to compose, the heads, labelled learning and selection splits, unlabeled test inputs) and calls a method's
``fit(ctx) -> FitResult``. The result's :class:`Predictor` maps a :class:`TaskData` batch to class probabilities
``[N, C_max]`` (each input scored by its own task's head) and reports what it learned.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pyro_tvc.compose.engine import Composer
from pyro_tvc.heads import MultiHead
from pyro_tvc.task_vectors import TaskVectorBank


@dataclass
class TaskData:
    """One split of a (possibly mixed-task) problem: ``images [N, 3, H, W]``, ``features [N, D]`` (theta_0's image
    features, the amortized guides' input), ``labels [N]`` and ``task_ids [N]`` (index into the heads' names)."""

    images: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, idx: torch.Tensor) -> "TaskData":
        return TaskData(self.images[idx], self.features[idx], self.labels[idx], self.task_ids[idx])

    def of_task(self, task_id: int) -> "TaskData":
        return self.subset(torch.nonzero(self.task_ids == task_id).squeeze(-1))

    @staticmethod
    def concat(parts: list["TaskData"]) -> "TaskData":
        return TaskData(*(torch.cat([getattr(p, k) for p in parts]) for k in ("images", "features", "labels",
                                                                                 "task_ids")))


@dataclass
class MethodConfig:
    """Hyper-parameters shared by the learned methods (each method's paper default where one exists; docs/methods.md).

    Args:
        epochs: passes over the learning split for gradient-based methods (the epoch with the best validation
            accuracy is kept).
        batch_size: minibatch size.
        lr: learning rate of the per-sample (amortized) methods.
        atlas_lr: learning rate of aTLAS's task-level coefficients.
        adamerging_lr: AdaMerging's learning rate (paper: 1e-3).
        adamerging_steps: AdaMerging's steps (paper: 500).
        adamerging_init: AdaMerging's initial coefficient (paper: 0.3).
        ties_k: TIES trim: keep the top-k percent magnitudes of every task vector (paper: 20).
        rank: rank of the low-rank composition for the per-sample methods (None: full rank).
        eval_samples: posterior draws for Monte-Carlo predictions.
        max_train: cap on learning inputs per task (None: all).
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-2
    atlas_lr: float = 5e-2
    adamerging_lr: float = 1e-3
    adamerging_steps: int = 500
    adamerging_init: float = 0.3
    ties_k: float = 20.0
    rank: int | None = 16
    eval_samples: int = 16
    max_train: int | None = None


@dataclass
class MethodContext:
    """What a method may use. ``learn``: labelled inputs to learn from; ``select``: labelled inputs for model
    selection (val); ``unlabeled``: test inputs without their labels (AdaMerging's test-time adaptation);
    ``own_bank``: each head-task's own vector where one exists (the fine-tuned upper bound);
    ``objective``: ``"fit"`` or ``"negate"`` (lower accuracy on ``negate_task_id``'s inputs, keep the others)."""

    encoder: nn.Module
    bank: TaskVectorBank
    heads: MultiHead
    learn: TaskData
    select: TaskData
    unlabeled: TaskData
    cfg: MethodConfig
    seed: int
    own_bank: TaskVectorBank | None = None
    objective: str = "fit"
    negate_task_id: int | None = None
    control_min_accuracy: float | None = None  # negation: control accuracy floor (% ; 95 % of zero-shot)
    quiet: bool = True

    @property
    def device(self) -> torch.device:
        return self.learn.labels.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype


@dataclass
class FitResult:
    """``predictors``: prediction kind (``single`` model per input or task, ``mc`` posterior-predictive average)
    -> predictor, the first being the method's main one; ``learned``: JSON-able summary of what was learned
    (chosen scale, coefficient statistics, selection curve); ``train_seconds``: wall time of ``fit``."""

    predictors: dict
    learned: dict = field(default_factory=dict)
    train_seconds: float = 0.0


class Predictor:
    """Maps inputs to class probabilities ``[N, C_max]`` (each input scored by its own task's head)."""

    def probs(self, data: TaskData) -> torch.Tensor:
        raise NotImplementedError

    def exact_zero_fraction(self, data: TaskData) -> float | None:
        """Fraction of composition coefficients exactly 0 in the deployed model(s); None without coefficients."""
        return None


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


class ComposedPredictor(Predictor):
    """A task-level composition: one ``theta = theta_0 + sum_tb coef[t, b] tau[t, b]`` for every input
    (``coef [T, B]``), merged once, then a plain forward."""

    def __init__(self, composer: Composer, heads: MultiHead, coefficients: torch.Tensor, report_zeros: bool = True):
        self.composer, self.heads, self.coefficients = composer, heads, coefficients.detach()
        self.report_zeros = report_zeros

    def exact_zero_fraction(self, data: TaskData) -> float | None:
        return (self.coefficients == 0).float().mean().item() if self.report_zeros else None

    @torch.no_grad()
    def probs(self, data: TaskData) -> torch.Tensor:
        params = self.composer.merged_parameters(self.coefficients)
        out = []
        for sl in _chunks(len(data), 512):
            feats = torch.func.functional_call(self.composer.module, params, (data.images[sl],))
            with self.heads.using(data.task_ids[sl]):
                out.append(self.heads(feats).softmax(-1))
        return torch.cat(out)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent; NaN for no inputs or when the predictor has no answer (NaN probabilities)."""
    if not len(labels) or torch.isnan(probs).any():
        return float("nan")
    return 100.0 * (probs.argmax(-1) == labels).float().mean().item()


def per_task_accuracy(probs: torch.Tensor, data: TaskData, num_tasks: int) -> list[float]:
    return [accuracy(probs[data.task_ids == t], data.labels[data.task_ids == t]) for t in range(num_tasks)]


def mean_task_accuracy(probs: torch.Tensor, data: TaskData, num_tasks: int) -> float:
    """Mean over the tasks present in ``data`` of their accuracy (task addition weighs tasks equally)."""
    accs = [a for a in per_task_accuracy(probs, data, num_tasks) if a == a]
    return sum(accs) / len(accs)


def selection_score(ctx: MethodContext, probs: torch.Tensor, data: TaskData) -> float | None:
    """Higher is better. ``fit``: mean per-task accuracy. ``negate``: minus the negated task's accuracy, or None
    when a control task falls below its floor (aTLAS's rule: lowest target accuracy with the control kept at
    >= 95 % of its zero-shot accuracy)."""
    accs = per_task_accuracy(probs, data, len(ctx.heads.names))
    if ctx.objective == "fit":
        return mean_task_accuracy(probs, data, len(ctx.heads.names))
    control = [a for t, a in enumerate(accs) if t != ctx.negate_task_id and a == a]
    if ctx.control_min_accuracy is not None and min(control) < ctx.control_min_accuracy:
        return None
    return -accs[ctx.negate_task_id]


def select_on_grid(ctx: MethodContext, candidates: list, make_predictor: Callable) -> tuple[object, Predictor, list]:
    """Evaluate ``make_predictor(c)`` on the selection split for every candidate; return the best candidate, its
    predictor and the curve ``[(candidate, score)]``. The first candidate must be admissible (e.g. scale 0)."""
    best, curve = None, []
    for c in candidates:
        pred = make_predictor(c)
        score = selection_score(ctx, pred.probs(ctx.select), ctx.select)
        curve.append((c, score))
        if score is not None and (best is None or score > best[2]):
            best = (c, pred, score)
    if best is None:
        raise ValueError("no candidate satisfied the selection rule (the first candidate should be scale 0)")
    return best[0], best[1], curve


def objective_loss(ctx: MethodContext, logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor):
    """Cross-entropy for ``fit``; for ``negate``, ``-CE`` on the negated task's inputs plus ``CE`` on the others
    (aTLAS's negation loss)."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    if ctx.objective == "fit":
        return ce.mean()
    sign = torch.where(task_ids == ctx.negate_task_id, -1.0, 1.0)
    return (sign * ce).mean()


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
