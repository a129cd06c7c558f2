"""Proposition 3.1, checked numerically in float64 (derivation: docs/proposition_3_1.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_patch_analysis.cooccurrence import (
    cooccurrence_loss,
    spectral_contrastive_loss,
    spectral_contrastive_loss_sampled,
)

N_PATCHES, DIM = 7, 3


def _cooccurrence(seed: int, n: int = N_PATCHES) -> torch.Tensor:
    """A random valid co-occurrence matrix: symmetric, non-negative, sums to 1, some zeros."""
    rng = np.random.default_rng(seed)
    a = rng.exponential(size=(n, n)) * (rng.random((n, n)) < 0.7)
    a = a + a.T + np.diag(rng.random(n))  # the diagonal keeps every marginal positive
    return torch.from_numpy(a / a.sum())


def _embeddings(seed: int, n: int = N_PATCHES, d: int = DIM) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)))


def _closed_form_constant(P: torch.Tensor) -> float:
    p = P.numpy().sum(axis=1)
    return float((P.numpy() ** 2 / np.outer(p, p)).sum())


def _value_and_grad(loss, F: torch.Tensor) -> tuple[float, torch.Tensor]:
    F = F.clone().requires_grad_(True)
    value = loss(F)
    value.backward()
    return value.item(), F.grad


def test_spectral_contrastive_loss_matches_the_expectations_written_as_double_sums():
    P, F = _cooccurrence(0), _embeddings(1)
    Pn, Fn = P.numpy(), F.numpy()
    p = Pn.sum(axis=1)
    expected = 0.0
    for i in range(N_PATCHES):
        for j in range(N_PATCHES):
            s = Fn[i] @ Fn[j]
            expected += -2 * Pn[i, j] * s + p[i] * p[j] * s**2
    assert spectral_contrastive_loss(F, P).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("w", [0.5, 2.0, 3.0])
def test_proposition_3_1_equal_up_to_the_closed_form_constant_when_lambda_is_half_w(w):
    P = _cooccurrence(2)
    constant = _closed_form_constant(P)
    for seed in range(5):
        F = _embeddings(10 + seed)
        ls, grad_s = _value_and_grad(lambda X: spectral_contrastive_loss(X, P), F)
        lc, grad_c = _value_and_grad(lambda X: cooccurrence_loss(X, P, lam=w / 2, w=w), F)
        assert ls - lc == pytest.approx(-constant, rel=1e-10)
        torch.testing.assert_close(grad_s, grad_c, rtol=1e-10, atol=1e-12)


def test_proposition_3_1_fails_for_another_lambda():
    P, w = _cooccurrence(3), 2.0
    gaps, grad_pairs = [], []
    for seed in range(5):
        F = _embeddings(20 + seed)
        ls, grad_s = _value_and_grad(lambda X: spectral_contrastive_loss(X, P), F)
        lc, grad_c = _value_and_grad(lambda X: cooccurrence_loss(X, P, lam=0.7 * w, w=w), F)
        gaps.append(ls - lc)
        grad_pairs.append((grad_s, grad_c))
    assert np.ptp(gaps) > 1e-3
    assert not any(torch.allclose(gs, gc, rtol=1e-6) for gs, gc in grad_pairs)


def test_minimum_of_the_spectral_loss_is_the_top_eigenvalues_of_the_normalised_cooccurrence():
    """HaoChen et al.'s result: L_S + C = ||D^1/2 F F^T D^1/2 - A||_F^2 with A = D^-1/2 P D^-1/2, so the
    minimum over n x d embeddings is -(sum of the d largest positive eigenvalues of A, squared)."""
    P = _cooccurrence(4)
    p = P.numpy().sum(axis=1)
    A = P.numpy() / np.sqrt(np.outer(p, p))
    eigenvalues, eigenvectors = np.linalg.eigh(A)
    top = np.argsort(eigenvalues)[::-1][:DIM]
    assert (eigenvalues[top] > 0).all()
    optimum = torch.from_numpy(eigenvectors[:, top] * np.sqrt(eigenvalues[top]) / np.sqrt(p)[:, None])
    value, grad = _value_and_grad(lambda X: spectral_contrastive_loss(X, P), optimum)
    assert value == pytest.approx(-(eigenvalues[top] ** 2).sum(), rel=1e-10)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)
    assert all(spectral_contrastive_loss(_embeddings(s), P).item() > value for s in range(30, 40))


def test_sampled_estimator_is_unbiased():
    P, F = _cooccurrence(5), _embeddings(6)
    exact = spectral_contrastive_loss(F, P).item()
    g = torch.Generator().manual_seed(0)
    draws, pairs, negatives = 4000, 8, 8
    flat = torch.multinomial(P.flatten(), draws * pairs, replacement=True, generator=g)
    i, j = (flat // N_PATCHES).view(draws, pairs), (flat % N_PATCHES).view(draws, pairs)
    k = torch.multinomial(P.sum(dim=1), draws * negatives, replacement=True, generator=g).view(draws, negatives)
    estimates = torch.stack(
        [spectral_contrastive_loss_sampled(F[i[t]], F[j[t]], F[k[t]]) for t in range(draws)]
    ).numpy()
    standard_error = estimates.std(ddof=1) / np.sqrt(draws)
    assert abs(estimates.mean() - exact) < 4 * standard_error
    # The check has power: the estimate is precise compared with the loss and its spread.
    assert standard_error < 0.05 * estimates.std(ddof=1)


@pytest.mark.parametrize(
    "P, message",
    [
        (torch.tensor([[0.5, 0.2], [0.1, 0.2]], dtype=torch.float64), "symmetric"),
        (torch.tensor([[0.5, 0.2], [0.2, 0.2]], dtype=torch.float64), "sum to 1"),
        (torch.tensor([[0.7, -0.1], [-0.1, 0.5]], dtype=torch.float64), "non-negative"),
        (torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64), "never occur"),
        (torch.full((3, 3), 1 / 9, dtype=torch.float64), "2 patches"),
        (torch.full((4,), 0.25, dtype=torch.float64), "square"),
    ],
)
def test_invalid_cooccurrence_matrices_are_rejected(P, message):
    F = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        spectral_contrastive_loss(F, P)
    with pytest.raises(ValueError, match=message):
        cooccurrence_loss(F, P, lam=1.0, w=2.0)


def test_invalid_sampled_inputs_are_rejected():
    a = torch.ones(4, 3)
    with pytest.raises(ValueError, match="positive pairs"):
        spectral_contrastive_loss_sampled(a, torch.ones(5, 3), a)
    with pytest.raises(ValueError, match="f_neg"):
        spectral_contrastive_loss_sampled(a, a, torch.ones(4, 2))
    with pytest.raises(ValueError, match="lam and w"):
        cooccurrence_loss(a, torch.full((4, 4), 1 / 16), lam=0.0, w=1.0)
