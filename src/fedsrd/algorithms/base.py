"""The algorithm contract: pure functions over named tensor states.

A *state* maps the keys of a PEFT adapter state dict (e.g. ``...q_proj.lora_A.weight``) to float32 CPU tensors.
An algorithm never reads files, builds models or talks to other processes; the roles (`fedsrd.client`,
`fedsrd.server`) encode what it returns to bytes and back, so the same object serves the simulation,
Accelerate and Flower.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from fedsrd.config import FedSRDConfig

State = dict[str, torch.Tensor]
# What travels: a dense tensor, or a sparse one (fedsrd.wire.SparseTensor) for compressed payloads.
Payload = dict[str, Any]


class Algorithm(ABC):
    """Base class of every federated algorithm. Subclass it in one file and register it with `@register_algorithm`."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    uploads: ClassVar[str] = ""
    downloads: ClassVar[str] = ""

    def __init__(self, config: FedSRDConfig) -> None:
        self.config = config

    # ---- local training -------------------------------------------------------------------------------------------
    def trainable(self, name: str) -> bool:
        """Whether local training updates the adapter parameter `name` (default: every LoRA A and B)."""
        return "lora_A" in name or "lora_B" in name

    def extra_loss(self, model: torch.nn.Module, global_state: State) -> torch.Tensor | None:
        """An extra term added to the local loss (e.g. FedProx's proximal term); None for plain SFT."""
        return None

    # ---- state ------------------------------------------------------------------------------------------------------
    def init_global_state(self, adapter_state: State) -> State:
        """The round-0 global state from the freshly initialised adapter (shared by seed, so nothing travels)."""
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in adapter_state.items()}

    # ---- the round --------------------------------------------------------------------------------------------------
    @abstractmethod
    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        """What a client uploads after local training (`local_state`) started from `global_state`."""

    @abstractmethod
    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        """Aggregate the decoded client updates into the broadcast (weights are normalised to sum to one)."""

    @abstractmethod
    def apply(self, state: State, broadcast: Payload) -> State:
        """The next global state from the current one and the broadcast, run by the server and by every client."""

    # ---- what the receiver checks ----------------------------------------------------------------------------------
    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Expected upload: name -> (shape, may it be sparse). Default: every trainable tensor, dense."""
        return {k: (tuple(v.shape), False) for k, v in global_state.items() if self.trainable(k)}

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Expected broadcast: name -> (shape, may it be sparse). Default: the whole state, dense."""
        return {k: (tuple(v.shape), False) for k, v in global_state.items()}

    def broadcast_is_partial(self) -> bool:
        """True if a broadcast may carry only some of the `broadcast_shapes` names (e.g. one LoRA factor per round)."""
        return False
