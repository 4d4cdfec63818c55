"""FedProx on LoRA (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

FedAvg-LoRA (the same upload, aggregation and broadcast) with a proximal term in every client's local loss:

    loss = task_loss + mu / 2 * sum_p ||w_p - w_p^global||^2

over the trained LoRA parameters ``w_p`` (and a classifier's head, PEFT's ``modules_to_save``), where ``w^global``
is the adapter the client started the round from. The term's gradient ``mu (w - w_global)`` pulls local training back
toward the global adapter. ``mu`` is ``FedSRDConfig.fedprox_mu`` (0.01, the default of the FedSRD authors' code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import AlgorithmOptions, State, require_option
from fedsrd.algorithms.families import is_head_key
from fedsrd.algorithms.fedavg import FedAvg

# A PEFT parameter name carries the adapter name (``...lora_A.default.weight``); the state key does not.
_ADAPTER_SEGMENT = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")
# A head PEFT trains whole (``modules_to_save``): ``...classifier.modules_to_save.default.weight`` in the model,
# ``...classifier.weight`` in the state.
_SAVED_MODULE_SEGMENT = re.compile(r"\.modules_to_save\.[^.]+\.")


def state_key(param_name: str) -> str:
    """The adapter state key of a PEFT parameter name: drop wrapper prefixes (``module.``) and the adapter name."""
    while param_name.startswith("module."):
        param_name = param_name[len("module.") :]
    return _SAVED_MODULE_SEGMENT.sub(".", _ADAPTER_SEGMENT.sub(r".\1.weight", param_name))


@dataclass
class FedProxOptions(AlgorithmOptions):
    """FedProx: the weight of the proximal term."""

    fedprox_mu: float = field(
        default=0.01,
        metadata={"help": "FedProx: weight mu of the proximal term mu/2 * ||w - w_global||^2 over the trained LoRA."},
    )

    @staticmethod
    def validate(config) -> None:
        require_option(config, config.fedprox_mu >= 0.0, "fedprox_mu", f"must be >= 0, got {config.fedprox_mu}")


@register_algorithm
class FedProx(FedAvg):
    name = "fedprox"
    paper = "FedProx (Li et al., MLSys 2020)"
    uploads = "LoRA A and B, dense"
    downloads = "averaged LoRA A and B, dense"
    options = FedProxOptions
    trains_dense_head = True  # FedAvg's round; the proximal term covers the head too

    def __init__(self, config) -> None:
        super().__init__(config)
        # The global state moved to the training device once per round, not once per step (a cache, not state:
        # it holds a reference to the global state it was made from and is rebuilt when that changes).
        self._anchor: tuple[State, torch.device, dict[str, torch.Tensor]] | None = None

    def extra_loss(self, model: torch.nn.Module, global_state: State) -> torch.Tensor | None:
        """``mu / 2 * sum ||w - w_global||^2`` over the model's trainable LoRA parameters and head (float32)."""
        mu = float(self.config.fedprox_mu)
        if mu == 0.0:
            return None
        total: torch.Tensor | None = None
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = state_key(name)
            if key not in global_state or not (self.trainable(key) or is_head_key(key)):
                continue
            anchor = self._anchor_tensor(global_state, key, param.device)
            term = (param.to(torch.float32) - anchor).square().sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError(
                "FedProx: no trainable LoRA parameter of the model matches a key of the global state; expected "
                "PEFT parameter names like '...q_proj.lora_A.default.weight'."
            )
        return 0.5 * mu * total

    def _anchor_tensor(self, global_state: State, key: str, device: torch.device) -> torch.Tensor:
        if self._anchor is None or self._anchor[0] is not global_state or self._anchor[1] != device:
            self._anchor = (global_state, device, {})
        cache = self._anchor[2]
        if key not in cache:
            cache[key] = global_state[key].detach().to(device=device, dtype=torch.float32)
        return cache[key]
