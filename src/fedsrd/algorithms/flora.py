"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024; code ATP-1010/FederatedLLM, ``--stacking``).

Averaging A and B separately does not average the clients' updates: ``mean(B_i) mean(A_i) != mean(B_i A_i)``.
FLoRA *stacks* instead: with ``P = [B_1 .. B_m]`` (d_out x m r) and ``Q = [p_1 A_1; ..; p_m A_m]`` (m r x d_in),
``P Q = sum_i p_i B_i A_i`` exactly, a LoRA of rank m r. The server broadcasts the stacked factors (slot i holds
``B_i`` and ``p_i A_i``, the weight on A as in the authors' code); every party merges ``s P Q`` (s = lora_alpha / r)
into its frozen base weights, and LoRA is re-initialised for the next round: B = 0 and a fresh A drawn as PEFT does
(Kaiming-uniform, ``U(-1/sqrt(d_in), 1/sqrt(d_in))``) from ``generator_for(seed, "flora_reinit", round, module)``,
so every party draws the same A and nothing is sent for it. The server never needs the base weights.

Clients of different ranks (`FedSRDConfig.client_lora_ranks`, the setting FLoRA was designed for): slot i carries
client i's own rank r_i (``B_i`` d_out x r_i, ``p_i A_i`` r_i x d_in), so the stacked product is still exactly
``sum_i p_i B_i A_i``; each client restarts from the first r_i rows of the fresh A (rows drawn i.i.d., so that is a
fresh rank-r_i A) and B = 0. Every adapter has the same scaling (lora_alpha * r_i / R over r_i), as in the authors'
code, where lora_alpha is a fixed multiple of each client's rank.

The download is m times FedAvg's A+B (the rank grows with the clients). What a user needs afterwards: the base
weights as merged (the runtime saves their accumulated change, ``base_delta.safetensors``, next to each adapter) and
the adapter, which right after a round is the fresh one (B = 0). Refused on quantized bases.
"""

from __future__ import annotations

import math

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import BaseDelta, Payload, State
from fedsrd.algorithms.families import (
    LoraModule,
    base_delta_from_slots,
    lora_modules,
    merge_slot_keys,
    merge_slot_shapes,
)
from fedsrd.algorithms.fedavg import FedAvg
from fedsrd.ops import generator_for


def peft_lora_a_init(rank: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """A fresh LoRA A as PEFT draws it (``kaiming_uniform_(a=sqrt(5))``: ``U(-1/sqrt(d_in), 1/sqrt(d_in))``)."""
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=generator, dtype=torch.float32) * 2.0 - 1.0) * bound


@register_algorithm
class FLoRA(FedAvg):  # FedAvg's upload: every trained factor, dense
    name = "flora"
    paper = "FLoRA (Wang et al., NeurIPS 2024)"
    uploads = "LoRA A and B, dense"
    downloads = "every client's B and p_i A (stacked, rank m r), dense; merged into the base, LoRA re-initialised"
    robust_defences = frozenset()  # not a weighted sum of client tensors (stacked products re-initialised every round)
    dp_support = frozenset()
    dp_refusal = ("its server stacks the clients' individual adapters into the base weights, so every client's update "
                  "is released as it is, not a noised sum (docs/privacy.md)")
    supports_unequal_ranks = True  # slots of any rank stack exactly; the fresh A is cut to each client's rank
    secure_sum = False  # needs each client's upload (see robust_defences)
    writes_base_weights = True

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("FLoRA.server_step: no client updates to aggregate.")
        if len(updates) > self.config.num_clients:
            raise ValueError(f"FLoRA: {len(updates)} updates, more than num_clients={self.config.num_clients}.")
        payload: Payload = {}
        for module in lora_modules(global_state):
            for slot, (update, weight) in enumerate(zip(updates, weights, strict=True)):
                rank = update[module.a_key].shape[0] if self.config.has_unequal_ranks else None
                left, right = merge_slot_keys(module.name, slot, rank)  # B_i: d_out x r_i, p_i A_i: r_i x d_in
                payload[left] = update[module.b_key].to(torch.float32).clone()  # P = [B_1 .. B_m]
                payload[right] = update[module.a_key].to(torch.float32) * weight  # Q = [p_1 A_1; ..; p_m A_m]
        return payload

    def apply(self, state: State, broadcast: Payload) -> State:
        """The stacked product is merged into the base, so the adapter restarts from B = 0 (A: `reinitialize`)."""
        new_state = dict(state)
        for module in lora_modules(state):
            new_state[module.b_key] = torch.zeros_like(state[module.b_key], dtype=torch.float32)
        return new_state

    def base_delta(self, broadcast: Payload) -> BaseDelta:
        return base_delta_from_slots(broadcast)

    def reinitialize(self, state: State, round: int) -> State:
        new_state = dict(state)
        for module in lora_modules(state):
            new_state[module.a_key] = self.fresh_a(module, state, round)
        return new_state

    def fresh_a(self, module: LoraModule, state: State, round: int) -> torch.Tensor:
        """The A every party draws for `module` after `round`'s merge."""
        rank, d_in = state[module.a_key].shape
        return peft_lora_a_init(rank, d_in, generator_for(self.config.seed, "flora_reinit", round, module.name))

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        ranks = self.config.client_lora_ranks if self.config.has_unequal_ranks else None
        return merge_slot_shapes(global_state, self.config.num_clients, ranks)

    def client_download(self, broadcast: Payload, rank: int) -> Payload:
        """Every client merges the whole stacked product into its base weights: it needs all of the broadcast."""
        return broadcast

    def broadcast_is_partial(self) -> bool:
        return True  # one slot per aggregated client, however many that was


# merge_slot_* and base_delta_from_slots (shared with FedEx-LoRA) live in fedsrd.algorithms.families
__all__ = ["FLoRA", "base_delta_from_slots", "merge_slot_keys", "merge_slot_shapes", "peft_lora_a_init"]
