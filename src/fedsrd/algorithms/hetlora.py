"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024).

Clients train LoRA adapters of different ranks r_k <= R (`FedSRDConfig.client_lora_ranks`; R = lora_r, the global
adapter's rank). Per LoRA module, every round:

* **Truncation** (download, Sec. 3.1). Client k trains from the global factors cut to its rank, ``B[:, :r_k]`` and
  ``A[:r_k]`` (`Algorithm.client_start_state`); what it needs of the broadcast is that slice.
* **Local training with rank self-pruning** (optional, Sec. 3.2). The local loss gains
  ``lambda * sum_modules ||B[:, g r:r]||_F ||A[g r:r, :]||_F`` on the tail of the client's rank (g = gamma, the
  decay; `hetlora_prune_lambda`, `hetlora_prune_gamma`). When a client's tail norm is smaller than at its previous
  upload, it prunes that module to rank ``floor(g r)``: the pruned ranks are uploaded as zero from then on.
* **Zero-padding and sparsity-weighted aggregation** (server, Sec. 3.3). Each client's B_k, A_k are zero-padded to
  R and averaged with weights from the Frobenius norm of its LoRA product, ``p_k ∝ w_k ||B_k A_k||_F`` (w_k: the
  round's client weights, uniform by default): ``B = sum_k p_k pad(B_k)``, ``A = sum_k p_k pad(A_k)``. A client whose
  adapter changes the layer little counts little. The norm uses ``||B A||_F^2 = trace((B^T B)(A A^T))``, so no
  d_out x d_in matrix is formed.

The broadcast is the new global (B, A), dense, rank R. Deviations (docs/algorithms.md): the weights are per module
(the paper's notation is per LoRA module); the regulariser acts on the tail of the client's configured rank, and
pruning is kept in the client's memory (`client_update_with_memory`), since the wire keeps each client's configured
shapes (the configured rank is what the server checks).
"""

from __future__ import annotations

import math

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Payload, State
from fedsrd.algorithms.fedavg import FedAvg
from fedsrd.algorithms.fedsrd import lora_modules
from fedsrd.algorithms.ranks import pad_tensor

_RANK = ".hetlora_rank"  # memory: a module's rank after self-pruning
_TAIL = ".hetlora_tail"  # memory: a module's tail norm at the previous upload


def product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """``||B A||_F`` from the small Gram matrices: ``sqrt(trace((B^T B)(A A^T)))``."""
    b, a = b.to(torch.float64), a.to(torch.float64)
    return math.sqrt(max(0.0, float(((b.T @ b) * (a @ a.T)).sum())))


def sparsity_weights(bs: list[torch.Tensor], as_: list[torch.Tensor], weights: list[float]) -> list[float]:
    """HetLoRA's sparsity-weighted aggregation weights, ``p_k = w_k ||B_k A_k||_F / sum_j w_j ||B_j A_j||_F``; the
    plain weights when every product is zero (round 1 of a B = 0 start)."""
    scores = [w * product_norm(b, a) for b, a, w in zip(bs, as_, weights, strict=True)]
    total = sum(scores)
    if not total > 0:
        return list(weights)
    return [s / total for s in scores]


def tail_start(rank: int, gamma: float) -> int:
    """The first rank of the tail that self-pruning regularises and would remove: ``floor(gamma r)``, at least 1."""
    return max(1, int(math.floor(gamma * rank)))


@register_algorithm
class HetLoRA(FedAvg):
    name = "hetlora"
    paper = "HetLoRA (Cho et al., EMNLP 2024)"
    uploads = "the client's LoRA A and B at its own rank, dense"
    downloads = "sparsity-weighted mean of the zero-padded factors (rank R), dense; each client needs its rank's slice"
    secure_sum = False  # not linear: weights from each client's own product norm
    supports_unequal_ranks = True
    robust_defences = frozenset()  # weights from the clients' own norms: not a plain weighted sum to clip or trim

    # ---- local training: the self-pruning regulariser (Sec. 3.2) ------------------------------------------------
    def extra_loss(self, model: torch.nn.Module, global_state: State) -> torch.Tensor | None:
        lam = self.config.hetlora_prune_lambda
        if lam == 0:
            return None
        terms = []
        for module in model.modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            active = getattr(module, "active_adapters", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or not active or active[0] not in lora_a:
                continue
            a, b = lora_a[active[0]].weight, lora_b[active[0]].weight  # r x d_in, d_out x r
            cut = tail_start(a.shape[0], self.config.hetlora_prune_gamma)
            if cut < a.shape[0]:
                terms.append(torch.linalg.norm(b[:, cut:]) * torch.linalg.norm(a[cut:]))
        return lam * torch.stack(terms).sum() if terms else None

    # ---- client: upload, pruned ranks as zero -----------------------------------------------------------------
    def client_update_with_memory(
        self, global_state: State, local_state: State, memory: State, round: int, rng: torch.Generator
    ) -> tuple[Payload, State]:
        upload = self.client_update(global_state, local_state, round, rng)
        if self.config.hetlora_prune_lambda == 0:
            return upload, {}
        kept: State = {}
        for module in lora_modules(global_state):
            a, b = upload[module.a_key], upload[module.b_key]
            rank = int(memory[module.name + _RANK]) if module.name + _RANK in memory else a.shape[0]
            cut = tail_start(rank, self.config.hetlora_prune_gamma)
            tail = float(torch.linalg.norm(b[:, cut:rank]) * torch.linalg.norm(a[cut:rank]))
            previous = memory.get(module.name + _TAIL)
            if cut < rank and previous is not None and tail < float(previous):
                rank = cut  # the tail shrank since the last upload: prune it (Sec. 3.2)
            a, b = a.clone(), b.clone()
            a[rank:], b[:, rank:] = 0.0, 0.0
            upload[module.a_key], upload[module.b_key] = a, b
            kept[module.name + _RANK] = torch.tensor(float(rank))
            kept[module.name + _TAIL] = torch.tensor(tail)
        return upload, kept

    # ---- server: zero-padding and sparsity-weighted aggregation (Sec. 3.3) -----------------------------------------
    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("HetLoRA.server_step: no client updates to aggregate.")
        payload: Payload = {}
        for module in lora_modules(global_state):
            rank = global_state[module.a_key].shape[0]
            bs = [u[module.b_key].to(torch.float32) for u in updates]
            as_ = [u[module.a_key].to(torch.float32) for u in updates]
            p = sparsity_weights(bs, as_, weights)  # p_k ∝ w_k ||B_k A_k||_F
            b = torch.zeros_like(global_state[module.b_key], dtype=torch.float32)
            a = torch.zeros_like(global_state[module.a_key], dtype=torch.float32)
            for b_k, a_k, p_k in zip(bs, as_, p, strict=True):  # fixed order: the same bits on every party
                b.add_(pad_tensor(module.b_key, b_k, rank), alpha=p_k)  # B = sum_k p_k pad(B_k)
                a.add_(pad_tensor(module.a_key, a_k, rank), alpha=p_k)  # A = sum_k p_k pad(A_k)
            payload[module.b_key], payload[module.a_key] = b, a
        return payload
