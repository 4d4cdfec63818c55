"""FedAvg on LoRA (FedIT; Zhang et al., "Towards Building the Federated GPT", ICASSP 2024).

Clients upload their trained LoRA A and B; the server averages A and B *separately* (not their product) and
broadcasts the averaged adapter. Every client and the server then hold exactly that adapter. On a sequence classifier
the new head (PEFT's ``modules_to_save``) is uploaded and averaged the same way, dense (`fedsrd.algorithms.families`).
"""

from __future__ import annotations

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import SUM_DEFENCES, SUM_DP, Aggregation, Algorithm, Payload, RunningWeightedSum, State
from fedsrd.algorithms.families import head_shapes, head_values
from fedsrd.ops import weighted_sum


@register_algorithm
class FedAvg(Algorithm):
    name = "fedavg"
    paper = "FedIT (Zhang et al., ICASSP 2024); McMahan et al., AISTATS 2017"
    uploads = "LoRA A and B, dense"
    downloads = "averaged LoRA A and B, dense"
    robust_defences = SUM_DEFENCES  # a weighted sum of dense client tensors (and so FedProx, FFA-LoRA, FedSA-LoRA)
    dp_support = SUM_DP  # noise on the sum of the clipped factor changes (docs/privacy.md)
    secure_sum = True  # secure aggregation may hand the step only the weighted sum of the uploads
    trains_dense_head = True  # a classifier's head: averaged like the factors (every step below is per tensor name)

    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        upload = {k: local_state[k].detach().to("cpu", torch.float32) for k in global_state if self.trainable(k)}
        return {**upload, **head_values(global_state, local_state)}  # a classifier's head, dense (none for an LM)

    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {**super().update_shapes(global_state), **head_shapes(global_state)}

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        return {name: weighted_sum([u[name] for u in updates], weights) for name in updates[0]}

    def begin_aggregate(self, global_state: State, round: int, rng: torch.Generator, memory: State) -> Aggregation:
        """A running weighted sum, for this class and the subclasses that keep its step (FedProx, FFA-LoRA,
        FedSA-LoRA); a subclass with its own step gets the default (batch) aggregation."""
        cls = type(self)
        if cls.server_step is FedAvg.server_step and cls.server_step_with_memory is Algorithm.server_step_with_memory:
            return RunningWeightedSum(self, global_state, round, rng, memory)
        return super().begin_aggregate(global_state, round, rng, memory)

    def apply(self, state: State, broadcast: Payload) -> State:
        new_state = dict(state)
        for name, value in broadcast.items():
            new_state[name] = value.to(torch.float32).clone()
        return new_state
