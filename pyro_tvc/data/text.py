"""The real text-classification sets shipped with the package (issue 14's data; the text backbone comes later).

Eleven sets (``TEXT_TASKS``) in ``pyro_tvc/data/text_embedded/<task>/``: the upstream JSONL files byte for byte,
gzip-compressed, and ``classes.txt``; ``MANIFEST.json`` holds the upstream sha256 of each file, which the loader
checks after decompressing, the sources and the licences (built by ``scripts/vendor_text.py`` from
``shared/data-text``). Single-text tasks give one string per example; sentence-pair tasks (``mrpc``, ``rte``) give
``(text_a, text_b)`` pairs, to be encoded jointly by the model's own tokenizer. ``val`` is carved from train as for
the image sets (10 % of every class, seeded, stratified).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pyro_tvc.data import stratified_val_indices
from pyro_tvc.data.custom import is_task_path, task_name

TEXT_DIR = Path(__file__).parent / "text_embedded"
TEXT_TASKS = ("sst2", "ag_news", "trec", "sms_spam", "subj", "emotion", "cola", "mrpc", "rte", "cr", "mpqa")
PAIR_TASKS = ("mrpc", "rte")


class TextTaskError(ValueError):
    """An unknown text task, or a shipped file that is damaged or holds an empty text field."""


@dataclass
class TextSplit:
    """``texts[i]``: a string, or ``(text_a, text_b)`` for a pair task; ``labels [N]`` int64."""

    texts: list
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "TextSplit":
        idx = np.asarray(idx, dtype=np.int64)
        return TextSplit([self.texts[i] for i in idx], self.labels[idx])


@dataclass
class TextTask:
    name: str
    classes: list[str]
    pair: bool
    train: TextSplit
    val: TextSplit
    test: TextSplit

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@lru_cache(maxsize=1)
def text_manifest() -> dict:
    return json.loads((TEXT_DIR / "MANIFEST.json").read_text())


def is_text_task_path(spec: str) -> bool:
    """A text task given by path (a folder of ``train.jsonl``, ``test.jsonl``, ``classes.txt``), not by name: the
    image tasks' rule (:func:`pyro_tvc.data.custom.is_task_path`), or an existing folder."""
    return spec not in TEXT_TASKS and (is_task_path(spec) or Path(spec).expanduser().is_dir())


def text_task_name(spec: str) -> str:
    """The folder's name of a task by path, else ``spec``."""
    return task_name(spec) if is_text_task_path(spec) else spec


def _own_rows(folder: Path, split: str) -> list[dict]:
    """Rows of your own text task: ``SPLIT.jsonl`` or ``SPLIT.jsonl.gz`` (no checksum to check)."""
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        path = folder / name
        if path.is_file():
            try:
                data = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
                return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
            except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as err:
                raise TextTaskError(f"{path}: not readable JSON lines ({type(err).__name__}); expected one "
                                    f'{{"text": ..., "label": k}} object per line') from err
    raise TextTaskError(f"{folder}: no {split}.jsonl (or {split}.jsonl.gz); a text task folder holds train.jsonl, "
                        f"test.jsonl and classes.txt")


def _rows(task: str, split: str) -> list[dict]:
    if is_text_task_path(task):
        return _own_rows(Path(task).expanduser(), split)
    path = TEXT_DIR / task / f"{split}.jsonl.gz"
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise TextTaskError(f"{path}: not a readable gzip file ({type(err).__name__}); reinstall the package or "
                            f"re-run scripts/vendor_text.py") from err
    expected = text_manifest()["tasks"][task]["sha256"][f"{split}.jsonl"]
    if hashlib.sha256(data).hexdigest() != expected:
        raise TextTaskError(f"{path}: its content differs from the upstream sha256 {expected[:12]}...; reinstall "
                            f"the package or re-run scripts/vendor_text.py")
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _split(task: str, split: str, pair: bool | None, num_classes: int) -> TextSplit:
    rows = _rows(task, split)
    if pair is None:  # your own task: a pair task when its rows have text_a/text_b
        pair = bool(rows) and isinstance(rows[0], dict) and "text_a" in rows[0]
    fields = ("text_a", "text_b") if pair else ("text",)
    texts, labels = [], []
    where = f"{task.rstrip('/')}/{split}.jsonl"
    if not rows:
        raise TextTaskError(f"{where}: no examples")
    for line, row in enumerate(rows, start=1):
        values = [row.get(f) for f in fields] if isinstance(row, dict) else [None]
        if any(not isinstance(v, str) or not v.strip() for v in values):
            raise TextTaskError(f"{where}, line {line}: empty or missing {'/'.join(fields)}; every "
                                f"example needs text")
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
            raise TextTaskError(f"{where}, line {line}: label {label!r}; expected an integer in "
                                f"[0, {num_classes})")
        texts.append(tuple(values) if pair else values[0])
        labels.append(label)
    return TextSplit(texts, np.asarray(labels, dtype=np.int64))


def _capped(split: TextSplit, cap: int | None, seed: int) -> TextSplit:
    if cap is None or len(split) <= cap:
        return split
    return split.subset(np.sort(np.random.RandomState(seed).permutation(len(split))[:cap]))


def text_task_classes(spec: str) -> list[str]:
    """The class names of the text task folder ``spec`` (``classes.txt``, one per line, in label order).

    Raises:
        TextTaskError: no such folder, no classes.txt, or fewer than 2 classes.
    """
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise TextTaskError(f"{spec}: no such folder (a text task by path is a folder of train.jsonl, "
                            f"test.jsonl and classes.txt)")
    if not (folder / "classes.txt").is_file():
        raise TextTaskError(f"{folder}: no classes.txt (one class name per line, in label order)")
    classes = [c for c in (folder / "classes.txt").read_text(encoding="utf-8").splitlines() if c.strip()]
    if len(classes) < 2:
        raise TextTaskError(f"{folder}/classes.txt: {len(classes)} class(es); expected at least 2")
    return classes


def load_text_task(name: str, val_fraction: float = 0.1, seed: int = 0, max_train: int | None = None,
                   max_val: int | None = None, max_test: int | None = None) -> TextTask:
    """One shipped text task, or your own by folder path (``train.jsonl``, ``test.jsonl`` — or ``.jsonl.gz`` —
    with ``{"text": ..., "label": k}`` or ``{"text_a": ..., "text_b": ..., "label": k}`` per line, and
    ``classes.txt``; named after the folder), with train/val/test splits; ``max_train`` keeps a seeded subset of
    train, ``max_val`` of val; ``max_test`` a fixed subset of test (seed 0 whatever ``seed``: every run scores the
    same inputs).

    Raises:
        TextTaskError: an unknown name (the message lists the shipped ones), a missing or damaged file, an empty
            text field or a label outside the task's classes (naming the file and line).
    """
    if is_text_task_path(name):
        classes, pair = text_task_classes(name), None
    elif name not in TEXT_TASKS:
        raise TextTaskError(f"unknown text task {name!r}; shipped text tasks: {', '.join(TEXT_TASKS)} (or a folder "
                            f"of train.jsonl, test.jsonl, classes.txt)")
    else:
        classes = (TEXT_DIR / name / "classes.txt").read_text(encoding="utf-8").splitlines()
        pair = name in PAIR_TASKS
    train = _split(name, "train", pair, len(classes))
    if pair is None:  # your own task: as its training rows are (test must match)
        pair = isinstance(train.texts[0], tuple)
    train_idx, val_idx = stratified_val_indices(train.labels, val_fraction, seed)
    if max_train is not None and len(train_idx) > max_train:
        train_idx = np.sort(np.random.RandomState(seed).permutation(train_idx)[:max_train])
    return TextTask(text_task_name(name), classes, pair, train.subset(train_idx),
                    _capped(train.subset(val_idx), max_val, seed),
                    _capped(_split(name, "test", pair, len(classes)), max_test, 0))
