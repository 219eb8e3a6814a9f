"""Diagnostics: the exported DataTree reloads with its dims, coords and groups (read with ArviZ's own accessors),
every summary number matches an independent numpy computation on the same draws, the report fits the guide, bad
arguments fail before any work and leave nothing behind, and a copied run folder finds its artefacts."""
import csv
import itertools
import json
import shutil

import numpy as np
import pytest
from arviz_base import convert_to_dataset, extract

from pyro_tvc.diagnostics import (auroc, brier, expected_calibration_error, hdi_interval, load_datatree, mc_accuracy,
                                  resolve_run)
from pyro_tvc.diagnostics.report import DiagnoseConfig, diagnose


def _diagnose(run, **kw):
    return diagnose(DiagnoseConfig(run, num_obs=kw.pop("num_obs", 5), draws=kw.pop("draws", 40), quiet=True, **kw))


@pytest.fixture(scope="module")
def diagnosed(trained_run):
    return _diagnose(trained_run)


@pytest.fixture(scope="module")
def point_run(prepared, tmp_path_factory):
    """A one-epoch point-estimate run (guide without a posterior)."""
    from pyro_tvc.infer import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "digits-point"
    train(TrainConfig(artifacts=prepared, target="digits", out=out, guide="point", epochs=1, max_train=128,
                      eval_samples=2, quiet=True, device="cpu"))
    return out


def test_datatree_reloads_with_named_dims_and_coords(diagnosed, trained_run):
    tree = load_datatree(diagnosed / "posterior.nc")
    config = json.loads((trained_run / "config.json").read_text())
    post = tree["posterior"]
    assert post["coef"].dims == ("chain", "draw", "obs", "task", "block")
    assert post.sizes["draw"] == 40 and post.sizes["obs"] == 5
    assert list(post["task"].values) == config["tasks"] and post.sizes["block"] == config["blocks"]
    assert set(post["dataset"].values) == {"digits"}
    assert tree["posterior_predictive"]["class_probs"].dims == ("chain", "draw", "obs", "class")
    assert np.allclose(tree["posterior_predictive"]["class_probs"].values.sum(-1), 1, atol=1e-5)
    inc = post["included"].values
    assert np.array_equal(inc, (post["coef"].values != 0).astype(inc.dtype))
    assert tree["training"]["tempered_loss_per_datum"].dims == ("step",) and tree["training"].sizes["step"] > 0
    assert tree["point"]["coef_point"].dims == ("obs", "task", "block")
    assert "r_hat" in tree.attrs["draws"]  # the file says why r_hat/ESS are absent


def test_observed_label_is_a_data_variable_for_arviz(diagnosed, prepared):
    """Issue 12, case 8: ArviZ's converters see ``label`` as an observed variable, not a coordinate."""
    from pyro_tvc.data import load_embedded

    tree = load_datatree(diagnosed / "posterior.nc")
    observed = convert_to_dataset(tree, group="observed_data")
    assert list(observed.data_vars) == ["label"]
    assert "label" not in observed.coords
    test_labels = load_embedded("digits").test.tensors[1].numpy()  # independent: the data set itself
    obs = observed["obs"].values
    assert np.array_equal(observed["label"].values, test_labels[obs])
    assert np.array_equal(tree["posterior"]["obs_label"].values, test_labels[obs])


def test_prior_group_matches_the_run_prior(diagnosed, trained_run):
    """The prior group holds draws of the run's spike-and-slab prior: inclusion near pi, slab sd near its scale."""
    config = json.loads((trained_run / "config.json").read_text())
    tree = load_datatree(diagnosed / "posterior.nc")
    prior = extract(tree, group="prior", var_names="coef", combined=True).values  # ArviZ's own accessor
    assert tree["prior"]["coef"].dims == tree["posterior"]["coef"].dims
    nonzero = prior[prior != 0]
    n = prior.size
    pi = config["inclusion_prob"]
    assert abs(nonzero.size / n - pi) < 5 * np.sqrt(pi * (1 - pi) / n)
    assert nonzero.std() == pytest.approx(config["slab_scale"], rel=0.05)
    assert abs(nonzero.mean()) < 5 * config["slab_scale"] / np.sqrt(nonzero.size)


def brute_force_hdi(x, prob):
    """Every window of ceil-ish length, the narrowest one: written independently of the library's version."""
    x = sorted(x)
    k = int(np.floor(prob * len(x)))
    best = min(range(len(x) - k), key=lambda i: x[i + k] - x[i])
    return x[best], x[best + k]


def test_coefficient_summary_matches_numpy(diagnosed):
    tree = load_datatree(diagnosed / "posterior.nc")
    draws = tree["posterior"]["coef"].values[0]  # [S, N, T, B]
    obs, tasks, blocks = (list(tree["posterior"][d].values) for d in ("obs", "task", "block"))
    with open(diagnosed / "coefficients.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(obs) * len(tasks) * len(blocks)
    rng = np.random.default_rng(0)
    for row in rng.choice(rows, 40, replace=False):
        i, t, b = obs.index(int(row["obs"])), tasks.index(row["task"]), blocks.index(row["block"])
        x = draws[:, i, t, b]
        assert float(row["mean"]) == pytest.approx(x.mean(), abs=1e-6)
        assert float(row["sd"]) == pytest.approx(x.std(ddof=1), abs=1e-6)
        assert float(row["mean_mcse"]) == pytest.approx(x.std(ddof=1) / np.sqrt(len(x)), abs=1e-6)
        p = np.mean(x != 0)
        assert float(row["inclusion_prob"]) == pytest.approx(p)
        assert float(row["inclusion_prob_mcse"]) == pytest.approx(np.sqrt(p * (1 - p) / len(x)))
        lo, hi = brute_force_hdi(x, 0.94)
        assert (float(row["hdi_lower"]), float(row["hdi_upper"])) == pytest.approx((lo, hi), abs=1e-6)


def test_input_summary_matches_numpy(diagnosed):
    tree = load_datatree(diagnosed / "posterior.nc")
    draws = tree["posterior"]["coef"].values[0]
    probs = tree["posterior_predictive"]["class_probs"].values[0].mean(0)
    with open(diagnosed / "inputs.csv") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        p = probs[i]
        assert float(row["predictive_entropy"]) == pytest.approx(-np.sum(p * np.log(p)), rel=1e-4)
        assert float(row["mean_inclusion_prob"]) == pytest.approx(np.mean(draws[:, i] != 0))
        m = np.abs(draws[:, i].mean(0)).ravel()
        assert float(row["effective_active_components"]) == pytest.approx(m.sum() ** 2 / (m ** 2).sum(), rel=1e-4)
        assert int(row["prediction"]) == int(np.argmax(p))


def _final_name(run) -> str:
    """The run's final checkpoint as train records it (older runs: the last epoch's file)."""
    return json.loads((run / "config.json").read_text()).get("checkpoint_final", "epoch1.pt")


def test_report_names_checkpoint_and_links_existing_plots(diagnosed, trained_run):
    index = (diagnosed / "index.md").read_text()
    assert f"checkpoint {_final_name(trained_run)}" in index and "epoch 1" in index
    links = [line.split("(")[1].rstrip(")") for line in index.splitlines() if line.startswith("![")]
    assert len(links) >= 6
    for name in links:
        assert (diagnosed / name).stat().st_size > 5000, name  # a real image, not an empty figure
    summary = json.loads((diagnosed / "summary.json").read_text())
    assert [r["prediction"] for r in summary["calibration"]] == ["mc_average", "gated_mc_average", "single_model"]
    assert summary["gate"]["pruned_fraction"] + summary["gate"]["reliable_fraction"] + \
        summary["gate"]["sampled_fraction"] == pytest.approx(1)


def test_mc_accuracy_equals_the_runs_results(diagnosed, trained_run):
    """One quantity, one value (issue 13.2): with the run's own draws and seed, diagnose's MC accuracy is the one in
    results.json, and its exact-zero fraction (single model, whole test split) too."""
    results = json.loads((trained_run / "results.json").read_text())
    summary = json.loads((diagnosed / "summary.json").read_text())
    mc = next(r for r in summary["calibration"] if r["prediction"] == "mc_average")
    # float32 (torch) and float64 (numpy) means of the same 0/1 vector differ in the 7th digit; printed: 1 decimal
    assert mc["accuracy"] == pytest.approx(results["mc_accuracy"], abs=1e-4)
    assert summary["dataset"]["exact_zero_fraction"] == pytest.approx(
        results.get("exact_zero_fraction", results.get("sparsity")), abs=1e-6)


def test_point_run_has_no_posterior_rows(point_run):
    out = _diagnose(point_run)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["prediction"] for r in summary["calibration"]] == ["single_model"]
    assert summary["gate"] is None
    tree = load_datatree(out / "posterior.nc")
    assert {"posterior", "prior", "posterior_predictive"}.isdisjoint(tree.children)
    index = (out / "index.md").read_text()
    assert "HDI" not in index.split("## ")[0] or "no interval" in index
    assert not (out / "inclusion_heatmap.png").exists()
    with open(out / "inputs.csv") as f:
        assert "mean_inclusion_prob" not in next(csv.reader(f))


@pytest.mark.parametrize("kw, error", [
    ({"draws": 1}, "--draws must be an integer >= 2"),
    ({"num_obs": 0}, "--num-obs must be an integer >= 1"),
    ({"mc_samples": 1}, "--mc-samples must be an integer >= 2"),
    ({"seed": -1}, "--seed must be"),
    ({"checkpoint": ""}, "--checkpoint must be"),
])
def test_bad_arguments_fail_before_any_work(trained_run, kw, error):
    """Issue 12, case 5: every argument is checked when the config is made, before anything is read or written."""
    before = sorted(p.name for p in trained_run.iterdir())
    with pytest.raises(ValueError, match=error):
        DiagnoseConfig(trained_run, **kw)
    assert sorted(p.name for p in trained_run.iterdir()) == before


def test_failures_leave_no_partial_output(trained_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("diagnostics"))
    with pytest.raises(ValueError, match="--num-obs 100000 exceeds"):  # only known once the data is loaded
        _diagnose(run, num_obs=100000)
    with pytest.raises(FileNotFoundError, match="expected 'final', epoch<k> or a file; present: .*'epoch1.pt'"):
        _diagnose(run, checkpoint="epoch7")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiagnoseConfig(tmp_path / "nowhere")
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in trained_run.iterdir() if p.name !=
                                                           "diagnostics")
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_failed_rerun_keeps_the_complete_earlier_output(diagnosed, trained_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # with the complete diagnostics/ of the `diagnosed` fixture
    first = (run / "diagnostics" / "index.md").read_text()
    from pyro_tvc.diagnostics import plots

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(plots, "reliability", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _diagnose(run, num_obs=3, draws=4)
    assert (run / "diagnostics" / "index.md").read_text() == first
    assert sorted(p.name for p in (run / "diagnostics").iterdir()) == sorted(p.name for p in diagnosed.iterdir())
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_copied_run_finds_artifacts_by_hash_or_flag(trained_run, prepared, tmp_path):
    """Issue 13.1: a run folder copied elsewhere, whose recorded artefact path is gone."""
    from pyro_tvc.diagnostics.run_files import theta0_sha256

    run = tmp_path / "elsewhere" / "runs" / "copied"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("diagnostics"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["artifacts"] = str(tmp_path / "gone")
    cfg["theta0_sha256"] = theta0_sha256(prepared)
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="pass --artifacts"):
        resolve_run(run)
    assert resolve_run(run, artifacts=prepared).found_by == "--artifacts"
    (tmp_path / "elsewhere" / "artifacts").mkdir()
    (tmp_path / "elsewhere" / "artifacts" / "tiny").symlink_to(prepared, target_is_directory=True)
    source = resolve_run(run)
    assert source.found_by.startswith("theta_0 hash") and source.artifacts == prepared.resolve()
    cfg["theta0_sha256"] = "0" * 64  # the run was trained on another theta_0: the flag's folder is refused
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trained on theta_0 000000000000"):
        resolve_run(run, artifacts=prepared)


def test_final_checkpoint_is_the_runs_not_the_highest(trained_run, tmp_path):
    """A folder reused by an older, longer run keeps its epoch5.pt; 'final' is still this run's last epoch."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("diagnostics"))
    shutil.copy(run / "checkpoints" / "epoch1.pt", run / "checkpoints" / "epoch5.pt")
    assert resolve_run(run).checkpoint.name == _final_name(trained_run)
    assert resolve_run(run, checkpoint="epoch5").epoch == 5


def test_calibration_metrics_against_brute_force():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=300)
    labels = rng.integers(0, 4, size=300)
    # Brier by explicit loops
    expected = np.mean([sum((probs[n, c] - (c == labels[n])) ** 2 for c in range(4)) for n in range(300)])
    assert brier(probs, labels) == pytest.approx(expected)
    # AUROC as the fraction of (positive, negative) pairs ordered correctly, ties counted half
    scores = np.round(rng.normal(size=300), 1)
    pos = rng.random(300) < 0.3
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(scores[pos], scores[~pos])]
    assert auroc(scores, pos) == pytest.approx(np.mean(pairs))
    # ECE: one bin holding everything equals |accuracy - mean confidence|
    acc = np.mean(probs.argmax(1) == labels)
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(acc - probs.max(1).mean()))
    lo, hi = hdi_interval(np.arange(100.0)[:, None], 0.9)
    assert hi[0] - lo[0] == 90


def test_mc_accuracy_standard_error():
    # Hand-made: 3 draws, 2 inputs of label 0. Averages without one draw: drop 0 -> both right, drop 1 -> input 1
    # wrong, drop 2 -> both right: leave-one-out accuracies (100, 50, 100), jackknife se^2 = 2/3 * (2 * (50/3)^2 +
    # (100/3)^2) = 2/3 * 5000/3.
    p = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.9, 0.1], [0.9, 0.1]], [[0.9, 0.1], [0.6, 0.4]]])
    acc, se = mc_accuracy(p, np.array([0, 0]))
    assert acc == 100.0 and se == pytest.approx(np.sqrt(2 / 3 * 5000 / 3))
    # Statistical: the jackknife matches the spread of the accuracy over independent repetitions of the S draws.
    rng = np.random.default_rng(0)
    N, S, C = 400, 8, 3
    centre = rng.dirichlet(np.ones(C) * 2, size=N)
    labels = rng.integers(0, C, size=N)

    def draws():  # Dirichlet draws around each input's centre, by normalised gammas
        g = rng.gamma(centre * 6 + 0.1, size=(S, N, C))
        return g / g.sum(-1, keepdims=True)
    reps = [mc_accuracy(draws(), labels) for _ in range(30)]
    spread = np.std([a for a, _ in reps], ddof=1)
    assert np.mean([s for _, s in reps]) == pytest.approx(spread, rel=0.5)
