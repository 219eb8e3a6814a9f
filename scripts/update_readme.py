"""Rewrite the results section of README.md (between the results markers) from the results files.

    make full        # pyro-tvc benchmark --full -> results/ (then this script)
    make results     # the engine benchmarks -> benchmarks/results/ (then this script)
Every number in that section comes from a file: results/results.json and results/table.md (the full benchmark),
results/converged/ and results/converged_all/ (the longer-trained methods), gradient_variance_conditional_gated.json,
benchmarks/results/prepare_table.json (a copy of artifacts/pyro-tvc-tiny/table.json), compose_quick.json,
compose_full.json, svi_step.json, lowrank_accuracy.json, gradient_variance.json; the text path's
results/text/ and benchmarks/results/prepare_text_table.json (``make text``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(rel: str):
    path = ROOT / rel
    return json.loads(path.read_text()) if path.exists() else None


def fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


def paired(summary: dict, a: str, b: str) -> tuple[float, float, int] | None:
    """Mean and sd over seeds of the paired per-seed difference of two methods' average accuracy (a - b)."""
    if a not in summary or b not in summary:
        return None
    sa, sb = summary[a]["per_seed"], summary[b]["per_seed"]
    diffs = [sa[k] - sb[k] for k in sa if k in sb]
    if not diffs:
        return None
    mean = sum(diffs) / len(diffs)
    sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5 if len(diffs) > 1 else 0.0
    return mean, sd, len(diffs)


def claim(summary: dict, a: str, b: str, what: str) -> str:
    d = paired(summary, a, b)
    if d is None:
        return f"* {what}: not measured (missing `{a}` or `{b}`)."
    mean, sd, n = d
    if n < 2:
        return (f"* {what}: one seed so far, no noise estimate — {summary[a]['average']:.1f} vs "
                f"{summary[b]['average']:.1f} % on average ({mean:+.1f} points).")
    holds = "holds" if mean - sd > 0 else ("does not hold" if mean + sd < 0 else "is within the seed noise")
    return (f"* {what}: {holds} here — {summary[a]['average']:.1f} vs {summary[b]['average']:.1f} % on average, "
            f"paired difference {mean:+.1f} ± {sd:.1f} points over {n} seeds.")


def claims(summary: dict, pairs: list[tuple[str, str, str]]) -> list[str]:
    """One :func:`claim` line per ``(a, b, what)``."""
    return [claim(summary, a, b, what) for a, b, what in pairs]


def benchmark_section() -> list[str]:
    res = load("results/results.json")
    if not res:
        return []
    cfg, summary = res["config"], res["summary"]
    planned = load("results/config.json").get("cells", "?")
    done = len(list((ROOT / "results" / "cells").glob("*.json")))
    table = (ROOT / "results" / "table.md").read_text().split("\n", 2)[-1]
    parts = [f"**Benchmark** (`results/table.md`, `results/results.json`; `pyro-tvc benchmark --full`, seeds "
             f"{cfg['seeds']}, per-sample methods at rank {cfg['rank'] or 'full'}, {cfg['epochs']} epochs, at most "
             f"{cfg['max_train']} training images per task; "
             + (f"all {done} cells" if done == planned else
                f"{done} of the {planned} planned cells finished: `make full` resumes the rest")
             + "). Results differ slightly across machines (threading changes float sums); train time and inference "
               "cost were measured cell by cell, several cells running at once on 2 cores, so they are rough.\n", table.replace("](", "](results/"),
             "**The paper's claims, measured here** (target composition unless stated; from `results/results.json`):\n"]
    t = summary.get("target", {})
    abl_key = next((k for k in summary if k.startswith("target:")), None)
    ab = summary.get(abl_key, {})
    scope = f" (on {abl_key.split(':', 1)[1].replace(',', ', ')})" if abl_key else ""
    parts.append(claim(t, "vtvc_gated:single", "atlas:single", "VTVC (gated, one model per input) > aTLAS"))
    parts.append(claim(t, "vtvc_gated:mc", "atlas:single", "VTVC (gated, MC average) > aTLAS"))
    parts.append(claim(t, "vtvc_gated:single", "metanet:single", "VTVC (gated) vs the deterministic meta-net"))
    parts.append(claim(t, "vtvc_gated:single", "vtvc_ungated:single", "gating helps (single model per input)"))
    parts.append(claim(t, "vtvc_gated:mc", "vtvc_ungated:mc", "gating helps (MC average)"))
    parts.append(claim(ab, "vtvc_ungated:mc", "vtvc_gaussian:mc", "spike-and-slab helps over a Gaussian prior (MC)"
                       + scope))
    for v2 in ("vtvc_conditional", "vtvc_conditional_gated", "vtvc_hierarchical", "vtvc_hierarchical_gated"):
        parts.append(claim(ab, f"{v2}:single", "metanet:single", f"`{v2}` (KL weight 1) vs the meta-net" + scope))
    g = t.get("vtvc_gated:single", {})
    if g:
        parts.append(f"* spike-and-slab is sparse: the gated single models have {g.get('exact_zero_percent', 0):.1f} % "
                     f"exact-zero coefficients; their inference costs {g.get('relative_inference_cost') or 0:.2f} x "
                     f"zero-shot per input (aTLAS, one merged model: "
                     f"{t.get('atlas:single', {}).get('relative_inference_cost') or 0:.2f} x).")
    best = max(((k, v) for k, v in t.items() if v["average"] == v["average"] and not k.startswith("finetuned")),
               key=lambda kv: kv[1]["average"], default=None)
    if best:
        parts.append(f"* best method on average (fine-tuned excluded): `{best[0]}` with {best[1]['average']:.1f} %.")
    for key, proto in (("target", "target composition"), ("addition", "task addition")):
        ada, zs = summary.get(key, {}).get("adamerging:single"), summary.get(key, {}).get("zero_shot:single")
        if ada and zs:
            parts.append(f"* AdaMerging with its paper defaults collapses here ({proto}): {ada['average']:.1f} % vs "
                         f"zero-shot {zs['average']:.1f} %. Its starting point (0.3 x every vector) already predicts "
                         f"almost one class with the tiny CLIP, and entropy minimisation makes that confident "
                         f"(docs/methods.md).")
    mn, at = t.get("metanet:single"), t.get("atlas:single")
    if mn and at:
        parts.append(f"* per-input composition vs one task-level composition: meta-net {mn['average']:.1f} %, aTLAS "
                     f"{at['average']:.1f} %, at {cfg['max_train']} training images and {cfg['epochs']} epochs.")
    a = summary.get("addition", {})
    if a:
        parts.append(claim(a, "vtvc_gated:single", "atlas:single", "task addition: VTVC (gated) > aTLAS"))
    n = summary.get("negation", {})
    prep = load("benchmarks/results/prepare_table.json")
    if n.get("vtvc_gated:single") and n.get("atlas:single") and prep:
        rows = prep["rows"]  # the nine targets
        chance = sum(r["chance"] for r in rows) / len(rows)
        v, at, mn = n["vtvc_gated:single"], n["atlas:single"], n.get("metanet:single", {})
        parts.append(f"* task negation (lower is better, control kept >= 95 % of zero-shot): VTVC (gated) "
                     f"{v['average']:.1f} %, meta-net {mn.get('average', float('nan')):.1f} %, aTLAS {at['average']:.1f} %, "
                     f"zero-shot {n['zero_shot:single']['average']:.1f} %, with the control at "
                     f"{v['control_retained_percent']:.0f} % of its zero-shot accuracy for VTVC. The per-input methods "
                     f"go below chance ({chance:.1f} % on average): they learn to predict a wrong class, which the "
                     f"protocol's accuracy rewards; aTLAS's one merged model per task stays above it.")
    parts.append("")
    return parts


def converged_section() -> list[str]:
    """results/converged: the per-sample methods trained 15 epochs (val-selected) on issue 11's targets."""
    res = load("results/converged/results.json")
    if not res:
        return []
    cfg, summary = res["config"], res["summary"]
    t, post = summary.get("target", {}), summary.get("posterior", {})
    table = (ROOT / "results" / "converged" / "table.md").read_text().split("\n", 2)[-1]
    parts = [f"**Trained longer** (`results/converged/`: `pyro-tvc benchmark --protocols target --methods "
             f"{' '.join(cfg['methods'])} --targets {' '.join(cfg['targets'])} --seeds "
             f"{' '.join(map(str, cfg['seeds']))} --epochs {cfg['epochs']} --out results/converged`). At 5 epochs "
             f"(the table above) the per-sample methods are still improving on mnist; here each trains "
             f"{cfg['epochs']} epochs and keeps its best validation epoch.\n",
             table.replace("](", "](results/converged/"), "**Issue 11's measures on these runs:**\n"]
    parts.append(claim(t, "vtvc_conditional_gated:single", "metanet:single",
                       "conditional prior, gated, KL weight 1 (one model per input) vs the meta-net"))
    parts.append(claim(t, "vtvc_conditional_gated:mc", "metanet:single",
                       "conditional prior, gated, KL weight 1 (MC average) vs the meta-net"))
    parts.append(claim(t, "vtvc_gated:single", "metanet:single", "VTVC gated (tempered KL) vs the meta-net"))
    cg, mn = post.get("vtvc_conditional_gated:single", {}), post.get("metanet:single", {})
    if cg and mn:
        parts.append(f"* NLL (nats, mean over targets and seeds): conditional gated {fmt(cg['nll']['mean'], 3)}, "
                     f"meta-net {fmt(mn['nll']['mean'], 3)}; true ELBO per input "
                     f"{fmt(cg['true_elbo_per_datum']['mean'], 2)}; its gate marks "
                     f"{fmt(cg['gate_reliable_among_included']['mean'])} % of the included coefficients "
                     f"reliable (target >= 25 %); the label moves the posterior by "
                     f"KL(q(.|x,y) || p(.|x)) = {fmt(cg['kl_q_p_per_input']['mean'], 4)} nats per input.")
    for name in ("gradient_variance_conditional_gated", "gradient_variance_conditional_gated_inclusion07"):
        gv = load(f"benchmarks/results/{name}.json")
        if gv:
            parts.append(gate_line(name, gv))
    parts.append("")
    return parts


def gate_line(name: str, gv: dict) -> str:
    """The gate's gradient measures of one gradient_variance.py run, and its threshold sweep."""
    trained = next((x.split("=", 1)[1] for x in gv.get("set", []) if x.startswith("gate.inclusion_min=")), "0.9")
    test = gv.get("test", {})
    line = (f"* its gradient (`benchmarks/results/{name}.json`, mnist, seed 1, {gv['train_epochs']} epochs, trained "
            f"with inclusion_min {trained}): gated / ungated total variance "
            f"{fmt(gv['variance_ratio_gated_to_ungated'], 2)} (target <= 0.5), cosine of the mean gradients "
            f"{fmt(gv['cosine_gated_to_ungated_mean'], 3)} (target >= 0.95), reliable among included "
            f"{fmt(100 * (gv.get('gate_reliable_among_included') or 0))} % (target >= 25 %)")
    if test:
        line += (f"; test accuracy {fmt(test.get('single_model_accuracy'))} % one model per input, "
                 f"{fmt(test.get('mc_accuracy'))} % MC")
    sweep = [f"{p['inclusion_min']:g}/{p['cv_max']:g}: {p['variance_ratio_gated_to_ungated']:.2f}, "
             f"{p['cosine_gated_to_ungated_mean']:.3f}, {100 * (p['gate_reliable_among_included'] or 0):.0f} %"
             for p in gv.get("gate_sweep", [])]
    if sweep:
        line += (". The same trained guide measured with other thresholds (inclusion_min/cv_max: variance ratio, "
                 "cosine, reliable among included): " + "; ".join(sweep))
    return line + "."


def converged_all_section() -> list[str]:
    """results/converged_all: the learned target-composition methods trained 15 epochs on all nine targets (issue 9)."""
    res = load("results/converged_all/results.json")
    if not res:
        return []
    cfg, t = res["config"], res["summary"].get("target", {})
    epochs = [r for r in res["records"] if r["metric"] == "selected_epoch"]
    early = sum(r["value"] < cfg["epochs"] for r in epochs)
    table = (ROOT / "results" / "converged_all" / "table.md").read_text().split("\n", 2)[-1]
    return [f"**Every target, trained to convergence** (`results/converged_all/`: `pyro-tvc benchmark --protocols "
            f"target --methods {' '.join(cfg['methods'])} --seeds {' '.join(map(str, cfg['seeds']))} --epochs "
            f"{cfg['epochs']} --out results/converged_all`; the best validation epoch was before the last in {early} "
            f"of {len(epochs)} per-sample cells):\n", table.replace("](", "](results/converged_all/"),
            "**The paper's main claims at convergence** (paired over seeds, from `results/converged_all/results.json`):\n",
            *claims(t, [("vtvc_gated:single", "atlas:single", "VTVC (gated, one model per input) > aTLAS"),
                        ("vtvc_gated:mc", "atlas:single", "VTVC (gated, MC average) > aTLAS"),
                        ("vtvc_gated:single", "metanet:single", "VTVC (gated) vs the deterministic meta-net"),
                        ("metanet:single", "atlas:single", "per-input (meta-net) > task-level (aTLAS) composition"),
                        ("vtvc_gated:single", "vtvc_ungated:single", "gating helps (single model per input)"),
                        ("vtvc_gated:mc", "vtvc_ungated:mc", "gating helps (MC average)"),
                        ("vtvc_gated:single", "task_level_vi:single",
                         "per-input VTVC > task-level variational composition")]), ""]


def text_section() -> list[str]:
    """results/text: the same benchmark on text artefacts (prepare --modality text; issue 14)."""
    res, prep = load("results/text/results.json"), load("benchmarks/results/prepare_text_table.json")
    parts = []
    if prep:
        enc = prep["encoder"]
        parts += [f"**Text** (`benchmarks/results/prepare_text_table.json`, a copy of the table of `pyro-tvc prepare "
                  f"--modality text`): {enc['name']}, {enc['max_length']} tokens, the top "
                  f"{enc['layers'] - enc['start_layer']} of {enc['layers']} layers fine-tuned, head = linear probe "
                  f"on theta_0's sentence features; prepare took {prep['seconds']:.0f} s. Test %:\n",
                  "| task | classes | probe (zero-shot column) | fine-tuned | paper metric: probe -> fine-tuned |",
                  "|---|---|---|---|---|"]
        for r in prep["rows"]:
            metric = "" if r["metric"] == "accuracy" else \
                f"{r['metric'].upper()} {fmt(r['probe_metric'])} -> {fmt(r['fine_tuned_metric'])}"
            parts.append(f"| {r['task']} | {r['classes']} | {fmt(r['zero_shot'])} | {fmt(r['fine_tuned'])} | {metric} |")
        parts.append("")
    if res:
        cfg, t = res["config"], res["summary"].get("target", {})
        table = (ROOT / "results" / "text" / "table.md").read_text().split("\n", 2)[-1]
        parts += [f"**Text benchmark** (`results/text/`: `pyro-tvc benchmark --artifacts {Path(cfg['artifacts']).name} "
                  f"...`, seeds {cfg['seeds']}, {cfg['epochs']} epochs, at most {cfg['max_train']} training texts "
                  f"per target; scores: accuracy, MCC for CoLA, F1 for MRPC):\n", table.replace("](", "](results/text/"),
                  "**On text** (paired over seeds, from `results/text/results.json`):\n",
                  *claims(t, [("vtvc_gated:single", "atlas:single", "VTVC (gated) > aTLAS"),
                              ("vtvc_gated:single", "task_arithmetic:single", "VTVC (gated) > Task Arithmetic"),
                              ("vtvc_gated:single", "metanet:single", "VTVC (gated) vs the meta-net"),
                              ("atlas:single", "zero_shot:single", "aTLAS > the frozen probe (zero-shot row)")]), ""]
    return parts


def main() -> None:
    parts = []
    table = load("benchmarks/results/prepare_table.json")
    if table:
        parts.append(f"**Embedded default** (`benchmarks/results/prepare_table.json`): test top-1 %, "
                     f"prepare took {table['seconds']:.0f} s.\n")
        parts.append("| task | classes | chance | zero-shot | fine-tuned |\n|---|---|---|---|---|")
        for r in table["rows"]:
            parts.append(f"| {r['task']} | {r['classes']} | {fmt(r['chance'])} | {fmt(r['zero_shot'])} | {fmt(r['fine_tuned'])} |")
        a = table["average"]
        parts.append(f"| **average** | | {fmt(a['chance'])} | {fmt(a['zero_shot'])} | {fmt(a['fine_tuned'])} |\n")
    parts += benchmark_section()
    parts += converged_section()
    parts += converged_all_section()
    parts += text_section()
    comp = load("benchmarks/results/compose_quick.json")
    if comp:
        parts.append(f"**Composition engine** (`benchmarks/results/compose_quick.json`, tiny CLIP, batch 64, T = 7, "
                     f"{comp[0]['threads']} CPU threads):\n")
        parts.append("| method | rank | forward ms | × plain | fwd+bwd ms | × plain | peak MB | × plain |\n|---|---|---|---|---|---|---|---|")
        for r in comp:
            parts.append(f"| {r['method']} | {r['rank'] or '–'} | {fmt(r['forward_ms'])} | {fmt(r['forward_ratio_to_plain'], 2)} | "
                         f"{fmt(r['forward_backward_ms'])} | {fmt(r['forward_backward_ratio_to_plain'], 2)} | "
                         f"{fmt(r['peak_mem_mb'])} | {fmt(r['mem_ratio_to_plain'], 2)} |")
        parts.append("")
    full = load("benchmarks/results/compose_full.json")
    if full:
        vit = [r for r in full if r["model"] != "pyro-tvc-tiny"]
        parts.append("**ViT-B/32** (random weights, T = 7, `benchmarks/results/compose_full.json`; skipped rows keep N "
                     "copies of theta for backward, 22 GB at batch 64):\n")
        parts.append("| batch | method | rank | forward × plain | fwd+bwd × plain | peak memory × plain |\n|---|---|---|---|---|---|")
        for r in vit:
            if "skipped" in r:
                parts.append(f"| {r['batch']} | {r['method']} | {r['rank'] or '–'} | skipped | | |")
            else:
                parts.append(f"| {r['batch']} | {r['method']} | {r['rank'] or '–'} | {fmt(r['forward_ratio_to_plain'], 2)} | "
                             f"{fmt(r['forward_backward_ratio_to_plain'], 2)} | {fmt(r['mem_ratio_to_plain'], 2)} |")
        parts.append("")
    svi = load("benchmarks/results/svi_step.json")
    if svi:
        parts.append("**SVI step vs task-level (aTLAS-style) step**, same batch (`benchmarks/results/svi_step.json`):\n")
        parts.append("| rank | batch | SVI step ms | task-level step ms | ratio |\n|---|---|---|---|---|")
        for r in svi:
            parts.append(f"| {r['rank'] or 'full'} | {r['batch']} | {fmt(r['svi_step_ms'])} | {fmt(r['task_level_step_ms'])} | "
                         f"{fmt(r['ratio'], 2)} |")
        parts.append("")
    lr = load("benchmarks/results/lowrank_accuracy.json")
    if lr:
        parts.append("**Low-rank task vectors** (`benchmarks/results/lowrank_accuracy.json`): relative error of the "
                     "rank-r matrix blocks and mean test accuracy of theta_0 + tau_t^(r) over the 9 tasks:\n")
        parts.append("| rank | " + " | ".join(str(r["rank"] or "full") for r in lr) + " |")
        parts.append("|---|" + "---|" * len(lr))
        parts.append("| relative error | " + " | ".join(fmt(r["relative_error"], 3) for r in lr) + " |")
        parts.append("| mean fine-tuned accuracy | " + " | ".join(fmt(r["mean_accuracy"]) for r in lr) + " |\n")
    gv = load("benchmarks/results/gradient_variance.json")
    if gv:
        parts.append(f"**Gradient variance** (`benchmarks/results/gradient_variance.json`): gated / ungated total variance "
                     f"{fmt(gv['variance_ratio_gated_to_ungated'], 2)}, score-function / ungated "
                     f"{fmt(gv['variance_ratio_score_function_to_ungated'], 0)}; cosine between gated and ungated mean "
                     f"gradients {fmt(gv['cosine_gated_to_ungated_mean'], 3)}; gate: "
                     f"{fmt(100 * gv['gate_fraction_pruned'])} % pruned, {fmt(100 * gv['gate_fraction_reliable'])} % reliable.\n")
    readme = (ROOT / "README.md").read_text()
    block = "<!-- results:start -->\n" + "\n".join(parts) + "\n<!-- results:end -->"
    readme = re.sub(r"<!-- results:start -->.*<!-- results:end -->", lambda _: block, readme, flags=re.S)
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
