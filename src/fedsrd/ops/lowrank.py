"""Low-rank algebra on factored matrices: nothing here ever forms a d_out x d_in matrix.

A matrix is held as a pair ``(left, right)`` with ``W = left @ right``, ``left`` d_out x k and ``right`` k x d_in.
A weighted sum of LoRA products ``sum_i p_i B_i A_i`` is the single pair ``P = [p_1 B_1 .. p_m B_m]`` (d_out x m r),
``Q = [A_1; ..; A_m]`` (m r x d_in), so every operation FedSRD's server needs costs O(m r (d_out + d_in)) memory:

* the rank-r truncated SVD of ``P @ Q``, from a QR of ``P`` and of ``Q^T`` and an SVD of the small (m r x m r) core;
* the least-squares factor updates ``dW @ pinv(A)`` and ``pinv(B) @ dW``, with ``dW`` factored, as
  ``left @ (right @ pinv(A))`` and ``(pinv(B) @ left) @ right``.

Everything is computed in float32 (the LoRA dtype; FedSRD's reference code does its server algebra in fp32), or in
float64 when given float64 inputs (useful as an exact reference).
The dense way (form W, full SVD, dense pinv solve) lives in ``tests/test_fedsrd.py`` as the reference these match.

**Which path is cheaper.** The factored SVD costs two Householder QRs of tall k-column matrices and the SVD of a
k x k core (k = m r): O(k^2 (d_out + d_in) + k^3). The dense way forms W (2 d_out d_in k flops) and takes the SVD of
the d_out x d_in matrix: O(d_out d_in min(d_out, d_in)), independent of k. With a few clients the factored path wins by
orders of magnitude; once k approaches min(d_out, d_in) its QRs cost more than they save (a QR of a matrix wider than
tall keeps every one of its k columns). `truncated_svd_flops` counts both (LAPACK's textbook operation counts,
Golub & Van Loan, *Matrix Computations*, 4th ed., Sec. 5.2 and 8.6) and `cheapest_truncated_svd` runs the cheaper one;
both give the same rank-r factors to float32 rounding (the product, not the signs of singular vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Factored = tuple[torch.Tensor, torch.Tensor]  # (left d_out x k, right k x d_in): the matrix left @ right


def _compute(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the compute dtype: float32, or float64 if it already is."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def stack_factors(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor], weights: Sequence[float]) -> Factored:
    """``sum_i w_i lefts[i] @ rights[i]`` as one factored pair ``([w_1 L_1 .. w_m L_m], [R_1; ..; R_m])``."""
    if not (len(lefts) == len(rights) == len(weights)) or len(lefts) == 0:
        raise ValueError(
            f"stack_factors: expected as many lefts, rights and weights (at least one), got "
            f"{len(lefts)}, {len(rights)} and {len(weights)}."
        )
    for i, (left, right) in enumerate(zip(lefts, rights, strict=True)):
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(
                f"stack_factors: term {i} has left {tuple(left.shape)} and right {tuple(right.shape)}; "
                "expected (d_out, k) and (k, d_in)."
            )
    left = torch.cat([_compute(lf) * float(w) for lf, w in zip(lefts, weights, strict=True)], dim=1)
    right = torch.cat([_compute(rt) for rt in rights], dim=0)
    return left, right


def factored_difference(target: Factored, current: Factored) -> Factored:
    """``target_left @ target_right - current_left @ current_right`` as one factored pair."""
    (tl, tr), (cl, cr) = target, current
    return torch.cat([tl, -cl], dim=1), torch.cat([tr, cr], dim=0)


def truncated_svd(left: torch.Tensor, right: torch.Tensor, rank: int) -> Factored:
    """The best rank-``rank`` approximation of ``left @ right`` as factors ``(U_r S_r, V_r^T)``.

    ``left @ right = Q_l R_l R_r^T Q_r^T`` with ``left = Q_l R_l`` and ``right^T = Q_r R_r``; the SVD of the small
    core ``R_l R_r^T = U S V^T`` gives the SVD ``(Q_l U) S (Q_r V)^T`` of the product. Returns d_out x r' and r' x d_in
    with ``r' = min(rank, k, d_out, d_in)``.
    """
    if rank < 1:
        raise ValueError(f"truncated_svd: rank must be >= 1, got {rank}.")
    left, right = _compute(left), _compute(right)
    q_left, r_left = torch.linalg.qr(left)  # d_out x k1, k1 x k
    q_right, r_right = torch.linalg.qr(right.T)  # d_in x k2, k2 x k
    core = r_left @ r_right.T  # k1 x k2
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = min(rank, s.numel())
    return q_left @ (u[:, :keep] * s[:keep]), vh[:keep] @ q_right.T


def pad_to_rank(left: torch.Tensor, right: torch.Tensor, rank: int) -> Factored:
    """``(left, right)`` with zero directions appended up to inner dimension `rank` (a truncated SVD of a product of
    smaller rank returns fewer columns than asked for); the product is unchanged."""
    missing = rank - left.shape[1]
    if missing <= 0:
        return left, right
    return (torch.cat([left, left.new_zeros(left.shape[0], missing)], dim=1),
            torch.cat([right, right.new_zeros(missing, right.shape[1])], dim=0))  # fmt: skip


# ---- the cheaper of the factored and the dense truncated SVD --------------------------------------------------------
SVD_PATHS = ("auto", "factored", "dense")


def _gemm_flops(rows: int, cols: int, inner: int) -> float:
    return 2.0 * rows * cols * inner


def _qr_flops(rows: int, cols: int) -> float:
    """Householder QR of a rows x cols matrix plus its explicit reduced Q (geqrf + orgqr): 4 M p^2 - 4/3 p^3 with
    p = min(rows, cols), M = max(rows, cols)."""
    p, big = min(rows, cols), max(rows, cols)
    return 4.0 * big * p * p - 4.0 * p**3 / 3.0


def _svd_flops(rows: int, cols: int) -> float:
    """Thin SVD with singular vectors of a rows x cols matrix, R-SVD count 6 M p^2 + 20 p^3."""
    p, big = min(rows, cols), max(rows, cols)
    return 6.0 * big * p * p + 20.0 * p**3


def truncated_svd_flops(d_out: int, d_in: int, inner: int, rank: int) -> dict[str, float]:
    """Estimated flops of the rank-`rank` truncated SVD of ``left @ right`` (d_out x inner times inner x d_in) by the
    factored path (`truncated_svd`) and by the dense path (`dense_truncated_svd`)."""
    k_left, k_right = min(d_out, inner), min(d_in, inner)
    keep = min(rank, k_left, k_right)
    factored = (
        _qr_flops(d_out, inner)
        + _qr_flops(d_in, inner)
        + _gemm_flops(k_left, k_right, inner)  # the core R_l R_r^T
        + _svd_flops(k_left, k_right)
        + _gemm_flops(d_out, keep, k_left)
        + _gemm_flops(keep, d_in, k_right)
    )
    dense = _gemm_flops(d_out, d_in, inner) + _svd_flops(d_out, d_in) + d_out * keep
    return {"factored": factored, "dense": dense}


def choose_svd_path(d_out: int, d_in: int, inner: int, rank: int, path: str = "auto") -> str:
    """'factored' or 'dense': `path` itself if forced, else the one `truncated_svd_flops` says is cheaper."""
    if path not in SVD_PATHS:
        raise ValueError(f"choose_svd_path: path must be one of {SVD_PATHS}, got {path!r}.")
    if path != "auto":
        return path
    flops = truncated_svd_flops(d_out, d_in, inner, rank)
    return "factored" if flops["factored"] <= flops["dense"] else "dense"


def dense_truncated_svd(left: torch.Tensor, right: torch.Tensor, rank: int) -> Factored:
    """`truncated_svd` the paper's way: form ``W = left @ right`` (d_out x d_in), take its thin SVD, keep ``rank``.

    Cheaper than the factored path once ``left`` has about as many columns as W has rows or columns (many clients).
    """
    if rank < 1:
        raise ValueError(f"dense_truncated_svd: rank must be >= 1, got {rank}.")
    w = _compute(left) @ _compute(right)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    keep = min(rank, s.numel(), left.shape[1])
    return u[:, :keep] * s[:keep], vh[:keep]


def cheapest_truncated_svd(left: torch.Tensor, right: torch.Tensor, rank: int, path: str = "auto") -> Factored:
    """The rank-``rank`` truncated SVD of ``left @ right`` by the path `choose_svd_path` picks for these shapes."""
    chosen = choose_svd_path(left.shape[0], right.shape[1], left.shape[1], rank, path)
    return (truncated_svd if chosen == "factored" else dense_truncated_svd)(left, right, rank)


def solve_left_update(delta: Factored, a: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """B-round least squares: ``dB = dW @ pinv(A)`` (d_out x r) for ``dW = left @ right``.

    With ``ridge > 0``, the damped solve ``dW A^T (A A^T + lambda I)^-1`` with ``lambda = ridge * trace(A A^T) / r``
    (relative to A's mean squared singular value, so the damping does not depend on A's scale).
    """
    left, right = delta
    return left @ (right @ left_solve_matrix(a, ridge))


def left_solve_matrix(a: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """The d_in x r matrix a B-round multiplies dW by: ``pinv(A)``, or its damped form (`solve_left_update`)."""
    return torch.linalg.pinv(_compute(a)) if ridge == 0 else _damped_pinv(_compute(a).T, ridge).T


def right_solve_matrix(b: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """The r x d_out matrix an A-round multiplies dW by: ``pinv(B)``, or its damped form (`solve_right_update`)."""
    return torch.linalg.pinv(_compute(b)) if ridge == 0 else _damped_pinv(_compute(b), ridge)


def solve_right_update(delta: Factored, b: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """A-round least squares: ``dA = pinv(B) @ dW`` (r x d_in) for ``dW = left @ right``.

    With ``ridge > 0``, the damped solve ``(B^T B + lambda I)^-1 B^T dW`` with ``lambda = ridge * trace(B^T B) / r``:
    directions in which B is weak are not amplified.
    """
    left, right = delta
    return (right_solve_matrix(b, ridge) @ left) @ right


def _damped_pinv(m: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(M^T M + lambda I)^-1 M^T`` for a tall ``M`` (n x r), ``lambda = ridge * trace(M^T M) / r``."""
    gram = m.T @ m
    r = gram.shape[0]
    lam = ridge * torch.trace(gram) / r
    if float(lam) == 0.0:
        return torch.linalg.pinv(m)
    return torch.linalg.solve(gram + lam * torch.eye(r, dtype=gram.dtype, device=gram.device), m.T)


__all__ = [
    "SVD_PATHS",
    "Factored",
    "cheapest_truncated_svd",
    "choose_svd_path",
    "dense_truncated_svd",
    "factored_difference",
    "left_solve_matrix",
    "pad_to_rank",
    "right_solve_matrix",
    "solve_left_update",
    "solve_right_update",
    "stack_factors",
    "truncated_svd",
    "truncated_svd_flops",
]
