"""Robust PCA by Principal Component Pursuit (Candès, Li, Ma and Wright, "Robust Principal Component Analysis?",
J. ACM 2011), solved by the inexact augmented Lagrange multiplier method (Lin, Chen and Ma, "The Augmented Lagrange
Multiplier Method for Exact Recovery of Corrupted Low-Rank Matrices", arXiv 1009.5055, Algorithm 5).

    minimise ||L||_* + lambda ||S||_1   subject to   L + S = M,     lambda = 1 / sqrt(max(n1, n2))  (Candès et al.)

Lin et al.'s iteration, with their initialisation Y = M / max(||M||_2, ||M||_inf / lambda), mu = 1.25 / ||M||_2 and
mu growing by rho = 1.5 each step (bounded by 1e7 mu_0):

    L <- SVT_{1/mu}(M - S + Y/mu)          singular values soft-thresholded by 1/mu
    S <- shrink_{lambda/mu}(M - L + Y/mu)  entries soft-thresholded by lambda/mu
    Y <- Y + mu (M - L - S)

until ||M - L - S||_F <= tol ||M||_F (tol 1e-7, their stopping rule). Hand-written because neither scipy nor
scikit-learn ships Robust PCA (sklearn's PCA, SparsePCA and the like solve other problems); it is twenty lines of
torch. FedRPCA's matrices are d x m with m the number of clients, so every SVD is a thin one, O(d m^2).
"""

from __future__ import annotations

import math

import torch


def _shrink(x: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


def _svt(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Singular value thresholding; a tall x (d x m, d >> m) through a QR first, so the SVD is of an m x m core."""
    if x.shape[0] > 2 * x.shape[1]:
        q, r = torch.linalg.qr(x)
        u, s, vh = torch.linalg.svd(r)
        return q @ ((u * _shrink(s, tau)) @ vh)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u * _shrink(s, tau)) @ vh


def robust_pca(
    m: torch.Tensor, lam: float | None = None, tol: float = 1e-7, max_iter: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, S)`` with ``L + S ~= m``, L low-rank and S sparse (Principal Component Pursuit), in m's dtype.

    `lam` defaults to ``1 / sqrt(max(n1, n2))``. A zero matrix gives two zero matrices.
    """
    if m.dim() != 2:
        raise ValueError(f"robust_pca: expected a matrix, got shape {tuple(m.shape)}.")
    n1, n2 = m.shape
    lam = 1.0 / math.sqrt(max(n1, n2)) if lam is None else lam
    norm_2 = float(torch.linalg.matrix_norm(m, ord=2))
    if norm_2 == 0.0:
        return torch.zeros_like(m), torch.zeros_like(m)
    norm_f = float(torch.linalg.norm(m))
    dual = m / max(norm_2, float(m.abs().max()) / lam)
    mu, rho = 1.25 / norm_2, 1.5
    mu_max = mu * 1e7
    low, sparse = torch.zeros_like(m), torch.zeros_like(m)
    for _ in range(max_iter):
        low = _svt(m - sparse + dual / mu, 1.0 / mu)
        sparse = _shrink(m - low + dual / mu, lam / mu)
        residual = m - low - sparse
        dual = dual + mu * residual
        mu = min(mu * rho, mu_max)
        if float(torch.linalg.norm(residual)) <= tol * norm_f:
            break
    return low, sparse
