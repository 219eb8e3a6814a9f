"""The per-sample family, all trained by Pyro SVI through :mod:`pyro_tvc.infer` with a registered inference
variant (:mod:`pyro_tvc.variants`): the deterministic meta-net, task-level variational composition, VTVC gated
and ungated (Zhang, Du, Zhen, Shao, "Variational task vector composition", NeurIPS 2025), and the ablations
(Gaussian prior; low-rank composition at ranks 4 and 64). Every fit gives two predictions: one composed model
per input (``single``: the guide's point estimate, hard-gated where there is a gate) and the Monte-Carlo average
over posterior draws (``mc``).

Negation (docs/methods.md): the pool is the negated task's vector alone; on the negated task's inputs the
likelihood is the complement ``p(y != y_i | x_i, lambda_i) = 1 - p(y_i | ...)`` (the probabilistic counterpart of
aTLAS's ``-CE``), on control inputs the ordinary one. The spike at 0 makes "leave this input at zero-shot" the
default; the gate zeroes whatever is not reliably needed, so control inputs run the exact zero-shot model.
"""
from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from pyro_tvc.guides.gated import gate_statistics
from pyro_tvc.infer import (Problem, TrainConfig, fit as svi_fit, make_problem, point_predictions, predictive_probs,
                            true_elbo_per_datum)
from pyro_tvc.methods.base import FitResult, MethodContext, Predictor, TaskData, Timer, selection_score
from pyro_tvc.models import ClassificationLikelihood
from pyro_tvc.variants import get_variant, variant_names

FIRST_GENERATION = {"metanet": ("point", "Meta-net (point)"), "task_level_vi": ("task_level", "Task-level VI"),
                    "vtvc_gated": ("gated", "VTVC gated"), "vtvc_ungated": ("spike_slab", "VTVC ungated"),
                    "vtvc_gaussian": ("gaussian", "VTVC Gaussian prior")}
RANK_ABLATIONS = {"vtvc_gated_r4": 4, "vtvc_gated_r64": 64}


class ComplementCategorical(dist.Categorical):
    """``Categorical`` whose ``log_prob`` is ``log(1 - p(y))`` on rows marked ``negate [N]`` (bool)."""

    def __init__(self, logits, negate, validate_args=None):
        super().__init__(logits=logits, validate_args=validate_args)
        self.negate = negate

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return ComplementCategorical(self.logits.expand(batch_shape + self.logits.shape[-1:]),
                                     self.negate.expand(batch_shape))

    def log_prob(self, value):
        logp = super().log_prob(value)
        masked = self.logits.masked_fill(torch.nn.functional.one_hot(value.long(), self.logits.shape[-1]).bool(),
                                         float("-inf"))
        log_complement = masked.logsumexp(-1)  # logits are normalised by Categorical
        return torch.where(self.negate, log_complement, logp)


class NegationLikelihood(ClassificationLikelihood):
    """Complement likelihood on the negated task's rows (identified through the heads' current task ids)."""

    def __init__(self, composer, heads, negate_task_id: int):
        super().__init__(composer, heads)
        self.negate_task_id = negate_task_id

    def __call__(self, inputs, coefficients):
        logits = self.logits(inputs, coefficients)
        ids = self.head._task_ids
        if ids is None:
            negate = torch.zeros(logits.shape[-2], dtype=torch.bool, device=logits.device)
        else:
            negate = (ids == self.negate_task_id).to(logits.device)
        return ComplementCategorical(logits, negate.expand(logits.shape[:-1]))


class _SplitPredictor(Predictor):
    """Evaluates a trained :class:`Problem` on arbitrary data by installing it as the ``eval`` split."""

    def __init__(self, problem: Problem, kind: str):
        self.problem, self.kind = problem, kind

    def _install(self, data: TaskData) -> None:
        self.problem.splits["eval"] = (data.images, data.features, data.labels)
        self.problem.task_ids["eval"] = data.task_ids

    @torch.no_grad()
    def probs(self, data: TaskData) -> torch.Tensor:
        self._install(data)
        if self.kind == "mc":
            return predictive_probs(self.problem, "eval", self.problem.cfg.eval_samples).mean(0)
        return point_predictions(self.problem, "eval")[0]

    @torch.no_grad()
    def exact_zero_fraction(self, data: TaskData) -> float | None:
        if self.kind != "single":
            return None
        self._install(data)
        return (point_predictions(self.problem, "eval")[1] == 0).float().mean().item()


def _splits(ctx: MethodContext) -> tuple[dict, dict]:
    parts = {"train": ctx.learn, "val": ctx.select}
    return ({k: (d.images, d.features, d.labels) for k, d in parts.items()},
            {k: d.task_ids for k, d in parts.items()})


def _val_key(e: dict) -> float:
    v = e.get("val_single_model_accuracy")
    return float("-inf") if v is None else v


@torch.no_grad()
def posterior_summary(problem: Problem, select: TaskData) -> dict:
    """Issue 11's measures of the trained posterior: the true ELBO per training input (KL weight 1, ungated), what the
    gate marks on the selection inputs, and for a label-reading posterior ``KL(q(lambda|x,y) || p(lambda|x))``."""
    out = {}
    if not get_variant(problem.cfg.guide).point_only:
        out["true_elbo_per_datum"] = true_elbo_per_datum(problem, "train")
    if hasattr(problem.guide, "masks"):
        out |= gate_statistics(problem.guide, select.features)
    if hasattr(problem.guide, "kl_per_input") and len(getattr(problem.head, "names", [0])) == 1:  # one head
        out["kl_q_p_per_input"] = problem.guide.kl_per_input(select.features, select.labels,
                                                             problem.likelihood).mean().item()
    return out


def make_fit(guide: str, rank_override: int | None | str = "cfg"):
    def fit(ctx: MethodContext) -> FitResult:
        mc = ctx.cfg
        rank = mc.rank if rank_override == "cfg" else rank_override
        cfg = TrainConfig(artifacts=Path("."), target="benchmark", out=Path("."), guide=guide, epochs=mc.epochs,
                          batch_size=mc.batch_size, lr=mc.lr, rank=rank, eval_samples=mc.eval_samples, seed=ctx.seed,
                          quiet=ctx.quiet, device=str(ctx.device))
        with Timer() as timer:
            pyro.clear_param_store()
            splits, task_ids = _splits(ctx)
            problem = make_problem(cfg, ctx.encoder, ctx.bank, ctx.heads, splits, list(ctx.heads.names), task_ids)
            score_fn = None
            if ctx.objective == "negate":
                problem.likelihood = NegationLikelihood(problem.composer, ctx.heads, ctx.negate_task_id)
                score_fn = lambda p: selection_score(ctx, _SplitPredictor(p, "single").probs(ctx.select),  # noqa
                                                     ctx.select)
            _, epochs = svi_fit(problem, score_fn=score_fn)
        predictors = {"single": _SplitPredictor(problem, "single")}
        if not get_variant(guide).point_only:
            predictors["mc"] = _SplitPredictor(problem, "mc")
        learned = {"guide": guide, "rank": rank, "kl_weight": cfg.kl_weight, "epochs": epochs,
                   "selected_epoch": max(epochs, key=_val_key)["epoch"] if epochs else None,
                   **posterior_summary(problem, ctx.select)}
        return FitResult(predictors, learned, timer.seconds)
    return fit


def register_all(register) -> None:
    from pyro_tvc.methods import Method

    for name, (guide, label) in FIRST_GENERATION.items():
        register(Method(name, label, make_fit(guide), description=get_variant(guide).description))
    for name, rank in RANK_ABLATIONS.items():
        register(Method(name, f"VTVC gated, rank {rank}", make_fit("gated", rank), protocols=("target",),
                        description=f"ablation: low-rank composition at rank {rank}"))
    builtin = {g for g, _ in FIRST_GENERATION.values()}
    for guide in variant_names():  # Bayesian core v2 variants, registered by their own modules
        if guide not in builtin:
            register(Method(f"vtvc_{guide}", f"VTVC {guide.replace('_', ' ')}", make_fit(guide),
                            description=get_variant(guide).description))
