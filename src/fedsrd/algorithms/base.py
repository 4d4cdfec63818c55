"""The algorithm contract: pure functions over named tensor states.

A *state* maps the keys of a PEFT adapter state dict (e.g. ``...q_proj.lora_A.weight``) to float32 CPU tensors.
An algorithm never reads files, builds models or talks to other processes; the roles (`fedsrd.client`,
`fedsrd.server`) encode what it returns to bytes and back, so the same object serves the simulation,
Accelerate and Flower.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedsrd.algorithms.ranks import lora_param_bytes, truncate_payload, truncate_state
from fedsrd.ops.aggregate import normalized_weights
from fedsrd.ops.privacy import gaussian_like
from fedsrd.ops.robust import change_norm, scale_change
from fedsrd.ops.sparse import SparseTensor

if TYPE_CHECKING:
    from fedsrd.config import FedSRDConfig

State = dict[str, torch.Tensor]
ROBUST_DEFENCES = ("clip", "median", "trimmed_mean")  # what `Algorithm.robust_defences` may list
DP_PLACEMENTS = ("central", "local")  # what `Algorithm.dp_support` may list (FedSRDConfig.dp_mode)
SUM_DP = frozenset(DP_PLACEMENTS)  # a server step that is a weighted sum of the uploads: noise on the sum, anywhere
SUM_DEFENCES = frozenset(ROBUST_DEFENCES)  # a server step that is a weighted sum of dense client tensors
# What travels: a dense tensor, or a sparse one (fedsrd.wire.SparseTensor) for compressed payloads.
Payload = dict[str, Any]
# A change to fold into frozen base weights: module name -> factor pairs (left d_out x k, right k x d_in).
BaseDelta = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


# ---- an algorithm's own options ------------------------------------------------------------------------------------
@dataclass
class AlgorithmOptions:
    """Base of an algorithm's options: a dataclass of the knobs only that algorithm reads, declared in its own file
    (as PEFT gives each tuner its config), each field with ``metadata={"help": ...}``.

    `fedsrd.FedSRDConfig` is composed from these classes (it inherits every algorithm's options class), so the options
    stay flat fields of the config: the same YAML keys, ``--upload_sparsity_alpha`` on the command line and
    ``FedSRDConfig(upload_sparsity_alpha=...)``. An algorithm names its class in `Algorithm.options`; the model card
    and the docs list exactly those fields. On its own (``FedSRDOptions(download_drop=0.5)``) an options class is
    validated when it is made.
    """

    def __post_init__(self) -> None:
        validate_options(self)

    @staticmethod
    def validate(config: Any) -> None:
        """Raise ValueError naming the option if one of *this class's own* fields (read from `config`, the options
        object or a `FedSRDConfig`) is invalid. Subclasses override it; fields of a parent class are checked by the
        parent's `validate`."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The names of the fields of this options class (its parents' included), in declaration order."""
        return tuple(f.name for f in fields(cls))


def validate_options(config: Any) -> None:
    """Run the own `validate` of every `AlgorithmOptions` class that `config`'s class is made of, parents first."""
    for klass in reversed(type(config).__mro__):
        check = klass.__dict__.get("validate")
        if check is not None and issubclass(klass, AlgorithmOptions):
            check.__func__(config)


def require_option(config: Any, ok: bool, option: str, message: str) -> None:
    """Raise ``ValueError("<ConfigClass>.<option>: <message>.")`` unless `ok` (the style of `FedSRDConfig`'s errors)."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{option}: {message}.")


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
    # ---- differential privacy (FedSRDConfig.dp_mode; docs/privacy.md) ----
    # Where the Gaussian noise of client-level DP can go, a subset of `DP_PLACEMENTS`: "central" (the server clips
    # each change with `clip_update` and noises the aggregate, `server_step_private`), "local" (each client clips and
    # adds its share of the noise to its upload, `add_dp_noise`). The config refuses the others, with `dp_refusal`.
    dp_support: ClassVar[frozenset[str]] = frozenset()
    dp_refusal: ClassVar[str] = ""  # why not, for the config's error message
    # True if the upload's kept positions and their count depend on the client's data under upload_mask="importance"
    # (FedSRD's pruning): differential privacy then needs upload_mask="random".
    data_dependent_positions: ClassVar[bool] = False
    random_upload_mask: ClassVar[bool] = False  # honours upload_mask="random" (FedSRD, FedSRD-e)
    # True if the server step is linear in equal-shape dense uploads: server_step(updates, weights) equals
    # server_step([sum_i weights[i] * updates[i]], [1.0]). Secure aggregation (FedSRDConfig.secure_aggregation) then
    # hands the server only that sum; the config refuses it for the others.
    secure_sum: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    uploads: ClassVar[str] = ""
    downloads: ClassVar[str] = ""
    # The dataclass of the options this algorithm reads beyond the common ones (None: it has none). FedSRDConfig
    # inherits it, so they are flat config fields; the model card lists exactly these.
    options: ClassVar[type[AlgorithmOptions] | None] = None
    # ---- a sequence classifier's new head (PEFT modules_to_save; fedsrd.algorithms.families, "classifier head") ----
    # True if the algorithm carries the head's tensors of a LoRA state (keys without ``lora_``, e.g.
    # ``...classifier.weight``) through its round: uploaded dense and averaged with the round's weights beside its
    # LoRA step. FederatedTrainer refuses a sequence classifier for the LoRA algorithms without it. Not inherited
    # (`__init_subclass__`): a subclass that changes the round must declare it again.
    trains_dense_head: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "trains_dense_head" not in cls.__dict__:
            cls.trains_dense_head = False

    def __init__(self, config: FedSRDConfig) -> None:
        self.config = config
        # True when one object serves both the server and the client copy of one process (the simulation sets it,
        # `fedsrd.runtime.local.run_federation`): each broadcast is then applied twice in a row by this object, and an
        # algorithm may keep what the first apply computed for the second (Ferret's reconstruction). False on a
        # Flower ServerApp or SuperNode, which apply each broadcast once: nothing is kept there.
        self.shared_by_server_and_client = False

    # ---- local training -------------------------------------------------------------------------------------------
    def trainable(self, name: str) -> bool:
        """Whether local training updates the adapter parameter `name` (default: every LoRA A and B)."""
        return "lora_A" in name or "lora_B" in name

    # ---- issue 19 (newalgos): round-dependent training (RoLoRA) and adapters PEFT has no layer for (Fed-SB) -------
    def trains(self, name: str, round: int) -> bool:
        """Whether local training in `round` updates adapter parameter `name`. Default: `trainable(name)` every round;
        RoLoRA alternates (B in odd rounds, A in even ones). The trainer sets ``requires_grad`` from it each round."""
        return self.trainable(name)

    # True if `prepare_adapter` computes the initial adapter from data (client 0's, Fed-SB): a party that builds the
    # model from other data gets another initial adapter. On Flower the server starts from client 0's and sends it
    # to every other SuperNode as a full state before it first trains (one download of the adapter).
    init_from_data: ClassVar[bool] = False

    def prepare_adapter(self, model: torch.nn.Module, init_data: Any = None, args: Any = None) -> None:
        """Change a freshly built PEFT model before its adapter becomes the global state (every party runs it).

        Fed-SB inserts its r x r matrix R between each LoRA B and A and sets B, A, R from LoRA-SB's initialisation,
        computed on `init_data` (a tokenised dataset) with `args` (TrainingArguments). Default: nothing.
        """
        return None

    # ---- end of issue 19 (newalgos) ----------------------------------------------------------------------------

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

    # ---- differential privacy (docs/privacy.md) ------------------------------------------------------------------
    def add_dp_noise(self, global_state: State, payload: Payload, std: float, rng: torch.Generator) -> Payload:
        """`payload` with ``N(0, std^2)`` added to every coordinate of every upload tensor (`update_shapes`, in sorted
        name order), dense: a sparse tensor becomes dense, since noise only on its positions would reveal them, and a
        tensor a partial payload lacks counts as a zero change. For sum algorithms this is the noise on the sum (the
        server's aggregate, `server_step_private`) or one client's share of it (dp_mode="local")."""
        out = dict(payload)
        for name, (shape, _) in sorted(self.update_shapes(global_state).items()):
            value = payload.get(name)
            if value is None:
                if not (self.update_is_partial() or self.broadcast_is_partial()):
                    raise KeyError(f"{self.name}.add_dp_noise: the payload lacks {name!r}.")
                value = torch.zeros(shape, dtype=torch.float32)
            elif isinstance(value, SparseTensor):
                value = value.to_dense(torch.float32)
            out[name] = value.to(torch.float32) + gaussian_like(tuple(shape), std, rng)
        return out

    def server_step_private(
        self,
        global_state: State,
        updates: list[Payload],
        weights: list[float],
        round: int,
        rng: torch.Generator,
        memory: State,
        noise_std: float,
        noise_rng: torch.Generator,
    ) -> tuple[Payload, State]:
        """`server_step_with_memory` with Gaussian noise of `noise_std` on the aggregate (dp_mode="central", and the
        shares of missing clients under "local"). Default, for steps that are a weighted sum of the uploads: the noise
        goes on that sum (`add_dp_noise` on the broadcast). Algorithms whose step is not a sum override this."""
        payload, memory = self.server_step_with_memory(global_state, updates, weights, round, rng, memory)
        return self.add_dp_noise(global_state, payload, noise_std, noise_rng), memory

    def null_update(self, global_state: State, like: Payload) -> Payload:
        """An update that proposes no change, shaped as `like` (DP divides by the fixed number of sampled clients:
        a missing client counts as this)."""
        return scale_change(like, global_state, 0.0, self.uploads_deltas)

    # ---- what the receiver checks ----------------------------------------------------------------------------------
    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Expected upload: name -> (shape, may it be sparse). Default: every trainable tensor, dense."""
        return {k: (tuple(v.shape), False) for k, v in global_state.items() if self.trainable(k)}

    def round_update_shapes(self, global_state: State, round: int) -> dict[str, tuple[tuple[int, ...], bool]]:
        """What every upload of `round` carries, all of it (secure aggregation sums one vector of these tensors).
        Default: `update_shapes`; RoLoRA: the round's factor only."""
        return self.update_shapes(global_state)

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

        Under differential privacy (``dp_mode`` central or local) personal tensors are *not* averaged: they never
        pass through the clipped and noised aggregate, so their mean would publish the clients' data without any
        guarantee. The exported adapter is then the global state alone (FedSA-LoRA: the noised shared A with the
        initial B), and each client's own tensors stay with it (docs/privacy.md).
        """
        names = sorted({k for state in personal_states.values() for k in state})
        if not names:
            return global_state
        if getattr(self.config, "dp_mode", "off") != "off":
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

    # ---- clients of different LoRA ranks (FedSRDConfig.client_lora_ranks; fedsrd.algorithms.ranks) -------------
    # True if the algorithm defines its server step for clients of different LoRA ranks. The global state keeps rank
    # lora_r; a rank-r client trains from `client_start_state` and uploads tensors of its own rank (`update_shapes` of
    # that start state), and the server infers each update's rank from its shapes after checking them against the
    # rank configured for its sender. The config refuses unequal ranks for the others.
    supports_unequal_ranks: ClassVar[bool] = False

    def client_start_state(self, global_state: State, rank: int) -> State:
        """The adapter a client of LoRA rank `rank` trains from, and computes its upload against. Default: the
        global state truncated to its first `rank` components (the global state itself at the global rank)."""
        return truncate_state(global_state, rank)

    def client_download(self, broadcast: Payload, rank: int) -> Payload:
        """The part of a broadcast a rank-`rank` client needs to move its start state to the next round's (its own
        rank's update). Default: every LoRA tensor of the broadcast truncated to `rank`."""
        return truncate_payload(broadcast, rank)

    def trainable_param_bytes(self, global_state: State, rank: int) -> int | None:
        """Float32 bytes of the parameters a rank-`rank` client trains (its adapter's memory, without optimizer
        state); None for full-parameter algorithms."""
        if not self.uses_lora:
            return None
        return lora_param_bytes(global_state, rank, self.trainable)

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
