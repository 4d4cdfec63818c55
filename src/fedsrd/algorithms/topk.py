"""Top-k magnitude sparsification on FedAvg-LoRA (the "magnitude" upload plug-in of FedSRD's Fig. 2 / Table 7).

Each client uploads its round deltas ``dA_i = A_i - A``, ``dB_i = B_i - B`` keeping, per tensor, the
``ceil(topk_density * numel)`` entries of largest magnitude (values unscaled). The server averages the sparse deltas,
``d = sum_i p_i d_i``, which equals FedAvg of the sparsified client adapters ``sum_i p_i (W + d_i) - W``, and
broadcasts ``d`` sparse: its positions are the union of the clients' top-k sets. Everyone adds ``d`` to the global
adapter. No error feedback (the dropped remainder is lost, as in the paper's plug-in).

`SparseDeltaFedAvg` (`fedsrd.algorithms.families`; still importable from here) is that upload-sparse-deltas /
average / broadcast-the-union scheme; Fed-DARE uses it with a random drop instead of top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import AlgorithmOptions, require_option
from fedsrd.algorithms.families import SparseDeltaFedAvg
from fedsrd.ops import SparseTensor


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


# ---- the option Top-k reads (FedSRDConfig inherits it: a flat field, --topk_density) ------------------------------
@dataclass
class TopKOptions(AlgorithmOptions):
    """Top-k: how much of each uploaded delta is kept."""

    topk_density: float = field(
        default=0.1,
        metadata={"help": "Top-k: fraction of each uploaded LoRA delta's entries kept (the largest magnitudes)."},
    )

    @staticmethod
    def validate(config) -> None:
        density = config.topk_density
        require_option(config, 0.0 < density <= 1.0, "topk_density", f"must be in (0, 1], got {density}")


@register_algorithm
class TopK(SparseDeltaFedAvg):
    name = "topk"
    paper = "magnitude top-k on FedAvg-LoRA (FedSRD paper, Fig. 2 / Table 7)"
    uploads = "LoRA deltas dA, dB, top-k by magnitude (topk_density = 0.1 kept)"
    downloads = "averaged delta, sparse (union of the clients' top-k positions)"
    options = TopKOptions

    def sparsify(self, delta: torch.Tensor, rng: torch.Generator) -> SparseTensor:
        return topk_sparsify(delta, self.config.topk_density)


__all__ = ["SparseDeltaFedAvg", "TopK", "TopKOptions", "topk_sparsify"]
