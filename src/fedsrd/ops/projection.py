"""Seeded random directions for the full-parameter family: FedKRSO's projections and FedKSeed's perturbations.

Every draw comes from a CPU `torch.Generator` seeded by (seed, parameter name) (`fedsrd.ops.seeding`), so any party
rebuilds the same bits on any hardware, and no draw depends on the order in which weights are visited.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedsrd.ops.seeding import derive_seed, generator_for


def seed_pool(seed: int, *parts: object, size: int) -> list[int]:
    """`size` seeds derived from the run seed and labels (FedKRSO: per round; FedKSeed: one pool for the run).

    Seeds are 63-bit (`derive_seed`), not drawn from a small range (the FedKRSO reference's ``randint(1, 2*32-1)``
    typo makes seeds repeat across rounds).
    """
    if size < 1:
        raise ValueError(f"seed_pool: size must be >= 1, got {size}")
    return [derive_seed(seed, *parts, k) for k in range(size)]


def projection(seed: int, name: str, rank: int, in_features: int) -> torch.Tensor:
    """FedKRSO's P for weight `name` under `seed`: rank x in_features, i.i.d. N(0, 1/rank), so E[P^T P] = I.

    float32 on the CPU; move it to the weight's device after drawing, never draw on the device.
    """
    if rank < 1 or in_features < 1:
        raise ValueError(f"projection {name!r}: rank and in_features must be >= 1, got {rank} and {in_features}")
    generator = generator_for(seed, name)
    return torch.randn(rank, in_features, generator=generator, dtype=torch.float32).mul_(1.0 / math.sqrt(rank))


def direction(seed: int, name: str, shape: Sequence[int]) -> torch.Tensor:
    """FedKSeed's z for weight `name` under `seed`: i.i.d. N(0, 1) of `shape`, float32 on the CPU."""
    generator = generator_for(seed, name)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def reconstruct(
    accumulators: Mapping[int, torch.Tensor], seeds: Sequence[int], name: str, in_features: int
) -> torch.Tensor:
    """sum_k A_k P_k for one weight (out x in): seed index k -> its out x r accumulator A_k (FedKRSO's reconstruction).

    float32 on the CPU, summed in increasing seed index, so every party that runs it gets the same bits.
    """
    if not accumulators:
        raise ValueError(f"reconstruct {name!r}: no accumulators given")
    total: torch.Tensor | None = None
    for k in sorted(accumulators):
        acc = accumulators[k].to("cpu", torch.float32)
        term = acc @ projection(seeds[k], name, acc.shape[1], in_features)
        total = term if total is None else total.add_(term)
    return total
