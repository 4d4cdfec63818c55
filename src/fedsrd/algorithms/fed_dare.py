"""Fed-DARE: DARE random drop on the uploaded LoRA deltas (the FedSRD paper's random-sparsification baseline).

DARE (Yu et al., "Language Models are Super Mario", ICML 2024) zeroes each entry of a delta independently with
probability p and rescales the survivors by 1/(1-p), so the delta is unbiased. Each client drops its round deltas
``dA_i``, ``dB_i`` this way (p = ``FedSRDConfig.fed_dare_drop``, 0.9 as in the FedSRD paper) from its own seeded
generator; the server averages them and broadcasts the average, sparse: its positions are the union of the clients'
random masks (about ``1 - p^m`` dense for m clients, ~34% for 4 clients at p = 0.9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import AlgorithmOptions, require_option
from fedsrd.algorithms.families import SparseDeltaFedAvg
from fedsrd.ops import SparseTensor
from fedsrd.ops.sparsify import dare_drop


@dataclass
class FedDAREOptions(AlgorithmOptions):
    """Fed-DARE: the drop probability of the uploads."""

    fed_dare_drop: float = field(
        default=0.9,
        metadata={"help": "Fed-DARE: drop probability p on the uploaded LoRA deltas (kept entries x 1/(1-p))."},
    )

    @staticmethod
    def validate(config) -> None:
        drop = config.fed_dare_drop
        require_option(config, 0.0 <= drop < 1.0, "fed_dare_drop", f"must be in [0, 1), got {drop}")


@register_algorithm
class FedDARE(SparseDeltaFedAvg):
    name = "fed_dare"
    paper = "DARE (Yu et al., ICML 2024) on uploads; baseline of the FedSRD paper"
    uploads = "LoRA deltas dA, dB, DARE random drop (fed_dare_drop = 0.9), kept x 1/(1-p)"
    downloads = "averaged delta, sparse (union of the clients' random masks)"
    options = FedDAREOptions

    def sparsify(self, delta: torch.Tensor, rng: torch.Generator) -> SparseTensor:
        return dare_drop(delta, self.config.fed_dare_drop, rng)
