"""Task addition (Ilharco et al. 2023; aTLAS's protocol): one composed model for all tasks, learned on the union of
their val splits, each input scored by its own task's head. Reports absolute accuracy and normalised accuracy
(accuracy / the task's fine-tuned accuracy, in %). Model selection (grid scales, epochs) uses a held-out subset of
the train splits, which no method learns from in this protocol."""
from __future__ import annotations

from pyro_tvc.methods.base import MethodContext, TaskData
from pyro_tvc.protocols.common import Reads, evaluate_fit, record
from pyro_tvc.protocols.workspace import Workspace, selection_subset, unlabeled
from pyro_tvc.runtime import seed_everything

NAME = "addition"
ALL_TASKS = "ALL"


def tasks_for(ws: Workspace, pool: list[str] | None) -> list[str]:
    tasks = list(pool or ws.with_vectors)
    if len(tasks) < 2:
        raise ValueError(f"task addition needs at least 2 tasks with prepared vectors, got {tasks}")
    return tasks


def reads(ws: Workspace, target: str, cfg) -> Reads:
    """Every task's vector, head and data, and its fine-tuned accuracy (the normalised score's denominator)."""
    tasks = tasks_for(ws, cfg.pool)
    return Reads(vectors=tasks, heads=tasks, data=tasks, finetuned=tasks)


def applicable(ws: Workspace, method, target: str) -> bool:
    return True


def run(ws: Workspace, method, target: str, seed: int, cfg) -> list[dict]:
    tasks = tasks_for(ws, cfg.pool)
    parts = [ws.task_data(t, seed, None, cfg.max_train, task_id=i) for i, t in enumerate(tasks)]
    learn = TaskData.concat([p["val"] for p in parts])
    select = selection_subset(TaskData.concat([p["train"] for p in parts]), cfg.selection_per_task, seed)
    test = TaskData.concat([p["test"] for p in parts])
    bank = ws.bank(tasks)
    ctx = MethodContext(ws.encoder, bank, ws.heads(tasks), learn, select, unlabeled(test), cfg.method_config(), seed,
                        own_bank=bank, quiet=cfg.quiet)
    seed_everything(seed)
    rows = evaluate_fit(NAME, method.name, seed, method.fit(ctx), test, tasks, paper_metrics=ws.paper_metrics)
    for r in list(rows):
        ft = ws.finetuned_accuracy(r["task"]) if r["metric"] == "accuracy" else None
        if ft and r["value"] is not None:
            rows.append(record(NAME, r["method"], r["prediction"], r["task"], seed, "normalized_accuracy",
                               100.0 * r["value"] / ft))
    return rows
