"""Sparse tensors: flat positions plus values, the form compressed payloads take.

A random mask (DARE) can travel as its seed: `SeededMask` regenerates the positions from (seeds, drop) and the shape,
so the wire sends only the values (`fedsrd.wire`, ``positions: "seeded"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_MASK_SEEDS = 256  # a broadcast's mask is the union of at most this many seeded masks (one per client)


@dataclass(frozen=True)
class SeededMask:
    """The positions of a random mask: entry ``j`` is kept when ``torch.rand(shape, generator=seeded)[j] >= drop`` for
    any of ``seeds`` (a union of masks, e.g. the clients' DARE masks under a sparse average).

    The draw is `torch.rand` from a CPU `torch.Generator` seeded with each seed, so every party regenerates the same
    positions from a few bytes.
    """

    seeds: tuple[int, ...]
    drop: float

    def __post_init__(self) -> None:
        if not 1 <= len(self.seeds) <= MAX_MASK_SEEDS:
            raise ValueError(f"SeededMask: expected 1 to {MAX_MASK_SEEDS} seeds, got {len(self.seeds)}")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 for s in self.seeds):
            raise ValueError(f"SeededMask: seeds must be ints in [0, 2**63), got {list(self.seeds)[:4]}...")
        if isinstance(self.drop, bool) or not isinstance(self.drop, (int, float)) or not 0.0 <= self.drop < 1.0:
            raise ValueError(f"SeededMask: drop must be a probability in [0, 1), got {self.drop!r}")

    def keep(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Boolean tensor of ``shape``: True where the mask keeps the entry."""
        keep = torch.zeros(shape, dtype=torch.bool)
        for seed in self.seeds:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            keep |= torch.rand(shape, generator=generator, device="cpu") >= self.drop
        return keep

    def positions(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The kept flat (row-major) positions, int64, increasing."""
        return torch.nonzero(self.keep(shape).reshape(-1), as_tuple=False).reshape(-1)

    def union(self, other: SeededMask) -> SeededMask:
        if other.drop != self.drop:
            raise ValueError(f"SeededMask.union: drops differ ({self.drop} and {other.drop})")
        return SeededMask(self.seeds + other.seeds, self.drop)


@dataclass
class SparseTensor:
    """A tensor with most entries zero: flat (row-major) positions of the kept entries and their values."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, 1-D, strictly increasing flat positions
    values: torch.Tensor  # 1-D, same length as indices, floating dtype
    # Where the positions are exactly those of a seeded random mask (DARE), the mask, so the wire can send its seed.
    mask: SeededMask | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError(
                f"SparseTensor indices and values must be 1-D, got shapes "
                f"{tuple(self.indices.shape)} and {tuple(self.values.shape)}"
            )
        if self.indices.numel() != self.values.numel():
            raise ValueError(f"SparseTensor has {self.indices.numel()} indices but {self.values.numel()} values")

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        """Number of entries of the dense tensor."""
        return math.prod(self.shape)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor (zeros off the stored positions), in ``dtype`` or the values' dtype."""
        dtype = dtype or self.values.dtype
        flat = torch.zeros(self.numel, dtype=dtype, device=self.values.device)
        flat[self.indices.to(device=flat.device, dtype=torch.int64)] = self.values.to(dtype)
        return flat.reshape(self.shape)

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> SparseTensor:
        """Keep the non-zero entries of ``dense``."""
        flat = dense.detach().reshape(-1)
        indices = torch.nonzero(flat, as_tuple=False).reshape(-1).to(torch.int64)
        return cls(shape=tuple(dense.shape), indices=indices, values=flat[indices].clone())

    @classmethod
    def from_mask(cls, dense: torch.Tensor, mask: SeededMask) -> SparseTensor:
        """The entries of ``dense`` where ``mask`` keeps them (zeros included); ``dense`` must be zero elsewhere."""
        flat = dense.detach().reshape(-1)
        indices = mask.positions(tuple(dense.shape)).to(flat.device)
        return cls(shape=tuple(dense.shape), indices=indices, values=flat[indices].clone(), mask=mask)


def densify(value: torch.Tensor | SparseTensor) -> torch.Tensor:
    """A payload value (dense or sparse) as a dense float32 tensor."""
    if isinstance(value, SparseTensor):
        return value.to_dense(torch.float32)
    return value.to(torch.float32)


def round_to_dtype(value: torch.Tensor | SparseTensor, dtype: torch.dtype) -> torch.Tensor | SparseTensor:
    """`value` with its values rounded to `dtype` and back to float32 (what a receiver decodes from a message whose
    values travel in `dtype`); positions and seeded masks are kept."""
    if isinstance(value, SparseTensor):
        values = value.values.to(dtype).to(torch.float32)
        return SparseTensor(shape=value.shape, indices=value.indices, values=values, mask=value.mask)
    return value.to(dtype).to(torch.float32)
