"""A one-pass sketch of a sum of low-rank products, and its rank-r reconstruction.

Tropp, Yurtsever, Udell and Cevher, "Practical sketching algorithms for low-rank matrix approximation", SIAM J. Matrix
Anal. Appl. 38(4), 2017. A d_out x d_in matrix ``W`` that arrives as a sum of terms ``W = sum_i w_i L_i R_i`` is never
formed; two thin sketches are kept instead, each a linear function of ``W`` (so a term is folded in and released):

* the range sketch ``Y = W Omega`` (d_out x k), with a test matrix ``Omega`` (d_in x k),
* the co-range sketch ``Z = Psi W`` (l x d_in), with a test matrix ``Psi`` (l x d_out), l >= k.

Reconstruction (their Sec. 4, the simple low-rank approximation): ``Q = orth(Y)``, ``X = (Psi Q)^+ Z``, ``W ~ Q X``;
the rank-r approximation (their Sec. 5) truncates ``X``'s SVD: ``[[W]]_r ~ (Q U_r) S_r V_r^T``. With Gaussian test
matrices, ``E ||W - Q X||_F^2 <= (1 + k/(l-k-1)) min_{rho < k-1} (1 + rho/(k-rho-1)) tau_{rho+1}^2(W)``, where
``tau_j^2`` is the energy of ``W``'s singular values from the j-th on (their Thm. 4.3), and
``||W - [[Q X]]_r||_F <= tau_{r+1}(W) + 2 ||W - Q X||_F`` (their Prop. 6.1): a matrix whose energy sits in fewer than
about k directions is recovered almost exactly.

Ours adds known directions to the Gaussian test matrices (``range_basis``, ``corange_basis``: e.g. the current LoRA
factors' spans). The bounds above still hold, since extra columns of ``Omega`` only enlarge the range ``Q`` captures,
and ``Q X Omega_known = W Omega_known`` exactly (``W Omega_known`` lies in the range of ``Q``): the sketch reproduces
``W`` exactly along the directions it was told of. Memory: 2 (d_out + d_in)(k' + l') floats (sketches and test
matrices, k' and l' counting the known directions), whatever the number of terms; a fold of a term of inner size j
costs O(j (k' + l')(d_out + d_in)).
"""

from __future__ import annotations

import torch

from fedsrd.ops.lowrank import Factored


def recommended_corange_size(k: int) -> int:
    """The co-range sketch size Tropp et al. recommend for a range sketch of size k: l = 2k + 1."""
    return 2 * k + 1


class OnePassSketch:
    """The sketches ``(Y, Z)`` of a d_out x d_in matrix held as a running weighted sum of products ``left @ right``.

    `k` and `l`: the Gaussian columns of ``Omega`` and rows of ``Psi`` (drawn from `generator`); `range_basis`
    (d_in x j, orthonormal columns) and `corange_basis` (d_out x j', orthonormal columns) are appended to them.
    Folding is in a fixed order, so the same terms in the same order give the same bits.
    """

    def __init__(
        self,
        d_out: int,
        d_in: int,
        k: int,
        l: int,  # noqa: E741 (the paper's name)
        generator: torch.Generator,
        range_basis: torch.Tensor | None = None,
        corange_basis: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if k < 1 or l < k:
            raise ValueError(f"OnePassSketch: expected 1 <= k <= l, got k={k}, l={l}.")
        omega = torch.randn(d_in, k, generator=generator, dtype=dtype)
        psi = torch.randn(l, d_out, generator=generator, dtype=dtype)
        if range_basis is not None:
            omega = torch.cat([range_basis.to(dtype), omega], dim=1)
        if corange_basis is not None:
            psi = torch.cat([corange_basis.to(dtype).T, psi], dim=0)
        self.omega, self.psi = omega, psi  # d_in x k', l' x d_out
        self.y = torch.zeros(d_out, omega.shape[1], dtype=dtype)  # W Omega
        self.z = torch.zeros(psi.shape[0], d_in, dtype=dtype)  # Psi W

    def contribution(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sketches of ``left @ right`` alone (d_out x j times j x d_in), never forming it."""
        left, right = left.to(self.y.dtype), right.to(self.y.dtype)
        return left @ (right @ self.omega), (self.psi @ left) @ right

    def add(self, sketches: tuple[torch.Tensor, torch.Tensor], weight: float = 1.0) -> None:
        """Add ``weight`` times a term's sketches (from `contribution`)."""
        y, z = sketches
        self.y.add_(y, alpha=weight)
        self.z.add_(z, alpha=weight)

    def fold(self, left: torch.Tensor, right: torch.Tensor, weight: float = 1.0) -> None:
        """``W += weight * left @ right``, in sketch."""
        self.add(self.contribution(left, right), weight)

    def reconstruct(self) -> Factored:
        """``(Q, X)`` with ``W ~ Q X`` (Q d_out x k' orthonormal, X k' x d_in): Tropp et al., Sec. 4."""
        q, _ = torch.linalg.qr(self.y)
        # (Psi Q)^+ Z through the SVD-based pinv: torch.linalg.lstsq's default CPU driver (gelsy) does not return the
        # same bits on every call, and a server step must
        x = torch.linalg.pinv(self.psi @ q) @ self.z
        return q, x

    def truncated(self, rank: int) -> Factored:
        """The rank-`rank` approximation ``((Q U_r) S_r, V_r^T)`` of ``W``: Tropp et al., Sec. 5."""
        q, x = self.reconstruct()
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        keep = min(rank, s.numel())
        return q @ (u[:, :keep] * s[:keep]), vh[:keep]


def orthonormal_basis(columns: torch.Tensor) -> torch.Tensor | None:
    """An orthonormal basis of the span of `columns` (reduced QR), or None if they are all zero."""
    if not bool(columns.any()):
        return None
    q, _ = torch.linalg.qr(columns.to(torch.float32))
    return q


__all__ = ["OnePassSketch", "orthonormal_basis", "recommended_corange_size"]
