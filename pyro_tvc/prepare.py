"""``pyro-tvc prepare``: theta_0, zero-shot heads and one real task vector per task, cached on disk.

Embedded default (no ``--pretrained``): the tiny open_clip CLIP is pre-trained contrastively on a small share of
every task's training split, short enough to stay *broad but weak* (docs/embedded-default.md explains the recipe),
then each task gets a zero-shot head from its class names and prompt templates, and the image encoder is
fine-tuned on the task with that head frozen (the task_vectors / aTLAS protocol). With ``--pretrained FILE`` the
pre-training is skipped and theta_0 is the given checkpoint (e.g. ViT-B-32 with ``--data-root``).
Every stage is cached and keyed to what made it (:mod:`pyro_tvc.recipes`): a re-run reuses a file only when its
recorded recipe equals the one it would use now, and says what changed otherwise.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F

from pyro_tvc.artifacts import (ArtifactPaths, clip_metadata, head_metadata, load_clip, load_head, save_clip,
                                save_head, vector_metadata)
from pyro_tvc.checkpoints import file_sha256
from pyro_tvc.backbones import (TINY_MODEL, ZeroShotHead, create_clip, image_encoder, model_input_size, tokenizer_for,
                                zero_shot_head)
from pyro_tvc.data import EMBEDDED_TASKS, REAL_TASKS, TaskSplits, dataset_labels, infinite_batches, load_task
from pyro_tvc.data.custom import is_task_path, task_name
from pyro_tvc.data.prompts import templates_for
from pyro_tvc.evaluation import accuracy
from pyro_tvc.recipes import (RECIPE_KEY, canonical_json, custom_data_identity, describe_change, embedded_data_sha256,
                              model_config_sha256, real_data_identity, recipe_sha256, same_recipe, stored_recipe)
from pyro_tvc.reporting import markdown_table
from pyro_tvc.runtime import (atomic_write_text, check_writable_folder, progress, read_json, resolve_device,
                              seed_everything, write_json)
from pyro_tvc.task_vectors import TaskVector, state_dict_sha256


@dataclass
class PrepareConfig:
    """Configuration of ``pyro-tvc prepare`` (every field is a command-line option ``--field-name``).

    Args:
        out: Artefact folder (theta_0, heads, task vectors, table); created if missing, must be writable
            (default artifacts/pyro-tvc-tiny; text: artifacts/all-MiniLM-L6-v2).
        model: open_clip model name (default ``pyro-tvc-tiny``, pre-trained locally; others need ``pretrained``);
            text: ``all-MiniLM-L6-v2`` (default) or a local Hugging Face encoder folder.
        pretrained: Local CLIP checkpoint for ``model`` (state dict, open_clip checkpoint, safetensors or OpenAI
            TorchScript file); skips pre-training.
        data_root: Folder of real data sets (torchvision layout); default: the embedded sets.
        tasks: Tasks to prepare (default: the 9 embedded sets; text: sst2 ag_news trec subj cola mrpc): embedded
            names, or real ones with ``data_root``, without repeats, or paths of your own tasks (an ImageFolder
            tree, an .npz or a .csv; docs/custom-tasks.md; text: a folder, docs/text.md), named after the folder.
        pretrain_tasks: Embedded tasks whose images pre-train the tiny theta_0 (default: ``tasks``, or every
            embedded task when a task is given by path, i.e. the default theta_0). The demo
            pre-trains on every embedded set but fine-tunes only its own tasks, so its theta_0, heads and vectors
            are the ones a later full ``prepare`` reuses.
        pretrain_steps: Contrastive pre-training steps of the tiny theta_0 (>= 1).
        pretrain_lr: Peak learning rate of pre-training, in (0, 1].
        pretrain_fraction: Share of every training split used for pre-training, in (0, 1].
        finetune_steps: Fine-tuning steps per task (>= 1; default 300, text 200).
        finetune_lr: Peak learning rate of fine-tuning, in (0, 1] (default 1e-3, text 1e-4).
        batch_size: Fine-tuning batch size (>= 1; default 128, text 32).
        max_train: Cap on training images per embedded task (>= 1; fast mode); None keeps all (text: 2000).
        seed: Random seed, in [0, 2**32).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:i]``.
        quiet: No progress bars.
        rebuild: Replace a theta_0 in ``out`` that was made from other inputs (and everything built on it)
            instead of refusing.
        skip_bad_images: Leave out unreadable files of tasks given by path (counted and printed) instead of
            refusing them.
        modality: ``image`` (open_clip CLIP) or ``text`` (a local Hugging Face encoder, the shipped text sets;
            docs/text.md). With ``text``: ``--model`` is ``all-MiniLM-L6-v2`` (the ``nlu`` extra) or a model folder,
            ``--out`` defaults to ``artifacts/all-MiniLM-L6-v2``, ``--tasks`` to six text tasks, and fine-tuning to
            200 steps at lr 1e-4, batch 32, 2000 training texts per task (each option given explicitly wins).
        max_length: Text only: tokens per input (longer inputs are truncated), in [8, 512].
        text_layers: Text only: how many top transformer layers are fine-tuned (the task vectors' blocks); the
            layers below stay frozen and are computed once.
    """

    out: Path | None = None
    model: str | None = None
    pretrained: Path | None = None
    data_root: Path | None = None
    tasks: list[str] | None = None
    pretrain_tasks: list[str] | None = None
    pretrain_steps: int = 150
    pretrain_lr: float = 1e-3
    pretrain_fraction: float = 0.1
    finetune_steps: int | None = None
    finetune_lr: float | None = None
    batch_size: int | None = None
    max_train: int | None = None
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    rebuild: bool = False
    skip_bad_images: bool = False
    modality: Literal["image", "text"] = "image"
    max_length: int = 64
    text_layers: int = 2

    def __post_init__(self):
        """Options left out take their modality's default (image | text): ``out`` artifacts/pyro-tvc-tiny |
        artifacts/all-MiniLM-L6-v2, ``model`` pyro-tvc-tiny | all-MiniLM-L6-v2, ``tasks`` the 9 embedded sets |
        sst2 ag_news trec subj cola mrpc, ``finetune_steps`` 300 | 200, ``finetune_lr`` 1e-3 | 1e-4,
        ``batch_size`` 128 | 32, ``max_train`` all | 2000."""
        if self.modality == "text":
            from pyro_tvc.text.encoder import DEFAULT_TEXT_MODEL
            from pyro_tvc.text.prepare import TEXT_DEFAULT_TASKS

            defaults = dict(model=DEFAULT_TEXT_MODEL, out=Path("artifacts") / DEFAULT_TEXT_MODEL,
                            tasks=list(TEXT_DEFAULT_TASKS), finetune_steps=200, finetune_lr=1e-4, batch_size=32,
                            max_train=2000)
        else:
            defaults = dict(model=TINY_MODEL, out=Path("artifacts") / TINY_MODEL, tasks=list(EMBEDDED_TASKS),
                            finetune_steps=300, finetune_lr=1e-3, batch_size=128)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate_numbers(self) -> None:
        """The numeric options (both modalities).

        Raises:
            ValueError: one line naming the option, the value and what is accepted.
        """
        def whole(name: str, low: int, high: int | None = None, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value >= high):
                bound = f"an integer >= {low}" + (f" and < {high}" if high else "")
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected {bound}")

        def fraction(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected a number in (0, 1]")

        for name in ("pretrain_steps", "finetune_steps", "batch_size", "max_length", "text_layers"):
            whole(name, 1)
        whole("max_train", 1, optional=True)
        whole("seed", 0, 2**32)
        for name in ("pretrain_lr", "finetune_lr", "pretrain_fraction"):
            fraction(name)

    def validate(self) -> None:
        """Check every field before any work.

        Raises:
            ValueError: a value out of range, an unknown model or task, repeated tasks (one line naming the option).
            FileNotFoundError: ``pretrained`` or ``data_root`` missing.
        """
        self.validate_numbers()
        if self.model not in open_clip.list_models():
            raise ValueError(f"--model {self.model!r}: unknown open_clip model (e.g. {TINY_MODEL}, ViT-B-32, ViT-B-16)")
        if self.pretrained is not None and not Path(self.pretrained).is_file():
            raise FileNotFoundError(f"--pretrained {self.pretrained}: no such file (pyro-tvc loads local weights only)")
        if self.data_root is not None and not Path(self.data_root).is_dir():
            raise FileNotFoundError(f"--data-root {self.data_root}: no such folder")
        self._validate_tasks()

    @property
    def pretraining_tasks(self) -> list[str]:
        if self.pretrain_tasks is not None:
            return list(self.pretrain_tasks)
        return list(EMBEDDED_TASKS) if any(map(is_task_path, self.tasks)) else list(self.tasks)

    def names(self) -> list[str]:
        """The tasks' names (a task by path is named after its folder or file)."""
        return [task_name(t) if is_task_path(t) else t for t in self.tasks]

    def _validate_tasks(self) -> None:
        real = self.data_root is not None
        named = [t for t in self.tasks if not is_task_path(t)]
        if named or not self.tasks:
            _check_task_list("--tasks", named, list(REAL_TASKS) if real else list(EMBEDDED_TASKS),
                             "real tasks under --data-root" if real else "embedded tasks")
        for t in self.tasks:
            if is_task_path(t) and not Path(t).expanduser().exists():
                raise ValueError(f"--tasks {t}: no such folder or file (a task by path is an ImageFolder tree, "
                                 f"an .npz or a .csv)")
            if is_task_path(t) and task_name(t) in EMBEDDED_TASKS + tuple(REAL_TASKS):
                raise ValueError(f"--tasks {t}: its name {task_name(t)!r} is a built-in task's; rename the folder")
        repeated = sorted({n for n in self.names() if self.names().count(n) > 1})
        if repeated:
            raise ValueError(f"--tasks: the names {repeated} are given more than once")
        if self.pretrain_tasks is not None:
            _check_task_list("--pretrain-tasks", self.pretrain_tasks, list(EMBEDDED_TASKS), "embedded tasks")


def _check_task_list(option: str, tasks, known: list[str], where: str) -> None:
    if not tasks:
        raise ValueError(f"{option}: expected at least one task of {known}")
    repeated = sorted({t for t in tasks if list(tasks).count(t) > 1})
    if repeated:
        raise ValueError(f"{option}: {repeated} given more than once")
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"{option}: unknown {unknown}; {where} are: {', '.join(known)}")


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int):
    """One-cycle schedule (10 % warm-up) peaking at ``lr``; a constant ``lr`` below 20 steps, where the warm-up
    would be under one step (torch's OneCycleLR then divides by zero)."""
    if steps < 20:
        for group in opt.param_groups:
            group["lr"] = lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)


# --- pre-training (embedded default only) -----------------------------------------------------------------------

def _pretraining_pool(splits: dict[str, TaskSplits], fraction: float, seed: int):
    """Per (task, class): the image tensors of a ``fraction`` share of the training split (at least 2 images)."""
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for task, s in splits.items():
        images, labels = s.train.tensors
        for c, name in enumerate(s.classes):
            members = torch.nonzero(labels == c).flatten()
            members = members[torch.randperm(len(members), generator=gen)]
            keep = members[: max(2, int(fraction * len(members)))]
            if len(keep):
                pool.append((task, name, images[keep]))
    return pool


def pretrain_clip(model: torch.nn.Module, splits: dict[str, TaskSplits], cfg: PrepareConfig, device) -> None:
    """Contrastive pre-training: each batch holds one image per (task, class) with a caption from its templates."""
    tokenizer = tokenizer_for(cfg.model)
    pool = _pretraining_pool(splits, cfg.pretrain_fraction, cfg.seed)
    captions = [[t.format(name) for t in templates_for(task)] for task, name, _ in pool]
    tokens = [tokenizer(c) for c in captions]
    rng = random.Random(cfg.seed)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.1)
    sched = one_cycle(opt, cfg.pretrain_lr, cfg.pretrain_steps)
    model.train()
    bar = progress(range(cfg.pretrain_steps), cfg.quiet, desc="pre-train theta_0")
    for _ in bar:
        img = torch.stack([imgs[rng.randrange(len(imgs))] for _, _, imgs in pool]).to(device)
        txt = torch.stack([t[rng.randrange(len(t))] for t in tokens]).to(device)
        loss = loss_fn(model.encode_image(img, normalize=True), model.encode_text(txt, normalize=True),
                       model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # redrawn by the bar's own clock, not per step
    model.eval()


# --- fine-tuning ------------------------------------------------------------------------------------------------

def finetune_encoder(encoder: torch.nn.Module, head: ZeroShotHead, splits: TaskSplits, cfg: PrepareConfig,
                     device) -> dict[str, torch.Tensor]:
    """Fine-tune the image encoder with the head frozen; returns the fine-tuned state dict (encoder left unchanged)."""
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.finetune_lr, weight_decay=0.1)
    sched = one_cycle(opt, cfg.finetune_lr, cfg.finetune_steps)
    encoder.train()
    batches = infinite_batches(splits.train, cfg.batch_size, gen)
    bar = progress(range(cfg.finetune_steps), cfg.quiet, desc=f"fine-tune {splits.name}")
    for _ in bar:
        x, y = next(batches)
        loss = F.cross_entropy(head(encoder(x.to(device))), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # redrawn by the bar's own clock, not per step
    encoder.eval()
    finetuned = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(theta0)
    return finetuned


# --- recipes: what every artefact depends on (pyro_tvc.recipes) --------------------------------------------------

def theta0_recipe(cfg: PrepareConfig) -> dict | None:
    """Inputs of theta_0: the architecture and the checkpoint file, or the pre-training data and settings.

    None when the configuration does not say how theta_0 is made (no ``pretrained`` and a model that is not
    pre-trained locally, or real data): then the theta_0 already in ``out`` is used, whatever made it.
    """
    if cfg.pretrained is None and (cfg.model != TINY_MODEL or cfg.data_root is not None):
        return None
    recipe = {"model": cfg.model, "model_config_sha256": model_config_sha256(cfg.model)}
    if cfg.pretrained is not None:
        return {**recipe, "pretrained_sha256": file_sha256(cfg.pretrained)}
    return {**recipe, "pretrain_tasks": list(cfg.pretraining_tasks),
            "pretrain_data_sha256": [embedded_data_sha256(t) for t in cfg.pretraining_tasks],
            "max_train": cfg.max_train, "pretrain_steps": cfg.pretrain_steps, "pretrain_lr": cfg.pretrain_lr,
            "pretrain_fraction": cfg.pretrain_fraction, "seed": cfg.seed}


def head_recipe(clip_sha: str, task: str, classes: list[str]) -> dict:
    return {"clip_sha256": clip_sha, "task": task, "classes_sha256": recipe_sha256(classes),
            "templates_sha256": recipe_sha256(list(templates_for(task)))}


def vector_recipe(cfg: PrepareConfig, theta0_sha: str, head: dict, task: str, splits: TaskSplits,
                  spec: str | None = None) -> dict:
    if spec is not None and is_task_path(spec):
        data = {"custom": custom_data_identity(spec), "max_train": cfg.max_train}
    elif cfg.data_root is None:
        data = {"embedded_sha256": embedded_data_sha256(task), "max_train": cfg.max_train}
    else:
        data = real_data_identity(cfg.data_root, task, splits.classes,
                                  {k: len(getattr(splits, k)) for k in ("train", "val", "test")})
    return {"theta0_sha256": theta0_sha, "head_sha256": recipe_sha256(head), "task": task, "data": data,
            "finetune_steps": cfg.finetune_steps, "finetune_lr": cfg.finetune_lr, "batch_size": cfg.batch_size,
            "seed": cfg.seed}


def _note(message: str, notes: list[str]) -> None:
    """Cache decisions are printed even with --quiet: a rebuilt or refused artefact must never be silent."""
    notes.append(message)
    print(f"prepare: {message}", file=sys.stderr)


# --- the whole pipeline -----------------------------------------------------------------------------------------

def _load_splits(cfg: PrepareConfig, transform, tasks: list[str], image_size: int = 32) -> dict[str, TaskSplits]:
    """Every task's splits; an empty train or test split is refused (fine-tuning would loop on no batches).

    Raises:
        ValueError: naming the task, the split and the sizes found.
    """
    splits = {t: load_task(t, cfg.data_root, transform, image_size=image_size, max_train=cfg.max_train,
                           skip_bad_images=cfg.skip_bad_images) for t in tasks}
    for t, s in splits.items():
        if s.skipped:
            print(f"prepare: {t}: skipped {s.skipped} unreadable files (--skip-bad-images)", file=sys.stderr)
    for task, s in splits.items():
        sizes = {k: len(getattr(s, k)) for k in ("train", "val", "test")}
        empty = [k for k in ("train", "test") if sizes[k] == 0]
        if empty or not s.classes:
            where = f" under {cfg.data_root}" if cfg.data_root is not None else ""
            raise ValueError(f"task {task!r}{where}: empty {' and '.join(empty) or 'class list'} split (sizes {sizes}, "
                             f"{len(s.classes)} classes); it needs images in every split (about 5+ per class)")
    return splits


def _keeps_theta0(cfg: PrepareConfig, paths: ArtifactPaths) -> bool:
    """Adding a task by path to prepared artefacts (no --pretrained, no --pretrain-tasks) keeps their theta_0.

    Raises:
        ValueError: the prepared theta_0 is another architecture than ``--model``.
    """
    if not (paths.clip.exists() and cfg.pretrained is None and cfg.pretrain_tasks is None
            and any(map(is_task_path, cfg.tasks))):
        return False
    stored = clip_metadata(paths.clip).get("model")
    if stored != cfg.model:
        raise ValueError(f"{paths.clip} holds {stored!r}, not --model {cfg.model!r}: pass --model {stored} to add "
                         f"tasks to it, or choose another --out")
    return True


def _theta0(cfg: PrepareConfig, paths: ArtifactPaths, device, splits_for_pretraining,
            notes: list[str]) -> torch.nn.Module:
    recipe = theta0_recipe(cfg)
    if _keeps_theta0(cfg, paths):
        return load_clip(paths.clip, device)[0]  # adding your own task to prepared artefacts keeps their theta_0
    if paths.clip.exists():
        meta = clip_metadata(paths.clip)
        if recipe is None and meta.get("model") != cfg.model:
            raise ValueError(f"{paths.clip} holds {meta.get('model')!r}, not {cfg.model!r}: use another --out")
        if recipe is None or same_recipe(meta, recipe):
            return load_clip(paths.clip, device)[0]
        change = describe_change(meta, recipe)
        if not cfg.rebuild:
            raise ValueError(f"{paths.clip}: theta_0 there was made from other inputs ({change}); pass --rebuild to "
                             f"replace it and everything built on it, or choose another --out")
        _note(f"rebuilding theta_0 ({change})", notes)
    torch.manual_seed(cfg.seed)
    model = create_clip(cfg.model, pretrained=cfg.pretrained, device=str(device))
    if cfg.pretrained is None:
        pretrain_clip(model, splits_for_pretraining(), cfg, device)
    save_clip(model, cfg.model, paths.clip, recipe)
    return model.eval()


def _head(cfg, paths, model, clip_sha, task, s: TaskSplits, device, notes) -> tuple[ZeroShotHead, dict]:
    recipe = head_recipe(clip_sha, task, s.classes)
    if paths.head(task).exists():
        meta = head_metadata(paths.head(task))
        if same_recipe(meta, recipe):
            return load_head(paths.head(task), device)[0], recipe
        _note(f"rebuilding the zero-shot head of {task!r} ({describe_change(meta, recipe)})", notes)
    head = zero_shot_head(model, tokenizer_for(cfg.model), s.classes, task)
    save_head(head, s.classes, paths.head(task), recipe)
    return head, recipe


def _vector(cfg, paths, encoder, theta0, theta0_sha, head, recipe, task, s, device, notes) -> TaskVector:
    path = paths.task_vector(task)
    if path.exists():
        old = TaskVector.load(path)
        if same_recipe(old.meta, recipe):
            return old
        if stored_recipe(old.meta) == {"kind": "import"} and old.meta.get("theta0_sha256") == theta0_sha:
            _note(f"keeping the imported task vector of {task!r} (import-vector); delete it to fine-tune here", notes)
            return old
        _note(f"rebuilding the task vector of {task!r} ({describe_change(old.meta, recipe)})", notes)
    finetuned = finetune_encoder(encoder, head, s, cfg, device)
    vector = TaskVector.from_state_dicts(theta0, finetuned, task=task, backbone=cfg.model)
    vector = TaskVector(vector.params, {**vector.meta, RECIPE_KEY: canonical_json(recipe)})
    vector.save(path)
    return vector


def run_prepare(cfg: PrepareConfig) -> dict:
    """Build (or reuse) every artefact and return the accuracy table.

    Every argument is validated and the output folder proven writable before any work. An artefact is reused only
    when the recipe recorded in it equals the one this run would use; otherwise heads, vectors and table rows are
    rebuilt, and theta_0 is refused unless ``cfg.rebuild`` (each decision printed to stderr and listed in the
    table's ``notes``).

    Raises:
        ValueError / FileNotFoundError: bad configuration, unwritable ``out``, a stale theta_0 without ``rebuild``.
    """
    if cfg.modality == "text":
        from pyro_tvc.text.prepare import run_prepare_text

        return run_prepare_text(cfg)
    cfg.validate()
    paths = ArtifactPaths(Path(cfg.out))
    if (paths.root / "text_encoder.json").exists():
        raise ValueError(f"--out {paths.root}: holds text artefacts (prepare --modality text); choose another --out "
                         f"for images")
    if cfg.data_root is not None and cfg.pretrained is None and not paths.clip.exists():
        raise ValueError("pre-training theta_0 uses the embedded sets; with --data-root pass --pretrained FILE")
    if cfg.pretrained is None and cfg.model != TINY_MODEL and not paths.clip.exists():
        raise ValueError(f"--model {cfg.model} needs --pretrained FILE (only {TINY_MODEL} is pre-trained locally)")
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    notes: list[str] = []
    splits_cache: dict[str, TaskSplits] = {}
    transform: list = [None]  # set once theta_0 exists (real data sets need the model's preprocessing)
    size = [model_input_size(cfg.model)]  # tasks by path are decoded at the model's input size

    def splits(tasks: list[str] = cfg.tasks) -> dict[str, TaskSplits]:
        missing = [t for t in tasks if t not in splits_cache]
        splits_cache.update(_load_splits(cfg, transform[0], missing, size[0]) if missing else {})
        return {t: splits_cache[t] for t in tasks}  # in the order given: the pre-training pool's RNG follows it

    _keeps_theta0(cfg, paths)  # refuses another architecture before anything is read at the wrong size
    splits([t for t in cfg.tasks if is_task_path(t)])  # your own tasks are read (and refused) before any write
    check_writable_folder(paths.root)
    seed_everything(cfg.seed)
    model = _theta0(cfg, paths, device, lambda: splits(cfg.pretraining_tasks), notes)
    encoder = image_encoder(model)
    if cfg.data_root is not None:
        transform[0] = open_clip.image_transform(encoder.image_size, is_train=False)
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    theta0_sha = state_dict_sha256(theta0)
    clip_sha = clip_metadata(paths.clip).get("clip_sha256") or state_dict_sha256(model.state_dict())
    previous = read_json(paths.table_json) if paths.table_json.exists() else {}
    rows = {r["task"]: r for r in previous.get("rows", []) if isinstance(r, dict) and "task" in r}
    for spec, task in progress(list(zip(cfg.tasks, cfg.names())), cfg.quiet, desc="tasks"):
        s = splits()[spec]
        head, h_recipe = _head(cfg, paths, model, clip_sha, task, s, device, notes)
        recipe = vector_recipe(cfg, theta0_sha, h_recipe, task, s, spec)
        vector = _vector(cfg, paths, encoder, theta0, theta0_sha, head, recipe, task, s, device, notes)
        row_key = recipe_sha256({"vector": vector.meta.get(RECIPE_KEY), "source": vector.meta.get("source_sha256"),
                                 "theta0_sha256": theta0_sha, "head": h_recipe})
        if rows.get(task, {}).get("recipe_sha256") != row_key:
            rows[task] = _evaluate(encoder, head, vector, theta0, s, device) | {"recipe_sha256": row_key}
    # rows of tasks prepared earlier on this theta_0 stay in the table (a demo-sized prepare after a full one)
    earlier = [t for t in rows if t not in cfg.names() and _built_on(paths, t, theta0_sha)]
    ordered = [rows[t] for t in cfg.names() + earlier]
    table = {
        "model": cfg.model, "theta0_sha256": theta0_sha, "config": {k: str(v) for k, v in asdict(cfg).items()},
        "rows": ordered,
        "average": {k: round(sum(r[k] for r in ordered) / len(ordered), 2)
                    for k in ("chance", "zero_shot", "fine_tuned")},
        "notes": notes,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(paths.table_json, table)
    atomic_write_text(paths.table_md, markdown_table(
        ["task", "classes", "chance", "zero_shot", "fine_tuned"],
        ordered + [{"task": "**average**", "classes": "", **table["average"]}],
        title=f"Test top-1 accuracy (%) of theta_0 ({cfg.model}) and fine-tuned encoders"))
    return table


def _built_on(paths: ArtifactPaths, task: str, theta0_sha: str) -> bool:
    path = paths.task_vector(task)
    if not path.exists():
        return False
    meta = vector_metadata(path)
    return (stored_recipe(meta) or {}).get("theta0_sha256", meta.get("theta0_sha256")) == theta0_sha


def _evaluate(encoder, head, vector: TaskVector, theta0, s: TaskSplits, device) -> dict:
    """Zero-shot and fine-tuned test accuracy of one task (the encoder is left at theta_0)."""
    zs = accuracy(encoder, head, s.test, device=device)
    encoder.load_state_dict(vector.apply_to(theta0))
    ft = accuracy(encoder, head, s.test, device=device)
    encoder.load_state_dict(theta0)
    majority = 100.0 * float((dataset_labels(s.test)[:, None] == range(s.num_classes)).mean(0).max())
    return {"task": s.name, "classes": s.num_classes, "chance": round(100.0 / s.num_classes, 2),
            "majority": round(majority, 2), "zero_shot": round(zs, 2), "fine_tuned": round(ft, 2)}
