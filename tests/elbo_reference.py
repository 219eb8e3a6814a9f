"""Independent references for the ELBO tests: exact enumeration of inclusion patterns with closed-form or
Gauss-Hermite integrals over the slab, written from the maths, not from the library's code."""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def patterns(K: int) -> torch.Tensor:
    """All 2^K inclusion patterns, ``[2^K, K]`` float64."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=K)), dtype=torch.float64)


def pattern_log_prob(gamma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``gamma [n, K]``, ``z [P, K]`` -> ``log q(z) [n, P]``."""
    g = gamma[:, None, :]
    return (z * torch.log(g) + (1 - z) * torch.log1p(-g)).sum(-1)


def kl_by_hand(gamma, mu, sigma, pi, sigma_p) -> torch.Tensor:
    """Per-datum KL(q || p) for independent coordinates, each a two-component mixture sharing the atom at 0."""
    bern = gamma * torch.log(gamma / pi) + (1 - gamma) * torch.log((1 - gamma) / (1 - pi))
    gauss = torch.log(sigma_p / sigma) + (sigma ** 2 + mu ** 2) / (2 * sigma_p ** 2) - 0.5
    return (bern + gamma * gauss).sum(-1)


def expected_gaussian_loglik(gamma, mu, sigma, design, y, noise) -> torch.Tensor:
    """E_q[log N(y; a . lambda, noise^2)] per datum, by enumerating inclusion patterns (closed form per pattern)."""
    z = patterns(mu.shape[-1])
    mean = (z[None] * (design * mu)[:, None]).sum(-1)                  # [n, P]
    var = (z[None] * (design ** 2 * sigma ** 2)[:, None]).sum(-1)       # [n, P]
    ll = -0.5 * math.log(2 * math.pi * noise ** 2) - ((y[:, None] - mean) ** 2 + var) / (2 * noise ** 2)
    return (pattern_log_prob(gamma, z).exp() * ll).sum(-1)


def gaussian_log_evidence(design, y, noise, pi, sigma_p) -> torch.Tensor:
    """log p(y_i) = log sum_z p(z) N(y_i; 0, noise^2 + sum_k z_k a_k^2 sigma_p^2)."""
    K = design.shape[-1]
    z = patterns(K)
    log_pz = (z * math.log(pi) + (1 - z) * math.log(1 - pi)).sum(-1)   # [P]
    var = noise ** 2 + (z[None] * design[:, None] ** 2).sum(-1) * sigma_p ** 2
    log_n = -0.5 * torch.log(2 * math.pi * var) - y[:, None] ** 2 / (2 * var)
    return torch.logsumexp(log_pz + log_n, dim=-1)


def expected_categorical_loglik(gamma, mu, sigma, logits_fn, y, order: int = 30) -> torch.Tensor:
    """E_q[log Categorical(y; logits_fn(lambda))] per datum: enumerate patterns, Gauss-Hermite over included slabs.

    ``logits_fn(lambda [n, M, K]) -> [n, M, C]``."""
    n, K = mu.shape
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)  # probabilists': integrates against N(0, 1)
    nodes = torch.tensor(nodes, dtype=torch.float64)
    weights = torch.tensor(weights / weights.sum(), dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*([nodes] * K), indexing="ij"), -1).reshape(-1, K)        # [M, K]
    grid_w = torch.stack(torch.meshgrid(*([weights] * K), indexing="ij"), -1).reshape(-1, K).prod(-1)  # [M]
    total = torch.zeros(n, dtype=torch.float64)
    for z in patterns(K):
        lam = z * (mu[:, None, :] + sigma[:, None, :] * grid[None])                               # [n, M, K]
        logp = torch.log_softmax(logits_fn(lam), -1).gather(-1, y[:, None, None].expand(n, lam.shape[1], 1))[..., 0]
        qz = pattern_log_prob(gamma, z[None])[:, 0].exp()
        total = total + qz * (logp * grid_w).sum(-1)
    return total


# --- Bayesian core v2 (tests/test_elbo_v2.py) ---------------------------------------------------------------------

def kl_spike_slab_pair(gq, mq, sq, gp, mp, sp) -> torch.Tensor:
    """KL between two spike-and-slab products sharing the atom at 0, from the mixture definition:
    ``sum_k KL_Bern(gq || gp) + gq KL(N(mq, sq^2) || N(mp, sp^2))`` (all ``[..., K]``) -> ``[...]``."""
    bern = gq * torch.log(gq / gp) + (1 - gq) * torch.log((1 - gq) / (1 - gp))
    gauss = torch.log(sp / sq) + (sq ** 2 + (mq - mp) ** 2) / (2 * sp ** 2) - 0.5
    return (bern + gq * gauss).sum(-1)


def kl_normal(m, v, s) -> torch.Tensor:
    """KL(N(m, v^2) || N(0, s^2)) summed over the last dim."""
    return (torch.log(s / v) + (v ** 2 + m ** 2) / (2 * s ** 2) - 0.5).sum(-1)


def expected_gaussian_loglik_hierarchical(gamma, mu, sigma, dev_mean, dev_scale, design, y, noise) -> torch.Tensor:
    """E_q[log N(y_i; a_i . lambda_i, noise^2)] per datum for ``lambda_i = z * (w + delta_i)`` with the *shared*
    pattern z ~ Bernoulli(gamma) [K], w ~ N(mu, sigma^2) [K] and delta_i ~ N(dev_mean_i, dev_scale_i^2) [n, K]:
    enumerate z; given z, a_i . lambda_i is Gaussian. Returns ``[n]``."""
    z = patterns(mu.shape[-1])                                                        # [P, K]
    log_qz = (z * torch.log(gamma) + (1 - z) * torch.log1p(-gamma)).sum(-1)          # [P]
    mean = (z[:, None] * design[None] * (mu + dev_mean)[None]).sum(-1)                # [P, n]
    var = (z[:, None] * design[None] ** 2 * (sigma ** 2 + dev_scale ** 2)[None]).sum(-1)
    ll = -0.5 * math.log(2 * math.pi * noise ** 2) - ((y[None] - mean) ** 2 + var) / (2 * noise ** 2)
    return (log_qz.exp()[:, None] * ll).sum(0)


def hierarchical_gaussian_log_evidence(design, y, noise, pi, sigma_p, s) -> torch.Tensor:
    """log p(y_1..n) of the hierarchical linear-Gaussian model: sum over the shared pattern z of
    p(z) N(y; 0, Sigma_z) with Sigma_z = sigma_p^2 A diag(z) A^T + diag(noise^2 + sum_k z_k a_ik^2 s_k^2)."""
    K = design.shape[-1]
    terms = []
    for z in patterns(K):
        log_pz = (z * math.log(pi) + (1 - z) * math.log(1 - pi)).sum()
        cov = sigma_p ** 2 * (design * z) @ design.T + torch.diag(noise ** 2 + (design ** 2 * z * s ** 2).sum(-1))
        terms.append(log_pz + torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y))
    return torch.logsumexp(torch.stack(terms), 0)


def categorical_log_evidence(gamma, mu, sigma, logits_fn, y, order: int = 30) -> torch.Tensor:
    """log E_p[Categorical(y_i; logits_fn(lambda))] per datum under the spike-and-slab ``p`` with parameters
    ``[n, K]``: enumerate patterns, Gauss-Hermite over included slabs (as :func:`expected_categorical_loglik`)."""
    n, K = mu.shape
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)
    nodes = torch.tensor(nodes, dtype=torch.float64)
    weights = torch.tensor(weights / weights.sum(), dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*([nodes] * K), indexing="ij"), -1).reshape(-1, K)
    log_w = torch.stack(torch.meshgrid(*([weights] * K), indexing="ij"), -1).reshape(-1, K).prod(-1).log()
    terms = []
    for z in patterns(K):
        lam = z * (mu[:, None, :] + sigma[:, None, :] * grid[None])
        logp = torch.log_softmax(logits_fn(lam), -1).gather(-1, y[:, None, None].expand(n, lam.shape[1], 1))[..., 0]
        terms.append(pattern_log_prob(gamma, z[None])[:, 0] + torch.logsumexp(logp + log_w, -1))
    return torch.logsumexp(torch.stack(terms), 0)
