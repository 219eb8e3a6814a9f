"""`pyro-tvc benchmark` end to end on the small prepared fixture: records, tables, resume, bad input."""
import json

import numpy as np
import pandas as pd
import pytest

from pyro_tvc.cli import main

QUICK = ["--negation-control", "mnist", "--seeds", "1", "--epochs", "1", "--max-train", "64", "--eval-samples", "2",
         "--rank", "4",
         "--adamerging-steps", "3", "--selection-per-task", "32", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def bench(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    code = main(["benchmark", "--artifacts", str(prepared), "--out", str(out), "--protocols", "target", "addition",
                 "negation", "--methods", "zero_shot", "finetuned", "task_arithmetic", "ties", "atlas", "adamerging",
                 "vtvc_gated", "--targets", "digits", *QUICK])
    assert code == 0
    return out


def test_benchmark_writes_tidy_records_tables_and_plots(bench, prepared):
    df = pd.read_csv(bench / "results.csv")
    assert list(df.columns) == ["protocol", "method", "prediction", "task", "seed", "metric", "value"]
    acc = df[df.metric == "accuracy"]
    target = acc[acc.protocol == "target"]
    assert set(target.method) == {"zero_shot", "finetuned", "task_arithmetic", "ties", "atlas", "adamerging",
                                  "vtvc_gated"}
    assert set(target[target.method == "vtvc_gated"].prediction) == {"single", "mc"}
    # zero-shot and fine-tuned target accuracy equal prepare's independent table (same test split, same weights)
    table = {r["task"]: r for r in json.loads((prepared / "table.json").read_text())["rows"]}
    zs = target[(target.method == "zero_shot") & (target.task == "digits")].value.item()
    ft = target[(target.method == "finetuned") & (target.task == "digits")].value.item()
    assert zs == pytest.approx(table["digits"]["zero_shot"], abs=0.01)
    assert ft == pytest.approx(table["digits"]["fine_tuned"], abs=0.01)
    # task addition: every prepared task, normalised = accuracy / fine-tuned accuracy
    add = df[(df.protocol == "addition") & (df.method == "atlas")]
    for task, row in table.items():
        a = add[(add.metric == "accuracy") & (add.task == task)].value.item()
        n = add[(add.metric == "normalized_accuracy") & (add.task == task)].value.item()
        assert n == pytest.approx(100 * a / row["fine_tuned"], rel=1e-6)
    assert set(df[df.protocol == "negation"].metric) >= {"accuracy", "control_accuracy", "control_retained_percent"}
    assert "adamerging" not in set(df[df.protocol == "negation"].method)  # no negation objective
    # calibration per task and prediction, and what VTVC's posterior learned (issue 11's measures)
    tg = df[(df.protocol == "target") & (df.task == "digits")]
    for metric, low, high in (("nll", 0.0, 20.0), ("ece", 0.0, 100.0)):
        v = tg[tg.metric == metric]
        assert set(v.method) == set(target.method) and v.value.between(low, high).all(), metric
    learned = df[(df.protocol == "target") & (df.method == "vtvc_gated") & (df.task == "digits")]
    got = dict(zip(learned.metric, learned.value))
    assert got["true_elbo_per_datum"] < 0 and 1 <= got["selected_epoch"] <= 1
    assert 0 <= got["gate_fraction_reliable"] <= 1 and 0 <= got["gate_fraction_included"] <= 1
    md = (bench / "table.md").read_text()
    for label in ("Zero-shot", "TIES", "aTLAS", "AdaMerging", "VTVC gated (MC)", "Task addition", "Task negation"):
        assert label in md
    assert (bench / "accuracy_target.png").stat().st_size > 0 and (bench / "cost_target.png").exists()
    cfg = json.loads((bench / "config.json").read_text())
    assert cfg["seeds"] == [1] and "git_commit" in cfg and (bench / "command.txt").exists()


def test_benchmark_resume_reuses_finished_cells(bench, prepared, monkeypatch):
    import pyro_tvc.methods as methods

    def boom(ctx):
        raise AssertionError("a cached cell was recomputed")

    for name in ("zero_shot", "atlas", "vtvc_gated"):
        monkeypatch.setitem(methods._METHODS, name, methods._METHODS[name].__class__(
            **{**methods._METHODS[name].__dict__, "fit": boom}))
    before = (bench / "results.csv").read_text()
    code = main(["benchmark", "--artifacts", str(prepared), "--out", str(bench), "--protocols", "target", "addition",
                 "negation", "--methods", "zero_shot", "finetuned", "task_arithmetic", "ties", "atlas", "adamerging",
                 "vtvc_gated", "--targets", "digits", "--resume", *QUICK])
    assert code == 0
    assert (bench / "results.csv").read_text() == before


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--protocols", "bogus"], "unknown protocol 'bogus'"),
    (["--targets", "svhn"], "unknown target 'svhn'"),
    (["--seeds", "0"], "--seeds must be positive"),
    (["--seeds", "-2", "1"], "--seeds must be positive"),
    (["--pool", "svhn"], "--pool task 'svhn'"),
    (["--protocols", "negation", "--targets", "digits", "--pool", "nope"], "--pool task 'nope'"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--protocols", "negation", "--targets", "digits"], "negation control 'cifar10' has no prepared head"),
])
def test_benchmark_bad_input_one_line_exit_2_nothing_written(prepared, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code = main(["benchmark", "--artifacts", str(prepared), "--out", str(out), "--quiet", "--device", "cpu", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_negation_target_without_vector_is_refused(prepared, tmp_path, capsys):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(prepared, art)
    (art / "task_vectors" / "digits.safetensors").unlink()
    code = main(["benchmark", "--artifacts", str(art), "--out", str(tmp_path / "o"), "--protocols", "negation",
                 "--targets", "digits", "--quiet", "--device", "cpu"])
    assert code == 2 and "has no prepared task vector" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nll_and_gate_statistics_on_hand_made_cases():
    import math

    import torch

    from pyro_tvc.guides.gated import gate_statistics
    from pyro_tvc.protocols.common import nll

    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    assert nll(probs, torch.tensor([0, 1, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.1) + math.log(0.8)) / 3)

    class Guide:  # 1 input, T=1, B=4: pruned, reliable+included, sampled+included, sampled+excluded
        def masks(self, f):
            return torch.tensor([[[True, False, False, False]]]), torch.tensor([[[False, True, False, False]]])

        def point_estimate(self, f):
            return torch.tensor([[[0.0, 0.3, -0.2, 0.0]]])

    got = gate_statistics(Guide(), torch.zeros(1, 8))
    assert got == {"gate_fraction_pruned": 0.25, "gate_fraction_reliable": 0.25, "gate_fraction_sampled": 0.5,
                   "gate_fraction_included": 0.5, "gate_reliable_among_included": 0.5}


def test_evaluate_fit_records_calibration_and_auroc_against_hand_computation():
    """A hand-made predictor on 6 inputs of one task: NLL, ECE and the AUROC of the predictive entropy for errors,
    counted here pair by pair (ties count a half)."""
    import math

    import torch

    from pyro_tvc.methods.base import FitResult, Predictor, TaskData
    from pyro_tvc.protocols.common import evaluate_fit

    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5], [0.7, 0.3], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0, 1, 0])

    class Fixed(Predictor):
        def probs(self, data):
            return probs

        def exact_zero_fraction(self, data):
            return None

    test = TaskData(torch.zeros(6, 3, 2, 2), torch.zeros(6, 4), labels, torch.zeros(6, dtype=torch.long))
    rows = evaluate_fit("target", "hand", 1, FitResult({"single": Fixed()}), test, ["t"])
    got = {r["metric"]: r["value"] for r in rows if r["task"] == "t"}
    wrong = (probs.argmax(1) != labels).tolist()  # argmax of the tie [0.5, 0.5] is class 0: right
    entropy = [-(p * p.log()).sum().item() for p in probs]
    pairs = [(e_w, e_r) for e_w, w in zip(entropy, wrong) if w for e_r, r in zip(entropy, wrong) if not r]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert got["auroc_entropy_error"] == pytest.approx(expected)
    assert got["nll"] == pytest.approx(-sum(math.log(probs[i, labels[i]]) for i in range(6)) / 6)
    assert got["accuracy"] == pytest.approx(100 * (1 - sum(wrong) / 6))
    assert "mcc" not in got  # no paper metric unless the workspace names one (an image task may be called cola)
    for paper in ({}, {"cola": "mcc"}):  # an image folder may be called cola: only the workspace decides
        rows = evaluate_fit("target", "hand", 1, FitResult({"single": Fixed()}), test, ["cola"], paper_metrics=paper)
        got = {r["metric"]: r["value"] for r in rows if r["task"] == "cola"}
        if paper:  # binary MCC is the Pearson correlation of the 0/1 predictions and labels
            expected = np.corrcoef(probs.argmax(1).numpy(), labels.numpy())[0, 1]
            assert got["mcc"] == pytest.approx(100 * expected)
        else:
            assert "mcc" not in got and "f1" not in got


def test_protocol_table_cells_from_hand_made_records():
    """Per-task cells, averages and the extra columns of the tables against values written by hand (two methods,
    two seeds; addition has an extra normalised column that must not leak into the task cells; text-style
    records switch the cells to each task's paper metric)."""
    from pyro_tvc.experiments.report import protocol_table, with_task_scores

    rows = []
    acc = {("atlas", 1): (50.0, 60.0), ("atlas", 2): (52.0, 62.0), ("ties", 1): (40.0, 44.0), ("ties", 2): (42.0, 46.0)}
    for (m, seed), (a, b) in acc.items():
        for task, v in (("x", a), ("y", b)):
            rows.append(("addition", m, "single", task, seed, "accuracy", v))
            rows.append(("addition", m, "single", task, seed, "normalized_accuracy", 99.0))
    df = pd.DataFrame(rows, columns=["protocol", "method", "prediction", "task", "seed", "metric", "value"])
    table, summary = protocol_table(df, "addition", ["x", "y"])
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    for method, label in (("atlas", "aTLAS"), ("ties", "TIES")):
        row = next(v for k, v in lines.items() if k.startswith(label))
        x = [acc[(method, s)][0] for s in (1, 2)]
        assert row[1] == f"{sum(x) / 2:.1f} ± {pd.Series(x).std():.1f}"  # the task cell: accuracy, not 99
        assert summary[f"{method}:single"]["average"] == pytest.approx(sum(sum(acc[(method, s)]) / 2 for s in (1, 2)) / 2)
        assert summary[f"{method}:single"]["normalized_accuracy"] == pytest.approx(99.0)
    text = df.copy()
    text.loc[text.task == "y", "task"] = "cola"
    mcc = text[(text.metric == "accuracy") & (text.task == "cola")].assign(metric="mcc", value=10.0)
    scored = with_task_scores(pd.concat([text, mcc], ignore_index=True))
    table, summary = protocol_table(scored, "addition", ["x", "cola"], "score")
    assert "cola (MCC)" in table.splitlines()[0]
    assert summary["atlas:single"]["average"] == pytest.approx((51.0 + 10.0) / 2)
    # a task named like a GLUE task but scored by accuracy (an image folder called cola): no metric in its header
    named = df.copy()
    named.loc[named.task == "y", "task"] = "cola"
    named.loc[named.task == "x", "task"] = "mrpc"
    f1 = named[(named.metric == "accuracy") & (named.task == "mrpc")].assign(metric="f1", value=70.0)
    table, _ = protocol_table(with_task_scores(pd.concat([named, f1], ignore_index=True)), "addition",
                              ["mrpc", "cola"], "score")
    assert table.splitlines()[0].startswith("| method | mrpc (F1) | cola | average")


def test_cell_key_follows_what_the_cell_reads(tmp_path):
    """A hand-made artefact folder and workspace: each protocol's key moves exactly when something its cells read
    changes (a head's or vector's recipe, an unrecorded vector's content, your own task's files, addition's fine-tuned
    accuracy, one more prepared vector in the default pool) and stays put otherwise."""
    import types

    import torch
    from safetensors.torch import save_file

    from pyro_tvc.artifacts import ArtifactPaths
    from pyro_tvc.experiments.config import BenchmarkConfig
    from pyro_tvc.experiments.runner import cell_key

    paths = ArtifactPaths(tmp_path / "artifacts")
    (paths.root / "heads").mkdir(parents=True)
    (paths.root / "task_vectors").mkdir()

    def write(path, value, recipe):
        meta = {} if recipe is None else {"recipe": json.dumps(recipe)}
        save_file({"w": torch.full((2,), float(value))}, str(path), metadata=meta)

    for t in "abcd":
        write(paths.head(t), 0, {"head": t})
    for t in "abc":
        write(paths.task_vector(t), 0, {"vector": t})
    mine = tmp_path / "my_task"  # task c's data is your own folder
    mine.mkdir()
    (mine / "x.txt").write_text("1")
    finetuned = {"a": 90.0, "b": 80.0, "c": 70.0}
    ws = types.SimpleNamespace(paths=paths, with_vectors=["a", "b", "c"], with_heads=["a", "b", "c", "d"],
                               theta0_sha256="t0", custom={"c": str(mine)}, finetuned_accuracy=finetuned.get)
    cells = {"target": ("target", "atlas", "a", 1), "negation": ("negation", "atlas", "a", 1),
             "addition": ("addition", "atlas", "ALL", 1)}

    def changed(step, cfg=BenchmarkConfig(negation_control="d")) -> set[str]:
        before = {k: cell_key(cfg, ws, c) for k, c in cells.items()}
        step()
        return {k for k, c in cells.items() if cell_key(cfg, ws, c) != before[k]}

    assert changed(lambda: write(paths.task_vector("b"), 5, {"vector": "b"})) == set()  # same recipe, new bytes
    assert changed(lambda: write(paths.task_vector("b"), 0, {"vector": "b", "steps": 300})) == {"target", "addition"}
    assert changed(lambda: write(paths.head("d"), 0, {"head": "d", "n": 2})) == {"negation"}  # the control's head
    assert changed(lambda: write(paths.head("b"), 0, {"head": "b", "n": 2})) == {"addition"}  # target reads a's only
    assert changed(lambda: write(paths.head("a"), 0, {"head": "a", "n": 2})) == set(cells)
    assert changed(lambda: write(paths.task_vector("a"), 0, {"vector": "a", "n": 2})) == set(cells)  # own vector
    write(paths.task_vector("c"), 1, None)
    assert changed(lambda: write(paths.task_vector("c"), 2, None)) == {"target", "addition"}  # content, no recipe
    assert changed(lambda: (mine / "x.txt").write_text("22")) == {"addition"}  # c's data: addition reads it
    assert changed(lambda: finetuned.update(b=81.0)) == {"addition"}  # the normalised accuracy's denominator

    def one_more_vector():
        write(paths.task_vector("e"), 0, {"vector": "e"})
        ws.with_vectors.append("e")
        ws.with_heads.append("e")
        write(paths.head("e"), 0, {"head": "e"})

    pooled = BenchmarkConfig(negation_control="d", pool=["a", "b"])
    assert changed(lambda: write(paths.task_vector("c"), 3, None), pooled) == set()  # outside an explicit pool
    assert changed(one_more_vector) == {"target", "addition"}  # joins the default pool only
