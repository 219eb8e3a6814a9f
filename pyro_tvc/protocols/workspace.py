"""Prepared artefacts loaded once per benchmark, and task data encoded once per (task, seed, shots, cap).

Each task's splits come with theta_0's image features (the amortized guides' input), computed once and kept in
memory for every method and protocol of the run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pyro_tvc.artifacts import ArtifactPaths, load_bank, load_clip, load_head
from pyro_tvc.backbones import image_encoder
from pyro_tvc.data import load_embedded
from pyro_tvc.evaluation import encode_dataset
from pyro_tvc.heads import MultiHead
from pyro_tvc.methods.base import TaskData
from pyro_tvc.runtime import read_json


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` indices per class, drawn without replacement (seeded, stratified; aTLAS's few-shot setting).

    Raises:
        ValueError: ``shots`` < 1 or larger than the smallest class (the message names the class and its size).
    """
    if shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    rng = np.random.RandomState(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"--shots {shots} is larger than class {c}'s {len(members)} training images")
        picked.append(rng.choice(members, shots, replace=False))
    return np.sort(np.concatenate(picked))


class Workspace:
    """theta_0's image encoder, the prepared heads and task vectors of ``artifacts``, and cached task data.

    Raises:
        FileNotFoundError: ``artifacts`` holds no prepared CLIP (run ``pyro-tvc prepare``).
    """

    def __init__(self, artifacts: Path, device: torch.device, quiet: bool = True):
        self.paths = ArtifactPaths(Path(artifacts))
        clip, self.model_name = load_clip(self.paths.clip, device)
        self.encoder = image_encoder(clip).requires_grad_(False)
        self.device, self.quiet = device, quiet
        self.with_vectors = sorted(p.stem for p in (self.paths.root / "task_vectors").glob("*.safetensors"))
        self.with_heads = sorted(p.stem for p in (self.paths.root / "heads").glob("*.safetensors"))
        table = read_json(self.paths.table_json) if self.paths.table_json.is_file() else {"rows": []}
        self.table = {r["task"]: r for r in table["rows"]}
        self.theta0_sha256 = table.get("theta0_sha256")
        self._data: dict = {}

    def heads(self, tasks: list[str]) -> MultiHead:
        return MultiHead([load_head(self.paths.head(t), self.device)[0] for t in tasks], tasks).to(self.device)

    def bank(self, tasks: list[str]):
        return load_bank(self.paths, tasks).to(self.device)

    def finetuned_accuracy(self, task: str) -> float | None:
        row = self.table.get(task)
        return None if row is None else row.get("fine_tuned")

    def task_data(self, task: str, seed: int, shots: int | None = None, max_train: int | None = None,
                  task_id: int = 0) -> dict[str, TaskData]:
        """``{"train", "val", "test"}`` -> :class:`TaskData` with ``task_ids`` set to ``task_id``."""
        key = (task, seed, shots, max_train)
        if key not in self._data:
            splits = load_embedded(task, seed=seed, max_train=None if shots else max_train)
            out = {}
            for name in ("train", "val", "test"):
                images, labels = splits_tensors(getattr(splits, name))
                if name == "train" and shots:
                    idx = torch.from_numpy(few_shot_indices(labels.numpy(), shots, seed))
                    images, labels = images[idx], labels[idx]
                feats, _ = encode_dataset(self.encoder, torch.utils.data.TensorDataset(images, labels),
                                          device=self.device)
                out[name] = TaskData(images.to(self.device), feats.to(self.device), labels.to(self.device),
                                     torch.zeros(len(labels), dtype=torch.long, device=self.device))
            self._data[key] = out
        return {k: TaskData(v.images, v.features, v.labels, torch.full_like(v.task_ids, task_id))
                for k, v in self._data[key].items()}


def splits_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = dataset.tensors
    return images, labels


def unlabeled(data: TaskData) -> TaskData:
    """The same inputs with every label replaced by -1, so a test-time method cannot read them."""
    return TaskData(data.images, data.features, torch.full_like(data.labels, -1), data.task_ids)


def selection_subset(data: TaskData, per_task: int, seed: int) -> TaskData:
    """Up to ``per_task`` random inputs of each task (a held-out selection split)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for t in torch.unique(data.task_ids).tolist():
        rows = torch.nonzero(data.task_ids == t).squeeze(-1).cpu()
        parts.append(rows[torch.randperm(len(rows), generator=gen)[:per_task]])
    return data.subset(torch.cat(parts).sort().values.to(data.labels.device))
