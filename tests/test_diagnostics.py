"""Diagnostics: the exported DataTree reloads with its dims and coords, and every summary number matches an
independent numpy computation on the same draws."""
import csv
import itertools
import json

import numpy as np
import pytest

from pyro_tvc.cli import main
from pyro_tvc.diagnostics import auroc, brier, expected_calibration_error, hdi_interval, load_datatree


@pytest.fixture(scope="module")
def diagnosed(trained_run):
    assert main(["diagnose", str(trained_run), "--num-obs", "5", "--draws", "40", "--mc-samples", "2"]) == 0
    return trained_run / "diagnostics"


def test_datatree_reloads_with_named_dims_and_coords(diagnosed, trained_run):
    tree = load_datatree(diagnosed / "posterior.nc")
    config = json.loads((trained_run / "config.json").read_text())
    post = tree["posterior"]
    assert post["coef"].dims == ("chain", "draw", "obs", "task", "block")
    assert post.sizes["draw"] == 40 and post.sizes["obs"] == 5
    assert list(post["task"].values) == config["tasks"] and post.sizes["block"] == config["blocks"]
    assert set(post["dataset"].values) == {"digits"}
    assert np.array_equal(post["label"].values, tree["observed_data"]["label"].values)
    assert tree["posterior_predictive"]["class_probs"].dims == ("chain", "draw", "obs", "class")
    probs = tree["posterior_predictive"]["class_probs"].values
    assert np.allclose(probs.sum(-1), 1, atol=1e-5)
    inc = post["included"].values
    assert np.array_equal(inc, (post["coef"].values != 0).astype(inc.dtype))
    assert tree["elbo_trace"]["neg_elbo_per_datum"].dims == ("step",) and tree["elbo_trace"].sizes["step"] > 0
    assert tree["point"]["coef_point"].dims == ("obs", "task", "block")


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
        assert float(row["inclusion_prob"]) == pytest.approx(np.mean(x != 0))
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
        assert float(row["fraction_exact_zeros"]) == pytest.approx(np.mean(draws[:, i] == 0))
        m = np.abs(draws[:, i].mean(0)).ravel()
        assert float(row["effective_active_components"]) == pytest.approx(m.sum() ** 2 / (m ** 2).sum(), rel=1e-4)
        assert int(row["prediction"]) == int(np.argmax(p))


def test_report_index_links_existing_plots(diagnosed):
    index = (diagnosed / "index.md").read_text()
    links = [line.split("(")[1].rstrip(")") for line in index.splitlines() if line.startswith("![")]
    assert len(links) >= 5
    for name in links:
        assert (diagnosed / name).stat().st_size > 5000, name  # a real image, not an empty figure


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
