"""SVI for VTVC: set-up from prepared artefacts, the training loop, Predictive-based evaluation, checkpoints.

The ELBO estimator is ``TraceMeanField_ELBO``: the closed-form spike-and-slab KL (registered for the pair) and a
straight-through draw of the coefficients for the expected log likelihood (unbiased loss value; biased gradient of
the inclusion logits only: see docs/inference.md). Minibatches are subsampled plates, so every loss is that of the
whole training set; ``kl_weight`` != 1 is an explicit tempering recorded in the run's config.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO

from pyro_tvc import distributed
from pyro_tvc.artifacts import ArtifactPaths, clip_metadata, load_bank, load_clip, prepared_tasks, target_head
from pyro_tvc.backbones import image_encoder, input_size
from pyro_tvc.compose.engine import Composer
from pyro_tvc.data.custom import is_task_path, task_name
from pyro_tvc.data.targets import load_target
from pyro_tvc.evaluation import encode_target, nll
from pyro_tvc.guides import GateConfig
from pyro_tvc.heads import MultiHead
from pyro_tvc.models import ClassificationLikelihood, PriorConfig
from pyro_tvc.runtime import progress, resolve_device, seed_everything, write_json
from pyro_tvc.variants import get_variant


DEFAULT_ARTIFACTS = Path("artifacts") / "pyro-tvc-tiny"


@dataclass
class TrainConfig:
    """SVI of a VTVC model on one target, composing the other prepared tasks' vectors per input.

    Args:
        artifacts: Folder written by ``pyro-tvc prepare``.
        target: Target task: a prepared task's name, or the path of your own task (an ImageFolder tree, .npz or
            .csv; docs/custom-tasks.md), whose zero-shot head is built from its class names if not prepared.
        out: Run folder (default: runs/<target>-<guide>); refused when not empty unless --overwrite or --resume.
        tasks: Task vectors to compose (default: every prepared vector but the target's).
        guide: Inference variant (model + guide), see docs/inference.md: gated, spike_slab, point, gaussian,
            task_level, and the v2 models.
        epochs: Passes over the training split; the epoch with the best validation accuracy is kept.
        batch_size: Minibatch size (the plate subsamples it; the ELBO stays that of the whole split).
        lr: Adam learning rate (ClippedAdam).
        final_lr_fraction: Learning rate at the last step as a fraction of lr (exponential decay).
        clip_norm: Gradient-norm clip.
        kl_weight: Multiplies the KL; 1 = the true ELBO; default: the variant's (1e-3 for the first-generation
            guides, 1 for the v2 models).
        particles: ELBO particles per step.
        rank: Low-rank composition rank (default: full rank, exact).
        parts: aTLAS x K: coefficients per parameter block.
        inclusion_prob: Prior inclusion probability pi, in (0, 1).
        slab_scale: Prior slab standard deviation (> 0).
        learn_inclusion: Learn pi by type-II maximum likelihood: none, global or per_task.
        init_scale: Initial posterior scale sigma (< max_scale).
        max_scale: Cap on the posterior scale sigma.
        hidden: Width of the amortized guide's hidden layer.
        gate: The gate's thresholds (importance, inclusion, coefficient of variation).
        deviation_scale: Hierarchical models: initial s of the per-input deviations delta_i ~ N(0, s^2), learned
            by type-II maximum likelihood (> 0, < max_scale).
        deviation_per: Hierarchical models: one s per task and block (block) or per task (task).
        global_step_multiplier: Hierarchical models: effective learning-rate multiplier of q(Lambda).
        shift_multiplier: Conditional models: effective learning-rate multiplier of the posterior's label shift.
        eval_samples: Posterior draws of the Monte-Carlo predictive.
        elbo_particles: Particles of the reported true ELBO.
        max_train: Cap on training images (fast mode).
        shots: Keep k labelled training images per class (seeded, stratified; aTLAS's few-shot setting).
        skip_bad_images: Leave out unreadable files of a target given by path (counted) instead of refusing them.
        data_root: Folder of real data sets (torchvision layout, as ``prepare --data-root``) when the target or a
            composed task is a real set prepared from it; read with the model's own preprocessing, streamed.
        patience: Stop after this many epochs without validation improvement (default: run every epoch).
        seed: Random seed.
        device: auto (CUDA when present), cpu or cuda[:i].
        quiet: No progress bars.
        overwrite: Replace a non-empty --out.
        resume: Continue an interrupted run in --out from its last epoch checkpoint.
    """

    artifacts: Path = DEFAULT_ARTIFACTS
    target: str = "mnist"
    out: Path | None = None
    tasks: list[str] | None = None
    guide: str = "gated"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-2
    final_lr_fraction: float = 0.1
    clip_norm: float = 10.0
    kl_weight: float | None = None
    particles: int = 1
    rank: int | None = None
    parts: int = 1
    inclusion_prob: float = 0.5
    slab_scale: float = 1.0
    learn_inclusion: str = "none"
    init_scale: float = 0.02
    max_scale: float = 0.1
    hidden: int = 256
    gate: GateConfig = field(default_factory=GateConfig)
    deviation_scale: float = 0.05
    deviation_per: str = "block"
    global_step_multiplier: float = 10.0
    shift_multiplier: float = 0.01
    eval_samples: int = 16
    elbo_particles: int = 8
    max_train: int | None = None
    shots: int | None = None
    skip_bad_images: bool = False
    data_root: Path | None = None
    patience: int | None = None
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self):
        variant = get_variant(self.guide)  # raises on an unknown name, listing the known ones
        if self.kl_weight is None:
            self.kl_weight = variant.default_kl_weight
        if self.out is None:
            name = task_name(self.target) if is_task_path(self.target) else self.target
            self.out = Path("runs") / f"{name}-{self.guide}"
        checks = [("kl_weight", self.kl_weight > 0, "> 0"), ("epochs", self.epochs >= 1, ">= 1"),
                  ("batch_size", self.batch_size >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                  ("final_lr_fraction", 0 < self.final_lr_fraction <= 1, "in (0, 1]"),
                  ("clip_norm", self.clip_norm > 0, "> 0"), ("particles", self.particles >= 1, ">= 1"),
                  ("rank", self.rank is None or self.rank >= 1, ">= 1"), ("parts", self.parts >= 1, ">= 1"),
                  ("inclusion_prob", 0 < self.inclusion_prob < 1, "in (0, 1)"),
                  ("slab_scale", self.slab_scale > 0, "> 0"),
                  ("learn_inclusion", self.learn_inclusion in ("none", "global", "per_task"), "none|global|per_task"),
                  ("init_scale", 0 < self.init_scale < self.max_scale, f"in (0, max_scale={self.max_scale})"),
                  ("hidden", self.hidden >= 1, ">= 1"),
                  ("deviation_scale", 0 < self.deviation_scale < self.max_scale, f"in (0, max_scale={self.max_scale})"),
                  ("deviation_per", self.deviation_per in ("block", "task"), "block|task"),
                  ("global_step_multiplier", self.global_step_multiplier > 0, "> 0"),
                  ("shift_multiplier", self.shift_multiplier > 0, "> 0"), ("eval_samples", self.eval_samples >= 1, ">= 1"),
                  ("elbo_particles", self.elbo_particles >= 1, ">= 1"),
                  ("max_train", self.max_train is None or self.max_train >= 1, ">= 1"),
                  ("shots", self.shots is None or self.shots >= 1, ">= 1"),
                  ("patience", self.patience is None or self.patience >= 1, ">= 1"),
                  ("seed", self.seed >= 0, ">= 0")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {getattr(self, name)}")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume exclude each other: choose one")
        check_data_root(self.data_root)


def check_data_root(data_root) -> None:
    """Raises ValueError: ``--data-root`` given but not a folder."""
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise ValueError(f"--data-root {data_root}: no such folder; expected the folder of real data sets "
                         f"(torchvision layout) that prepare --data-root read")


def real_transform(encoder, data_root):
    """The model's own evaluation preprocessing for real sets (open_clip's), or None without ``data_root``."""
    if data_root is None:
        return None
    import open_clip

    return open_clip.image_transform(input_size(encoder), is_train=False)


@dataclass
class Problem:
    """Everything SVI needs: data with pre-trained features, the likelihood, model and guide.

    ``splits[name] = (images [N, 3, H, W], features [N, D], labels [N])``; ``task_ids[name]`` is ``[N]`` (which
    task's head scores each input, for mixed-task data such as task addition) or None (one head).
    """

    cfg: TrainConfig
    composer: Composer
    head: object
    likelihood: ClassificationLikelihood
    model: object
    guide: object
    prior: PriorConfig
    splits: dict
    classes: list[str]
    task_ids: dict = field(default_factory=dict)
    data_choices: dict = field(default_factory=dict)  # how the target's splits were made (shots, val source)

    def kwargs(self, split: str, indices=None, kl_weight=None) -> dict:
        return dict(likelihood=self.likelihood, num_data=len(self.splits[split][2]), indices=indices,
                    prior=self.prior, kl_weight=self.cfg.kl_weight if kl_weight is None else kl_weight)

    @contextlib.contextmanager
    def heads_for(self, split: str, idx):
        """Score the rows of ``split[idx]`` with their own tasks' heads inside this block (no-op for one head)."""
        ids = self.task_ids.get(split)
        if ids is None or not isinstance(self.head, MultiHead):
            yield
            return
        with self.head.using(ids[idx]):
            yield


def make_problem(cfg: TrainConfig, encoder, bank, head, splits: dict, classes: list[str],
                 task_ids: dict | None = None) -> Problem:
    """Assemble a :class:`Problem` from loaded pieces (the benchmark reuses one encoding for many methods)."""
    device = splits["train"][2].device
    composer = Composer(encoder, bank, method="fast", rank=cfg.rank, parts=cfg.parts).to(device)
    T, B = composer.coefficient_shape
    likelihood = ClassificationLikelihood(composer, head)
    prior = PriorConfig(cfg.inclusion_prob, cfg.slab_scale, cfg.learn_inclusion)
    variant = get_variant(cfg.guide)
    guide = variant.build_guide(splits["train"][1].shape[1], T, B, cfg)
    if isinstance(guide, torch.nn.Module):
        guide.to(device)
    # A guide that owns model parameters (the conditional prior network) offers the model bound to them.
    model = getattr(guide, "model", None) or variant.model
    return Problem(cfg, composer, head, likelihood, model, guide, prior, splits, classes, task_ids or {})


def build_problem(cfg: TrainConfig) -> Problem:
    """Load theta_0, the target's head and data, and the other prepared tasks' vectors (or ``cfg.tasks``).

    Raises:
        ValueError: the target, or a task of ``cfg.tasks``, has no prepared head/vector in ``cfg.artifacts``.
    """
    device = distributed.local_device(resolve_device(cfg.device))
    paths = ArtifactPaths(Path(cfg.artifacts))
    clip, model_name = load_clip(paths.clip, device)
    encoder = image_encoder(clip)
    available = prepared_tasks(paths)
    if not is_task_path(cfg.target) and not paths.head(cfg.target).exists():
        hint = f"./{cfg.target}" if Path(cfg.target).exists() else "its path"
        raise ValueError(f"target {cfg.target!r} has no prepared head/vector in {paths.root}; "
                         f"prepared: {', '.join(available)}; for your own task give {hint} (docs/custom-tasks.md)")
    target = load_target(cfg.target, cfg.seed, cfg.shots, cfg.max_train, input_size(encoder), cfg.skip_bad_images,
                         cfg.data_root, real_transform(encoder, cfg.data_root))
    tasks = cfg.tasks or [t for t in available if t != target.name]
    unknown = [t for t in tasks if t not in available]
    if unknown or not tasks:
        raise ValueError(f"--tasks {' '.join(tasks) or '(empty)'}: need prepared task vectors; "
                         f"prepared: {', '.join(available)}")
    theta0 = clip_metadata(paths.clip).get("theta0_sha256")
    # after every check: this may write the feature cache
    splits = encode_target(encoder, target.splits, theta0, paths.root / "features", device)
    bank = load_bank(paths, tasks)
    head = target_head(paths, clip, model_name, target.name, target.classes, device)
    problem = make_problem(cfg, encoder, bank, head, splits, target.classes)
    problem.data_choices = target.choices
    return problem


@contextlib.contextmanager
def ungated(guide):
    """Draw from the plain posterior (the unbiased estimator) even if the guide gates its training draws."""
    gate = getattr(guide, "gate", None)
    if gate is None or not gate.gate_in_training:
        yield
        return
    gate.gate_in_training = False
    try:
        yield
    finally:
        gate.gate_in_training = True


def batches(n: int, batch_size: int, generator: torch.Generator, device):
    order = torch.randperm(n, generator=generator)
    for s in range(0, n, batch_size):
        yield order[s:s + batch_size].to(device)


def _tensors(problem: Problem, split: str, idx):
    x, f, y = problem.splits[split]
    return x[idx], f[idx], y[idx]


def _chunks(n: int, batch_size: int, device):
    for s in range(0, n, batch_size):
        yield torch.arange(s, min(s + batch_size, n), device=device)


@torch.no_grad()
def true_elbo_per_datum(problem: Problem, split: str = "train", max_items: int = 512) -> float:
    """ELBO / N with kl_weight = 1 and the ungated posterior (unbiased estimate), on up to ``max_items`` items."""
    n = len(problem.splits[split][2])
    idx = torch.arange(min(n, max_items), device=problem.splits[split][2].device)
    elbo = TraceMeanField_ELBO(num_particles=problem.cfg.elbo_particles, vectorize_particles=True, max_plate_nesting=1)
    with ungated(problem.guide), problem.heads_for(split, idx):
        x, f, y = _tensors(problem, split, idx)
        loss = elbo.loss(problem.model, problem.guide, x, f, y, **problem.kwargs(split, idx, kl_weight=1.0))
    return -loss / n


@torch.no_grad()
def predictive_probs(problem: Problem, split: str, samples: int, batch_size: int = 256, gated: bool = False):
    """Monte-Carlo posterior predictive class probabilities ``[S, N, C]`` (``pyro.infer.Predictive``)."""
    x_all, f_all, _ = problem.splits[split]
    out = []
    pred = Predictive(problem.model, guide=problem.guide, num_samples=samples, return_sites=("probs",), parallel=True)
    ctx = contextlib.nullcontext() if gated else ungated(problem.guide)
    with ctx:
        for idx in _chunks(len(x_all), batch_size, x_all.device):
            with problem.heads_for(split, idx):
                draws = pred(x_all[idx], f_all[idx], None, **problem.kwargs(split, idx))["probs"]
            out.append(draws.reshape(samples, len(idx), -1))
    return torch.cat(out, dim=1)


@torch.no_grad()
def point_predictions(problem: Problem, split: str, batch_size: int = 256):
    """Deterministic single-model prediction per input (hard gate): probabilities ``[N, C]`` and ``lambda [N, T, B]``."""
    x_all, f_all, _ = problem.splits[split]
    probs, coefs = [], []
    for idx in _chunks(len(x_all), batch_size, x_all.device):
        x, f = x_all[idx], f_all[idx]
        lam = problem.guide.point_estimate(f)
        with problem.heads_for(split, idx):
            probs.append(problem.likelihood.logits(x, lam).softmax(-1))
        coefs.append(lam.expand(len(x), *lam.shape[-2:]) if lam.ndim == 2 else lam)
    return torch.cat(probs), torch.cat(coefs)


@torch.no_grad()
def zero_shot_accuracy(problem: Problem, split: str = "test") -> float:
    x_all, _, y = problem.splits[split]
    T, B = problem.composer.coefficient_shape
    correct = 0
    for idx in _chunks(len(x_all), 512, x_all.device):
        with problem.heads_for(split, idx):
            logits = problem.likelihood.logits(x_all[idx], torch.zeros(T, B, device=x_all.device))
        correct += (logits.argmax(-1) == y[idx]).sum().item()
    return 100.0 * correct / len(y)


def mc_accuracy_with_se(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy (%) of the MC-averaged predictive ``probs [S, N, C]`` and its jackknife standard error over the S
    draws (%): how much the printed accuracy would move with another set of draws of the same size."""
    S = probs.shape[0]
    acc = 100.0 * (probs.mean(0).argmax(-1) == labels).float().mean().item()
    if S < 2:
        return acc, float("nan")
    loo = (probs.sum(0, keepdim=True) - probs) / (S - 1)  # [S, N, C] leave-one-draw-out averages
    acc_loo = 100.0 * (loo.argmax(-1) == labels).float().mean(-1)
    se = ((S - 1) / S * ((acc_loo - acc_loo.mean()) ** 2).sum()).sqrt().item()
    return acc, se


def evaluate(problem: Problem, split: str = "test") -> dict:
    """Test metrics; names and units in docs/glossary.md. The MC predictive uses ``cfg.eval_samples`` draws of the
    ungated posterior (the gated one too when the guide has a gate); single-model = ``guide.point_estimate``."""
    variant = get_variant(problem.cfg.guide)
    y = problem.splits[split][2]
    point, coefs = point_predictions(problem, split)
    out = {"zero_shot_accuracy": zero_shot_accuracy(problem, split)}
    if not variant.point_only:
        # Reseeded so that diagnose and the notebook, which reseed with the run's seed, print the same numbers.
        torch.manual_seed(problem.cfg.seed)
        pyro.set_rng_seed(problem.cfg.seed)
        probs = predictive_probs(problem, split, problem.cfg.eval_samples)
        acc, se = mc_accuracy_with_se(probs, y)
        out |= {"mc_accuracy": acc, "mc_accuracy_se": se, "mc_nll": nll(probs.mean(0), y),
                "mc_samples": problem.cfg.eval_samples}
        if variant.has_gate:
            torch.manual_seed(problem.cfg.seed)
            pyro.set_rng_seed(problem.cfg.seed)
            out["gated_mc_accuracy"] = 100.0 * (predictive_probs(problem, split, problem.cfg.eval_samples, gated=True)
                                                .mean(0).argmax(-1) == y).float().mean().item()
    out |= {"single_model_accuracy": 100.0 * (point.argmax(-1) == y).float().mean().item(),
            "single_model_nll": nll(point, y), "exact_zero_fraction": (coefs == 0).float().mean().item()}
    return out


def _param_state() -> dict:
    return {k: v.detach().cpu().clone() for k, v in pyro.get_param_store().items()}


def save_checkpoint(state: dict, path: Path) -> None:
    """Write a training checkpoint atomically (a crash mid-write leaves the previous file intact)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, device="cpu") -> dict:
    """Load a training checkpoint with ``weights_only=True`` (tensors, numbers and containers only)."""
    return torch.load(path, map_location=device, weights_only=True)


def latest_epoch_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = sorted(Path(checkpoint_dir).glob("epoch*.pt"), key=lambda p: int(p.stem[5:]))
    return found[-1] if found else None


def restore_params(problem: Problem, state: dict) -> None:
    """Put a checkpoint's parameters back: the guide network's into its module (``pyro.module`` names them
    ``<guide name>$$$<parameter>``), the rest (task-level guide, learned prior) into Pyro's param store."""
    device = problem.splits["train"][2].device
    if isinstance(problem.guide, torch.nn.Module):
        prefix = f"{problem.guide.name}$$$"
        problem.guide.load_state_dict({k[len(prefix):]: v for k, v in state["params"].items() if k.startswith(prefix)})
    store = pyro.get_param_store()
    for name, value in state["params"].items():
        if "$$$" not in name:
            store[name] = value.to(device)


def val_single_model_accuracy(problem: Problem) -> float:
    point, _ = point_predictions(problem, "val")
    return 100.0 * (point.argmax(-1) == problem.splits["val"][2]).float().mean().item()


class NonFiniteLossError(RuntimeError):
    """SVI produced a NaN/inf loss; training stopped and the last good checkpoint was kept."""


def fit(problem: Problem, checkpoint_dir: Path | None = None, resume: bool = False,
        score_fn=None) -> tuple[list[float], list[dict]]:
    """Run SVI on ``problem`` in place and keep the epoch with the best validation score: single-model accuracy,
    or ``score_fn(problem) -> float | None`` (higher is better, None = inadmissible) when given.

    Every epoch writes ``checkpoint_dir/epoch<k>.pt`` with parameters, optimiser state, RNG states and the best
    epoch so far, so ``resume=True`` continues an interrupted run to the same result as an uninterrupted one.
    Returns (tempered loss per datum per step, per-epoch validation records).

    Raises:
        NonFiniteLossError: a step gave a non-finite loss (the message names the step and epoch).
    """
    cfg = problem.cfg
    n_train = len(problem.splits["train"][2])
    steps_per_epoch = -(-n_train // cfg.batch_size)
    steps = cfg.epochs * steps_per_epoch
    optim = pyro.optim.ClippedAdam({"lr": cfg.lr, "clip_norm": cfg.clip_norm,
                                    "lrd": cfg.final_lr_fraction ** (1.0 / max(1, steps))})
    elbo = TraceMeanField_ELBO(num_particles=cfg.particles, vectorize_particles=cfg.particles > 1, max_plate_nesting=1)
    svi = SVI(problem.model, problem.guide, optim, elbo)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, epochs, best, first_epoch = [], [], None, 0
    last = latest_epoch_checkpoint(checkpoint_dir) if (resume and checkpoint_dir is not None) else None
    if last is not None:
        state = load_checkpoint(last)
        restore_params(problem, state)
        optim.set_state(state["optim"])
        torch.set_rng_state(state["rng"]["torch"])
        gen.set_state(state["rng"]["batches"])
        history, epochs, best, first_epoch = state["history"], state["epochs"], state["best"], state["epoch"]
    t0 = time.perf_counter() - (epochs[-1]["seconds"] if epochs else 0.0)
    bar = progress(total=steps, initial=first_epoch * steps_per_epoch, quiet=cfg.quiet,
                   desc=f"SVI {cfg.guide} on {cfg.target}")
    stale = 0
    kill_at = int(os.environ.get("PYRO_TVC_TEST_KILL_AT_STEP", "0"))  # crash-safety tests only (tests/test_runs.py)
    rank, size = distributed.world(problem.splits["train"][2].device)
    distributed.check_batch(cfg.batch_size, n_train, size)
    if size > 1 and last is None:
        torch.manual_seed(cfg.seed + 7919 * rank)  # independent posterior draws per rank (the batches stay shared)
    checkpoint_dir = checkpoint_dir if rank == 0 else None  # rank 0 alone writes
    for epoch in range(first_epoch, cfg.epochs):
        for batch in batches(n_train, cfg.batch_size, gen, problem.splits["train"][2].device):
            idx = distributed.shard(batch, rank, size)  # the global batch order is the same on every rank
            x, f, y = _tensors(problem, "train", idx)
            with problem.heads_for("train", idx), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Encountered NaN")  # handled just below, with a message
                if size == 1:
                    loss = svi.step(x, f, y, **problem.kwargs("train", idx))
                else:
                    loss = distributed.step(svi, len(idx) / len(batch), x, f, y, **problem.kwargs("train", idx))
            if not math.isfinite(loss):
                bar.close()
                kept = f"the last good checkpoint is epoch{epoch}.pt" if epoch else "no checkpoint was written"
                raise NonFiniteLossError(f"non-finite loss at step {len(history) + 1} (epoch {epoch + 1}) of "
                                         f"{cfg.guide} on {cfg.target}; {kept}; try a smaller --lr")
            history.append(loss / n_train)
            if kill_at and len(history) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            bar.update(1)
            if len(history) % 10 == 0:
                bar.set_postfix(tempered_loss_per_datum=f"{history[-1]:.3f}", refresh=False)
        val = val_single_model_accuracy(problem) if score_fn is None else score_fn(problem)
        epochs.append({"epoch": epoch + 1, "val_single_model_accuracy": val, "seconds": time.perf_counter() - t0})
        if best is None or (val is not None and (best["val_single_model_accuracy"] is None
                                                 or val > best["val_single_model_accuracy"])):
            best, stale = {"epoch": epoch + 1, "val_single_model_accuracy": val, "params": _param_state()}, 0
        else:
            stale += 1
        if checkpoint_dir is not None:
            save_checkpoint({"epoch": epoch + 1, "params": _param_state(), "optim": optim.get_state(),
                             "rng": {"torch": torch.get_rng_state(), "batches": gen.get_state()},
                             "history": history, "epochs": epochs, "best": best},
                            Path(checkpoint_dir) / f"epoch{epoch + 1}.pt")
        if cfg.patience is not None and stale >= cfg.patience:
            break
    bar.close()
    restore_params(problem, best)
    if checkpoint_dir is not None:
        save_checkpoint({"epoch": best["epoch"], "params": best["params"], "selected_by": "val_single_model_accuracy"},
                        Path(checkpoint_dir) / "final.pt")
    return history, epochs


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate and write the run folder ``cfg.out``; returns the results dict.

    Raises:
        ValueError: ``cfg.out`` holds files and neither ``overwrite`` nor ``resume`` is set.
    """
    from pyro_tvc.runs import prepare_run_folder, run_config_record

    seed_everything(cfg.seed)
    pyro.clear_param_store()
    problem = build_problem(cfg)  # every input checked before the run folder is touched
    rank, size = distributed.world(problem.splits["train"][2].device)
    out = Path(cfg.out)
    if rank == 0:
        out = prepare_run_folder(out, overwrite=cfg.overwrite, resume=cfg.resume)
        write_json(out / "config.json", run_config_record(cfg, problem) | {"world_size": size})
        (out / "checkpoints").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    history, epochs = fit(problem, out / "checkpoints", resume=cfg.resume)
    train_seconds = time.perf_counter() - t0
    if rank != 0:
        return {}  # every rank holds the same parameters; rank 0 evaluates and writes
    variant = get_variant(cfg.guide)
    results = {"target": cfg.target, "guide": cfg.guide, "data": problem.data_choices, "tasks": list(problem.composer.task_names),
               "kl_weight": cfg.kl_weight, "train_seconds": train_seconds,
               "selected_epoch": load_checkpoint(out / "checkpoints" / "final.pt")["epoch"],
               **evaluate(problem, "test"),
               "true_elbo_per_datum": None if variant.point_only else true_elbo_per_datum(problem), "epochs": epochs}
    if hasattr(problem.guide, "masks"):  # one name per quantity: the benchmark's (docs/glossary.md)
        from pyro_tvc.guides.gated import gate_statistics

        results |= gate_statistics(problem.guide, problem.splits["test"][1])
    write_json(out / "metrics.json", {"tempered_loss_per_datum": history, "epochs": epochs})
    write_json(out / "results.json", results)
    return results
