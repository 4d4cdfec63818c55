"""FedRPCA (Jhunjhunwala et al., "FedRPCA: Enhancing Federated LoRA Aggregation Using Robust PCA", arXiv 2506.01194,
2025).

Clients train and upload LoRA A and B as in FedAvg-LoRA. The server treats each LoRA matrix X (every A and every B)
separately: the clients' updates Delta_i = X_i - X, flattened, are the columns of M = [Delta_1 .. Delta_m]
(d x m), which Robust PCA splits into a low-rank part (what the clients have in common) and a sparse part (what is
specific to each client),

    M = L + S,      (L, S) = argmin ||L||_* + lambda ||S||_1  s.t. L + S = M,   lambda = 1/sqrt(max(d, m))

(Principal Component Pursuit, `fedsrd.ops.rpca`). The common part is averaged and the client-specific part is
amplified by scaled averaging (Task Arithmetic's scaling, which alone fails because the clients' updates are highly
similar: the paper's motivation):

    X <- X + sum_i p_i L_i + beta sum_i p_i S_i          (beta = `fedrpca_beta`)

With beta = 1 this is FedAvg-LoRA (L + S = M). What travels is FedAvg's: A and B up, the new A and B down, dense.

Not verified against the authors' code, which we could not obtain: the default beta (2; the paper tunes it per task,
so set it for yours) and whether A and B are decomposed separately (done here, as FedAvg averages them separately).
The PCP solver's parameters are the standard ones of Candès et al. and Lin et al. (`fedsrd.ops.rpca`).
"""

from __future__ import annotations

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Payload, State
from fedsrd.algorithms.fedavg import FedAvg
from fedsrd.ops.rpca import robust_pca


def rpca_aggregate(global_value: torch.Tensor, clients: list[torch.Tensor], weights: list[float], beta: float):
    """``X + sum_i p_i L_i + beta sum_i p_i S_i`` for one LoRA matrix, Robust PCA on the stacked updates (float32)."""
    base = global_value.to(torch.float64)
    updates = torch.stack([c.to(torch.float64).reshape(-1) - base.reshape(-1) for c in clients], dim=1)  # d x m
    low, sparse = robust_pca(updates)
    p = torch.tensor(weights, dtype=torch.float64)
    change = low @ p + beta * (sparse @ p)  # sum_i p_i L_i + beta sum_i p_i S_i
    return (base + change.reshape(base.shape)).to(torch.float32)


@register_algorithm
class FedRPCA(FedAvg):
    name = "fedrpca"
    paper = "FedRPCA (Jhunjhunwala et al., arXiv 2506.01194, 2025)"
    uploads = "LoRA A and B, dense"
    downloads = "A and B from Robust PCA of the stacked updates: low-rank part averaged, sparse part x beta, dense"
    secure_sum = False  # not linear: Robust PCA of the stacked individual updates
    # Clipping only: a coordinate-wise median would hand the RPCA one consensus column, nothing to decompose.
    robust_defences = frozenset({"clip"})

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("FedRPCA.server_step: no client updates to aggregate.")
        beta = self.config.fedrpca_beta
        return {
            name: rpca_aggregate(global_state[name], [u[name] for u in updates], weights, beta) for name in updates[0]
        }
