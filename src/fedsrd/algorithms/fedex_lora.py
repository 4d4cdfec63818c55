"""FedEx-LoRA (Singhal et al., "Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models",
arXiv 2410.09432; code RaghavSinghal10/fedex-lora, ``aggregate_models_ours``).

FedAvg of A and B, plus the error that averaging the factors separately makes, folded into the frozen base weights
so that base + adapter carries exactly the mean of the clients' updates:

    residual = sum_i p_i B_i A_i - B_bar A_bar,      B_bar = sum_i p_i B_i,  A_bar = sum_i p_i A_i

Every party adds ``s * residual`` (s = lora_alpha / r) to the base weight and sets its adapter to (B_bar, A_bar).
The residual is sent factored, never as a d_out x d_in matrix, and with one client fewer than the naive stacking:
with sum_i p_i = 1, ``sum_i p_i (B_i - B_bar) = 0``, so

    residual = sum_i p_i (B_i - B_bar)(A_i - A_bar) = sum_{i<m} p_i (B_i - B_bar)(A_i - A_m),

(m - 1) pairs of rank r (slot i: ``p_i (B_i - B_bar)`` and ``A_i - A_m``). With one client the residual is zero and
nothing extra travels. The download is m times FedAvg's A+B for m clients. Refused on quantized bases.
"""

from __future__ import annotations

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import BaseDelta, Payload, State
from fedsrd.algorithms.families import base_delta_from_slots, lora_modules, merge_slot_keys, merge_slot_shapes
from fedsrd.algorithms.fedavg import FedAvg
from fedsrd.ops import weighted_sum


@register_algorithm
class FedExLoRA(FedAvg):
    name = "fedex_lora"
    paper = "FedEx-LoRA (Singhal et al., arXiv 2410.09432)"
    uploads = "LoRA A and B, dense"
    downloads = "averaged A and B + the exact residual as m-1 rank-r factor pairs, dense; residual merged into base"
    robust_defences = frozenset()  # not a weighted sum of client tensors (a residual makes products exact)
    dp_support = frozenset()
    dp_refusal = ("its server step writes a residual of the clients' individual products into the base weights, which "
                  "is not a sum of clipped changes (docs/privacy.md)")
    secure_sum = False  # needs each client's upload (see robust_defences)
    writes_base_weights = True

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("FedEx-LoRA.server_step: no client updates to aggregate.")
        if len(updates) > self.config.num_clients:
            raise ValueError(f"FedEx-LoRA: {len(updates)} updates, more than num_clients={self.config.num_clients}.")
        total = sum(weights)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"FedEx-LoRA: aggregation weights must sum to 1 (the residual relies on it), got {total}.")
        payload: Payload = {}
        for module in lora_modules(global_state):
            bs = [u[module.b_key].to(torch.float32) for u in updates]
            as_ = [u[module.a_key].to(torch.float32) for u in updates]
            b_bar, a_bar = weighted_sum(bs, weights), weighted_sum(as_, weights)
            payload[module.b_key], payload[module.a_key] = b_bar, a_bar
            for slot in range(len(updates) - 1):  # residual = sum_{i<m} p_i (B_i - B_bar)(A_i - A_m)
                left, right = merge_slot_keys(module.name, slot)
                payload[left] = weights[slot] * (bs[slot] - b_bar)
                payload[right] = as_[slot] - as_[-1]
        return payload

    def apply(self, state: State, broadcast: Payload) -> State:
        missing = sorted(k for k in state if k not in broadcast)
        if missing:
            raise ValueError(f"FedEx-LoRA.apply: the broadcast lacks the averaged factor {missing[0]!r}.")
        new_state = dict(state)
        for name, value in broadcast.items():
            if name in state:  # the averaged factors; the residual slots go into the base (`base_delta`)
                new_state[name] = value.to(torch.float32).clone()
        return new_state

    def base_delta(self, broadcast: Payload) -> BaseDelta:
        return base_delta_from_slots(broadcast)

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        shapes = {k: (tuple(v.shape), False) for k, v in global_state.items()}
        return {**shapes, **merge_slot_shapes(global_state, max(self.config.num_clients - 1, 0))}

    def broadcast_is_partial(self) -> bool:
        return True  # m - 1 residual slots for the m clients aggregated this round
