"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024).

Clients upload their trained LoRA factors. The server aggregates their *products* in full-rank space,
``W = sum_i p_i s_i B_i A_i`` (``s_i`` = client i's LoRA scaling, lora_alpha / r_i), and re-factorises ``W`` by a
truncated SVD, ``W ~ U_r S_r V_r^T``; the broadcast is both dense factors ``B = U_r S_r / s``, ``A = V_r^T``.
The SVD is taken in factored form (`fedsrd.ops.lowrank.truncated_svd`: QR of ``[p_i B_i]`` and of ``[A_i]^T`` and an
SVD of the small m r x m r core), never of a d_out x d_in matrix.

Heterogeneous ranks. The factors are ordered by singular value, so a client of rank r_j < r takes the first r_j
columns of B and rows of A (`truncate_to_rank`): ``U_{r_j} S_{r_j} V_{r_j}^T``, the best rank-r_j approximation of
``W``, rescaled to that client's LoRA scaling. `aggregate_heterogeneous` is the server math for clients of different
ranks and scalings. In the runtimes (`FedSRDConfig.client_lora_ranks`) every client's adapter has the global scaling
(its lora_alpha is lora_alpha * r_j / R), so ``s`` cancels: the server stacks the uploads of every rank, keeps the
rank-R SVD (R = lora_r) as the global adapter, and client j trains from, and downloads, its first r_j components.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Payload, State
from fedsrd.algorithms.families import lora_modules
from fedsrd.algorithms.fedavg import FedAvg
from fedsrd.ops.lowrank import Factored, pad_to_rank, stack_factors, truncated_svd


def rank_r_factors(
    bs: Sequence[torch.Tensor],
    as_: Sequence[torch.Tensor],
    weights: Sequence[float],
    rank: int,
    scalings: Sequence[float] | None = None,
) -> Factored:
    """``(U_r S_r, V_r^T)``: the best rank-``rank`` approximation of ``sum_i w_i s_i B_i A_i``, zero-padded to ``rank``.

    ``bs[i]`` is d_out x r_i and ``as_[i]`` r_i x d_in; the r_i may differ. ``scalings`` default to 1.
    """
    scalings = [1.0] * len(bs) if scalings is None else list(scalings)
    if len(scalings) != len(bs):
        raise ValueError(f"FlexLoRA: {len(bs)} clients but {len(scalings)} scalings.")
    left, right = stack_factors(bs, as_, [w * s for w, s in zip(weights, scalings, strict=True)])
    return pad_to_rank(*truncated_svd(left, right, rank), rank)  # rank < `rank` (e.g. tiny layers): zero directions


def truncate_to_rank(b: torch.Tensor, a: torch.Tensor, rank: int, scale: float = 1.0) -> Factored:
    """A client's rank-``rank`` LoRA from broadcast factors ordered by singular value: ``(B[:, :r] / scale, A[:r])``.

    ``scale`` is the client's LoRA scaling when the broadcast carries the scaled product (`aggregate_heterogeneous`).
    """
    if not 1 <= rank <= a.shape[0]:
        raise ValueError(f"FlexLoRA: client rank must be in [1, {a.shape[0]}], got {rank}.")
    return b[:, :rank] / scale, a[:rank].clone()


def aggregate_heterogeneous(
    bs: Sequence[torch.Tensor],
    as_: Sequence[torch.Tensor],
    weights: Sequence[float],
    scalings: Sequence[float],
    client_ranks: Sequence[int],
) -> list[Factored]:
    """FlexLoRA's server step for clients of different ranks: each client's (B, A) for the next round.

    Aggregates the scaled products ``sum_i w_i s_i B_i A_i`` once, truncates at the largest rank, then gives client j
    the best rank-r_j approximation divided by its own scaling s_j (so that ``s_j B_j A_j`` is that approximation).
    """
    b, a = rank_r_factors(bs, as_, weights, max(client_ranks), scalings)
    return [truncate_to_rank(b, a, r, s) for r, s in zip(client_ranks, scalings, strict=True)]


@register_algorithm
class FlexLoRA(FedAvg):
    name = "flexlora"
    paper = "FlexLoRA (Bai et al., NeurIPS 2024)"
    uploads = "LoRA A and B, dense"
    downloads = "rank-r truncated SVD of the averaged product, both factors dense"
    robust_defences = frozenset()  # not a weighted sum of client tensors (an SVD of the summed products)
    dp_support = frozenset()
    dp_refusal = ("its server step is an SVD of the clients' products, for which this library has not implemented the "
                  "product-space noise (FedSRD has it; docs/privacy.md)")
    supports_unequal_ranks = True  # stacked products of any ranks; truncation on the way down
    secure_sum = False  # needs each client's upload (see robust_defences)

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("FlexLoRA.server_step: no client updates to aggregate.")
        payload: Payload = {}
        for module in lora_modules(global_state):
            rank = global_state[module.a_key].shape[0]
            bs = [u[module.b_key].to(torch.float32) for u in updates]
            as_ = [u[module.a_key].to(torch.float32) for u in updates]
            # one LoRA shape (and scaling) for every client here, so s cancels: B = U_r S_r, A = V_r^T
            payload[module.b_key], payload[module.a_key] = rank_r_factors(bs, as_, weights, rank)
        return payload
