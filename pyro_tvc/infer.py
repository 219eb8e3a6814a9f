"""SVI for VTVC: set-up from prepared artefacts, the training loop, Predictive-based evaluation, checkpoints.

The ELBO estimator is ``TraceMeanField_ELBO``: the closed-form spike-and-slab KL (registered for the pair) and a
straight-through draw of the coefficients for the expected log likelihood (unbiased loss value; biased gradient of
the inclusion logits only: see docs/inference.md). Minibatches are subsampled plates, so every loss is that of the
whole training set; ``kl_weight`` != 1 is an explicit tempering recorded in the run's config.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO

from pyro_tvc.artifacts import ArtifactPaths, load_bank, load_clip, load_head, prepared_tasks
from pyro_tvc.backbones import image_encoder
from pyro_tvc.compose.engine import Composer
from pyro_tvc.data import load_embedded
from pyro_tvc.evaluation import encode_dataset
from pyro_tvc.guides import (AmortizedGaussianGuide, AmortizedPointGuide, AmortizedSpikeSlabGuide, GateConfig,
                             GatedSpikeSlabGuide, TaskLevelGuide)
from pyro_tvc.models import ClassificationLikelihood, PriorConfig, gaussian_prior_model, task_level_model, vtvc_model
from pyro_tvc.runtime import progress, resolve_device, seed_everything, write_json

GUIDES = ("gated", "spike_slab", "point", "gaussian", "task_level")


@dataclass
class TrainConfig:
    artifacts: Path
    target: str
    out: Path
    tasks: list[str] | None = None  # default: every prepared task but the target
    guide: str = "gated"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-2
    final_lr_fraction: float = 0.1
    clip_norm: float = 10.0
    kl_weight: float = 1e-3  # explicit tempering; 1 = the true ELBO (docs/inference.md: why not 1 by default)
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
    eval_samples: int = 16
    elbo_particles: int = 8
    max_train: int | None = None
    seed: int = 0
    device: str = "auto"
    quiet: bool = False

    def __post_init__(self):
        if self.guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {self.guide!r}")
        if self.kl_weight <= 0:
            raise ValueError(f"kl_weight must be positive, got {self.kl_weight}")


@dataclass
class Problem:
    """Everything SVI needs for one target: data with pre-trained features, the likelihood, model and guide."""

    cfg: TrainConfig
    composer: Composer
    head: object
    likelihood: ClassificationLikelihood
    model: object
    guide: object
    prior: PriorConfig
    splits: dict  # name -> (images [N, 3, H, W], features [N, D], labels [N])
    classes: list[str]

    def kwargs(self, split: str, indices=None, kl_weight=None) -> dict:
        return dict(likelihood=self.likelihood, num_data=len(self.splits[split][2]), indices=indices,
                    prior=self.prior, kl_weight=self.cfg.kl_weight if kl_weight is None else kl_weight)


def build_problem(cfg: TrainConfig) -> Problem:
    device = resolve_device(cfg.device)
    paths = ArtifactPaths(Path(cfg.artifacts))
    clip, _ = load_clip(paths.clip, device)
    encoder = image_encoder(clip)
    available = prepared_tasks(paths)
    if cfg.target not in available:
        raise ValueError(f"target {cfg.target!r} has no prepared head/vector in {paths.root}; prepared: {available}")
    tasks = cfg.tasks or [t for t in available if t != cfg.target]
    bank = load_bank(paths, tasks)
    head, classes = load_head(paths.head(cfg.target), device)
    data = load_embedded(cfg.target, max_train=cfg.max_train, seed=cfg.seed)
    splits = {}
    for name in ("train", "val", "test"):
        ds = getattr(data, name)
        feats, labels = encode_dataset(encoder, ds, device=device)
        splits[name] = (ds.tensors[0].to(device), feats.to(device), labels.to(device))
    composer = Composer(encoder, bank, method="fast", rank=cfg.rank, parts=cfg.parts).to(device)
    T, B = composer.coefficient_shape
    likelihood = ClassificationLikelihood(composer, head)
    prior = PriorConfig(cfg.inclusion_prob, cfg.slab_scale, cfg.learn_inclusion)
    D = splits["train"][1].shape[1]
    common = dict(hidden=cfg.hidden, init_scale=cfg.init_scale, max_scale=cfg.max_scale,
                  init_inclusion=cfg.inclusion_prob)
    guide = {
        "gated": lambda: GatedSpikeSlabGuide(D, T, B, gate=cfg.gate, **common),
        "spike_slab": lambda: AmortizedSpikeSlabGuide(D, T, B, **common),
        "point": lambda: AmortizedPointGuide(D, T, B, **common),
        "gaussian": lambda: AmortizedGaussianGuide(D, T, B, **common),
        "task_level": lambda: TaskLevelGuide(T, B, init_scale=cfg.init_scale, init_inclusion=cfg.inclusion_prob),
    }[cfg.guide]()
    if isinstance(guide, torch.nn.Module):
        guide.to(device)
    model = {"gaussian": gaussian_prior_model, "task_level": task_level_model}.get(cfg.guide, vtvc_model)
    return Problem(cfg, composer, head, likelihood, model, guide, prior, splits, classes)


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


@torch.no_grad()
def true_elbo_per_datum(problem: Problem, split: str = "train", max_items: int = 512) -> float:
    """ELBO / N with kl_weight = 1 and the ungated posterior (unbiased estimate), on up to ``max_items`` items."""
    n = len(problem.splits[split][2])
    idx = torch.arange(min(n, max_items), device=problem.splits[split][2].device)
    elbo = TraceMeanField_ELBO(num_particles=problem.cfg.elbo_particles, vectorize_particles=True, max_plate_nesting=1)
    with ungated(problem.guide):
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
        for s in range(0, len(x_all), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(x_all)), device=x_all.device)
            kw = problem.kwargs(split, idx)
            out.append(pred(x_all[idx], f_all[idx], None, **kw)["probs"].reshape(samples, len(idx), -1))
    return torch.cat(out, dim=1)


@torch.no_grad()
def point_predictions(problem: Problem, split: str, batch_size: int = 256):
    """Deterministic single-model prediction per input (hard gate): probabilities ``[N, C]`` and ``lambda [N, T, B]``."""
    x_all, f_all, _ = problem.splits[split]
    probs, coefs = [], []
    for s in range(0, len(x_all), batch_size):
        x, f = x_all[s:s + batch_size], f_all[s:s + batch_size]
        lam = problem.guide.point_estimate(f)
        probs.append(problem.likelihood.logits(x, lam).softmax(-1))
        coefs.append(lam.expand(len(x), *lam.shape[-2:]) if lam.ndim == 2 else lam)
    return torch.cat(probs), torch.cat(coefs)


@torch.no_grad()
def zero_shot_accuracy(problem: Problem, split: str = "test") -> float:
    x, _, y = problem.splits[split]
    T, B = problem.composer.coefficient_shape
    logits = problem.likelihood.logits(x, torch.zeros(T, B, device=x.device))
    return 100.0 * (logits.argmax(-1) == y).float().mean().item()


def evaluate(problem: Problem, split: str = "test") -> dict:
    y = problem.splits[split][2]
    mc = predictive_probs(problem, split, problem.cfg.eval_samples).mean(0)
    point, coefs = point_predictions(problem, split)
    nll = lambda p: F.nll_loss(p.clamp_min(1e-12).log(), y).item()  # noqa: E731
    return {
        "mc_accuracy": 100.0 * (mc.argmax(-1) == y).float().mean().item(), "mc_nll": nll(mc),
        "gated_accuracy": 100.0 * (point.argmax(-1) == y).float().mean().item(), "gated_nll": nll(point),
        "sparsity": (coefs == 0).float().mean().item(),
        "zero_shot_accuracy": zero_shot_accuracy(problem, split),
    }


def save_checkpoint(problem: Problem, optim, epoch: int, path: Path) -> None:
    state = {"epoch": epoch, "params": {k: v.detach().cpu() for k, v in pyro.get_param_store().items()},
             "optim": optim.get_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, device="cpu") -> dict:
    """Load a training checkpoint with ``weights_only=True`` (tensors and numbers only)."""
    return torch.load(path, map_location=device, weights_only=True)


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


def fit(problem: Problem, checkpoint_dir: Path | None = None) -> tuple[list[float], list[dict]]:
    """Run SVI on ``problem`` in place; returns (-ELBO per datum per step, per-epoch validation records)."""
    cfg = problem.cfg
    n_train = len(problem.splits["train"][2])
    steps = cfg.epochs * -(-n_train // cfg.batch_size)
    optim = pyro.optim.ClippedAdam({"lr": cfg.lr, "clip_norm": cfg.clip_norm,
                                    "lrd": cfg.final_lr_fraction ** (1.0 / max(1, steps))})
    elbo = TraceMeanField_ELBO(num_particles=cfg.particles, vectorize_particles=cfg.particles > 1, max_plate_nesting=1)
    svi = SVI(problem.model, problem.guide, optim, elbo)
    gen = torch.Generator().manual_seed(cfg.seed)
    history, epochs = [], []
    t0 = time.perf_counter()
    bar = progress(total=steps, quiet=cfg.quiet, desc=f"SVI {cfg.guide} on {cfg.target}")
    for epoch in range(cfg.epochs):
        for idx in batches(n_train, cfg.batch_size, gen, problem.splits["train"][2].device):
            x, f, y = _tensors(problem, "train", idx)
            loss = svi.step(x, f, y, **problem.kwargs("train", idx))
            history.append(loss / n_train)
            bar.update(1)
            bar.set_postfix(neg_elbo_per_datum=f"{history[-1]:.3f}")
        point, _ = point_predictions(problem, "val")
        val_acc = 100.0 * (point.argmax(-1) == problem.splits["val"][2]).float().mean().item()
        epochs.append({"epoch": epoch + 1, "val_gated_accuracy": val_acc, "seconds": time.perf_counter() - t0})
        if checkpoint_dir is not None:
            save_checkpoint(problem, optim, epoch + 1, checkpoint_dir / f"epoch{epoch + 1}.pt")
    bar.close()
    return history, epochs


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate and write the run folder; returns the results dict."""
    seed_everything(cfg.seed)
    pyro.clear_param_store()
    out = Path(cfg.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    problem = build_problem(cfg)
    write_json(out / "config.json", {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else str(v) if isinstance(
        v, Path) else v) for k, v in vars(cfg).items()} | {"tasks": list(problem.composer.task_names),
                                                           "blocks": len(problem.composer.block_names)})
    t0 = time.perf_counter()
    history, epochs = fit(problem, out / "checkpoints")
    train_seconds = time.perf_counter() - t0
    results = {"target": cfg.target, "guide": cfg.guide, "tasks": list(problem.composer.task_names),
               "kl_weight": cfg.kl_weight, "train_seconds": train_seconds, **evaluate(problem, "test"),
               "true_elbo_per_datum": true_elbo_per_datum(problem), "epochs": epochs}
    if isinstance(problem.guide, GatedSpikeSlabGuide):
        pruned, reliable = problem.guide.masks(problem.splits["test"][1])
        results["gate_fraction_pruned"] = pruned.float().mean().item()
        results["gate_fraction_reliable"] = reliable.float().mean().item()
    write_json(out / "metrics.json", {"neg_elbo_per_datum": history, "epochs": epochs})
    write_json(out / "results.json", results)
    return results
