"""Federated full fine-tuning (FedAvg on the trained weights): FedKRSO's reference baseline.

The full-parameter family (`fedfft`, `fedkrso`, `fedkseed`) trains the model's own weights, not a LoRA adapter. They
share one trained set, that of the FedKRSO authors' code (docs/full_parameter.md, "What is trained"): the weight of
every `torch.nn.Linear` inside the transformer blocks (no biases, embeddings or norms), plus, for a sequence
classifier, every parameter of its head (``classifier``, ``score``, ``pre_classifier`` and BERT's ``pooler``, which
feeds only the classifier), trained normally and sent dense. A causal LM's ``lm_head`` stays frozen, as under LoRA.

The global state holds each trained weight's change from the initial weights every party shares (zero at round 0,
so nothing travels before the first round and the server needs no model weights). FedFFT's clients upload their
weights' change, the server averages it and broadcasts the mean: dense, D + H floats each way.

The family's trained set and base class (`full_parameter_weights`, `FullParameterAlgorithm`) live in
`fedsrd.algorithms.families` and are still importable from here.
"""

from __future__ import annotations

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import SUM_DEFENCES, SUM_DP, Payload, State
from fedsrd.algorithms.families import (
    HEAD_MODULES,
    FullParameterAlgorithm,
    full_parameter_weights,
    in_block,
    is_head,
)
from fedsrd.ops import weighted_sum


@register_algorithm
class FedFFT(FullParameterAlgorithm):
    name = "fedfft"
    paper = "federated full fine-tuning (McMahan et al., AISTATS 2017), FedKRSO's reference baseline"
    uploads = "every trained weight's change, dense"
    downloads = "the averaged change, dense"
    robust_defences = SUM_DEFENCES  # a weighted sum of dense client tensors
    dp_support = SUM_DP  # noise on the sum of the clipped weight changes
    secure_sum = True  # secure aggregation may hand the step only the weighted sum of the uploads

    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        return {k: local_state[k].detach().to("cpu", torch.float32) for k in global_state}

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        return {name: weighted_sum([u[name] for u in updates], weights) for name in global_state}

    def apply(self, state: State, broadcast: Payload) -> State:
        return {name: broadcast[name].to(torch.float32).clone() for name in state}


__all__ = ["HEAD_MODULES", "FedFFT", "FullParameterAlgorithm", "full_parameter_weights", "in_block", "is_head"]
