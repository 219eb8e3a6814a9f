"""Rewrite the results section of README.md (between the results markers) from the results files.

    make results     # runs the benchmarks, copies the demo's result files, then this script
Every number in that section comes from a file in benchmarks/results/: prepare_table.json (a copy of
artifacts/pyro-tvc-tiny/table.json), demo_results.json (runs/demo/results.json), demo_diagnostics_summary.json
(runs/demo/diagnostics/summary.json), compose_quick.json, svi_step.json, gradient_variance.json.
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
    res = load("benchmarks/results/demo_results.json")
    if res:
        parts.append(f"**VTVC on {res['target']}** with the other {len(res['tasks'])} task vectors, guide `{res['guide']}`, "
                     f"KL weight {res['kl_weight']} (`benchmarks/results/demo_results.json`): zero-shot {fmt(res['zero_shot_accuracy'])} %, "
                     f"MC-averaged posterior predictive {fmt(res['mc_accuracy'])} %, gated single model per input "
                     f"{fmt(res['gated_accuracy'])} % with {fmt(100 * res['sparsity'])} % exact zeros; true ELBO "
                     f"{fmt(res['true_elbo_per_datum'])} nats per training input; training {fmt(res['train_seconds'], 0)} s.\n")
    diag = load("benchmarks/results/demo_diagnostics_summary.json")
    if diag:
        parts.append("Calibration on the test split (`benchmarks/results/demo_diagnostics_summary.json`):\n")
        parts.append("| prediction | accuracy | NLL | Brier | ECE | AUROC entropy→error |\n|---|---|---|---|---|---|")
        for r in diag["calibration"]:
            parts.append(f"| {r['prediction']} | {fmt(r['accuracy'])} | {fmt(r['nll'], 3)} | {fmt(r['brier'], 3)} | "
                         f"{fmt(r['ece'], 3)} | {fmt(r['auroc_entropy_error'], 3)} |")
        parts.append("")
    var = load("benchmarks/results/variants.json")
    if var:
        parts.append(f"**Guide variants** on the same target (`benchmarks/results/variants.json`, rank-{var[0]['rank']} "
                     "composition, KL weight 1e-3 in training; ELBO with KL weight 1, each variant's own model):\n")
        parts.append("| guide | MC accuracy | single-model accuracy | exact zeros % | true ELBO / input | train s |\n"
                     "|---|---|---|---|---|---|")
        for r in var:
            parts.append(f"| {r['guide']} | {fmt(r['mc_accuracy'])} | {fmt(r['gated_accuracy'])} | "
                         f"{fmt(100 * r['sparsity'])} | {fmt(r['true_elbo_per_datum'])} | {fmt(r['train_seconds'], 0)} |")
        parts.append("")
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
