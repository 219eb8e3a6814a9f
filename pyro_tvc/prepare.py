"""``pyro-tvc prepare``: theta_0, zero-shot heads and one real task vector per task, cached on disk.

Embedded default (no ``--pretrained``): the tiny open_clip CLIP is pre-trained contrastively on a small share of
every task's training split, short enough to stay *broad but weak* (docs/embedded-default.md explains the recipe),
then each task gets a zero-shot head from its class names and prompt templates, and the image encoder is
fine-tuned on the task with that head frozen (the task_vectors / aTLAS protocol). With ``--pretrained FILE`` the
pre-training is skipped and theta_0 is the given checkpoint (e.g. ViT-B-32 with ``--data-root``).
Every stage is cached: a re-run skips finished parts (a file exists and matches theta_0's hash).
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from pyro_tvc.artifacts import ArtifactPaths, load_clip, load_head, save_clip, save_head
from pyro_tvc.backbones import TINY_MODEL, ZeroShotHead, create_clip, image_encoder, tokenizer_for, zero_shot_head
from pyro_tvc.data import EMBEDDED_TASKS, TaskSplits, dataset_labels, infinite_batches, load_task
from pyro_tvc.data.prompts import templates_for
from pyro_tvc.evaluation import accuracy
from pyro_tvc.runtime import progress, resolve_device, seed_everything, write_json, read_json
from pyro_tvc.task_vectors import TaskVector, state_dict_sha256


@dataclass
class PrepareConfig:
    out: Path = Path("artifacts") / TINY_MODEL
    model: str = TINY_MODEL
    pretrained: Path | None = None
    data_root: Path | None = None
    tasks: list[str] = field(default_factory=lambda: list(EMBEDDED_TASKS))
    pretrain_steps: int = 150
    pretrain_lr: float = 1e-3
    pretrain_fraction: float = 0.1
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    batch_size: int = 128
    max_train: int | None = None
    seed: int = 0
    device: str = "auto"
    quiet: bool = False


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
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                pct_start=0.1)
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
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


# --- fine-tuning ------------------------------------------------------------------------------------------------

def finetune_encoder(encoder: torch.nn.Module, head: ZeroShotHead, splits: TaskSplits, cfg: PrepareConfig,
                     device) -> dict[str, torch.Tensor]:
    """Fine-tune the image encoder with the head frozen; returns the fine-tuned state dict (encoder left unchanged)."""
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.finetune_lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.finetune_lr, total_steps=cfg.finetune_steps,
                                                pct_start=0.1)
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
        bar.set_postfix(loss=f"{loss.item():.3f}")
    encoder.eval()
    finetuned = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(theta0)
    return finetuned


# --- the whole pipeline -----------------------------------------------------------------------------------------

def _load_splits(cfg: PrepareConfig, transform) -> dict[str, TaskSplits]:
    kw = {} if cfg.data_root else {"max_train": cfg.max_train}
    return {t: load_task(t, cfg.data_root, transform, **kw) for t in cfg.tasks}


def _theta0(cfg: PrepareConfig, paths: ArtifactPaths, device, splits_for_pretraining) -> torch.nn.Module:
    if paths.clip.exists():
        model, name = load_clip(paths.clip, device)
        if name != cfg.model:
            raise ValueError(f"{paths.clip} holds {name!r}, not {cfg.model!r}: use another --out")
        return model
    if cfg.pretrained is None and cfg.model != TINY_MODEL:
        raise ValueError(f"--model {cfg.model} needs --pretrained FILE (only {TINY_MODEL} is pre-trained locally)")
    torch.manual_seed(cfg.seed)
    # open_clip's own loader reads state dicts, its training checkpoints, safetensors and OpenAI's TorchScript files.
    model = create_clip(cfg.model, pretrained=cfg.pretrained, device=str(device))
    if cfg.pretrained is None:
        pretrain_clip(model, splits_for_pretraining(), cfg, device)
    save_clip(model, cfg.model, paths.clip)
    return model.eval()


def run_prepare(cfg: PrepareConfig) -> dict:
    """Build (or reuse) every artefact and return the accuracy table."""
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {cfg.pretrained}: no such file (pyro-tvc loads local weights only)")
    if cfg.data_root is not None and not Path(cfg.data_root).is_dir():
        raise FileNotFoundError(f"--data-root {cfg.data_root}: no such folder")
    if cfg.data_root is not None and cfg.pretrained is None and not ArtifactPaths(Path(cfg.out)).clip.exists():
        raise ValueError("pre-training theta_0 uses the embedded sets; with --data-root pass --pretrained FILE")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    paths = ArtifactPaths(Path(cfg.out))
    t_start = time.perf_counter()
    splits_cache: dict[str, TaskSplits] = {}
    transform: list = [None]  # set once theta_0 exists (real data sets need the model's preprocessing)

    def splits() -> dict[str, TaskSplits]:
        if not splits_cache:
            splits_cache.update(_load_splits(cfg, transform[0]))
        return splits_cache

    model = _theta0(cfg, paths, device, splits)
    encoder = image_encoder(model)
    if cfg.data_root is not None:
        transform[0] = open_clip.image_transform(encoder.image_size, is_train=False)
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    theta0_sha = state_dict_sha256(theta0)
    tokenizer = tokenizer_for(cfg.model)
    previous = read_json(paths.table_json) if paths.table_json.exists() else {}
    rows = {r["task"]: r for r in previous.get("rows", []) if previous.get("theta0_sha256") == theta0_sha}
    for task in progress(cfg.tasks, cfg.quiet, desc="tasks"):
        s = splits()[task]
        if paths.head(task).exists():
            head, _ = load_head(paths.head(task), device)
        else:
            head = zero_shot_head(model, tokenizer, s.classes, task)
            save_head(head, s.classes, paths.head(task))
        vec_path = paths.task_vector(task)
        vector = TaskVector.load(vec_path) if vec_path.exists() else None
        if vector is None or vector.meta.get("theta0_sha256") != theta0_sha:
            finetuned = finetune_encoder(encoder, head, s, cfg, device)
            vector = TaskVector.from_state_dicts(theta0, finetuned, task=task, backbone=cfg.model)
            vector.save(vec_path)
            rows.pop(task, None)
        if task not in rows:
            zs = accuracy(encoder, head, s.test, device=device)
            encoder.load_state_dict(vector.apply_to(theta0))
            ft = accuracy(encoder, head, s.test, device=device)
            encoder.load_state_dict(theta0)
            chance = 100.0 * float((dataset_labels(s.test)[:, None] == range(s.num_classes)).mean(0).max())
            rows[task] = {"task": task, "classes": s.num_classes, "chance": round(100.0 / s.num_classes, 2),
                          "majority": round(chance, 2), "zero_shot": round(zs, 2), "fine_tuned": round(ft, 2)}
    ordered = [rows[t] for t in cfg.tasks]
    table = {
        "model": cfg.model, "theta0_sha256": theta0_sha, "config": {k: str(v) for k, v in asdict(cfg).items()},
        "rows": ordered,
        "average": {k: round(sum(r[k] for r in ordered) / len(ordered), 2)
                    for k in ("chance", "zero_shot", "fine_tuned")},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(paths.table_json, table)
    from pyro_tvc.reporting import markdown_table

    paths.table_md.parent.mkdir(parents=True, exist_ok=True)
    paths.table_md.write_text(markdown_table(
        ["task", "classes", "chance", "zero_shot", "fine_tuned"],
        ordered + [{"task": "**average**", "classes": "", **table["average"]}],
        title=f"Test top-1 accuracy (%) of theta_0 ({cfg.model}) and fine-tuned encoders"))
    return table
