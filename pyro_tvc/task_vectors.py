"""Task vectors: ``tau = theta_finetuned - theta_0``, one block per parameter tensor, names kept.

A :class:`TaskVector` is a small immutable algebra (``+``, ``-``, unary ``-``, scalar ``*``) over named tensors;
a :class:`TaskVectorBank` stacks T task vectors per block (``[T, *shape]``) for the composition engine.
Both save to safetensors with metadata (format, task, backbone, sha256 of theta_0) and refuse to mix vectors
whose keys, shapes, dtypes, backbones or theta_0 differ, and to load or stack vectors holding NaN/inf (naming the
task and the blocks). Reading users' checkpoints lives in :mod:`pyro_tvc.checkpoints`.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from safetensors import SafetensorError, safe_open

FORMAT = "pyro-tvc-task-vector/1"


class TaskVectorError(ValueError):
    """Task vectors (or checkpoints) that cannot be combined or loaded; the message says which key and why."""


class NonFiniteError(TaskVectorError):
    """Weights with NaN or infinite values; the message names the task and the blocks."""


_TASK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash over sorted names, dtypes, shapes and bytes (independent of dict order and device)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: logit_scale
    return h.hexdigest()


def check_compatible(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str = "state dicts") -> None:
    """Raise :class:`TaskVectorError` unless ``a`` and ``b`` have the same keys, shapes and dtypes."""
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing or extra:
        raise TaskVectorError(f"{what} have different keys: only in first {missing[:5]}, only in second {extra[:5]}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise TaskVectorError(f"{what}: shape mismatch at {k!r}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}")
        if a[k].dtype != b[k].dtype:
            raise TaskVectorError(f"{what}: dtype mismatch at {k!r}: {a[k].dtype} vs {b[k].dtype}")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write through :func:`pyro_tvc.runtime.atomic_output`: never half a file, mode from the umask.

    Raises:
        OutputError: the file cannot be written (a ``ValueError``; names the path and the reason).
    """
    from pyro_tvc.runtime import atomic_output

    with atomic_output(path) as tmp:
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as err:
            # safetensors reports I/O failures (a full disk) as its own error type: hand the reason to atomic_output
            raise OSError(str(err).split("I/O error: ")[-1]) from err


def nonfinite_blocks(params: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity, in ``params``' order."""
    return [k for k, v in params.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(params: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse NaN/inf weights: in a bank they poison every composed output, even with coefficient 0 (0 * NaN).

    Raises:
        NonFiniteError: naming ``what`` and the first blocks affected.
    """
    bad = nonfinite_blocks(params)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(f"{what} has NaN/inf values in {len(bad)} block(s): {', '.join(bad[:5])}{more}")


def check_task_name(task: str) -> str:
    """A task name is also a file name: letters, digits, ``_``, ``-``, ``.``; not starting with ``.``.

    Raises:
        TaskVectorError: naming the bad name and the rule.
    """
    if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
        raise TaskVectorError(f"task name {task!r}: use letters, digits, '_', '-' or '.', not starting with '.' "
                              f"(at most 100 characters)")
    return task


@dataclass(frozen=True)
class TaskVector:
    """Named parameter differences of one task. ``meta`` carries ``task``, ``backbone``, ``theta0_sha256``."""

    params: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_state_dicts(cls, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                         task: str = "", backbone: str = "") -> "TaskVector":
        """``finetuned - pretrained`` over floating-point tensors; both must have the same keys, shapes, dtypes."""
        check_compatible(pretrained, finetuned, "pre-trained and fine-tuned state dicts")
        check_finite(pretrained, f"the pre-trained state dict (task {task!r})")
        check_finite(finetuned, f"the fine-tuned state dict of task {task!r}")
        params = {k: (finetuned[k].detach() - pretrained[k].detach()) for k in pretrained
                  if pretrained[k].is_floating_point()}
        meta = {"task": task, "backbone": backbone, "theta0_sha256": state_dict_sha256(pretrained)}
        return cls(params, meta)

    @property
    def task(self) -> str:
        return self.meta.get("task", "")

    def _combine(self, other: "TaskVector", sign: float) -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        check_compatible(self.params, other.params, "task vectors")
        for key in ("backbone", "theta0_sha256"):
            mine, theirs = self.meta.get(key), other.meta.get(key)
            if mine and theirs and mine != theirs:
                raise TaskVectorError(f"task vectors disagree on {key}: {mine!r} vs {theirs!r}")
        op = "+" if sign > 0 else "-"
        meta = {**self.meta, "task": f"({self.task}{op}{other.task})"}
        return TaskVector({k: v + sign * other.params[k] for k, v in self.params.items()}, meta)

    def __add__(self, other: "TaskVector") -> "TaskVector":
        return self._combine(other, 1.0)

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self._combine(other, -1.0)

    def __neg__(self) -> "TaskVector":
        return TaskVector({k: -v for k, v in self.params.items()}, {**self.meta, "task": f"-{self.task}"})

    def __mul__(self, scale: float) -> "TaskVector":
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return TaskVector({k: scale * v for k, v in self.params.items()}, {**self.meta, "task": f"{scale}*{self.task}"})

    __rmul__ = __mul__

    def apply_to(self, pretrained: Mapping[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
        """``theta_0 + scale * tau``; tensors the vector does not cover (integer buffers) are copied."""
        theta0_sha = self.meta.get("theta0_sha256")
        if theta0_sha and state_dict_sha256(pretrained) != theta0_sha:
            raise TaskVectorError(f"task vector {self.task!r} was built on another theta_0 (sha256 {theta0_sha[:12]}…)")
        missing = sorted(set(self.params) - set(pretrained))
        if missing:
            raise TaskVectorError(f"task vector {self.task!r} has blocks missing from the model: {missing[:5]}")
        out = {k: v.clone() for k, v in pretrained.items()}
        for k, v in self.params.items():
            if out[k].shape != v.shape:
                raise TaskVectorError(f"shape mismatch at {k!r}: model {tuple(out[k].shape)} vs vector {tuple(v.shape)}")
            out[k] = out[k] + scale * v.to(out[k].dtype)
        return out

    def save(self, path: Path) -> None:
        atomic_save_safetensors(self.params, path, {"format": FORMAT, **self.meta})

    @classmethod
    def load(cls, path: Path) -> "TaskVector":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task vector file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise TaskVectorError(f"{path}: not a pyro-tvc task vector (format {meta.get('format')!r}, expected {FORMAT!r})")
        meta.pop("format")
        params = load_file(str(path))
        check_finite(params, f"task vector {meta.get('task', path.stem)!r} ({path})")
        return cls(params, meta)


@dataclass(frozen=True)
class TaskVectorBank:
    """T task vectors stacked per block: ``stacked[block]`` is ``[T, *shape]``; blocks keep the model's order."""

    task_names: tuple[str, ...]
    block_names: tuple[str, ...]
    stacked: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_vectors(cls, vectors: list[TaskVector], block_order: list[str] | None = None) -> "TaskVectorBank":
        if not vectors:
            raise TaskVectorError("a bank needs at least one task vector")
        first = vectors[0]
        for v in vectors:
            check_finite(v.params, f"task vector {v.task!r}")
        for v in vectors[1:]:
            check_compatible(first.params, v.params, f"task vectors {first.task!r} and {v.task!r}")
            for key in ("backbone", "theta0_sha256"):
                if first.meta.get(key) != v.meta.get(key):
                    raise TaskVectorError(f"task vectors {first.task!r} and {v.task!r} disagree on {key}")
        names = list(block_order) if block_order is not None else list(first.params)
        unknown = sorted(set(names) - set(first.params))
        if unknown:
            raise TaskVectorError(f"block order names blocks the vectors lack: {unknown[:5]}")
        stacked = {b: torch.stack([v.params[b] for v in vectors]) for b in names}
        meta = {k: first.meta[k] for k in ("backbone", "theta0_sha256") if k in first.meta}
        return cls(tuple(v.task for v in vectors), tuple(names), stacked, meta)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def to(self, device=None, dtype=None) -> "TaskVectorBank":
        return TaskVectorBank(self.task_names, self.block_names,
                              {k: v.to(device=device, dtype=dtype) for k, v in self.stacked.items()}, self.meta)

    def select(self, tasks: list[str]) -> "TaskVectorBank":
        """Sub-bank with the named tasks, in the given order."""
        unknown = sorted(set(tasks) - set(self.task_names))
        if unknown:
            raise TaskVectorError(f"unknown tasks {unknown}; bank has {list(self.task_names)}")
        idx = torch.tensor([self.task_names.index(t) for t in tasks])
        return TaskVectorBank(tuple(tasks), self.block_names, {k: v[idx] for k, v in self.stacked.items()}, self.meta)

    def vector(self, task: str) -> TaskVector:
        i = self.task_names.index(task)
        return TaskVector({k: v[i] for k, v in self.stacked.items()}, {**self.meta, "task": task})
