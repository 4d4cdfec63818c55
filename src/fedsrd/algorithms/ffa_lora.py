"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024; arXiv 2403.12313).

LoRA's A stays frozen at its shared, seeded initialisation on every party; clients train, upload and receive only B.
With A common to everyone, averaging B is exact: ``mean_i(B_i) A = mean_i(B_i A)``, and half the bytes travel.
The anchor implementation (FedEx-LoRA's ``aggregate_models_ffa``) averages B alone in the same way.
"""

from __future__ import annotations

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Payload, State
from fedsrd.algorithms.fedavg import FedAvg


@register_algorithm
class FFALoRA(FedAvg):
    name = "ffa_lora"
    paper = "FFA-LoRA (Sun et al., ICLR 2024)"
    uploads = "LoRA B only, dense (A frozen at its seeded init)"
    downloads = "averaged LoRA B, dense"

    def trainable(self, name: str) -> bool:
        return "lora_B" in name

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {k: (tuple(v.shape), False) for k, v in global_state.items() if self.trainable(k)}

    def apply(self, state: State, broadcast: Payload) -> State:
        frozen = sorted(k for k in broadcast if not self.trainable(k))
        if frozen:
            raise ValueError(f"FFA-LoRA.apply: the broadcast carries frozen tensor {frozen[0]!r}; only B may change.")
        new_state = dict(state)
        for name, value in broadcast.items():
            new_state[name] = value.to(torch.float32).clone()
        return new_state
