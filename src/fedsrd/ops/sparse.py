"""Sparse tensors: flat positions plus values, the form compressed payloads take."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SparseTensor:
    """A tensor with most entries zero: flat (row-major) positions of the kept entries and their values."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, 1-D, strictly increasing flat positions
    values: torch.Tensor  # 1-D, same length as indices, floating dtype

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
