"""``pyro-tvc prepare --modality text``: a frozen head and one task vector per text task on a local HF encoder.

Per task: theta_0's sentence features (mean-pooled) of the train split give a **linear probe** (multinomial
logistic regression, L2 chosen on val; trained once, then frozen: the text analogue of the zero-shot head), then the
top ``text_layers`` transformer layers are fine-tuned with that head frozen (Adam, ``finetune_steps`` steps) and
their difference to theta_0 is the task vector. The bottom layers stay frozen, so their output is computed once
(:func:`pyro_tvc.text.encoder.prefix_states`) and every later forward runs only the top layers: that is what keeps
six tasks under 20 minutes on 2 cores (docs/text.md gives the budget). Artefacts reuse the image layout
(:mod:`pyro_tvc.artifacts`) plus ``text_encoder.json`` (model folder, its sha256, start layer, sequence length).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pyro_tvc.artifacts import ArtifactPaths, head_metadata, save_head, vector_metadata
from pyro_tvc.backbones import ZeroShotHead
from pyro_tvc.data.text import TEXT_TASKS, TextSplit, is_text_task_path, load_text_task, text_task_name
from pyro_tvc.prepare import one_cycle
from pyro_tvc.recipes import RECIPE_KEY, canonical_json, recipe_sha256, stored_recipe
from pyro_tvc.reporting import markdown_table
from pyro_tvc.runtime import atomic_write_text, check_writable_folder, progress, read_json, resolve_device, \
    seed_everything, write_json
from pyro_tvc.task_vectors import TaskVector, state_dict_sha256
from pyro_tvc.text.encoder import (DEFAULT_TEXT_MODEL, SentenceEncoder, TextModelError, load_text_model, num_layers,
                                   prefix_states, resolve_model_folder, sentence_features,
                                   tokenize)
from pyro_tvc.text.metrics import PAPER_METRICS, paper_metric

TEXT_FORMAT = "pyro-tvc-text/1"
TEXT_DEFAULT_TASKS = ("sst2", "ag_news", "trec", "subj", "cola", "mrpc")
MAX_VAL, MAX_TEST = 300, 1000  # caps of the held-out splits (2-core budget; test is a fixed subset)


@dataclass(frozen=True)
class TextSettings:
    """What shapes theta_0's text inputs: the model folder, sequence length and the first fine-tuned layer."""

    folder: Path
    max_length: int
    start_layer: int


def encoder_info_path(root: Path) -> Path:
    return Path(root) / "text_encoder.json"


def is_text_artifacts(root: Path) -> bool:
    return encoder_info_path(root).is_file()


def read_encoder_info(root: Path) -> dict:
    info = read_json(encoder_info_path(root))
    if info.get("format") != TEXT_FORMAT:
        raise ValueError(f"{encoder_info_path(root)}: not a pyro-tvc text-encoder file (format {info.get('format')!r})")
    return info


def model_sha256(model) -> str:
    """sha256 of the model's weights as read from its folder: tensors the checkpoint lacks (e.g. a pooler, which
    Hugging Face initialises at random on every load) are left out, or the hash would change from load to load."""
    missing = getattr(model, "pyro_tvc_missing_keys", set())
    return state_dict_sha256({k: v for k, v in model.state_dict().items() if k not in missing})


def encode_split(model, tokenizer, split: TextSplit, settings: TextSettings, tail: SentenceEncoder,
                 batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prefix states [N, L, D+1], theta_0's features [N, D], labels [N])`` of one split."""
    tokens = tokenize(tokenizer, split.texts, settings.max_length)
    prefix = prefix_states(model, tokens, settings.start_layer, batch_size)
    return prefix, sentence_features(tail, prefix, batch_size), torch.as_tensor(split.labels)


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, l2_grid=(1e-4, 1e-3, 1e-2)) -> tuple[ZeroShotHead, float]:
    """Multinomial logistic regression on normalised features (L-BFGS), its L2 weight chosen on val accuracy.
    Returns the head (``logits = normalize(f) @ W^T``) and its val accuracy (%)."""
    x, xv = F.normalize(train_f, dim=-1), F.normalize(val_f, dim=-1)
    best = None
    for l2 in l2_grid:
        w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.T, train_y) + l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        acc = 100.0 * ((xv @ w.detach().T).argmax(-1) == val_y).float().mean().item()
        if best is None or acc > best[1]:
            best = (w.detach().clone(), acc)
    return ZeroShotHead(best[0], 1.0), best[1]


def finetune_tail(tail: SentenceEncoder, head: ZeroShotHead, prefix: torch.Tensor, labels: torch.Tensor, steps: int,
                  lr: float, batch_size: int, seed: int, quiet: bool, device) -> None:
    """Adam on the tail's parameters with the head frozen; batches drawn with their own seeded generator."""
    tail.train()
    tail.requires_grad_(True)
    opt = torch.optim.AdamW(tail.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    pos = 0
    for _ in progress(range(steps), quiet, desc="fine-tune"):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(labels), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(head(tail(prefix[idx].to(device))), labels[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    tail.eval()
    tail.requires_grad_(False)


def _scores(features: torch.Tensor, head: ZeroShotHead, labels: torch.Tensor, task: str) -> dict:
    """Accuracy (and the task's paper metric) in % of ``head`` on sentence ``features [N, D]``."""
    pred = head(features.to(head.weight.device)).argmax(-1).cpu()
    out = {"accuracy": round(100.0 * (pred == labels).float().mean().item(), 2)}
    metric = paper_metric(task, pred.numpy(), labels.numpy())
    if metric is not None:
        out[metric[0]] = round(metric[1], 2)
    return out


def validate_text(cfg) -> TextSettings:
    """Text-specific checks (unknown task, model folder, layers, length) before any work.

    Raises:
        ValueError: one line naming the option, what was given and what is accepted.
    """
    cfg.validate_numbers()
    unknown = [t for t in cfg.tasks if t not in TEXT_TASKS and not is_text_task_path(t)]
    if unknown or not cfg.tasks:
        raise ValueError(f"--tasks {unknown or '[]'}: unknown text task(s); shipped text tasks: {', '.join(TEXT_TASKS)}"
                         f" (or a folder of train.jsonl, test.jsonl, classes.txt)")
    names = [text_task_name(t) for t in cfg.tasks]
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise ValueError(f"--tasks: the names {repeated} are given more than once")
    for t in cfg.tasks:
        if is_text_task_path(t):
            if text_task_name(t) in TEXT_TASKS:
                raise ValueError(f"--tasks {t}: its name {text_task_name(t)!r} is a shipped text task's; rename the "
                                 f"folder")
            load_text_task(t)  # your own task is read (and refused) before anything is written
    if cfg.data_root is not None or cfg.pretrained is not None:
        raise ValueError("--modality text reads the shipped text sets and a model folder (--model PATH); "
                         "--data-root and --pretrained are for images")
    if not 8 <= cfg.max_length <= 512:
        raise ValueError(f"--max-length {cfg.max_length}: expected an integer in [8, 512]")
    return TextSettings(resolve_model_folder(cfg.model), cfg.max_length, -1)


def run_prepare_text(cfg) -> dict:
    """Build (or reuse) the text artefacts of ``cfg.tasks`` and return the table (probe vs fine-tuned, test).

    Every option and your own tasks are checked, and the model loaded, before anything is written. A head, vector
    and table row are reused only when all three record this run's recipe (encoder, data incl. test, steps).

    Raises:
        ValueError: bad options (one line), an image artefact folder as ``--out``, another encoder's artefacts in
            ``--out`` without ``--rebuild``; TextModelError / TextTaskError (ValueError subclasses).
    """
    settings = validate_text(cfg)
    paths = ArtifactPaths(Path(cfg.out))
    if paths.clip.exists():
        raise ValueError(f"--out {paths.root}: holds image artefacts (a CLIP theta_0); choose another --out for text")
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    model, tokenizer = load_text_model(settings.folder, device)
    layers = num_layers(model)
    if not 1 <= cfg.text_layers <= layers:
        raise TextModelError(f"--text-layers {cfg.text_layers}: the encoder has {layers} layers; expected 1..{layers}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.max_length > positions:
        raise TextModelError(f"--max-length {cfg.max_length}: the encoder has {positions} positions; expected at most "
                             f"that")
    check_writable_folder(cfg.out)
    settings = TextSettings(settings.folder, cfg.max_length, layers - cfg.text_layers)
    model_sha = model_sha256(model)
    default = str(cfg.model) == DEFAULT_TEXT_MODEL
    info = {"format": TEXT_FORMAT, "name": DEFAULT_TEXT_MODEL if default else settings.folder.name,
            "model": DEFAULT_TEXT_MODEL if default else str(settings.folder), "model_sha256": model_sha,
            "start_layer": settings.start_layer, "max_length": settings.max_length, "layers": layers}
    tail = SentenceEncoder(model, settings.start_layer).requires_grad_(False)
    theta0 = {k: v.detach().clone() for k, v in tail.state_dict().items()}
    theta0_sha = recipe_sha256({"model": model_sha, "start_layer": settings.start_layer,
                                "max_length": settings.max_length})
    info["theta0_sha256"] = theta0_sha
    previous = read_encoder_info(paths.root) if is_text_artifacts(paths.root) else None
    if previous is not None and previous.get("theta0_sha256") != theta0_sha:
        if not cfg.rebuild:
            raise ValueError(f"--out {paths.root}: holds text artefacts of another encoder setting (model, start "
                             f"layer or length); pass --rebuild to replace them or choose another --out")
        for stale in [*paths.root.glob("heads/*.safetensors"), *paths.root.glob("task_vectors/*.safetensors"),
                      paths.table_json, paths.table_md]:  # everything built on the old encoder goes
            stale.unlink(missing_ok=True)
        print(f"prepare: {paths.root}: another encoder setting; its heads, vectors and table removed (--rebuild)",
              file=sys.stderr)
    write_json(encoder_info_path(paths.root), info)
    hyper = {"steps": cfg.finetune_steps, "lr": cfg.finetune_lr, "batch_size": cfg.batch_size,
             "max_train": cfg.max_train, "seed": cfg.seed, "max_val": MAX_VAL, "max_test": MAX_TEST}
    table_prev = read_json(paths.table_json) if paths.table_json.exists() else {}
    rows = {r["task"]: r for r in table_prev.get("rows", []) if isinstance(r, dict) and "task" in r}
    names = [text_task_name(t) for t in cfg.tasks]
    for spec, task in progress(list(zip(cfg.tasks, names)), cfg.quiet, desc="text tasks"):
        data = load_text_task(spec, seed=cfg.seed, max_train=cfg.max_train, max_val=MAX_VAL, max_test=MAX_TEST)
        recipe = {"theta0_sha256": theta0_sha, "task": task, "data": recipe_sha256(
            {s: canonical_json([getattr(data, s).texts, getattr(data, s).labels.tolist()])
             for s in ("train", "val", "test")}), "classes": data.classes, "head": "linear_probe", "finetune": hyper}
        if is_text_task_path(spec):  # the benchmark finds your own task's texts again here
            recipe["path"] = str(Path(spec).expanduser().resolve())
        key = recipe_sha256(recipe)
        vec_path, head_path = paths.task_vector(task), paths.head(task)
        if vec_path.exists() and head_path.exists() and stored_recipe(vector_metadata(vec_path)) == recipe and \
                stored_recipe(head_metadata(head_path)) == {**recipe, "kind": "linear_probe"} and \
                rows.get(task, {}).get("recipe_sha256") == key:
            print(f"prepare: {task}: reusing its head and task vector (same recipe)", file=sys.stderr)
            continue
        rows.pop(task, None)  # never a row of an earlier recipe beside this run's head and vector
        splits = {s: encode_split(model, tokenizer, getattr(data, s), settings, tail) for s in ("train", "val", "test")}
        (xt, ft, yt), (_, fv, yv), (xs, fs, ys) = splits["train"], splits["val"], splits["test"]
        head, _ = linear_probe(ft, yt, fv, yv, data.num_classes)
        save_head(head, data.classes, head_path, {**recipe, "kind": "linear_probe"})
        head = head.to(device)
        probe = _scores(fs, head, ys, task)  # theta_0's test features, computed once above
        finetune_tail(tail, head, xt, yt, cfg.finetune_steps, cfg.finetune_lr, cfg.batch_size, cfg.seed, cfg.quiet,
                      device)
        vector = TaskVector.from_state_dicts(theta0, tail.state_dict(), task=task, backbone=info["name"])
        vector.meta["theta0_sha256"] = theta0_sha
        vector.meta[RECIPE_KEY] = canonical_json(recipe)
        vector.save(vec_path)
        tuned = _scores(sentence_features(tail, xs), head, ys, task)
        tail.load_state_dict(theta0)
        majority = 100.0 * float(np.bincount(ys.numpy(), minlength=data.num_classes).max() / max(1, len(ys)))
        metric = PAPER_METRICS.get(task, ("accuracy",))[0]
        rows[task] = {"task": task, "classes": data.num_classes, "chance": round(100.0 / data.num_classes, 2),
                      "majority": round(majority, 2), "zero_shot": probe["accuracy"], "fine_tuned": tuned["accuracy"],
                      "metric": metric, "probe_metric": probe.get(metric), "fine_tuned_metric": tuned.get(metric),
                      "train": len(yt), "val": len(yv), "test": len(ys), "recipe_sha256": key}
    ordered = [rows[t] for t in names] + [r for t, r in rows.items() if t not in names  # earlier tasks, same encoder
                                           and paths.task_vector(t).exists() and "metric" in r and
                                           vector_metadata(paths.task_vector(t)).get("theta0_sha256") == theta0_sha]
    table = {"model": info["model"], "modality": "text", "theta0_sha256": theta0_sha, "encoder": info,
             "config": {k: str(v) for k, v in vars(cfg).items()}, "rows": ordered,
             "average": {k: round(sum(r[k] for r in ordered) / len(ordered), 2)
                         for k in ("chance", "zero_shot", "fine_tuned")},
             "seconds": round(time.perf_counter() - t_start, 1)}
    write_json(paths.table_json, table)
    shown = [{**r, "paper metric": f"{r['metric']}: {r['probe_metric']} -> {r['fine_tuned_metric']}"
              if r["metric"] != "accuracy" else ""} for r in ordered]
    atomic_write_text(paths.table_md, markdown_table(
        ["task", "classes", "chance", "zero_shot", "fine_tuned", "paper metric"],
        shown + [{"task": "**average**", "classes": "", "paper metric": "", **table["average"]}],
        title=f"Test accuracy (%) of theta_0's linear probe (zero_shot column) and of the fine-tuned top "
              f"{layers - settings.start_layer} layers ({info['name']}, {settings.max_length} tokens)"))
    return table

