"""Run the benchmark's cells (cached), then write results.json, results.csv, table.md and plots."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from pyro_tvc import distributed
from pyro_tvc.artifacts import artefact_identity
from pyro_tvc.data import EMBEDDED_TASKS
from pyro_tvc.experiments.config import BenchmarkConfig, full_grid
from pyro_tvc.methods import get_method
from pyro_tvc.protocols import get_protocol
from pyro_tvc.protocols.addition import ALL_TASKS
from pyro_tvc.protocols.common import LEARNED_METRICS
from pyro_tvc.recipes import custom_data_identity
from pyro_tvc.runs import git_commit, jsonable, package_versions, recorded_command
from pyro_tvc.runtime import progress, read_json, resolve_device, write_json


def plan(cfg: BenchmarkConfig, ws) -> list[tuple[str, str, str, int]]:
    """Every (protocol, method, target, seed) cell, after checking targets and pools against the artefacts.

    Raises:
        ValueError: an unknown target, a target without a prepared head, a negation target without a vector.
    """
    if cfg.full:
        cells = []
        for protocol, methods, targets in full_grid():
            sub = dataclasses.replace(cfg, full=False, protocols=[protocol], methods=methods, targets=targets)
            cells += [c for c in _plan(sub, ws) if c not in cells]
        return cells
    return _plan(cfg, ws)


def _plan(cfg: BenchmarkConfig, ws) -> list[tuple[str, str, str, int]]:
    for p in cfg.pool or []:
        if p not in ws.with_vectors:
            raise ValueError(f"--pool task {p!r} has no prepared task vector; prepared: {', '.join(ws.with_vectors)}")
    cells = []
    for protocol in cfg.protocols:
        module = get_protocol(protocol)
        if protocol == "addition":
            targets = [ALL_TASKS]
            module.tasks_for(ws, cfg.pool)
        else:
            targets = [ws.register(t) for t in cfg.targets] if cfg.targets else list(
                ws.with_heads if protocol == "target" else ws.with_vectors)
            for t in targets:
                if t not in ws.with_heads:
                    raise ValueError(f"unknown target {t!r}: no prepared head in {ws.paths.root}; prepared: "
                                     f"{', '.join(ws.with_heads)}")
                if protocol == "negation" and t not in ws.with_vectors:
                    raise ValueError(f"negation target {t!r} has no prepared task vector in {ws.paths.root}")
                if protocol == "negation":
                    module.control_for(t, cfg.negation_control, ws.with_heads)
        for seed in cfg.seeds:
            for target in targets:
                for method in cfg.methods_for(protocol):
                    if module.applicable(ws, get_method(method), target):
                        cells.append((protocol, method, target, seed))
    return cells


def cell_reads(cfg: BenchmarkConfig, ws, cell: tuple) -> dict:
    """The identities of what the cell reads (its protocol's ``reads``): heads and task vectors by
    :func:`pyro_tvc.artifacts.artefact_identity`, your own tasks' data by content, real data sets by root, and task
    addition's fine-tuned accuracies. With the default pool, one more prepared vector joins the cells that use it."""
    protocol, _, target, _ = cell
    r = get_protocol(protocol).reads(ws, target, cfg)
    spec = {"heads": {t: artefact_identity(ws.paths.head(t)) for t in sorted(set(r.heads))},
            "vectors": {t: artefact_identity(ws.paths.task_vector(t)) for t in sorted(set(r.vectors))}}
    custom = sorted(t for t in set(r.data) if t in ws.custom)
    if custom:  # your own tasks: their content, not only their names
        spec["data"] = {t: custom_data_identity(ws.custom[t]) for t in custom}
    real = [t for t in set(r.data) | set(r.vectors) if t not in EMBEDDED_TASKS and t not in ws.custom]
    if cfg.data_root is not None and real:  # real sets: where they are read from
        spec["data_root"] = str(Path(cfg.data_root).expanduser().resolve())
    if r.finetuned:
        spec["finetuned"] = {t: ws.finetuned_accuracy(t) for t in sorted(set(r.finetuned))}
    return spec


def cell_key(cfg: BenchmarkConfig, ws, cell: tuple) -> str:
    """``<protocol>-<method>-<target>-s<seed>-<digest>``: the digest covers the cell, every option that shapes it,
    theta_0 and what the cell reads (:func:`cell_reads`): a re-prepared artefact or an edited folder makes a new key,
    never a stale hit."""
    protocol, method, target, seed = cell
    spec = {"cell": list(cell), "method_config": jsonable(cfg.method_config()), "shots": cfg.shots,
            "pool": cfg.pool, "negation_control": cfg.negation_control, "selection": cfg.selection_per_task,
            "theta0": ws.theta0_sha256, "reads": cell_reads(cfg, ws, cell), "version": 3}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{protocol}-{method}-{target}-s{seed}-{digest}"


def _relabelled(cell: tuple, rows: list[dict]) -> list[dict]:
    """Cells written before the learned scalars carried their target's name (task ``ALL``) get it here."""
    protocol, _, target, _ = cell
    if protocol != "target":
        return rows
    return [r | {"task": target} if r["task"] == "ALL" and r["metric"] in LEARNED_METRICS else r for r in rows]


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    """Run (or resume) the benchmark into ``cfg.out``; returns ``{"records": [...], "tables": {...}}``."""
    from pyro_tvc.experiments.report import write_reports
    from pyro_tvc.protocols.workspace import open_workspace
    from pyro_tvc.runs import prepare_run_folder

    device = distributed.local_device(resolve_device(cfg.device))
    ws = open_workspace(cfg.artifacts, device, quiet=cfg.quiet, data_root=cfg.data_root)
    cells = plan(cfg, ws)  # every check before anything is written
    keys = [cell_key(cfg, ws, cell) for cell in cells]  # reads every artefact's identity: a broken file fails here
    rank, size = distributed.world(device)  # under torchrun the ranks share the cells; rank 0 reports
    out = Path(cfg.out)
    if rank == 0:
        if cfg.resume and not (out / "config.json").is_file():
            out.mkdir(parents=True, exist_ok=True)  # resuming a run that died before its config: start it
        else:
            out = prepare_run_folder(out, overwrite=cfg.overwrite, resume=cfg.resume)
        write_json(out / "config.json", jsonable(cfg) | {"device": str(device), "theta0_sha256": ws.theta0_sha256,
                                                         "versions": package_versions(), "git_commit": git_commit(),
                                                         "command": recorded_command(), "cells": len(cells),
                                                         "world_size": size})
        (out / "cells").mkdir(exist_ok=True)
    distributed.barrier()
    t0 = time.perf_counter()
    paths = [out / "cells" / f"{key}.json" for key in keys]
    mine = [(c, p) for i, (c, p) in enumerate(zip(cells, paths)) if i % size == rank and not p.is_file()]
    bar = progress(mine, quiet=cfg.quiet or rank != 0, desc="benchmark cells")
    for cell, path in ([] if cfg.report_only else bar):
        bar.set_postfix_str("/".join(map(str, cell)), refresh=True)
        protocol, method, target, seed = cell
        with distributed.local():  # one cell, one rank
            rows = get_protocol(protocol).run(ws, get_method(method), target, seed, cfg)
        write_json(path, {"cell": list(cell), "records": rows})
    distributed.barrier()
    if rank != 0:
        return {"records": [], "tables": {"markdown": ""}, "out": out}
    records = [r for cell, p in zip(cells, paths) if p.is_file() for r in _relabelled(cell, read_json(p)["records"])]
    tables = write_reports(records, out, cfg, ws)
    write_json(out / "results.json", {"config": jsonable(cfg), "seconds": time.perf_counter() - t0,
                                      "records": records, "summary": tables["summary"]})
    return {"records": records, "tables": tables, "out": out}
