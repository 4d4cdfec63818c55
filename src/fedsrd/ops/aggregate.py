"""Weighted averaging of named tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to one; raises if they are empty, negative or all zero."""
    if len(weights) == 0:
        raise ValueError("aggregation weights: expected at least one client weight, got none.")
    if any(w < 0 for w in weights):
        raise ValueError(f"aggregation weights: expected non-negative weights, got {list(weights)}.")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights: expected a positive sum, got {list(weights)}.")
    return [float(w) / total for w in weights]


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * t_i in float32, accumulated in a fixed order so every process gets the same bits."""
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, weight in zip(tensors, weights, strict=True):
        out.add_(tensor.to(torch.float32), alpha=weight)
    return out
