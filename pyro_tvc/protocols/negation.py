"""Task negation (Ilharco et al. 2023; aTLAS's protocol and selection rule): make the model forget a target task
while a control task keeps >= 95 % of its zero-shot accuracy. The pool is the target's own vector; methods learn
on the target's and the control's val splits with the loss ``-CE(target) + CE(control)`` (VTVC: the complement
likelihood, docs/methods.md), and select the candidate with the lowest target accuracy whose control accuracy stays
above the floor, on a held-out subset of both train splits. The paper's control is ImageNet; ours is a configurable
embedded task (``negation_control``, default cifar10, the broadest natural-image set we ship)."""
from __future__ import annotations

from pyro_tvc.methods.base import MethodContext, TaskData, per_task_accuracy
from pyro_tvc.methods.zero_shot import fit as zero_shot_fit
from pyro_tvc.protocols.common import Reads, evaluate_fit, record
from pyro_tvc.protocols.workspace import Workspace, selection_subset, unlabeled
from pyro_tvc.runtime import seed_everything

NAME = "negation"
CONTROL_KEEP = 0.95
FALLBACK_CONTROL = "fashion_mnist"


def control_for(target: str, control: str, with_heads: list[str]) -> str:
    """The control task of ``target``: ``control``, or when the target is the control itself, fashion_mnist (or
    the first other prepared task).

    Raises:
        ValueError: the control has no prepared head.
    """
    if target == control:
        others = [t for t in with_heads if t != target]
        control = FALLBACK_CONTROL if FALLBACK_CONTROL in others else (others[0] if others else control)
    if control not in with_heads or control == target:
        raise ValueError(f"negation control {control!r} has no prepared head (prepared: {', '.join(with_heads)}); "
                         f"choose one with --negation-control")
    return control


def reads(ws: Workspace, target: str, cfg) -> Reads:
    """The target's vector (negated), the heads and data of the target and its control."""
    control = control_for(target, cfg.negation_control, ws.with_heads)
    return Reads(vectors=[target], heads=[target, control], data=[target, control])


def applicable(ws: Workspace, method, target: str) -> bool:
    return target in ws.with_vectors


def select_negation(curve: list[tuple[float, float]], control_zero_shot: float,
                    keep: float = CONTROL_KEEP) -> int | None:
    """Index of the candidate with the lowest target accuracy among those whose control accuracy is at least
    ``keep`` x the control's zero-shot accuracy (aTLAS's rule); ``curve[i] = (target_acc, control_acc)``; None when
    no candidate qualifies. Ties go to the earlier candidate."""
    best = None
    for i, (target_acc, control_acc) in enumerate(curve):
        if control_acc >= keep * control_zero_shot and (best is None or target_acc < curve[best][0]):
            best = i
    return best


def run(ws: Workspace, method, target: str, seed: int, cfg) -> list[dict]:
    if target not in ws.with_vectors:
        raise ValueError(f"negation target {target!r} has no prepared task vector")
    control = control_for(target, cfg.negation_control, ws.with_heads)
    tasks = [target, control]
    dt = ws.task_data(target, seed, None, cfg.max_train, task_id=0)
    dc = ws.task_data(control, seed, None, cfg.max_train, task_id=1)
    learn = TaskData.concat([dt["val"], dc["val"]])
    select = selection_subset(TaskData.concat([dt["train"], dc["train"]]), cfg.selection_per_task, seed)
    test = TaskData.concat([dt["test"], dc["test"]])
    ctx = MethodContext(ws.encoder, ws.bank([target]), ws.heads(tasks), learn, select, unlabeled(test),
                        cfg.method_config(), seed, objective="negate", negate_task_id=0, quiet=cfg.quiet)
    zs = zero_shot_fit(ctx).predictors["single"]
    ctx.control_min_accuracy = CONTROL_KEEP * per_task_accuracy(zs.probs(select), select, 2)[1]
    zs_control_test = per_task_accuracy(zs.probs(test), test, 2)[1]
    seed_everything(seed)
    rows = evaluate_fit(NAME, method.name, seed, method.fit(ctx), test, tasks, paper_metrics=ws.paper_metrics)
    out = []
    for r in rows:
        if r["metric"] == "accuracy" and r["task"] == control:
            out.append({**r, "task": target, "metric": "control_accuracy"})
            out.append(record(NAME, r["method"], r["prediction"], target, seed, "control_retained_percent",
                              100.0 * r["value"] / zs_control_test))
        else:
            out.append(r)
    return out
