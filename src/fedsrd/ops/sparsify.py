"""Sparsifiers for LoRA deltas: FedSRD's importance-aware pruning (upload) and DARE random drop (download).

Importance-aware pruning (FedSRD Sec. 4.1, Eq. 6-8) keeps the entries of a LoRA delta whose effect on the product
``B A`` is largest. An entry's score is its magnitude times the norm of the vector it multiplies in the other factor,
which is the Frobenius norm of the rank-1 change it makes to ``B A``. Each matrix gets its own sparsity ratio from the
kurtosis of its scores (heavy tails -> a few entries carry the mass -> prune more).
"""

from __future__ import annotations

import math

import torch

from fedsrd.ops.sparse import SeededMask, SparseTensor

# torch.quantile refuses inputs with more than 2**24 elements; above that an exact kthvalue equivalent is used.
QUANTILE_MAX_NUMEL = 2**24
MAX_SPARSITY = 0.99  # rho is clamped here so that large alpha stays a valid quantile (spec sec. 5, item 3)
L1_RESCALE_MIN_MASS = 1e-9


# ---- importance score (Eq. 6) ----------------------------------------------------------------------------------------
def importance_scores_b(delta_b: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """Scores of dB (d_out x r): ``I[u, v] = |dB[u, v]| * ||A_prev[v, :]||_2``, the norm of dB[u,v] e_u A_prev[v,:]."""
    _check_pair(delta_b, a_prev, "dB", "A_prev", delta_b.shape[1] == a_prev.shape[0])
    row_norms = torch.linalg.vector_norm(a_prev.to(torch.float32), dim=1)  # (r,)
    return delta_b.to(torch.float32).abs() * row_norms[None, :]


def importance_scores_a(delta_a: torch.Tensor, b_new: torch.Tensor) -> torch.Tensor:
    """Scores of dA (r x d_in): ``I[u, v] = |dA[u, v]| * ||B_new[:, u]||_2`` with B_new the client's dense new B."""
    _check_pair(delta_a, b_new, "dA", "B_new", delta_a.shape[0] == b_new.shape[1])
    col_norms = torch.linalg.vector_norm(b_new.to(torch.float32), dim=0)  # (r,)
    return delta_a.to(torch.float32).abs() * col_norms[:, None]


def _check_pair(delta: torch.Tensor, other: torch.Tensor, delta_name: str, other_name: str, ok: bool) -> None:
    if delta.dim() != 2 or other.dim() != 2 or not ok:
        raise ValueError(
            f"importance score: {delta_name} {tuple(delta.shape)} and {other_name} {tuple(other.shape)} "
            "are not the two factors of one LoRA module (expected B d_out x r and A r x d_in)."
        )


# ---- adaptive ratio (Eq. 7) ------------------------------------------------------------------------------------------
def pearson_kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis ``m4 / m2^2`` of all entries (normal = 3), in float64; NaN if the entries are constant.

    Equals ``scipy.stats.kurtosis(x.ravel(), fisher=False)`` (biased moments).
    """
    flat = x.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0:
        return math.nan
    centred = flat - flat.mean()
    m2 = centred.square().mean()
    m4 = centred.square().square().mean()
    if float(m2) == 0.0:
        return math.nan
    return float(m4 / (m2 * m2))


def adaptive_ratio(kurtosis: float, alpha: float, coeff: float, cap: float, max_ratio: float = MAX_SPARSITY) -> float:
    """Sparsity ``rho = alpha + min(cap, coeff * ln(max(kurtosis, 1))) <= max_ratio`` (Eq. 7, authors' code).

    A NaN kurtosis (constant scores) adds nothing: rho = alpha.
    """
    increment = 0.0 if math.isnan(kurtosis) else min(cap, coeff * math.log(max(kurtosis, 1.0)))
    return min(max(alpha + increment, 0.0), max_ratio)


# ---- pruning (Eq. 8) -------------------------------------------------------------------------------------------------
def quantile_threshold(scores: torch.Tensor, ratio: float, max_numel: int = QUANTILE_MAX_NUMEL) -> torch.Tensor:
    """``torch.quantile(scores, ratio)`` (linear interpolation), also for more than ``max_numel`` entries.

    Above ``max_numel`` the two order statistics around the rank come from ``kthvalue`` and are interpolated exactly
    as ``torch.quantile`` does (rank ``ratio * (n - 1)`` in the scores' dtype, then ``lerp``).
    """
    flat = scores.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("quantile_threshold: the scores are empty.")
    if flat.numel() <= max_numel:
        return torch.quantile(flat, ratio, interpolation="linear")
    rank = torch.tensor(ratio, dtype=flat.dtype, device=flat.device) * (flat.numel() - 1)
    below = int(rank.floor().item())
    above = min(below + 1, flat.numel() - 1)
    weight = rank - below
    low = torch.kthvalue(flat, below + 1).values
    high = torch.kthvalue(flat, above + 1).values if above != below else low
    return torch.lerp(low, high, weight)


def importance_prune(
    delta: torch.Tensor,
    scores: torch.Tensor,
    *,
    alpha: float,
    coeff: float,
    cap: float,
    l1_rescale: bool = True,
) -> SparseTensor:
    """Prune ``delta`` to the entries whose score is at least the ``rho``-quantile of ``scores`` (Eq. 7-8).

    With ``l1_rescale`` (authors' code, not in the paper) the kept entries are scaled by
    ``sum|delta| / sum|kept|`` so the pruned matrix keeps the L1 mass of the original (skipped if that is <= 1e-9).
    """
    if delta.shape != scores.shape:
        raise ValueError(f"importance_prune: delta {tuple(delta.shape)} and scores {tuple(scores.shape)} differ.")
    delta = delta.detach().to(torch.float32)
    rho = adaptive_ratio(pearson_kurtosis(scores), alpha, coeff, cap)  # Eq. 7
    tau = quantile_threshold(scores, rho)  # Eq. 8: tau = quantile(I, rho)
    pruned = torch.where(scores >= tau, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if l1_rescale:
        pruned_mass = float(pruned.abs().sum(dtype=torch.float64))
        if pruned_mass > L1_RESCALE_MIN_MASS:
            pruned = pruned * (float(delta.abs().sum(dtype=torch.float64)) / pruned_mass)
    return SparseTensor.from_dense(pruned)


# ---- DARE random drop (download) -------------------------------------------------------------------------------------
def dare_drop(tensor: torch.Tensor, drop: float, generator: torch.Generator, *, rescale: bool = True) -> SparseTensor:
    """Zero each entry independently with probability ``drop``; scale the survivors by ``1 / (1 - drop)`` (DARE).

    With ``rescale=False`` the survivors keep their values (random-k sparsification, as error feedback wants: what is
    dropped is kept and sent later, so nothing needs to be inflated now).

    The mask's seed is drawn from ``generator`` and the mask from that seed on the CPU (`SeededMask`), so the same
    generator state gives the same mask on any device, and the wire can send the seed instead of the positions.
    """
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"dare_drop: drop probability must be in [0, 1), got {drop}.")
    tensor = tensor.detach().to(torch.float32)
    if drop == 0.0:
        return SparseTensor.from_dense(tensor)
    mask = SeededMask((int(torch.randint(0, 2**62, (1,), generator=generator)),), float(drop))
    keep = mask.keep(tuple(tensor.shape))  # P(keep) = 1 - drop
    kept = tensor / (1.0 - drop) if rescale else tensor
    dropped = torch.where(keep.to(tensor.device), kept, torch.zeros((), device=tensor.device))
    return SparseTensor.from_mask(dropped, mask)


# ---- magnitude top-k (fedsrd_ef's download with error feedback) -----------------------------------------------------
def magnitude_keep(tensor: torch.Tensor, keep: float) -> SparseTensor:
    """The ``ceil(keep * numel)`` entries of largest magnitude (ties by position, deterministic), unscaled.

    Unlike `dare_drop`, the positions depend on the values, so they travel explicitly (bitmap or varint gaps).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"magnitude_keep: keep fraction must be in (0, 1], got {keep}.")
    flat = tensor.detach().to(torch.float32).reshape(-1)
    k = min(flat.numel(), max(1, math.ceil(keep * flat.numel())))
    order = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    indices = torch.sort(order).values
    return SparseTensor(shape=tuple(tensor.shape), indices=indices, values=flat[indices].clone())


__all__ = [
    "magnitude_keep",
    "adaptive_ratio",
    "dare_drop",
    "importance_prune",
    "importance_scores_a",
    "importance_scores_b",
    "pearson_kurtosis",
    "quantile_threshold",
]
