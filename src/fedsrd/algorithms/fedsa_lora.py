"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025).

Clients train both LoRA factors, but only A is shared: the server averages the clients' A and broadcasts it, while
every client keeps its own B across rounds (A learns what is general, B what is client-specific). B is *personal*:
the client role stores each client's B by client id and loads it over the global state before that client trains
again (`FederatedClient.start_state`); B is never uploaded nor broadcast.

What is saved. The global state every party holds is the shared A with B at its shared initialisation (zero), which
is not a useful model on its own, and no party can compute a global B because B never travels. The runtime, which
holds the clients' B in the simulation, saves and evaluates instead the shared A with the *mean of the clients' B*
(`Algorithm.export_state`): since A is shared, ``mean_i(B_i) A = mean_i(B_i A)``, exactly the average of the clients'
personalised LoRA products. Each client's own adapter (shared A + its B) is saved as well, under
``personal/client_NNNN/`` next to the global adapter.
"""

from __future__ import annotations

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Payload, State
from fedsrd.algorithms.fedavg import FedAvg


@register_algorithm
class FedSALoRA(FedAvg):
    name = "fedsa_lora"
    paper = "FedSA-LoRA (Guo et al., ICLR 2025)"
    uploads = "LoRA A only, dense (B stays on the client)"
    downloads = "averaged LoRA A, dense"

    def personal(self, name: str) -> bool:
        return "lora_B" in name

    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {k: (tuple(v.shape), False) for k, v in global_state.items() if self._shared(k)}

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return self.update_shapes(global_state)

    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        upload = super().client_update(global_state, local_state, round, rng)
        return {k: v for k, v in upload.items() if self._shared(k)}

    def apply(self, state: State, broadcast: Payload) -> State:
        kept = sorted(k for k in broadcast if not self._shared(k))
        if kept:
            raise ValueError(f"FedSA-LoRA.apply: the broadcast carries client-kept tensor {kept[0]!r}; only A travels.")
        return super().apply(state, broadcast)

    def _shared(self, name: str) -> bool:
        return self.trainable(name) and not self.personal(name)
