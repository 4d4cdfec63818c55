"""Fed-DARE: DARE random drop on the uploaded LoRA deltas (the FedSRD paper's random-sparsification baseline).

DARE (Yu et al., "Language Models are Super Mario", ICML 2024) zeroes each entry of a delta independently with
probability p and rescales the survivors by 1/(1-p), so the delta is unbiased. Each client drops its round deltas
``dA_i``, ``dB_i`` this way (p = ``FedSRDConfig.fed_dare_drop``, 0.9 as in the FedSRD paper) from its own seeded
generator; the server averages them and broadcasts the average, sparse: its positions are the union of the clients'
random masks (about ``1 - p^m`` dense for m clients, ~34% for 4 clients at p = 0.9).
"""

from __future__ import annotations

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.topk import SparseDeltaFedAvg
from fedsrd.ops import SparseTensor
from fedsrd.ops.sparsify import dare_drop


@register_algorithm
class FedDARE(SparseDeltaFedAvg):
    name = "fed_dare"
    paper = "DARE (Yu et al., ICML 2024) on uploads; baseline of the FedSRD paper"
    uploads = "LoRA deltas dA, dB, DARE random drop (fed_dare_drop = 0.9), kept x 1/(1-p)"
    downloads = "averaged delta, sparse (union of the clients' random masks)"

    def sparsify(self, delta: torch.Tensor, rng: torch.Generator) -> SparseTensor:
        return dare_drop(delta, self.config.fed_dare_drop, rng)
