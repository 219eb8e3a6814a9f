"""Prepared artefacts loaded once per benchmark, and task data encoded once per (task, seed, shots, cap).

Each task's splits come with theta_0's image features (the amortized guides' input), computed once and kept in
memory for every method and protocol of the run. A target given by path (your own task) is registered under its
name; its zero-shot head is built from its class names unless one was prepared.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pyro_tvc.artifacts import (ArtifactPaths, check_head_classes, load_bank, load_clip, load_head, target_head,
                                vector_metadata)
from pyro_tvc.backbones import image_encoder, input_size
from pyro_tvc.data import EMBEDDED_TASKS
from pyro_tvc.data.custom import is_task_path, task_name
from pyro_tvc.data.targets import load_target
from pyro_tvc.evaluation import encode_target
from pyro_tvc.infer import real_transform
from pyro_tvc.heads import MultiHead
from pyro_tvc.methods.base import TaskData
from pyro_tvc.recipes import stored_recipe
from pyro_tvc.runtime import read_json


class Workspace:
    """theta_0's image encoder, the prepared heads and task vectors of ``artifacts``, and cached task data.

    Raises:
        FileNotFoundError: ``artifacts`` holds no prepared CLIP (run ``pyro-tvc prepare``).
    """

    def __init__(self, artifacts: Path, device: torch.device, quiet: bool = True, data_root: Path | None = None):
        self.paths = ArtifactPaths(Path(artifacts))
        self.data_root = data_root
        self.clip, self.model_name = load_clip(self.paths.clip, device)
        self.encoder = image_encoder(self.clip).requires_grad_(False)
        self.device, self.quiet = device, quiet
        self.with_vectors = sorted(p.stem for p in (self.paths.root / "task_vectors").glob("*.safetensors"))
        self.with_heads = sorted(p.stem for p in (self.paths.root / "heads").glob("*.safetensors"))
        table = read_json(self.paths.table_json) if self.paths.table_json.is_file() else {"rows": []}
        self.table = {r["task"]: r for r in table["rows"]}
        self.theta0_sha256 = table.get("theta0_sha256")
        self._data: dict = {}
        self.custom: dict[str, str] = {}  # name -> path of the tasks given by path
        self._heads: dict = {}
        for name in self.with_vectors:  # tasks prepared by path: their data is where prepare read it
            path = prepared_task_path(self.paths, name)
            if path is not None:
                self.custom[name] = path

    @property
    def paper_metrics(self) -> dict[str, str]:
        """Task -> paper metric recorded beside accuracy: none for image tasks (GLUE's metrics are text's)."""
        return {}

    def register(self, spec: str) -> str:
        """The name of target ``spec``; a task given by path is checked (loaded once) and registered under it.

        Raises:
            ValueError: the path is not a readable task, or its name is a prepared task's other than itself.
        """
        if not is_task_path(spec):
            return spec
        name = task_name(spec)
        if self.custom.get(name, spec) != spec:
            raise ValueError(f"--targets {spec} and {self.custom[name]} share the name {name!r}; rename one folder")
        if name in EMBEDDED_TASKS:
            raise ValueError(f"--targets {spec}: its name {name!r} is a built-in task's; rename the folder")
        classes = load_target(spec, image_size=input_size(self.encoder)).classes
        # the prepared head under this name (refused if its classes differ), or one built from the class names
        self._heads[name] = target_head(self.paths, self.clip, self.model_name, name, classes, self.device)
        self.custom[name] = spec
        if name not in self.with_heads:
            self.with_heads = sorted(self.with_heads + [name])
        return name

    def heads(self, tasks: list[str]) -> MultiHead:
        for t in tasks:
            if t not in self._heads:  # a prepared task (registered targets have theirs already)
                self._heads[t] = load_head(self.paths.head(t), self.device)[0]
        return MultiHead([self._heads[t] for t in tasks], tasks).to(self.device)

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
            target = load_target(self.custom.get(task, task), seed, shots, max_train, input_size(self.encoder),
                                 data_root=self.data_root, transform=real_transform(self.encoder, self.data_root))
            if task in self.custom:  # a pool task or control by path (a registered target was checked already)
                check_head_classes(self.paths, task, target.classes, self.custom[task], "pyro-tvc prepare")
            encoded = encode_target(self.encoder, target.splits, self.theta0_sha256, self.paths.root / "features",
                                    self.device)
            self._data[key] = {name: TaskData(x, f, y, torch.zeros_like(y)) for name, (x, f, y) in encoded.items()}
        return {k: TaskData(v.images, v.features, v.labels, torch.full_like(v.task_ids, task_id))
                for k, v in self._data[key].items()}


def open_workspace(artifacts: Path, device: torch.device, quiet: bool = True, data_root: Path | None = None):
    """The workspace of an artefact folder: :class:`Workspace` for CLIP artefacts, the text workspace
    (:class:`pyro_tvc.text.workspace.TextWorkspace`) for those of ``prepare --modality text``."""
    from pyro_tvc.text.prepare import is_text_artifacts

    if is_text_artifacts(Path(artifacts)):
        from pyro_tvc.text.workspace import TextWorkspace

        return TextWorkspace(artifacts, device, quiet=quiet, data_root=data_root)
    return Workspace(artifacts, device, quiet=quiet, data_root=data_root)


def prepared_task_path(paths: ArtifactPaths, name: str) -> str | None:
    """Where ``prepare`` read the task ``name`` when it was given by path (its vector's recipe records it)."""
    if name in EMBEDDED_TASKS:
        return None
    recipe = stored_recipe(vector_metadata(paths.task_vector(name))) or {}
    return ((recipe.get("data") or {}).get("custom") or {}).get("path")


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
