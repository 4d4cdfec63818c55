"""The algorithm contract: pure functions over named tensor states.

A *state* maps the keys of a PEFT adapter state dict (e.g. ``...q_proj.lora_A.weight``) to float32 CPU tensors.
An algorithm never reads files, builds models or talks to other processes; the roles (`fedsrd.client`,
`fedsrd.server`) encode what it returns to bytes and back, so the same object serves the simulation,
Accelerate and Flower.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedsrd.ops.aggregate import normalized_weights
from fedsrd.ops.robust import change_norm, scale_change

if TYPE_CHECKING:
    from fedsrd.config import FedSRDConfig

State = dict[str, torch.Tensor]
ROBUST_DEFENCES = ("clip", "median", "trimmed_mean")  # what `Algorithm.robust_defences` may list
SUM_DEFENCES = frozenset(ROBUST_DEFENCES)  # a server step that is a weighted sum of dense client tensors
# What travels: a dense tensor, or a sparse one (fedsrd.wire.SparseTensor) for compressed payloads.
Payload = dict[str, Any]
# A change to fold into frozen base weights: module name -> factor pairs (left d_out x k, right k x d_in).
BaseDelta = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


class Algorithm(ABC):
    """Base class of every federated algorithm. Subclass it in one file and register it with `@register_algorithm`."""

    name: ClassVar[str]
    # True if every uploaded tensor is itself a change (a delta); False if uploads under state names carry new
    # values (the change is upload - global). Used by the server's norm clipping (`update_norm`, `clip_update`).
    uploads_deltas: ClassVar[bool] = False
    # The robust-aggregation defences this algorithm's server step admits, a subset of `ROBUST_DEFENCES`
    # (docs/reliability.md): "clip" (norm clipping of each client's change), "median" / "trimmed_mean" (coordinate-wise,
    # replacing the weighted mean: only for steps that are a weighted sum of dense client tensors). The config refuses
    # the others; the default adaptive clipping (adaptive_clip="auto") is on where "clip" is listed.
    robust_defences: ClassVar[frozenset[str]] = frozenset()
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

    # ---- state a party keeps between rounds (error feedback: fedsrd_ef) ------------------------------------------
    def client_update_with_memory(
        self, global_state: State, local_state: State, memory: State, round: int, rng: torch.Generator
    ) -> tuple[Payload, State]:
        """`client_update` for algorithms that carry per-client state from one upload to the next.

        `memory` is what this client kept after its previous upload (empty at first, and it may be several rounds
        old when the client was not sampled in between). Returns the payload and what the client keeps; the client
        role stores it by client id (and in checkpoints). Default: `client_update`, nothing kept.
        """
        return self.client_update(global_state, local_state, round, rng), {}

    def server_step_with_memory(
        self,
        global_state: State,
        updates: list[Payload],
        weights: list[float],
        round: int,
        rng: torch.Generator,
        memory: State,
    ) -> tuple[Payload, State]:
        """`server_step` for algorithms that carry server-side state from one round to the next (never broadcast).

        Returns the broadcast payload and the server's new memory; the server role commits it only when the round
        completes (and checkpoints it). Default: `server_step`, nothing kept.
        """
        return self.server_step(global_state, updates, weights, round, rng), {}

    # ---- the server step one update at a time (FedSRDConfig.server_streaming; docs/fedsrd.md) ------------------
    def begin_aggregate(self, global_state: State, round: int, rng: torch.Generator, memory: State) -> Aggregation:
        """An open server step: `Aggregation.fold` each update as it arrives, then `Aggregation.finish`.

        Algorithms whose step can fold an update into a fixed-size aggregate and release it (a running weighted sum;
        FedSRD's sketch) return their own `Aggregation`, so the server's memory does not grow with the number of
        clients. Default: `BatchAggregation`, which keeps every update and runs `server_step_with_memory` at the end.
        """
        return BatchAggregation(self, global_state, round, rng, memory)

    # ---- bounding one client's influence (FedSRDConfig.adaptive_clip / clip_update_norm) ------------------------
    def update_norm(self, global_state: State, update: Payload) -> float:
        """The size of the change `update` proposes, which norm clipping bounds. Default: the L2 norm of the uploaded
        change over every tensor (the upload itself if `uploads_deltas`, else upload - global)."""
        return change_norm(update, global_state, self.uploads_deltas)

    def clip_update(self, global_state: State, update: Payload, max_norm: float) -> Payload:
        """`update` scaled so that `update_norm` is at most `max_norm` (returned as is when it already is)."""
        norm = self.update_norm(global_state, update)
        if norm <= max_norm:
            return update
        return scale_change(update, global_state, max_norm / norm, self.uploads_deltas)

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

    # ---- client-kept ("personal") tensors (FedSA-LoRA) ----------------------------------------------------------
    def personal(self, name: str) -> bool:
        """Whether adapter tensor `name` stays with each client: trained locally, never uploaded nor broadcast.

        The client role keeps every client's personal tensors by client id and loads them over the global state
        before that client trains again (`FederatedClient.start_state`). The global state still holds these names,
        at their shared initial values, so every party's adapter has the same keys. Default: nothing is personal.
        """
        return False

    def export_state(self, global_state: State, personal_states: Mapping[int, State]) -> State:
        """The adapter the runtime saves and evaluates as the run's model.

        Default: the global state, each personal tensor replaced by the uniform mean of the clients' own values
        (clients that have not trained yet are left out). With nothing personal this is the global state itself.
        """
        names = sorted({k for state in personal_states.values() for k in state})
        if not names:
            return global_state
        exported = dict(global_state)
        for name in names:
            values = [s[name].to(torch.float32) for _, s in sorted(personal_states.items()) if name in s]
            exported[name] = torch.stack(values).mean(dim=0)
        return exported

    # ---- writes into the frozen base weights (FLoRA, FedEx-LoRA) ------------------------------------------------
    writes_base_weights: ClassVar[bool] = False  # True: refused on quantized bases, before any training

    def base_delta(self, broadcast: Payload) -> BaseDelta:
        """What every party folds into its frozen base weights once it has this broadcast.

        Module name (the PEFT key prefix of the module's ``lora_A``/``lora_B``) -> factor pairs ``(left, right)``;
        the party adds ``lora_scaling * sum(left @ right)`` to that module's base weight, in the weight's dtype.
        The server never needs base weights. Default: nothing (the base stays frozen).
        """
        return {}

    def reinitialize(self, state: State, round: int) -> State:
        """The state the next round starts from, run after `apply` by the server and every client.

        Everyone calls it with the same state and round, so it may draw from
        ``fedsrd.ops.generator_for(config.seed, ..., round)`` (FLoRA re-initialises LoRA after each merge).
        Default: the state unchanged.
        """
        return state

    # ---- full-parameter algorithms (FedKRSO, FedFFT, FedKSeed; docs/full_parameter.md) ------------------------------
    # With uses_lora False the model is trained without PEFT. Every party holds the shared initial values of the
    # `trainable_weights` and the global state; `materialize` turns the two into the weights the model loads.
    uses_lora: ClassVar[bool] = True

    def trainable_weights(self, model: torch.nn.Module) -> list[str]:
        """Full-parameter algorithms: names (as in `model.named_parameters()`) of the weights local training changes.

        `trainable(name)` then says which of them autograd differentiates (the others change through the
        algorithm's own optimizer). `init_global_state` receives these weights' initial values.
        """
        raise TypeError(
            f"algorithm {self.name!r} trains a LoRA adapter (uses_lora=True); trainable_weights is only for "
            "full-parameter algorithms, which override it."
        )

    def materialize(self, state: State, initial: State) -> State:
        """Full-parameter algorithms: the weights every party loads, from the global state and the initial weights.

        Default: ``initial + state`` (the state holds each trained weight's change from its initial value).
        """
        return {name: value + state[name].to(value.dtype) for name, value in initial.items()}

    def create_optimizer(
        self, model: torch.nn.Module, args: Any, round: int, client_id: int
    ) -> torch.optim.Optimizer | None:
        """The algorithm's own local optimizer for this client and round, or None for Trainer's (`args`: its
        `TrainingArguments`). Optional methods the trainer uses when the optimizer has them:

        - ``upload_state() -> State``: tensors `client_update` needs, merged into the local state (reserved names);
        - ``extra_parameters() -> list[Tensor]``: trained tensors outside the model, gradient-clipped with it;
        - ``zeroth_order_step(loss_fn) -> Tensor``: replaces forward + backward (`loss_fn()` evaluates the batch);
        - ``close()``: called when the local phase ends (e.g. removes forward hooks).
        """
        return None

    def check_training_args(self, args: Any) -> None:
        """Raise ValueError, before any training, if `args` (TrainingArguments) conflict with the algorithm."""
        return None

    def update_is_partial(self) -> bool:
        """True if an update may carry only some of the `update_shapes` names (FedKRSO: the seeds a client used)."""
        return False


class Aggregation(ABC):
    """One round's server step, fed one update at a time (`Algorithm.begin_aggregate`).

    `fold` takes an update and its raw, non-negative weight (1, or the client's sample count); the weights are
    normalised to sum to one at `finish`, so the result does not depend on knowing the round's total in advance.
    Updates are folded in the order given, so the same updates in the same order give the same bits. A `fold` that
    raises leaves the aggregate as it was.
    """

    def __init__(self, algorithm: Algorithm, global_state: State, round: int, rng: torch.Generator,
                 memory: State) -> None:
        self.algorithm = algorithm
        self.global_state = global_state
        self.round = round
        self.rng = rng
        self.memory = memory
        self.weights: list[float] = []

    @abstractmethod
    def fold(self, update: Payload, weight: float) -> None:
        """Add one decoded, validated update of raw weight `weight` to the aggregate."""

    @abstractmethod
    def finish(self) -> tuple[Payload, State]:
        """The broadcast payload and the server's new memory (as `Algorithm.server_step_with_memory`)."""

    def _check_weight(self, weight: float) -> None:
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"Aggregation.fold: expected a finite, non-negative weight, got {weight}.")

    def _total_weight(self) -> float:
        total = float(sum(self.weights))
        if not self.weights or total <= 0:
            raise ValueError(f"{type(self).__name__}.finish: no update of positive weight was folded.")
        return total


class BatchAggregation(Aggregation):
    """The default: keep every update, run the algorithm's `server_step_with_memory` on all of them at `finish`."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.updates: list[Payload] = []

    def fold(self, update: Payload, weight: float) -> None:
        self._check_weight(weight)
        self.updates.append(update)
        self.weights.append(float(weight))

    def finish(self) -> tuple[Payload, State]:
        weights = normalized_weights(self.weights)
        return self.algorithm.server_step_with_memory(
            self.global_state, self.updates, weights, self.round, self.rng, self.memory
        )


class RunningWeightedSum(Aggregation):
    """``sum_i w_i u_i / sum_i w_i`` per tensor name, in float32, one running sum per name (memory: one update).

    For steps that are a weighted mean of dense client tensors (FedAvg and its family): `finish` returns the mean as
    the broadcast. Equal to `fedsrd.ops.weighted_sum` with normalised weights up to float32 rounding.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sums: State = {}

    def fold(self, update: Payload, weight: float) -> None:
        self._check_weight(weight)
        if self.sums and set(update) != set(self.sums):
            raise KeyError(f"RunningWeightedSum.fold: update names {sorted(update)} differ from the round's "
                           f"{sorted(self.sums)}.")
        values = {name: value.to(torch.float32) for name, value in update.items()}
        for name, value in values.items():
            if name in self.sums and value.shape != self.sums[name].shape:
                raise ValueError(f"RunningWeightedSum.fold: {name!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(self.sums[name].shape)}.")
        for name, value in values.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros_like(value)
            self.sums[name].add_(value, alpha=float(weight))
        self.weights.append(float(weight))

    def finish(self) -> tuple[Payload, State]:
        total = self._total_weight()
        return {name: value / total for name, value in self.sums.items()}, {}
