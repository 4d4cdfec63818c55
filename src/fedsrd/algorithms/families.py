"""Helpers shared by a family of algorithms, in one module rather than inside one sibling that the others import.

* **LoRA adapters** (every algorithm with ``uses_lora``): the LoRA modules of a PEFT adapter state (`lora_modules`),
  the expected shapes of factors that may travel sparse (`lora_shapes`), and the factor-pair slots that FLoRA and
  FedEx-LoRA broadcast for merging into the frozen base weights (`merge_slot_keys`, `merge_slot_shapes`,
  `base_delta_from_slots`).
* **Sparse deltas on FedAvg** (Top-k, Fed-DARE): `SparseDeltaFedAvg`, upload sparse round deltas, average them,
  broadcast the average on the union of the clients' positions.
* **Full-parameter training** (FedFFT, FedKRSO, FedKSeed; docs/full_parameter.md): the trained set
  (`full_parameter_weights`) and the base class `FullParameterAlgorithm`, whose state is each trained weight's change.
* **A classifier's head on LoRA algorithms** (PEFT's ``modules_to_save``; ``Algorithm.trains_dense_head``): the head's
  keys in a LoRA state (`head_keys`), its dense upload (`head_values`, `head_changes`), its weighted mean (`HeadMean`)
  and its share of a client's change norm (`head_change_terms`).

The old homes (`fedsrd.algorithms.fedsrd.lora_modules`, `fedsrd.algorithms.topk.SparseDeltaFedAvg`,
`fedsrd.algorithms.fedfft.FullParameterAlgorithm`, `fedsrd.algorithms.flora.merge_slot_keys`, ...) still import them.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from fedsrd.algorithms.base import SUM_DP, Algorithm, BaseDelta, Payload, State
from fedsrd.ops import SeededMask, SparseTensor, densify, weighted_sum
from fedsrd.ops.robust import Terms
from fedsrd.ops.sparse import MAX_MASK_SEEDS

# ---- LoRA adapters ---------------------------------------------------------------------------------------------
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraModule:
    """The state keys of one adapted layer's LoRA factors."""

    name: str
    a_key: str  # A: r x d_in
    b_key: str  # B: d_out x r


def lora_modules(state: State) -> list[LoraModule]:
    """The LoRA modules of a PEFT adapter state (keys without adapter name), sorted by module name."""
    a_names, b_names = set(), set()
    for key in state:
        if key.endswith(LORA_A_SUFFIX):
            a_names.add(key[: -len(LORA_A_SUFFIX)])
        elif key.endswith(LORA_B_SUFFIX):
            b_names.add(key[: -len(LORA_B_SUFFIX)])
        elif "lora_A" in key or "lora_B" in key:
            raise ValueError(
                f"LoRA state: key {key!r} names a LoRA factor but does not end in {LORA_A_SUFFIX!r} or "
                f"{LORA_B_SUFFIX!r} (expected PEFT adapter keys without the adapter name)."
            )
    unpaired = sorted(a_names ^ b_names)
    if unpaired:
        raise ValueError(f"LoRA state: module {unpaired[0]!r} has only one of lora_A/lora_B in the state.")
    modules = [LoraModule(n, n + LORA_A_SUFFIX, n + LORA_B_SUFFIX) for n in sorted(a_names)]
    for module in modules:
        a, b = state[module.a_key], state[module.b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRA state: module {module.name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected A r x d_in and B d_out x r (linear LoRA layers only)."
            )
    return modules


def lora_shapes(state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every LoRA factor of the state, each of which may travel sparse."""
    keys = [key for module in lora_modules(state) for key in (module.a_key, module.b_key)]
    return {key: (tuple(state[key].shape), True) for key in keys}


# ---- factor pairs merged into the base weights (FLoRA, FedEx-LoRA) ---------------------------------------------------
def merge_slot_keys(module: str, slot: int, rank: int | None = None) -> tuple[str, str]:
    """Broadcast names of the ``slot``-th factor pair merged into ``module``'s base weight (left, right); with clients
    of different ranks the slot's rank is in its name (``base_merge_3_r4``), so the receiver knows its shape."""
    tag = f"{slot}" if rank is None else f"{slot}_r{rank}"
    return f"{module}.base_merge_{tag}.left", f"{module}.base_merge_{tag}.right"


def merge_slot_shapes(
    state: State, num_slots: int, ranks: list[int] | None = None
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Expected shapes of up to ``num_slots`` factor pairs per module: left d_out x r, right r x d_in (dense); with
    `ranks` (clients of different ranks), one rank-tagged pair per slot and rank."""
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {}
    for module in lora_modules(state):
        (r, d_in), (d_out, _) = state[module.a_key].shape, state[module.b_key].shape
        for slot in range(num_slots):
            for rank in [None] if ranks is None else sorted(set(ranks)):
                left, right = merge_slot_keys(module.name, slot, rank)
                width = r if rank is None else rank
                shapes[left], shapes[right] = ((d_out, width), False), ((width, d_in), False)
    return shapes


def base_delta_from_slots(broadcast: Payload) -> BaseDelta:
    """Group the broadcast's factor-pair slots by module, in slot order."""
    slots: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in broadcast.items():
        head, dot, side = key.rpartition(".")
        module, sep, slot = head.rpartition(".base_merge_")
        slot = slot.partition("_r")[0]  # rank-tagged slots (clients of different ranks): base_merge_3_r4
        if not sep or side not in ("left", "right") or not slot.isdigit():
            continue
        slots.setdefault(module, {}).setdefault(int(slot), {})[side] = value.to(torch.float32)
    delta: BaseDelta = {}
    for module, by_slot in sorted(slots.items()):
        for slot, pair in sorted(by_slot.items()):
            if set(pair) != {"left", "right"}:
                raise ValueError(f"base-weight factors of {module!r}: slot {slot} has only its {sorted(pair)[0]}.")
            delta.setdefault(module, []).append((pair["left"], pair["right"]))
    return delta


# ---- sparse deltas on FedAvg (Top-k, Fed-DARE) -------------------------------------------------------------------
class SparseDeltaFedAvg(Algorithm):
    """FedAvg of sparsified round deltas: subclasses say how a client sparsifies one delta tensor.

    Each client uploads ``sparsify(W_i - W)`` per trained tensor; the server broadcasts ``d = sum_i p_i d_i``, sparse
    on the union of the clients' positions (as the seeds of their masks where every mask was seeded), and everyone
    adds ``d`` to the global adapter.
    """

    uploads_deltas = True
    # Clipping only: the clients' supports differ, so a coordinate-wise median would mostly see the zeros of the
    # entries others dropped.
    robust_defences = frozenset({"clip"})
    dp_support = SUM_DP  # noise on the sum of the clipped sparse deltas, over every coordinate (the broadcast is dense)

    @abstractmethod
    def sparsify(self, delta: torch.Tensor, rng: torch.Generator) -> SparseTensor:
        """The sparse form of one tensor's round delta that this client uploads."""

    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        upload: Payload = {}
        for name in sorted(global_state):
            if self.trainable(name):
                delta = local_state[name].detach().to("cpu", torch.float32) - global_state[name].to(torch.float32)
                upload[name] = self.sparsify(delta, rng)
        return upload

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError(f"{self.name}.server_step: no client updates to aggregate.")
        # sum_i p_i d_i is non-zero only on the union of the clients' kept positions: where every client's positions
        # came from a seeded mask (Fed-DARE), the union is the union of those masks, and travels as their seeds.
        payload: Payload = {}
        for name in updates[0]:
            total = weighted_sum([densify(u[name]) for u in updates], weights)
            masks = [u[name].mask if isinstance(u[name], SparseTensor) else None for u in updates]
            seeded = all(m is not None for m in masks) and len({m.drop for m in masks}) == 1
            if seeded and sum(len(m.seeds) for m in masks) <= MAX_MASK_SEEDS:
                union = SeededMask(tuple(s for m in masks for s in m.seeds), masks[0].drop)
                payload[name] = SparseTensor.from_mask(total, union)
            else:
                payload[name] = SparseTensor.from_dense(total)
        return payload

    def apply(self, state: State, broadcast: Payload) -> State:
        new_state = dict(state)
        for name, delta in broadcast.items():
            if name not in state:
                raise KeyError(f"{self.name}.apply: broadcast tensor {name!r} is not in the global state.")
            new_state[name] = state[name].to(torch.float32) + densify(delta)
        return new_state

    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {k: (tuple(v.shape), True) for k, v in global_state.items() if self.trainable(k)}

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return self.update_shapes(global_state)


# ---- full-parameter training (FedFFT, FedKRSO, FedKSeed) -----------------------------------------------------------
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


# ---- a sequence classifier's new head on LoRA algorithms (PEFT's modules_to_save) ------------------------------------
# PEFT's SEQ_CLS task trains the LoRA adapter *and* the new classification head (``modules_to_save``); its adapter
# state dict then holds the head's tensors under the module's own name (``base_model.model.classifier.weight``,
# ``...score.weight``), beside the LoRA factors. Algorithms with ``trains_dense_head`` carry them through the round
# with these helpers: the head's change travels dense, and the server broadcasts (or sets) its weighted mean.
def is_head_key(key: str) -> bool:
    """Whether LoRA-state key `key` is a tensor of a classification head (not a LoRA factor)."""
    return "lora_" not in key and is_head(key)


def head_keys(state: State) -> list[str]:
    """The classification head's keys in a LoRA state, sorted (none for a causal LM's adapter)."""
    return sorted(key for key in state if is_head_key(key))


def head_shapes(state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The head's tensors as the receiver expects them: their own shapes, dense."""
    return {key: (tuple(state[key].shape), False) for key in head_keys(state)}


def head_values(global_state: State, local_state: State) -> Payload:
    """The head a client trained (new values, float32): what value-uploading algorithms (FedAvg) send."""
    return {key: local_state[key].detach().to("cpu", torch.float32) for key in head_keys(global_state)}


def head_changes(global_state: State, local_state: State) -> Payload:
    """The head's round change ``h_i - h`` (float32): what delta-uploading algorithms (FedSRD) send."""
    return {
        key: local_state[key].detach().to("cpu", torch.float32) - global_state[key].to(torch.float32)
        for key in head_keys(global_state)
    }


def head_change_terms(global_state: State, update: Payload, uploads_deltas: bool) -> list[Terms]:
    """The head's share of a client's change norm as `fedsrd.ops.robust` terms: ``||s dh||^2 = s^2 ||dh||^2``, so
    norm clipping (`update_norm`, `clip_update`) bounds the head together with the LoRA change."""
    total = 0.0
    for key in head_keys(global_state):
        if key in update:
            change = densify(update[key]).to(torch.float64)
            if not uploads_deltas:
                change = change - global_state[key].to(torch.float64)
            total += float(change.square().sum())
    return [(total, 0.0, 0.0)] if total > 0 else []


class HeadMean:
    """The weighted mean of the clients' head tensors (values or changes), folded one update at a time in float32.

    `check` validates an update's head against the global state's shapes without changing anything, so an
    aggregation can check every part of an update before folding any; `mean` divides by the round's total weight.
    `changes`: the updates carry the head's change (FedSRD), so a head an update lacks (a partial upload) is a zero
    change; otherwise they carry its values and every update must hold it.
    """

    def __init__(self, global_state: State, changes: bool = False) -> None:
        self.shapes = {key: shape for key, (shape, _) in head_shapes(global_state).items()}
        self.changes = changes
        self.sums: State = {}

    def check(self, update: Payload) -> dict[str, torch.Tensor]:
        values = {}
        for key, shape in self.shapes.items():
            if key not in update and self.changes:
                values[key] = torch.zeros(shape, dtype=torch.float32)
                continue
            if key not in update:
                raise KeyError(f"classifier head: the update lacks {key!r} (the head travels in every update).")
            value = densify(update[key])
            if tuple(value.shape) != shape:
                raise ValueError(f"classifier head: {key!r} has shape {tuple(value.shape)}, expected {shape}.")
            values[key] = value
        return values

    def add(self, values: dict[str, torch.Tensor], weight: float) -> None:
        for key, value in values.items():
            if key not in self.sums:
                self.sums[key] = torch.zeros(self.shapes[key], dtype=torch.float32)
            self.sums[key].add_(value, alpha=float(weight))

    def mean(self, total_weight: float) -> Payload:
        return {key: value / total_weight for key, value in self.sums.items()}

    @classmethod
    def of(cls, global_state: State, updates: list[Payload], weights: list[float], changes: bool = False) -> Payload:
        """``sum_i w_i head_i / sum_i w_i`` over a round's held updates (weights normalised or raw)."""
        aggregate = cls(global_state, changes)
        if not aggregate.shapes:
            return {}
        for update, weight in zip(updates, weights, strict=True):
            aggregate.add(aggregate.check(update), weight)
        return aggregate.mean(float(sum(weights)))


def head_supporting_algorithms() -> list[str]:
    """The registered algorithms that train a sequence classifier: the LoRA ones with ``trains_dense_head``, and the
    full-parameter ones (which train the head as one of their weights)."""
    from fedsrd.algorithms import get_algorithm_class, list_algorithms

    return [
        name for name in list_algorithms()
        if get_algorithm_class(name).trains_dense_head or not get_algorithm_class(name).uses_lora
    ]  # fmt: skip
