"""Clients of different LoRA ranks: the helpers every rank-aware algorithm shares (`FedSRDConfig.client_lora_ranks`).

The global adapter has rank R (``lora_r``); client k trains rank r_k <= R. A rank-r view of a rank-R adapter keeps the
first r columns of every ``lora_B`` (d_out x R) and the first r rows of every ``lora_A`` (R x d_in): the *truncation*
that HetLoRA (Cho et al., EMNLP 2024) sends down, and, where the global factors are ordered by singular value
(FlexLoRA: B = U_R S_R, A = V_R^T), the best rank-r approximation of the global product. Zero-padding is the way up:
a rank-r factor written into the first r columns/rows of a rank-R zero factor, so ``pad(B) pad(A) = B A``.

Every client's adapter has the same LoRA scaling (its lora_alpha is lora_alpha * r_k / R, `FedSRDConfig
.client_lora_alpha`), so products of different ranks are summed on one scale and no algorithm rescales them.
"""

from __future__ import annotations

import torch

from fedsrd.ops.sparse import SparseTensor

LORA_A_SUFFIX = ".lora_A.weight"  # A: r x d_in (rank on dim 0)
LORA_B_SUFFIX = ".lora_B.weight"  # B: d_out x r (rank on dim 1)


def rank_dim(name: str) -> int | None:
    """The dimension that holds the LoRA rank in tensor `name` (0 for A, 1 for B), None for other tensors."""
    if name.endswith(LORA_A_SUFFIX):
        return 0
    if name.endswith(LORA_B_SUFFIX):
        return 1
    return None


def state_rank(state: dict[str, torch.Tensor]) -> int | None:
    """The LoRA rank of an adapter state (of its first A factor), None if it has no LoRA factor."""
    for name, value in state.items():
        dim = rank_dim(name)
        if dim is not None:
            return int(value.shape[dim])
    return None


def truncate_tensor(name: str, value: torch.Tensor, rank: int) -> torch.Tensor:
    """`value` cut to `rank` along its rank dimension (A: first rows, B: first columns); other tensors as they are."""
    dim = rank_dim(name)
    if dim is None or value.shape[dim] == rank:
        return value
    if not 1 <= rank <= value.shape[dim]:
        raise ValueError(f"{name!r}: cannot cut rank {value.shape[dim]} to {rank}; expected 1..{value.shape[dim]}.")
    return value[:rank].clone() if dim == 0 else value[:, :rank].clone()


def truncate_state(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The rank-`rank` view of an adapter state: every A's first rows, every B's first columns (`state` itself when it
    already has that rank)."""
    if state_rank(state) in (None, rank):
        return state
    return {name: truncate_tensor(name, value, rank) for name, value in state.items()}


def pad_tensor(name: str, value: torch.Tensor, rank: int) -> torch.Tensor:
    """`value` zero-padded to `rank` along its rank dimension (HetLoRA's zero-padding); other tensors unchanged."""
    dim = rank_dim(name)
    if dim is None or value.shape[dim] == rank:
        return value
    if value.shape[dim] > rank:
        raise ValueError(f"{name!r}: cannot pad rank {value.shape[dim]} to the smaller {rank}.")
    shape = list(value.shape)
    shape[dim] = rank - value.shape[dim]
    return torch.cat([value, value.new_zeros(shape)], dim=dim)


def truncate_payload(payload: dict, rank: int) -> dict:
    """The part of a payload a rank-`rank` client needs: every LoRA tensor cut to `rank` (a sparse one keeps its
    entries in the kept rows/columns, with their positions written out), every other tensor as it is."""
    out = {}
    for name, value in payload.items():
        dim = rank_dim(name)
        if dim is None or value.shape[dim] <= rank:
            out[name] = value
        elif isinstance(value, SparseTensor):
            out[name] = SparseTensor.from_dense(truncate_tensor(name, value.to_dense(torch.float32), rank))
        else:
            out[name] = truncate_tensor(name, value, rank)
    return out


def lora_param_bytes(state: dict[str, torch.Tensor], rank: int, trainable, bytes_per_value: int = 4) -> int:
    """Bytes of the trainable parameters of a rank-`rank` adapter shaped like `state` (float32 by default): the memory
    a client of that rank holds for its LoRA weights (not its optimizer state, which Adam doubles)."""
    total = 0
    for name, value in state.items():
        if not trainable(name):
            continue
        dim = rank_dim(name)
        numel = value.numel() if dim is None else value.numel() // max(1, value.shape[dim]) * rank
        total += numel * bytes_per_value
    return total


__all__ = [
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "lora_param_bytes",
    "pad_tensor",
    "rank_dim",
    "state_rank",
    "truncate_payload",
    "truncate_state",
    "truncate_tensor",
]
