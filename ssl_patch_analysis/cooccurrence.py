"""Proposition 3.1 of the paper: the spectral contrastive loss models patch co-occurrence.

Over a finite set of ``n`` patches with embeddings ``F`` (``n x d``, row ``f_i``) and co-occurrence
matrix ``P`` (``P_ij = p(x_i, x_j)``, the probability that two patches drawn from one image are
``x_i`` and ``x_j``: symmetric, non-negative, summing to 1, marginals ``p_i = sum_j P_ij > 0``):

- :func:`spectral_contrastive_loss` (HaoChen et al. 2021):
  ``L_S = -2 sum_ij P_ij f_i.f_j + sum_ij p_i p_j (f_i.f_j)^2``;
- :func:`cooccurrence_loss`: a weighted least-squares fit of the normalised co-occurrence
  ``r_ij = P_ij / (p_i p_j)`` by the inner products,
  ``L_C = 1/(2 lam) sum_ij w p_i p_j (f_i.f_j - r_ij)^2``.

``L_C = w/(2 lam) (L_S + C)`` with ``C = sum_ij P_ij^2 / (p_i p_j)``, so ``L_S = L_C - C`` for every
``F`` exactly when ``lam = w/2``. docs/proposition_3_1.md derives it step by step.
:func:`spectral_contrastive_loss_sampled` is the minibatch estimator a training loop computes.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _marginals(F: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
    """Checks ``F`` and ``P``; returns ``P`` in ``F``'s dtype and its marginals."""
    if F.ndim != 2:
        raise ValueError(f"F must be n x d (one embedding per patch), got shape {tuple(F.shape)}")
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"P must be a square n x n co-occurrence matrix, got shape {tuple(P.shape)}")
    if P.shape[0] != F.shape[0]:
        raise ValueError(f"P is {P.shape[0]} x {P.shape[1]} but F has {F.shape[0]} patches (rows)")
    P = P.to(dtype=F.dtype, device=F.device)
    if not torch.isfinite(P).all() or (P < 0).any():
        raise ValueError("P must hold finite, non-negative probabilities p(x_i, x_j)")
    total = P.sum()
    if not torch.isclose(total, torch.ones_like(total), rtol=1e-5, atol=0.0):
        raise ValueError(f"P must sum to 1 (a joint distribution); it sums to {total.item():.6g}: divide by its sum")
    if not torch.allclose(P, P.T, rtol=1e-5, atol=1e-8 * P.abs().max().item()):
        raise ValueError("P must be symmetric (p(x_i, x_j) = p(x_j, x_i)); use (P + P.T) / 2")
    marginals = P.sum(dim=1)
    if (marginals <= 0).any():
        empty = torch.nonzero(marginals <= 0).flatten().tolist()
        raise ValueError(f"patches {empty} never occur (zero marginal); drop them from F and P")
    return P, marginals


def spectral_contrastive_loss(F: Tensor, P: Tensor) -> Tensor:
    """HaoChen et al.'s spectral contrastive loss of embeddings ``F`` (``n x d``) under ``P``.

    ``L_S = -2 E_{(x, x+) ~ P}[f(x).f(x+)] + E_{x ~ p, x' ~ p}[(f(x).f(x'))^2]``
    ``    = -2 sum_ij P_ij f_i.f_j + sum_ij p_i p_j (f_i.f_j)^2``.

    The second sum is ``||F^T diag(p) F||_F^2``, computed on ``d x d`` matrices.
    """
    P, p = _marginals(F, P)
    positive = (P * (F @ F.T)).sum()
    weighted_gram = F.T @ (p[:, None] * F)
    return -2 * positive + weighted_gram.pow(2).sum()


def cooccurrence_loss(F: Tensor, P: Tensor, lam: float, w: float) -> Tensor:
    """Co-occurrence statistics modelling loss ``L_C`` of embeddings ``F`` (``n x d``) under ``P``.

    ``L_C = 1/(2 lam) sum_ij w p_i p_j (f_i.f_j - P_ij / (p_i p_j))^2``: the inner product of two
    patches fits their normalised co-occurrence (1 for independent patches), each pair weighted by
    how often it is drawn as a negative, ``p_i p_j``, times the constant weighting factor ``w``.
    Equals ``L_S + sum_ij P_ij^2 / (p_i p_j)`` when ``lam = w / 2`` (Proposition 3.1).
    """
    if lam <= 0 or w <= 0:
        raise ValueError(f"lam and w must be positive, got lam={lam}, w={w}")
    P, p = _marginals(F, P)
    negative_weight = p[:, None] * p[None, :]
    normalised_cooccurrence = P / negative_weight
    residual = F @ F.T - normalised_cooccurrence
    return w / (2 * lam) * (negative_weight * residual.pow(2)).sum()


def spectral_contrastive_loss_sampled(f_a: Tensor, f_b: Tensor, f_neg: Tensor) -> Tensor:
    """Unbiased minibatch estimate of :func:`spectral_contrastive_loss`.

    ``f_a``, ``f_b`` (``B x d``): embeddings of ``B`` positive pairs drawn i.i.d. from ``P`` (two
    patches of one image). ``f_neg`` (``M x d``): ``M`` patches drawn i.i.d. from the marginal ``p``,
    independently of the pairs. Since ``P`` is symmetric both ``f_a[k]`` and ``f_b[k]`` follow ``p``,
    so every ``(f_a[k], f_neg[l])`` and ``(f_b[k], f_neg[l])`` is an independent pair, and

    ``-2 mean_k f_a[k].f_b[k] + 1/2 (mean_{k,l} (f_a[k].f_neg[l])^2 + mean_{k,l} (f_b[k].f_neg[l])^2)``

    has expectation ``L_S``.
    """
    if f_a.ndim != 2 or f_a.shape != f_b.shape:
        raise ValueError(
            f"f_a and f_b must be B x d embeddings of the B positive pairs, got {tuple(f_a.shape)} and "
            f"{tuple(f_b.shape)}"
        )
    if f_neg.ndim != 2 or f_neg.shape[1] != f_a.shape[1]:
        raise ValueError(f"f_neg must be M x {f_a.shape[1]} (patches drawn from the marginal), "
                         f"got {tuple(f_neg.shape)}")
    if f_a.shape[0] == 0 or f_neg.shape[0] == 0:
        raise ValueError("need at least one positive pair and one independent patch")
    positive = (f_a * f_b).sum(dim=1).mean()
    negative = 0.5 * ((f_a @ f_neg.T).pow(2).mean() + (f_b @ f_neg.T).pow(2).mean())
    return -2 * positive + negative


if __name__ == "__main__":  # a library module: python -m ssl_patch_analysis.cooccurrence says so, exit 2
    from ssl_patch_analysis.__main__ import not_a_command

    not_a_command(__spec__.name)
