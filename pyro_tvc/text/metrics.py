"""The paper-style metric of each text task: accuracy, except Matthews correlation for CoLA and F1 of the positive
class for MRPC (GLUE's conventions; Wang et al., ICLR 2019)."""
from __future__ import annotations

import math

import numpy as np

# task -> (record name, column label); other tasks report accuracy
PAPER_METRICS = {"cola": ("mcc", "MCC"), "mrpc": ("f1", "F1")}


def matthews_corrcoef(pred, labels) -> float:
    """Binary MCC ``(tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))`` in [-1, 1]; 0 when a margin is empty."""
    pred, labels = np.asarray(pred) == 1, np.asarray(labels) == 1
    tp, tn = float(np.sum(pred & labels)), float(np.sum(~pred & ~labels))
    fp, fn = float(np.sum(pred & ~labels)), float(np.sum(~pred & labels))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def f1_positive(pred, labels, positive: int = 1) -> float:
    """F1 of class ``positive``: ``2 tp / (2 tp + fp + fn)`` in [0, 1]; 0 when it is never predicted nor present."""
    pred, labels = np.asarray(pred) == positive, np.asarray(labels) == positive
    tp = float(np.sum(pred & labels))
    denom = 2 * tp + float(np.sum(pred & ~labels)) + float(np.sum(~pred & labels))
    return 0.0 if denom == 0 else 2 * tp / denom


def paper_metric(task: str, pred, labels) -> tuple[str, float] | None:
    """``(name, value in %)`` of the text task's paper metric when it is not accuracy, else None. Keyed on the
    shipped text tasks' names, which a text task given by path cannot take (prepare refuses the clash); image tasks
    never call it (an image folder may be called cola)."""
    if task not in PAPER_METRICS:
        return None
    return score(PAPER_METRICS[task][0], pred, labels)


def score(name: str, pred, labels) -> tuple[str, float]:
    """``(name, value in %)`` of metric ``name`` (``mcc`` or ``f1``) of predictions ``pred`` against ``labels``.

    Raises:
        ValueError: another name.
    """
    if name not in ("mcc", "f1"):
        raise ValueError(f"unknown paper metric {name!r}; expected mcc or f1")
    value = matthews_corrcoef(pred, labels) if name == "mcc" else f1_positive(pred, labels)
    return name, 100.0 * value
