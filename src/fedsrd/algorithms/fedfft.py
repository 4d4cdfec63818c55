"""Federated full fine-tuning (FedAvg on the trained weights): FedKRSO's reference baseline.

The full-parameter family (`fedfft`, `fedkrso`, `fedkseed`) trains the model's own weights, not a LoRA adapter. They
share one trained set, that of the FedKRSO authors' code (docs/full_parameter.md, "What is trained"): the weight of
every `torch.nn.Linear` inside the transformer blocks (no biases, embeddings or norms), plus, for a sequence
classifier, every parameter of its head (``classifier``, ``score``, ``pre_classifier`` and BERT's ``pooler``, which
feeds only the classifier), trained normally and sent dense. A causal LM's ``lm_head`` stays frozen, as under LoRA.

The global state holds each trained weight's change from the initial weights every party shares (zero at round 0,
so nothing travels before the first round and the server needs no model weights). FedFFT's clients upload their
weights' change, the server averages it and broadcasts the mean: dense, D + H floats each way.
"""

from __future__ import annotations

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import SUM_DEFENCES, Algorithm, Payload, State
from fedsrd.ops import weighted_sum

HEAD_MODULES = ("score", "pooler")  # besides any module whose name contains "classifier"


def is_head(name: str) -> bool:
    """Whether parameter `name` belongs to a classification head (trained normally, sent dense)."""
    return any("classifier" in part or part in HEAD_MODULES for part in name.split(".")[:-1])


def in_block(name: str) -> bool:
    """Whether parameter `name` sits inside a numbered transformer block (e.g. ``model.layers.3.mlp.up_proj``)."""
    return any(part.isdigit() for part in name.split(".")[:-1])


def full_parameter_weights(model: torch.nn.Module) -> list[str]:
    """The family's trained set: block Linear weights, then the head's parameters, in `named_parameters` order."""
    params = dict(model.named_parameters())
    linear_weights = [f"{m}.weight" for m, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    body = {name for name in linear_weights if in_block(name) and not is_head(name)}
    names = [n for n in params if n in body] + [n for n in params if is_head(n)]
    if not any(n in body for n in names):
        linear = sorted({m.rsplit(".", 1)[-1] for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})
        raise ValueError(
            f"{type(model).__name__}: no torch.nn.Linear weight inside numbered transformer blocks to train "
            f"(Linear modules present: {', '.join(linear) or 'none'}; GPT-2 style Conv1D layers are not supported)."
        )
    return names


class FullParameterAlgorithm(Algorithm):
    """Base of the full-parameter family: no LoRA; the state is each trained weight's change from its initial value."""

    uses_lora = False

    def trainable_weights(self, model: torch.nn.Module) -> list[str]:
        return full_parameter_weights(model)

    def trainable(self, name: str) -> bool:
        """Whether autograd differentiates trained weight `name` (FedFFT: all of them)."""
        return True

    def init_global_state(self, adapter_state: State) -> State:
        # `adapter_state` holds the initial trained weights; every change starts at zero.
        return {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in adapter_state.items()}


@register_algorithm
class FedFFT(FullParameterAlgorithm):
    name = "fedfft"
    paper = "federated full fine-tuning (McMahan et al., AISTATS 2017), FedKRSO's reference baseline"
    uploads = "every trained weight's change, dense"
    downloads = "the averaged change, dense"
    robust_defences = SUM_DEFENCES  # a weighted sum of dense client tensors
    secure_sum = True  # secure aggregation may hand the step only the weighted sum of the uploads

    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        return {k: local_state[k].detach().to("cpu", torch.float32) for k in global_state}

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        return {name: weighted_sum([u[name] for u in updates], weights) for name in global_state}

    def apply(self, state: State, broadcast: Payload) -> State:
        return {name: broadcast[name].to(torch.float32).clone() for name in state}
