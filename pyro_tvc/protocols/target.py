"""Target composition (aTLAS's few-shot protocol; VTVC's main protocol): for one target, compose the other
tasks' vectors, learn on the target's train split (all of it, or ``shots`` per class), select on its val split and
report test accuracy with the target's zero-shot head. The target needs a head, not a vector of its own (its own
vector serves only the fine-tuned upper bound)."""
from __future__ import annotations

from pyro_tvc.methods.base import MethodContext
from pyro_tvc.protocols.common import Reads, evaluate_fit
from pyro_tvc.protocols.workspace import Workspace, unlabeled
from pyro_tvc.runtime import seed_everything

NAME = "target"


def pool_for(ws: Workspace, target: str, pool: list[str] | None) -> list[str]:
    tasks = [t for t in (pool or ws.with_vectors) if t != target]
    if not tasks:
        raise ValueError(f"target {target!r}: the task pool is empty (prepared vectors: "
                         f"{', '.join(ws.with_vectors) or 'none'})")
    return tasks


def reads(ws: Workspace, target: str, cfg) -> Reads:
    """The pool's vectors and the target's own (the fine-tuned bound), the target's head and data."""
    own = [target] if target in ws.with_vectors else []
    return Reads(vectors=pool_for(ws, target, cfg.pool) + own, heads=[target], data=[target])


def applicable(ws: Workspace, method, target: str) -> bool:
    return method.name != "finetuned" or target in ws.with_vectors


def run(ws: Workspace, method, target: str, seed: int, cfg) -> list[dict]:
    data = ws.task_data(target, seed, cfg.shots, cfg.max_train)
    ctx = MethodContext(ws.encoder, ws.bank(pool_for(ws, target, cfg.pool)), ws.heads([target]), data["train"],
                        data["val"], unlabeled(data["test"]), cfg.method_config(), seed,
                        own_bank=ws.bank([target]) if target in ws.with_vectors else None, quiet=cfg.quiet)
    seed_everything(seed)
    return evaluate_fit(NAME, method.name, seed, method.fit(ctx), data["test"], [target],
                        paper_metrics=ws.paper_metrics)
