"""ELBO correctness of the Bayesian core v2 models on cases small enough to compute exactly (marker ``elbo``).

Hierarchical model (shared ``Lambda`` + per-input ``delta_i``): linear-Gaussian likelihood, the exact ELBO by
enumerating Lambda's 2^K inclusion patterns with closed-form Gaussian integrals, the exact log evidence as a sum of
multivariate normals. Conditional model (``p(lambda | x)`` and the label-reading residual posterior): Categorical
likelihood (labels index the class embeddings), exact by enumeration + Gauss-Hermite quadrature.
docs/elbo-tests.md records which test catches which broken KL (dropped, detached, wrongly scaled by the plate)."""
import itertools
import math
import types

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_tvc.guides import ConditionalGuide, GateConfig, HierarchicalGuide
from pyro_tvc.models import DEVIATION_SCALE_PARAM, ConditionalPriorNet, PriorConfig, hierarchical_model
from tests import elbo_reference as ref

pytestmark = pytest.mark.elbo

N, K, D = 4, 3, 5
PI, SIGMA_P, NOISE = 0.4, 1.3, 0.7


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mc_mean(values):
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


def finite_differences(exact_fn, tensors, eps=1e-5):
    """Central differences of ``exact_fn()`` w.r.t. every entry of each tensor (perturbed in place)."""
    grads = []
    with torch.no_grad():
        for t in tensors:
            g = torch.zeros_like(t)
            flat, gflat = t.view(-1), g.view(-1)
            for j in range(flat.numel()):
                flat[j] += eps
                up = exact_fn()
                flat[j] -= 2 * eps
                down = exact_fn()
                flat[j] += eps
                gflat[j] = (up - down) / (2 * eps)
            grads.append(g)
    return torch.cat([g.flatten() for g in grads])


def estimator_gradients(loss_fn, tensors, repeats):
    draws = []
    for _ in range(repeats):
        grads = torch.autograd.grad(loss_fn(), tensors)
        draws.append(-torch.cat([g.flatten() for g in grads]))
    g = torch.stack(draws)
    return g.mean(0), g.std(0, unbiased=True) / math.sqrt(repeats)


# --- hierarchical model --------------------------------------------------------------------------------------------

class LinearGaussian:
    """y_i ~ Normal(a_i . lambda_i, NOISE); the minibatch's inputs are the design rows a_i [n, K]."""

    num_tasks, num_blocks = 1, K

    def __call__(self, inputs, coefficients):
        return pyro.distributions.Normal((coefficients[..., 0, :] * inputs).sum(-1), NOISE)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, K, generator=g), torch.randn(N, generator=g) * 2, torch.randn(N, D, generator=g)


def hierarchical_guide(seed=0, s0=0.4):
    torch.manual_seed(seed)
    guide = HierarchicalGuide(D, 1, K, hidden=6, init_scale=0.5, max_scale=1.5, deviation_scale=s0,
                              global_step_multiplier=2.0).double()
    with torch.no_grad():  # a generic posterior rather than the step-0 initialisation
        guide.global_raw.normal_(0, 0.4)
        guide.out.weight.normal_(0, 0.4)
        guide.out.bias.normal_(0, 0.5)
    return guide


def hier_kwargs(idx=None, kl_weight=1.0):
    return dict(likelihood=LinearGaussian(), num_data=N, indices=idx, prior=PriorConfig(PI, SIGMA_P),
                kl_weight=kl_weight)


def deviation_scale_leaf():
    """The unconstrained (log) deviation scale, the leaf SVI optimises; the model creates it on first call."""
    return pyro.get_param_store().get_param(DEVIATION_SCALE_PARAM).unconstrained()


def hier_exact_elbo(guide, design, y, features, idx=None):
    idx = torch.arange(N) if idx is None else idx
    logits, mu, sigma = guide.global_params()
    gamma = torch.sigmoid(logits)
    m, v = guide.deviation_params(features[idx])
    s = deviation_scale_leaf().exp().reshape(-1)
    ell = ref.expected_gaussian_loglik_hierarchical(gamma, mu, sigma, m, v, design[idx], y[idx], NOISE)
    kl_global = ref.kl_by_hand(gamma, mu, sigma, PI, SIGMA_P)
    kl_local = ref.kl_normal(m, v, s)
    return N / len(idx) * (ell - kl_local).sum() - kl_global


def hier_estimates(guide, design, y, features, idx=None, particles=4000, repeats=8):
    idx = torch.arange(N) if idx is None else idx
    elbo = TraceMeanField_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    return [-elbo.loss(guide.model, guide, design[idx], features[idx], y[idx], **hier_kwargs(idx))
            for _ in range(repeats)]


def test_hierarchical_elbo_matches_exact_enumeration(data):
    design, y, features = data
    guide = hierarchical_guide()
    mean, se = mc_mean(hier_estimates(guide, design, y, features))
    exact = hier_exact_elbo(guide, design, y, features).item()
    assert abs(mean - exact) < 4 * se + 1e-9, (mean, exact, se)


def test_hierarchical_minibatches_scale_local_terms_only(data):
    """Every 2-of-4 subsample: (N / n) x (its expected log likelihoods and deviation KLs) - the global KL once."""
    design, y, features = data
    guide = hierarchical_guide()
    hier_estimates(guide, design, y, features, particles=1, repeats=1)  # creates s
    for s in itertools.combinations(range(N), 2):
        idx = torch.tensor(s)
        mean, se = mc_mean(hier_estimates(guide, design, y, features, idx, particles=2000, repeats=4))
        exact = hier_exact_elbo(guide, design, y, features, idx).item()
        assert abs(mean - exact) < 4 * se, (s, mean, exact, se)


def test_hierarchical_elbo_below_log_evidence(data):
    design, y, features = data
    for seed in range(4):
        pyro.clear_param_store()
        guide = hierarchical_guide(seed, s0=0.2 + 0.2 * seed)
        hier_estimates(guide, design, y, features, particles=1, repeats=1)
        s = deviation_scale_leaf().exp().reshape(-1)
        log_evidence = ref.hierarchical_gaussian_log_evidence(design, y, NOISE, PI, SIGMA_P, s).item()
        assert hier_exact_elbo(guide, design, y, features).item() <= log_evidence
        mean, se = mc_mean(hier_estimates(guide, design, y, features, particles=1000, repeats=4))
        assert mean <= log_evidence + 4 * se


def test_hierarchical_gradients_match_finite_differences(data):
    """Means and scales of q(Lambda) and q(delta | x), and the type-II ML scale s: unbiased against the exact ELBO."""
    design, y, features = data
    guide = hierarchical_guide()
    hier_estimates(guide, design, y, features, particles=1, repeats=1)
    log_s = deviation_scale_leaf()
    tensors = [guide.global_raw, guide.out.bias, log_s]
    fd = finite_differences(lambda: hier_exact_elbo(guide, design, y, features), tensors)
    elbo = TraceMeanField_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    mean, se = estimator_gradients(
        lambda: elbo.differentiable_loss(guide.model, guide, design, features, y, **hier_kwargs()), tensors, 20)
    slab = torch.ones_like(fd, dtype=torch.bool)
    slab[:K] = False  # Lambda's inclusion logits: the straight-through gradient is biased (docs/inference.md)
    assert torch.all((mean[slab] - fd[slab]).abs() < 4 * se[slab] + 1e-6), (mean[slab], fd[slab], se[slab])


def test_gated_global_coefficients_prune_every_input_and_ungated_is_the_elbo(data):
    design, y, features = data
    guide = hierarchical_guide()
    guide.gate = GateConfig(importance_min=0.3, inclusion_min=0.5, cv_max=10.0)
    logits, mu, sigma = guide.global_params()
    pruned, reliable = guide.masks()
    expected_pruned = torch.sigmoid(logits) * mu.abs() < 0.3
    assert torch.equal(pruned.reshape(-1), expected_pruned) and expected_pruned.any() and (~expected_pruned).any()
    lam = guide.point_estimate(features)[:, 0]          # [N, K]
    assert torch.all(lam[:, expected_pruned] == 0)
    keep = ~expected_pruned & ((torch.sigmoid(logits) >= 0.5) | (logits > 0))
    m, _ = guide.deviation_params(features)
    assert torch.allclose(lam[:, keep], (mu + m)[:, keep])
    guide.gate.gate_in_training = False  # what pyro_tvc.infer.ungated does: the plain posterior, the exact ELBO
    mean, se = mc_mean(hier_estimates(guide, design, y, features))
    assert abs(mean - hier_exact_elbo(guide, design, y, features).item()) < 4 * se


def test_hierarchical_bad_input_is_one_line_value_error():
    with pytest.raises(ValueError, match="deviation_scale"):
        HierarchicalGuide(D, 1, K, deviation_scale=0.0)
    with pytest.raises(ValueError, match="deviation_scale"):
        hierarchical_model(torch.zeros(2, K), torch.zeros(2, D), None, likelihood=LinearGaussian(), num_data=2,
                           deviation_scale_init=-1.0)
    with pytest.raises(ValueError, match="deviation_per"):
        HierarchicalGuide(D, 1, K, deviation_per="layer")
    with pytest.raises(ValueError, match="init_inclusion"):
        HierarchicalGuide(D, 1, K, init_inclusion=1.0)
    with pytest.raises(ValueError, match="inclusion_prob"):
        PriorConfig(inclusion_prob=0.0)


# --- conditional model ---------------------------------------------------------------------------------------------

NC, KC, C = 3, 2, 3  # inputs, coefficients (quadrature over K dims), classes


@pytest.fixture
def cdata():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(NC, C, generator=g)
    directions = torch.randn(NC, KC, C, generator=g)
    y = torch.randint(C, (NC,), generator=g)
    features = torch.randn(NC, D, generator=g)
    embeddings = torch.randn(C, D, generator=g)
    return base, directions, y, features, embeddings


class Softmax:
    """``y_i ~ Categorical(base_i + sum_k lambda_ik dir_ik)``; inputs are the row indices i (so minibatches work)."""

    num_tasks, num_blocks = 1, KC

    def __init__(self, base, directions, embeddings):
        self.base, self.directions = base, directions
        self.head = types.SimpleNamespace(weight=embeddings)

    def logits(self, idx, lam):  # lam [..., n, K]
        return self.base[idx] + (lam[..., None] * self.directions[idx]).sum(-2)

    def __call__(self, inputs, coefficients):
        return pyro.distributions.Categorical(logits=self.logits(inputs, coefficients[..., 0, :]))


def conditional_guide(seed=0, shift=True):
    torch.manual_seed(seed)
    guide = ConditionalGuide(D, 1, KC, hidden=6, init_scale=0.5, max_scale=1.5, shift_multiplier=0.5).double()
    with torch.no_grad():
        guide.prior_net.out.weight.normal_(0, 0.4)
        guide.prior_net.out.bias.normal_(0, 0.5)
        if shift:
            guide.shift_out.weight.normal_(0, 0.4)
            guide.shift_out.bias.normal_(0, 0.5)
    return guide


def cond_exact(guide, cdata, idx=None, kind="elbo"):
    base, directions, y, features, embeddings = cdata
    idx = torch.arange(NC) if idx is None else idx
    lp, mp, sp = guide.prior_params(features[idx])
    lq, mq, sq = guide.posterior_params(features[idx], y[idx], embeddings)
    logits_fn = lambda lam: base[idx][:, None] + (lam[..., None] * directions[idx][:, None]).sum(-2)  # noqa: E731
    if kind == "evidence":
        return ref.categorical_log_evidence(torch.sigmoid(lp), mp, sp, logits_fn, y[idx]).sum()
    gq, gp = torch.sigmoid(lq), torch.sigmoid(lp)
    ell = ref.expected_categorical_loglik(gq, mq, sq, logits_fn, y[idx])
    return NC / len(idx) * (ell - ref.kl_spike_slab_pair(gq, mq, sq, gp, mp, sp)).sum()


def cond_kwargs(cdata, idx=None):
    base, directions, _, _, embeddings = cdata
    return dict(likelihood=Softmax(base, directions, embeddings), num_data=NC, indices=idx, prior=PriorConfig())


def cond_estimates(guide, cdata, idx=None, particles=4000, repeats=8):
    _, _, y, features, _ = cdata
    idx = torch.arange(NC) if idx is None else idx
    elbo = TraceMeanField_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    return [-elbo.loss(guide.model, guide, idx, features[idx], y[idx], **cond_kwargs(cdata, idx))
            for _ in range(repeats)]


def test_conditional_elbo_matches_exact_enumeration_and_quadrature(cdata):
    guide = conditional_guide()
    mean, se = mc_mean(cond_estimates(guide, cdata))
    exact = cond_exact(guide, cdata).item()
    assert abs(mean - exact) < 4 * se + 1e-9, (mean, exact, se)


def test_conditional_minibatches_are_scaled_to_the_data_set(cdata):
    guide = conditional_guide()
    for s in itertools.combinations(range(NC), 2):
        idx = torch.tensor(s)
        mean, se = mc_mean(cond_estimates(guide, cdata, idx, particles=2000, repeats=4))
        exact = cond_exact(guide, cdata, idx).item()
        assert abs(mean - exact) < 4 * se, (s, mean, exact, se)


def test_conditional_elbo_below_log_evidence_with_equality_gap_the_kl(cdata):
    for seed in range(4):
        guide = conditional_guide(seed)
        log_evidence = cond_exact(guide, cdata, kind="evidence").item()
        assert cond_exact(guide, cdata).item() <= log_evidence
        mean, se = mc_mean(cond_estimates(guide, cdata, particles=1000, repeats=4))
        assert mean <= log_evidence + 4 * se
    # q = p (zero shift): the KL vanishes, the ELBO is E_p[log lik], still strictly below log E_p[lik] (Jensen)
    guide = conditional_guide(shift=False)
    mean, se = mc_mean(cond_estimates(guide, cdata))
    _, _, y, features, embeddings = cdata
    assert torch.allclose(guide.kl_per_input(features, y, Softmax(*cdata[:2], embeddings)), torch.zeros(NC))
    assert mean < cond_exact(guide, cdata, kind="evidence").item()


def test_conditional_gradients_match_finite_differences(cdata):
    """Means and scales of the prior network and of the label shift: unbiased against the exact ELBO."""
    guide = conditional_guide()
    _, _, y, features, _ = cdata
    tensors = [guide.prior_net.out.bias, guide.shift_out.bias]
    fd = finite_differences(lambda: cond_exact(guide, cdata), tensors)
    elbo = TraceMeanField_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    idx = torch.arange(NC)
    mean, se = estimator_gradients(
        lambda: elbo.differentiable_loss(guide.model, guide, idx, features, y, **cond_kwargs(cdata)), tensors, 20)
    slab = torch.ones_like(fd, dtype=torch.bool)
    slab[:KC] = slab[3 * KC:4 * KC] = False  # inclusion logits: straight-through, biased by design
    assert torch.all((mean[slab] - fd[slab]).abs() < 4 * se[slab] + 1e-6), (mean[slab], fd[slab], se[slab])


def test_conditional_prediction_falls_back_to_the_prior_network(cdata):
    """Without labels (and without gradients, as in Predictive) the guide draws from p(lambda | x) itself."""
    guide = conditional_guide()
    _, _, _, features, _ = cdata
    idx = torch.arange(NC)
    with torch.no_grad():
        trace = pyro.poutine.trace(guide).get_trace(idx, features, None, **cond_kwargs(cdata))
    q = trace.nodes["coef"]["fn"]
    for a, b in zip((q.inclusion_logits, q.loc, q.scale), guide.prior_params(features)):
        assert torch.equal(a, b)


def test_conditional_bad_input_is_one_line_value_error(cdata):
    guide = conditional_guide()
    _, _, _, features, _ = cdata
    with pytest.raises(ValueError, match="needs labels in training"):
        guide(torch.arange(NC), features, None, **cond_kwargs(cdata))
    with pytest.raises(ValueError, match="init_inclusion"):
        ConditionalPriorNet(D, KC, init_inclusion=1.2)
    with pytest.raises(ValueError, match="shift_multiplier"):
        ConditionalGuide(D, 1, KC, shift_multiplier=0.0)
    with pytest.raises(ValueError, match="prior_net"):
        from pyro_tvc.models import conditional_prior_model
        conditional_prior_model(torch.arange(NC), features, None, **cond_kwargs(cdata))
