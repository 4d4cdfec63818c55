"""Top-k magnitude sparsification on FedAvg-LoRA (the "magnitude" upload plug-in of FedSRD's Fig. 2 / Table 7).

Each client uploads its round deltas ``dA_i = A_i - A``, ``dB_i = B_i - B`` keeping, per tensor, the
``ceil(topk_density * numel)`` entries of largest magnitude (values unscaled). The server averages the sparse deltas,
``d = sum_i p_i d_i``, which equals FedAvg of the sparsified client adapters ``sum_i p_i (W + d_i) - W``, and
broadcasts ``d`` sparse: its positions are the union of the clients' top-k sets. Everyone adds ``d`` to the global
adapter. No error feedback (the dropped remainder is lost, as in the paper's plug-in).

`SparseDeltaFedAvg` is that upload-sparse-deltas / average / broadcast-the-union scheme; Fed-DARE reuses it with a
random drop instead of top-k.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import SUM_DP, Algorithm, Payload, State
from fedsrd.ops import SeededMask, SparseTensor, weighted_sum
from fedsrd.ops.sparse import MAX_MASK_SEEDS


def topk_sparsify(delta: torch.Tensor, density: float) -> SparseTensor:
    """The ``ceil(density * numel)`` largest-magnitude entries of ``delta`` (ties: the lower flat position first)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"topk_sparsify: density must be in (0, 1], got {density}.")
    flat = delta.detach().to(torch.float32).reshape(-1)
    k = min(flat.numel(), max(1, math.ceil(density * flat.numel())))
    # A stable descending sort makes ties deterministic on every machine (torch.topk does not promise an order).
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    indices = torch.sort(order).values
    return SparseTensor(shape=tuple(delta.shape), indices=indices, values=flat[indices].clone())


def _dense(value: torch.Tensor | SparseTensor) -> torch.Tensor:
    return value.to_dense(torch.float32) if isinstance(value, SparseTensor) else value.to(torch.float32)


class SparseDeltaFedAvg(Algorithm):
    """FedAvg of sparsified round deltas: subclasses say how a client sparsifies one delta tensor."""

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
            total = weighted_sum([_dense(u[name]) for u in updates], weights)
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
            new_state[name] = state[name].to(torch.float32) + _dense(delta)
        return new_state

    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {k: (tuple(v.shape), True) for k, v in global_state.items() if self.trainable(k)}

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return self.update_shapes(global_state)


@register_algorithm
class TopK(SparseDeltaFedAvg):
    name = "topk"
    paper = "magnitude top-k on FedAvg-LoRA (FedSRD paper, Fig. 2 / Table 7)"
    uploads = "LoRA deltas dA, dB, top-k by magnitude (topk_density = 0.1 kept)"
    downloads = "averaged delta, sparse (union of the clients' top-k positions)"

    def sparsify(self, delta: torch.Tensor, rng: torch.Generator) -> SparseTensor:
        return topk_sparsify(delta, self.config.topk_density)
