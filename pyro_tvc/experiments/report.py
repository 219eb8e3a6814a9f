"""Tables (mean ± sd over seeds, paired) and plots from the benchmark's tidy records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pyro_tvc.experiments.config import ISSUE_TARGETS
from pyro_tvc.methods import get_method
from pyro_tvc.text.metrics import PAPER_METRICS

PREDICTION_LABEL = {"single": "", "mc": " (MC)"}
MAIN_METRIC = {"target": "accuracy", "addition": "accuracy", "negation": "accuracy"}


def label(method: str, prediction: str) -> str:
    return get_method(method).label + PREDICTION_LABEL.get(prediction, f" ({prediction})")


def _fmt(mean: float, sd: float, n: int, digits: int = 1) -> str:
    if mean != mean:
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _mean_sd(values) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and x == x], dtype=float)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def seed_averages(df: pd.DataFrame, metric: str, num_tasks: int | None = None) -> pd.DataFrame:
    """Per (method, prediction, seed): the mean over tasks of ``metric`` (tasks weighed equally); with
    ``num_tasks``, only seeds that have every task (an unfinished seed is left out, not averaged over fewer)."""
    sub = df[(df.metric == metric) & (df.task != "ALL")]
    g = sub.groupby(["method", "prediction", "seed"], sort=False)["value"].agg(["mean", "count"]).reset_index()
    if num_tasks is not None:
        g = g[g["count"] == num_tasks]
    return g.rename(columns={"mean": "value"})[["method", "prediction", "seed", "value"]]


def relative_cost(df: pd.DataFrame, protocol: str) -> dict:
    """Inference time per input relative to zero-shot's in the same cells, mean over seeds."""
    ms = df[(df.protocol == protocol) & (df.metric == "inference_ms_per_input")]
    zs = ms[ms.method == "zero_shot"].groupby("seed")["value"].mean()
    out = {}
    for (m, p), g in ms.groupby(["method", "prediction"], sort=False):
        ratios = [v / zs[s] for s, v in zip(g.seed, g.value) if s in zs and zs[s] > 0]
        out[(m, p)] = float(np.mean(ratios)) if ratios else float("nan")
    return out


def task_sets(df: pd.DataFrame, protocol: str) -> list[list[str]]:
    """The distinct sets of tasks the methods of ``protocol`` were run on, largest first (one table each)."""
    acc = df[(df.protocol == protocol) & (df.metric == "accuracy") & (df.task != "ALL")]
    order = list(dict.fromkeys(acc.task))
    sets = {tuple(sorted(g.task.unique(), key=order.index)) for _, g in acc.groupby("method")}
    return [list(s) for s in sorted(sets, key=len, reverse=True)]


def with_task_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Add metric ``score``: each task's paper metric (MCC for CoLA, F1 for MRPC, accuracy otherwise), in %;
    unchanged when no task has another metric than accuracy."""
    other = df.metric.isin([name for name, _ in PAPER_METRICS.values()])
    if not other.any():
        return df
    tasks = set(df[other].task)
    acc = df[(df.metric == "accuracy") & ~df.task.isin(tasks)]
    return pd.concat([df, acc.assign(metric="score"), df[other].assign(metric="score")], ignore_index=True)


def _task_header(df: pd.DataFrame, task: str, metric: str) -> str:
    """``cola (MCC)`` when the task's ``score`` is a paper metric recorded for it, else the task's name."""
    if metric == "score":
        for name, shown in PAPER_METRICS.values():
            if ((df.task == task) & (df.metric == name)).any():
                return f"{task} ({shown})"
    return task


def protocol_table(df: pd.DataFrame, protocol: str, tasks: list[str], metric: str = "accuracy") -> tuple[str, dict]:
    """Methods run on every task of ``tasks``, restricted to them (so averages compare like with like); per-task
    cells and the average of ``metric`` (``score``: each task's paper metric, :func:`with_task_scores`)."""
    sub = df[df.protocol == protocol]
    if sub.empty:
        return "", {}
    covered = [m for m, g in sub[sub.metric == "accuracy"].groupby("method", sort=False) if set(tasks) <= set(g.task)]
    sub = sub[sub.method.isin(covered) & (sub.task.isin(tasks) | (sub.task == "ALL"))]
    avg = seed_averages(sub, metric, len(tasks))
    cost = relative_cost(df, protocol)
    extra = {"addition": [("normalized_accuracy", "normalised avg %")],
             "negation": [("control_accuracy", "control avg %"), ("control_retained_percent", "control kept %")]}
    extra = extra.get(protocol, [])
    head = (["method"] + [_task_header(sub, t, metric) for t in tasks] + ["average", "seeds"] + [h for _, h in extra]
            + ["exact zeros %", "train s", "inference × zero-shot"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = {}
    for (m, p), g in sub.groupby(["method", "prediction"], sort=False):
        if not (g.metric == "accuracy").any():
            continue
        cells = [label(m, p)]
        for t in tasks:
            cells.append(_fmt(*_mean_sd(g[(g.metric == metric) & (g.task == t)].value)))
        per_seed = avg[(avg.method == m) & (avg.prediction == p)].set_index("seed")["value"]
        mean, sd, n = _mean_sd(per_seed.values)
        cells += [_fmt(mean, sd, n), str(n)]
        entry = {"average": mean, "sd": sd, "seeds": n, "per_seed": {int(k): float(v) for k, v in per_seed.items()}}
        for extra_metric, _ in extra:
            ps = seed_averages(g, extra_metric, len(tasks))["value"].values
            cells.append(_fmt(*_mean_sd(ps)))
            entry[extra_metric] = _mean_sd(ps)[0]
        zeros = g[g.metric == "exact_zero_fraction"].value
        z = _mean_sd(100.0 * zeros.astype(float))[0] if len(zeros) else float("nan")
        train = df[(df.protocol == protocol) & (df.method == m) & (df.metric == "train_seconds")].value
        ts = _mean_sd(train)[0] if (p == "single" or p == sub[sub.method == m].prediction.iloc[0]) else float("nan")
        cells += ["–" if z != z else f"{z:.1f}", "–" if ts != ts else f"{ts:.1f}",
                  "–" if cost.get((m, p), float("nan")) != cost.get((m, p), float("nan")) else f"{cost[(m, p)]:.2f}"]
        entry |= {"exact_zero_percent": z, "train_seconds": ts, "relative_inference_cost": cost.get((m, p))}
        summary[f"{m}:{p}"] = entry
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summary


POSTERIOR_COLUMNS = [("accuracy", "accuracy %", 1, 1.0), ("nll", "NLL (nats)", 3, 1.0), ("ece", "ECE %", 1, 1.0),
                     ("auroc_entropy_error", "AUROC entropy→error", 3, 1.0),
                     ("true_elbo_per_datum", "true ELBO / input", 2, 1.0),
                     ("gate_fraction_included", "included %", 1, 100.0),
                     ("gate_reliable_among_included", "reliable / included %", 1, 100.0),
                     ("kl_q_p_per_input", "KL(q(·|x,y) ‖ p(·|x)) nats", 4, 1.0)]


def posterior_table(df: pd.DataFrame, tasks: list[str]) -> tuple[str, dict]:
    """Target composition on ``tasks``, the methods with calibration records: per (method, prediction) the mean over
    seeds of the task-averaged accuracy, NLL and ECE and of what the posterior learned on each target (issue 11's
    table); a seed counts only when it has every task."""
    sub = df[(df.protocol == "target") & (df.task.isin(tasks) | (df.task == "ALL"))]
    have = [m for m, g in sub[sub.metric == "nll"].groupby("method", sort=False) if set(tasks) <= set(g.task)]
    if not have:
        return "", {}
    # a column no finished cell has (cells written before it was recorded) is left out, not shown as dashes
    columns = [c for c in POSTERIOR_COLUMNS if (sub.metric == c[0]).any()]
    head = ["method"] + [h for _, h, _, _ in columns] + ["seeds"]
    lines, summary = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)], {}
    for (m, p), g in sub[sub.method.isin(have)].groupby(["method", "prediction"], sort=False):
        cells, entry = [label(m, p)], {}
        for metric, _, digits, scale in columns:
            mean, sd, n = _mean_sd(scale * seed_averages(g, metric, len(tasks))["value"])
            cells.append(_fmt(mean, sd, n, digits))
            entry[metric] = {"mean": mean, "sd": sd, "seeds": n}
        if not any(entry[k]["seeds"] for k in ("accuracy", "nll")):
            continue
        cells.append(str(entry["accuracy"]["seeds"]))
        summary[f"{m}:{p}"] = entry
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summary


TITLES = {"target": "Target composition: test accuracy %, composing the other tasks' vectors",
          "addition": "Task addition: test accuracy % of one composed model for all tasks",
          "negation": "Task negation: target test accuracy % (lower is better) with the control kept >= 95 %"}


def plot_accuracy(df: pd.DataFrame, protocol: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[(df.protocol == protocol) & (df.metric == "accuracy") & (df.task != "ALL")]
    if sub.empty:
        return
    tasks_all = task_sets(df, protocol)[0]  # the methods run on every task (the main table), for readable bars
    keep = [m for m, g in sub.groupby("method", sort=False) if set(tasks_all) <= set(g.task)]
    sub = sub[sub.method.isin(keep)]
    means = sub.groupby(["method", "prediction", "task"], sort=False)["value"].mean().unstack("task")
    tasks = list(means.columns)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(tasks) + 4), 5), constrained_layout=True)
    width = 0.8 / len(means)
    colours = plt.get_cmap("tab20").colors
    for i, ((m, p), row) in enumerate(means.iterrows()):
        ax.bar(np.arange(len(tasks)) + i * width, row.values, width, label=label(m, p), color=colours[i % 20],
               hatch="//" if p == "mc" else None, edgecolor="white", linewidth=0.3)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.set_title(TITLES[protocol], fontsize=11)
    ax.legend(fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(summary: dict, protocol: str, path: Path, metric: str = "accuracy") -> None:
    """Each method's average ``metric`` (its table's) against its inference time relative to zero-shot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(k, v) for k, v in summary.items() if (v.get("relative_inference_cost") or 0) > 0
           and v["average"] == v["average"]]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    pts.sort(key=lambda kv: (kv[1]["relative_inference_cost"], kv[1]["average"]))
    for i, (k, v) in enumerate(pts):
        m, p = k.split(":")
        ax.scatter(v["relative_inference_cost"], v["average"])
        ax.annotate(label(m, p), (v["relative_inference_cost"], v["average"]), fontsize=8,
                    xytext=(5, 8 - 11 * (i % 3)), textcoords="offset points")  # staggered: neighbours overlap
    ax.set_xscale("log")
    ax.set_xlabel("inference time per input relative to zero-shot (log scale)")
    what = "accuracy" if metric == "accuracy" else "score"
    ax.set_ylabel("average test accuracy (%)" if what == "accuracy" else
                  "average test score (%): accuracy; MCC for CoLA, F1 for MRPC")
    ax.set_title(f"{protocol}: {what} vs inference cost", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(records: list[dict], out: Path, cfg, ws) -> dict:
    df = pd.DataFrame.from_records(records, columns=["protocol", "method", "prediction", "task", "seed", "metric",
                                                     "value"])
    df.to_csv(out / "results.csv", index=False)
    df = with_task_scores(df)
    metric = "score" if (df.metric == "score").any() else "accuracy"
    parts, summary = [f"# Benchmark `{out}`", "",
                      f"Seeds {cfg.seeds}; mean ± sd over seeds (paired: every method sees the same data and seed); "
                      f"per-sample methods at rank {cfg.rank or 'full'}, {cfg.epochs} epochs with val selection; "
                      f"`(MC)`: Monte-Carlo posterior-predictive average of {cfg.eval_samples} draws, otherwise one "
                      f"composed model per input (or per task). Inference cost: time per test input relative to "
                      f"zero-shot on the same machine. Names and units: docs/glossary.md.", ""], {}
    for protocol in dict.fromkeys(df.protocol):
        for i, tasks in enumerate(task_sets(df, protocol)):
            key = protocol if i == 0 else f"{protocol}:{','.join(tasks)}"
            table, summary[key] = protocol_table(df, protocol, tasks, metric)
            scope = "" if i == 0 else f" — every method, on {', '.join(tasks)}"
            title = TITLES[protocol] if metric == "accuracy" else TITLES[protocol].replace(
                "accuracy %", "score % (accuracy; MCC for CoLA, F1 for MRPC)")
            parts += [f"## {title}{scope}", "", table]
        plot_accuracy(df, protocol, out / f"accuracy_{protocol}.png")
        plot_cost(summary[protocol], protocol, out / f"cost_{protocol}.png", metric)
        parts += [f"![accuracy per task]({'accuracy_' + protocol}.png)", ""]
    table, summary["posterior"] = posterior_table(df, ISSUE_TARGETS)
    if table:
        parts += [f"## Posterior quality: target composition on {', '.join(ISSUE_TARGETS)} (task-averaged; the "
                  f"learned quantities on the training/selection inputs; docs/inference.md)", "", table]
    (out / "table.md").write_text("\n".join(parts))
    return {"summary": summary, "markdown": "\n".join(parts)}
