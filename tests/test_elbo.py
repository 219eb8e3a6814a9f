"""ELBO correctness on cases small enough to compute exactly (marker ``elbo``).

Each check would fail on a wrong sign, a missing or detached KL, or a wrong plate scale (see docs/elbo-tests.md
for the record of breaking each one on purpose)."""
import itertools
import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_tvc.guides import AmortizedSpikeSlabGuide
from pyro_tvc.models import PriorConfig, vtvc_model
from tests import elbo_reference as ref

pytestmark = pytest.mark.elbo

N, K, D = 4, 3, 5
PI, SIGMA_P, NOISE = 0.4, 1.3, 0.7


class LinearGaussian:
    """y_i ~ Normal(a_i . lambda_i, NOISE); the minibatch's inputs are the design rows a_i [n, K]."""

    num_tasks, num_blocks = 1, K

    def __call__(self, inputs, coefficients):
        return pyro.distributions.Normal((coefficients[..., 0, :] * inputs).sum(-1), NOISE)


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(1)
    design = torch.randn(N, K, generator=g)
    y = torch.randn(N, generator=g) * 2
    features = torch.randn(N, D, generator=g)
    return design, y, features


def make_guide(estimator="straight_through", seed=0):
    torch.manual_seed(seed)
    guide = AmortizedSpikeSlabGuide(D, 1, K, hidden=6, estimator=estimator, init_scale=0.6, max_scale=5.0).double()
    with torch.no_grad():  # a generic, input-dependent posterior rather than the step-0 initialisation
        guide.net.out.weight.normal_(0, 0.4)
        guide.net.out.bias.normal_(0, 0.5)
    return guide


def exact_elbo(guide, design, y, features, idx=None, kl_weight=1.0):
    idx = torch.arange(N) if idx is None else idx
    logits, mu, sigma = guide.net(features[idx])
    gamma = torch.sigmoid(logits)
    ell = ref.expected_gaussian_loglik(gamma, mu, sigma, design[idx], y[idx], NOISE)
    kl = ref.kl_by_hand(gamma, mu, sigma, PI, SIGMA_P)
    return N / len(idx) * (ell - kl_weight * kl).sum()


def kwargs(idx=None, kl_weight=1.0):
    return dict(likelihood=LinearGaussian(), num_data=N, indices=idx, prior=PriorConfig(PI, SIGMA_P),
                kl_weight=kl_weight)


def estimate(elbo_cls, guide, design, y, features, idx=None, particles=4000, repeats=8, kl_weight=1.0):
    """Mean and standard error of the ELBO estimate over independent repeats."""
    idx = torch.arange(N) if idx is None else idx
    elbo = elbo_cls(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    values = [-elbo.loss(vtvc_model, guide, design[idx], features[idx], y[idx], **kwargs(idx, kl_weight))
              for _ in range(repeats)]
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(repeats))


def test_closed_form_kl_matches_monte_carlo_on_mixed_measure():
    g = torch.Generator().manual_seed(0)
    gamma, mu, sigma = torch.tensor([0.2, 0.7, 0.95]), torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 1.5, 0.1])
    from pyro_tvc.models import SpikeAndSlab

    q = SpikeAndSlab(torch.logit(gamma), mu, sigma)
    p = SpikeAndSlab(torch.logit(torch.tensor(PI)).expand(3), torch.zeros(3), torch.full((3,), SIGMA_P))
    closed = torch.distributions.kl_divergence(q, p)
    # independent sampler and log densities (atom at 0 + Lebesgue), written from the definition
    S = 400_000
    z = (torch.rand(S, 3, generator=g) < gamma).double()
    w = mu + sigma * torch.randn(S, 3, generator=g)
    lam = z * w

    def log_density(lam, g_, m_, s_):
        normal = -0.5 * ((lam - m_) / s_) ** 2 - torch.log(s_) - 0.5 * math.log(2 * math.pi)
        return torch.where(lam == 0, torch.log1p(-g_), torch.log(g_) + normal).sum(-1)

    log_ratio = log_density(lam, gamma, mu, sigma) - log_density(lam, torch.tensor(PI), torch.zeros(3), torch.tensor(SIGMA_P))
    se = log_ratio.std() / math.sqrt(S)
    assert abs(log_ratio.mean() - closed) < 4 * se
    assert torch.allclose(closed, ref.kl_by_hand(gamma, mu, sigma, PI, SIGMA_P))


@pytest.mark.parametrize("estimator, elbo_cls", [("straight_through", TraceMeanField_ELBO),
                                                 ("straight_through", Trace_ELBO),
                                                 ("score_function", Trace_ELBO)])
def test_elbo_estimate_matches_exact_enumeration(problem, estimator, elbo_cls):
    design, y, features = problem
    guide = make_guide(estimator)
    exact = exact_elbo(guide, design, y, features).item()
    mean, se = estimate(elbo_cls, guide, design, y, features)
    assert abs(mean - exact) < 4 * se + 1e-9, (mean, exact, se)


def test_kl_weight_multiplies_only_the_kl(problem):
    design, y, features = problem
    guide = make_guide()
    exact = exact_elbo(guide, design, y, features, kl_weight=0.1).item()
    mean, se = estimate(TraceMeanField_ELBO, guide, design, y, features, kl_weight=0.1)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


def test_elbo_never_exceeds_log_evidence(problem):
    design, y, features = problem
    log_evidence = ref.gaussian_log_evidence(design, y, NOISE, PI, SIGMA_P).sum().item()
    for seed in range(5):
        guide = make_guide(seed=seed)
        assert exact_elbo(guide, design, y, features).item() <= log_evidence
        mean, se = estimate(TraceMeanField_ELBO, guide, design, y, features, particles=1000, repeats=4)
        assert mean <= log_evidence + 4 * se


def test_minibatch_estimates_are_scaled_to_the_data_set(problem):
    design, y, features = problem
    guide = make_guide()
    full = exact_elbo(guide, design, y, features).item()
    subsets = list(itertools.combinations(range(N), 2))
    means, ses = [], []
    for s in subsets:
        idx = torch.tensor(s)
        exact_sub = exact_elbo(guide, design, y, features, idx).item()
        mean, se = estimate(TraceMeanField_ELBO, guide, design, y, features, idx, particles=2000, repeats=4)
        assert abs(mean - exact_sub) < 4 * se, (s, mean, exact_sub)  # scaled by N / batch, not per batch
        means.append(mean)
        ses.append(se)
    # averaged over every subset, the minibatch estimate is unbiased for the full-data ELBO
    assert abs(np.mean(means) - full) < 4 * math.sqrt(np.sum(np.square(ses))) / len(subsets) + 1e-9


def _bias_params(guide):
    """The output-layer bias: slices [0:K] inclusion logits, [K:2K] means, [2K:3K] log scales."""
    return guide.net.out.bias


def estimator_gradient(elbo, guide, design, y, features, repeats=30):
    grads = []
    for _ in range(repeats):
        guide.zero_grad()
        loss = elbo.differentiable_loss(vtvc_model, guide, design, features, y, **kwargs())
        loss.backward()
        grads.append(-_bias_params(guide).grad.detach().clone())
    g = torch.stack(grads)
    return g.mean(0), g.std(0, unbiased=True) / math.sqrt(repeats)


def finite_difference_gradient(guide, design, y, features, eps=1e-5):
    bias = _bias_params(guide)
    grad = torch.zeros_like(bias)
    with torch.no_grad():
        for j in range(bias.numel()):
            bias[j] += eps
            up = exact_elbo(guide, design, y, features)
            bias[j] -= 2 * eps
            down = exact_elbo(guide, design, y, features)
            bias[j] += eps
            grad[j] = (up - down) / (2 * eps)
    return grad


def test_reparameterised_gradients_match_finite_differences(problem):
    """Means and scales: the straight-through estimator with the analytic KL is unbiased for them."""
    design, y, features = problem
    guide = make_guide()
    fd = finite_difference_gradient(guide, design, y, features)
    elbo = TraceMeanField_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    mean, se = estimator_gradient(elbo, guide, design, y, features)
    slab = slice(K, 3 * K)
    assert torch.all((mean[slab] - fd[slab]).abs() < 4 * se[slab] + 1e-6), (mean[slab], fd[slab], se[slab])


def test_score_function_gate_gradient_is_unbiased(problem):
    design, y, features = problem
    guide = make_guide("score_function")
    fd = finite_difference_gradient(guide, design, y, features)
    elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    mean, se = estimator_gradient(elbo, guide, design, y, features, repeats=20)
    assert torch.all((mean - fd).abs() < 4 * se + 1e-6), (mean, fd, se)


def test_straight_through_gate_gradient_is_close_but_biased(problem):
    """Documented behaviour: biased for the inclusion logits, yet pointing the right way on this case."""
    design, y, features = problem
    guide = make_guide()
    fd = finite_difference_gradient(guide, design, y, features)
    elbo = TraceMeanField_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    mean, _ = estimator_gradient(elbo, guide, design, y, features, repeats=10)
    gate = slice(0, K)
    cosine = torch.nn.functional.cosine_similarity(mean[gate], fd[gate], dim=0)
    assert cosine > 0.8, (mean[gate], fd[gate])


def test_categorical_likelihood_matches_gauss_hermite():
    """The real likelihood family (Categorical over class logits), 2 coefficients, exact by quadrature."""
    g = torch.Generator().manual_seed(3)
    n, C, K2 = 3, 4, 2
    base = torch.randn(n, C, generator=g)
    directions = torch.randn(n, K2, C, generator=g)
    y = torch.randint(C, (n,), generator=g)
    features = torch.randn(n, D, generator=g)

    class Softmax:
        num_tasks, num_blocks = 1, K2

        def __call__(self, inputs, coefficients):
            lam = coefficients[..., 0, :]  # [..., n, K]
            return pyro.distributions.Categorical(logits=base + (lam[..., None] * directions).sum(-2))

    torch.manual_seed(0)
    guide = AmortizedSpikeSlabGuide(D, 1, K2, hidden=6, init_scale=0.8, max_scale=5.0).double()
    with torch.no_grad():
        guide.net.out.weight.normal_(0, 0.4)
        guide.net.out.bias.normal_(0, 0.5)
    logits, mu, sigma = guide.net(features)
    gamma = torch.sigmoid(logits)
    ell = ref.expected_categorical_loglik(gamma, mu, sigma,
                                          lambda lam: base[:, None] + (lam[..., None] * directions[:, None]).sum(-2), y)
    exact = (ell - ref.kl_by_hand(gamma, mu, sigma, PI, SIGMA_P)).sum().item()
    elbo = TraceMeanField_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    kw = dict(likelihood=Softmax(), num_data=n, prior=PriorConfig(PI, SIGMA_P))
    values = [-elbo.loss(vtvc_model, guide, torch.zeros(n, 1), features, y, **kw) for _ in range(8)]
    se = np.std(values, ddof=1) / math.sqrt(8)
    assert abs(np.mean(values) - exact) < 4 * se, (np.mean(values), exact, se)
