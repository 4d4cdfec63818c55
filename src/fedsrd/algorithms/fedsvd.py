"""FedSVD (Lee et al., "Adaptive Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025;
arXiv 2505.12805; code seanie12/fed-svd).

Clients train and upload only B, with A frozen (as FFA-LoRA), so averaging B is exact: ``(sum_i p_i B_i) A =
sum_i p_i B_i A`` (Sec. 3). The server then re-orthogonalises the adapter (Sec. 3.2, Algorithm 1) by the SVD of the
aggregated product,

    B_bar A = U S V^T,     A <- V_r^T (orthonormal rows),     B <- U_r S_r,

which leaves the product, and so the model, unchanged (B_bar A has rank <= r, so nothing is truncated), and
broadcasts both factors. The next round's clients train B against this new orthonormal A, whose rows follow the
principal directions of the update so far (the paper's argument: A adapts to the data while the upload stays B only,
which keeps DP-SGD's noise on one factor). The SVD is taken in factored form (`fedsrd.ops.lowrank.truncated_svd`:
QR of B_bar and of A^T, SVD of an r x r core), never forming the d_out x d_in product.

What travels: up, B (d_out x r per module, dense); down, A and B (dense) in rounds that re-orthogonalise, B alone
otherwise. As the official code (``--recalculate-svd-period``, default 1), the SVD runs every `fedsvd_every` rounds.
A module whose aggregated B is zero (e.g. nothing trained yet) keeps its A: the SVD of a zero matrix has no directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import AlgorithmOptions, Payload, State, require_option
from fedsrd.algorithms.fedsrd import lora_modules
from fedsrd.algorithms.ffa_lora import FFALoRA
from fedsrd.ops import weighted_sum
from fedsrd.ops.lowrank import truncated_svd


def orthogonalize(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r S_r, V_r^T)`` with ``U S V^T`` the SVD of ``b @ a`` (b d_out x r, a r x d_in), zero-padded to rank r
    when the product has lower rank (the padded rows of A are zero, so they contribute nothing until refreshed)."""
    rank = a.shape[0]
    new_b, new_a = truncated_svd(b, a, rank)
    missing = rank - new_a.shape[0]
    if missing > 0:
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], missing)], dim=1)
        new_a = torch.cat([new_a, new_a.new_zeros(missing, new_a.shape[1])], dim=0)
    return new_b, new_a


@dataclass
class FedSVDOptions(AlgorithmOptions):
    """FedSVD: how often A is re-orthogonalised."""

    fedsvd_every: int = field(
        default=1,
        metadata={"help": "FedSVD: re-orthogonalise A by the SVD of the aggregated B A every k rounds (the official "
                  "code's --recalculate-svd-period, default 1); other rounds broadcast B only."},
    )

    @staticmethod
    def validate(config) -> None:
        require_option(config, config.fedsvd_every >= 1, "fedsvd_every", f"must be >= 1, got {config.fedsvd_every}")


@register_algorithm
class FedSVD(FFALoRA):  # FFA-LoRA's client: B trained and uploaded, A frozen
    name = "fedsvd"
    options = FedSVDOptions
    paper = "FedSVD (Lee et al., NeurIPS 2025; arXiv 2505.12805)"
    uploads = "LoRA B only, dense (A frozen)"
    downloads = "B and the re-orthogonalised A from the SVD of B A, dense (B alone in rounds without the SVD)"
    secure_sum = True  # a function of the weighted mean of equal-shape dense B: secure aggregation may hand it the sum
    # robust_defences: FedAvg's. The step is a weighted sum of the clients' B, then a change of basis that keeps the
    # product; with A's rows orthonormal, ||(B_i - B) A|| = ||B_i - B||, so clipping B bounds the product change.

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("FedSVD.server_step: no client updates to aggregate.")
        refresh = round % self.config.fedsvd_every == 0
        payload: Payload = {}
        for module in lora_modules(global_state):
            b_bar = weighted_sum([u[module.b_key] for u in updates], weights)  # B = sum_i p_i B_i
            a = global_state[module.a_key].to(torch.float32)
            if refresh and bool(b_bar.any()):
                payload[module.b_key], payload[module.a_key] = orthogonalize(b_bar, a)  # B A = U S V^T
            else:
                payload[module.b_key] = b_bar
        return payload

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {k: (tuple(v.shape), False) for k, v in global_state.items()}

    def broadcast_is_partial(self) -> bool:
        return True  # A only in rounds that re-orthogonalise

    def apply(self, state: State, broadcast: Payload) -> State:
        unknown = sorted(k for k in broadcast if k not in state)
        if unknown:
            raise ValueError(f"FedSVD.apply: the broadcast carries {unknown[0]!r}, which is not in the global state.")
        new_state = dict(state)
        for name, value in broadcast.items():
            new_state[name] = value.to(torch.float32).clone()
        return new_state
