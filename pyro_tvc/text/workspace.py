"""The benchmark's workspace for text artefacts (``prepare --modality text``): the same interface as
:class:`pyro_tvc.protocols.workspace.Workspace`, so every protocol and method runs unchanged on text.

A text input of a :class:`~pyro_tvc.methods.base.TaskData` is its prefix states ``[L, D + 1]`` (the frozen bottom
layers' output and the attention mask; :func:`pyro_tvc.text.encoder.prefix_states`); the composed module is the
:class:`~pyro_tvc.text.encoder.SentenceEncoder` over the fine-tuned top layers. The bottom is run once per text and
split and kept for the whole benchmark.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pyro_tvc.artifacts import ArtifactPaths, check_head_classes, load_bank, load_head, vector_metadata
from pyro_tvc.data.text import TEXT_TASKS, is_text_task_path, load_text_task, text_task_classes, text_task_name
from pyro_tvc.recipes import stored_recipe
from pyro_tvc.heads import MultiHead
from pyro_tvc.methods.base import TaskData
from pyro_tvc.runtime import read_json
from pyro_tvc.text.metrics import PAPER_METRICS
from pyro_tvc.text.encoder import SentenceEncoder, load_text_model, resolve_model_folder
from pyro_tvc.text.prepare import MAX_TEST, MAX_VAL, TextSettings, encode_split, model_sha256, read_encoder_info


PREPARE = "pyro-tvc prepare --modality text"


class TextWorkspace:
    """theta_0's top layers, the prepared heads and task vectors of a text artefact folder, and encoded task data.

    Raises:
        ValueError: the model folder's weights differ from the ones the artefacts were prepared on.
        TextModelError: the model folder is missing or incomplete.
    """

    modality = "text"

    def __init__(self, artifacts: Path, device: torch.device, quiet: bool = True, data_root: Path | None = None):
        if data_root is not None:
            raise ValueError("--data-root is for image sets; text artefacts read the shipped text sets")
        self.paths = ArtifactPaths(Path(artifacts))
        self.data_root = None
        info = read_encoder_info(self.paths.root)
        folder = resolve_model_folder(info["model"])
        self.model, self.tokenizer = load_text_model(folder, device)
        if model_sha256(self.model) != info["model_sha256"]:
            raise ValueError(f"--artifacts {self.paths.root}: the model at {folder} is not the one they were prepared "
                             f"on (weights' sha256 differs); re-run `pyro-tvc prepare --modality text`")
        self.settings = TextSettings(folder, int(info["max_length"]), int(info["start_layer"]))
        self.encoder = SentenceEncoder(self.model, self.settings.start_layer).requires_grad_(False)
        self.model_name = info["name"]
        self.device, self.quiet = device, quiet
        self.with_vectors = sorted(p.stem for p in (self.paths.root / "task_vectors").glob("*.safetensors"))
        self.with_heads = sorted(p.stem for p in (self.paths.root / "heads").glob("*.safetensors"))
        table = read_json(self.paths.table_json) if self.paths.table_json.is_file() else {"rows": []}
        self.table = {r["task"]: r for r in table["rows"]}
        self.theta0_sha256 = info["theta0_sha256"]
        self.custom: dict[str, str] = {}  # name -> folder of your own text tasks (their vectors' recipes say where)
        for name in self.with_vectors:
            path = (stored_recipe(vector_metadata(self.paths.task_vector(name))) or {}).get("path")
            if path:
                self.custom[name] = path
        self._heads: dict = {}
        self._data: dict = {}
        self._encoded: dict = {}  # (task, split, text) -> (prefix row, feature row): the bottom runs once per text

    @property
    def paper_metrics(self) -> dict[str, str]:
        """Task -> GLUE's metric recorded beside accuracy (``mcc`` for CoLA, ``f1`` for MRPC; the names are the shipped
        tasks', which a text task by path cannot take)."""
        return {task: name for task, (name, _) in PAPER_METRICS.items()}

    def register(self, spec: str) -> str:
        """A shipped text task by name, or your own by folder (prepared into these artefacts first).

        Raises:
            ValueError: an unknown text task, or a folder without a prepared head here.
        """
        if is_text_task_path(spec):
            name = text_task_name(spec)
            if name not in self.with_heads or self.custom.get(name) != str(Path(spec).expanduser().resolve()):
                raise ValueError(f"--targets {spec}: text tasks by path need their head: run `pyro-tvc prepare "
                                 f"--modality text --tasks {spec} --out {self.paths.root}` first")
            check_head_classes(self.paths, name, text_task_classes(spec), spec, PREPARE)  # before anything is written
            return name
        if spec not in TEXT_TASKS:
            raise ValueError(f"--targets {spec}: unknown text task; shipped text tasks: {', '.join(TEXT_TASKS)}")
        return spec

    def heads(self, tasks: list[str]) -> MultiHead:
        for t in tasks:
            if t not in self._heads:
                self._heads[t] = load_head(self.paths.head(t), self.device)[0]
        return MultiHead([self._heads[t] for t in tasks], tasks).to(self.device)

    def bank(self, tasks: list[str]):
        return load_bank(self.paths, tasks, self.theta0_sha256).to(self.device)

    def finetuned_accuracy(self, task: str) -> float | None:
        row = self.table.get(task)
        return None if row is None else row.get("fine_tuned")

    def _encode(self, task: str, split_name: str, split) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [(task, split_name, t) for t in split.texts]
        todo = sorted({i for i, k in enumerate(keys) if k not in self._encoded})
        if todo:
            prefix, feats, _ = encode_split(self.model, self.tokenizer, split.subset(todo), self.settings,
                                            self.encoder)
            lengths = prefix[..., -1].sum(-1).long().tolist()
            for j, i in enumerate(todo):  # kept without the padding (about half the memory)
                self._encoded[keys[i]] = (prefix[j, :lengths[j]].clone(), feats[j])
        width = self.model.config.hidden_size
        prefix = torch.zeros(len(keys), self.settings.max_length, width + 1)
        for i, k in enumerate(keys):
            row = self._encoded[k][0]
            prefix[i, :row.shape[0]] = row
        feats = torch.stack([self._encoded[k][1] for k in keys]) if keys else torch.zeros(0, width)
        return prefix, feats

    def task_data(self, task: str, seed: int, shots: int | None = None, max_train: int | None = None,
                  task_id: int = 0) -> dict[str, TaskData]:
        """``{"train", "val", "test"}`` -> :class:`TaskData` (``images``: prefix states) with ``task_ids = task_id``."""
        key = (task, seed, shots, max_train)
        if key not in self._data:
            data = load_text_task(self.custom.get(task, task), seed=seed, max_train=max_train, max_val=MAX_VAL,
                                  max_test=MAX_TEST)
            if task in self.custom:  # a pool task or control by folder, not only a registered target
                check_head_classes(self.paths, task, data.classes, self.custom[task], PREPARE)
            train = data.train if shots is None else data.train.subset(_shots(data.train.labels, shots, seed, task))
            encoded = {}
            for name, split in (("train", train), ("val", data.val), ("test", data.test)):
                prefix, feats = self._encode(task, name, split)
                labels = torch.as_tensor(split.labels)
                encoded[name] = TaskData(prefix.to(self.device), feats.to(self.device), labels.to(self.device),
                                         torch.zeros_like(labels).to(self.device))
            self._data[key] = encoded
        return {k: TaskData(v.images, v.features, v.labels, torch.full_like(v.task_ids, task_id))
                for k, v in self._data[key].items()}


def _shots(labels: np.ndarray, shots: int, seed: int, task: str) -> np.ndarray:
    """``shots`` seeded examples of every class.

    Raises:
        ValueError: a class with fewer examples than ``shots``.
    """
    rng = np.random.RandomState(seed)
    picked = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        if len(members) < shots:
            raise ValueError(f"--shots {shots}: class {int(c)} of {task} has only {len(members)} training texts")
        picked.append(rng.permutation(members)[:shots])
    return np.sort(np.concatenate(picked))
