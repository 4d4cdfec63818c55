"""RoLoRA (Chen et al., "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS 2025;
arXiv 2502.01755).

Alternating optimisation of the two LoRA factors across communication rounds (the paper's Algorithm 1 and Sec. 4):
in a B-round every client trains B with A frozen at the global A, uploads B_i, and the server averages it; in an
A-round every client trains A with B frozen, uploads A_i, and the server averages that. Because the other factor is
the same on every party, averaging the trained factor is exact aggregation of the products:

    B-round:  sum_i p_i B_i A = (sum_i p_i B_i) A          A-round:  sum_i p_i B A_i = B (sum_i p_i A_i)

Each round moves one factor each way: half of FedAvg-LoRA's bytes. Round order: B first (odd rounds B, even rounds
A), since PEFT starts from B = 0, where the gradient of A is zero (the paper alternates the same two steps; no
official code was published, so the order is ours, as FedSRD's B-first). The frozen factor's requires_grad is off
during that round's local phase (`trains`), so the optimizer, weight decay and gradient clipping see only the
trained factor.
"""

from __future__ import annotations

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Payload, State
from fedsrd.algorithms.fedavg import FedAvg
from fedsrd.ops import weighted_sum


def trained_factor(round: int) -> str:
    """``"lora_B"`` in odd rounds (B^0 = 0, so B first), ``"lora_A"`` in even rounds."""
    return "lora_B" if round % 2 == 1 else "lora_A"


@register_algorithm
class RoLoRA(FedAvg):
    name = "rolora"
    paper = "RoLoRA (Chen et al., NeurIPS 2025; arXiv 2502.01755)"
    uploads = "one LoRA factor per round, dense: B in odd rounds (A frozen), A in even rounds (B frozen)"
    downloads = "the averaged factor of that round, dense"
    secure_sum = True  # a weighted mean of the round's factor (`round_update_shapes`: one shape per round)
    # robust_defences: FedAvg's (a weighted sum of dense client tensors of one factor)

    def trains(self, name: str, round: int) -> bool:
        return trained_factor(round) in name

    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        names = self.round_update_shapes(global_state, round)  # the round's factor
        return {k: local_state[k].detach().to("cpu", torch.float32) for k in names}

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("RoLoRA.server_step: no client updates to aggregate.")
        factor = trained_factor(round)
        names = sorted(self.round_update_shapes(global_state, round))  # what every upload of this round carries
        for update in updates:
            if sorted(update) != names:
                wrong = sorted(set(update) ^ set(names))
                how = "extra" if wrong[0] in update else "missing"
                raise ValueError(
                    f"RoLoRA round {round} aggregates {factor} only: an update must carry exactly the "
                    f"{len(names)} {factor} tensors, but {wrong[0]!r} is {how}."
                )
        return {name: weighted_sum([u[name] for u in updates], weights) for name in names}  # sum_i p_i B_i (or A_i)

    def round_update_shapes(self, global_state: State, round: int) -> dict[str, tuple[tuple[int, ...], bool]]:
        factor = trained_factor(round)
        return {k: shape for k, shape in self.update_shapes(global_state).items() if factor in k}

    def update_is_partial(self) -> bool:
        return True  # one factor per round

    def broadcast_is_partial(self) -> bool:
        return True
