"""Ferret (Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large Language Models", ICML 2025,
PMLR 267; code allen4747/Ferret, `optimizers/ferret_optimizer.py`, `client.py`, `server.py`).

First-order local updates, sent as their projections onto shared random bases (the paper's Sec. 4, Algorithm 1):

1. **Local update** (`client.py`): each client runs plain SGD (momentum 0, the run's learning rate, schedule and
   weight decay) on the trained weights from the global model, for the round's local steps: Delta = w_local - w.
2. **Projection** (`FerretFramework.project_update`). Per block g (here: one trained weight matrix) of d_g entries,
   n_g = max(floor(||Delta_g|| / max_h ||Delta_h|| * K), 2) seed indices are drawn without replacement from the run's
   pool of K seeds; each seed k gives a random basis vector v_k (d_g entries), and the client sends the coordinates

       gamma_k = (d_g / n_g) <Delta_g, v_k>          (a sparse K-vector per block: n_g (index, value) pairs)

3. **Reconstruction** (`FerretFramework.update`, `Server.update_global_model_by_seed_pool`). The server averages the
   coordinates per seed and block, gammabar = sum_i p_i gamma^i, and every party adds

       w_g <- w_g + eta_s sum_k clip_10(gammabar_k v_k)

   (eta_s = `ferret_server_lr`; each seed's term clipped to norm 10 as the code's ``max_norm``). With E[v v^T] = I/d_g
   the reconstruction is unbiased: E[(d/n) sum_k <Delta, v_k> v_k] = Delta.

v_k is the code's draw (``trunc_normal_(mean 0, std 1, [-1/sqrt(d), 1/sqrt(d)])``) divided by its standard deviation
times sqrt(d), so that E[v v^T] = I/d exactly. The code keeps the raw draw, whose variance is about 1/(3 d), and makes
up for the resulting 1/3 with its server learning rate (slr = 10 in its script): eta_s ~ 3.3 here reproduces that.
Draws come from a CPU generator seeded by (seed, weight name) (`ferret_direction`), so every party rebuilds the same
bits; the code seeds the global torch generator with the seed alone, which repeats one v across blocks of equal size.
The head of a classifier is trained by the same SGD and sent dense, as in the rest of the family; the code's server
momentum (0 in its script) is not implemented. Upload and download: one sparse K-vector per block (+ the head).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Payload, State
from fedsrd.algorithms.fedfft import FullParameterAlgorithm, is_head
from fedsrd.ops import SparseTensor, generator_for, weighted_sum
from fedsrd.ops.projection import seed_pool

COORD_SUFFIX = "@ferret"  # wire name of a block's K coordinates: "<weight>@ferret", shape (K,)
MAX_SEED_UPDATE_NORM = 10.0  # the code's `update(..., max_norm=10)`: each seed's term gammabar_k v_k is clipped to it


def coord_name(weight: str) -> str:
    return weight + COORD_SUFFIX


def truncated_normal_variance(bound: float) -> float:
    """Variance of N(0, 1) truncated to [-bound, bound]: 1 - 2 bound phi(bound) / (2 Phi(bound) - 1)."""
    phi = math.exp(-0.5 * bound * bound) / math.sqrt(2 * math.pi)
    return 1.0 - 2.0 * bound * phi / math.erf(bound / math.sqrt(2))


def ferret_direction(seed: int, name: str, numel: int) -> torch.Tensor:
    """v for block `name` under `seed`: the code's truncated normal on [-1/sqrt(d), 1/sqrt(d)], rescaled so that
    E[v v^T] = I / d (flat, float32, CPU)."""
    bound = 1.0 / math.sqrt(numel)
    draw = torch.empty(numel, dtype=torch.float32)
    torch.nn.init.trunc_normal_(draw, 0.0, 1.0, -bound, bound, generator=generator_for(seed, "ferret", name))
    return draw.mul_(1.0 / math.sqrt(numel * truncated_normal_variance(bound)))


def seeds_per_block(norms: dict[str, float], pool_size: int) -> dict[str, int]:
    """n_g = max(floor(||Delta_g|| / max_h ||Delta_h|| * K), 2), at most K (the code's `max_n_seeds`)."""
    largest = max([n for n in norms.values() if math.isfinite(n)] + [1e-8])
    return {
        name: min(pool_size, max(int(n / largest * pool_size) if math.isfinite(n) else 2, 2))
        for name, n in norms.items()
    }


def project(delta: torch.Tensor, name: str, pool: list[int], indices: list[int]) -> torch.Tensor:
    """The block's K-vector of coordinates: gamma_k = (d / n) <Delta, v_k> at `indices` (n of them), 0 elsewhere."""
    flat = delta.reshape(-1).to(torch.float32)
    coords = torch.zeros(len(pool), dtype=torch.float32)
    for k in indices:
        coords[k] = torch.dot(flat, ferret_direction(pool[k], name, flat.numel()))
    return coords.mul_(flat.numel() / len(indices))


def reconstruct_block(coords: torch.Tensor, name: str, pool: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """sum_k clip_10(gamma_k v_k) over the non-zero gamma_k, in increasing k (float32, CPU; the same bits anywhere)."""
    numel = math.prod(shape)
    total = torch.zeros(numel, dtype=torch.float32)
    for k in torch.nonzero(coords).reshape(-1).tolist():
        term = ferret_direction(pool[k], name, numel).mul_(float(coords[k]))
        norm = float(term.norm())
        if norm > MAX_SEED_UPDATE_NORM:
            term.mul_(MAX_SEED_UPDATE_NORM / (norm + 1e-8))
        total.add_(term)
    return total.reshape(shape)


def _dense(value: torch.Tensor | SparseTensor) -> torch.Tensor:
    return value.to_dense(torch.float32) if isinstance(value, SparseTensor) else value.to(torch.float32)


@register_algorithm
class Ferret(FullParameterAlgorithm):
    name = "ferret"
    uploads_deltas = True
    paper = "Ferret (Shu et al., ICML 2025)"
    uploads = "per weight matrix, the SGD update's coordinates on n_g of K shared random bases (sparse); the head"
    downloads = "per weight matrix, the averaged coordinates (sparse K-vector); the averaged head change"

    def pool(self) -> list[int]:
        """The K seeds of the run (the code's `candidate_seeds`, drawn once)."""
        return seed_pool(self.config.seed, "ferret", size=self.config.ferret_num_seeds)

    def create_optimizer(self, model: torch.nn.Module, args: Any, round: int, client_id: int) -> torch.optim.SGD:
        """The code's local optimizer: SGD, momentum 0, the run's learning rate and weight decay."""
        params = dict(model.named_parameters())
        trained = [params[n] for n in self.trainable_weights(model)]
        return torch.optim.SGD(trained, lr=args.learning_rate, momentum=0.0, weight_decay=args.weight_decay)

    # ---- what travels -----------------------------------------------------------------------------------------------
    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        k = self.config.ferret_num_seeds
        return {
            (name if is_head(name) else coord_name(name)): ((tuple(v.shape), False) if is_head(name) else ((k,), True))
            for name, v in global_state.items()
        }

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return self.update_shapes(global_state)

    # ---- the round --------------------------------------------------------------------------------------------------
    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        pool = self.pool()
        blocks = [n for n in global_state if not is_head(n)]
        deltas = {n: local_state[n].detach().to("cpu", torch.float32) - global_state[n] for n in blocks}
        counts = seeds_per_block({n: float(d.norm()) for n, d in deltas.items()}, len(pool))
        payload: Payload = {}
        for name in blocks:  # gamma_k = (d / n_g) <Delta_g, v_k> for n_g seeds drawn without replacement
            indices = sorted(torch.randperm(len(pool), generator=rng)[: counts[name]].tolist())
            payload[coord_name(name)] = SparseTensor.from_dense(project(deltas[name], name, pool, indices))
        payload.update({n: local_state[n].detach().to("cpu", torch.float32) for n in global_state if is_head(n)})
        return payload

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("Ferret.server_step: no client updates to aggregate.")
        payload: Payload = {}
        for name in global_state:
            key = name if is_head(name) else coord_name(name)
            mean = weighted_sum([_dense(u[key]) for u in updates], weights)  # gammabar = sum_i p_i gamma^i
            payload[key] = mean if is_head(name) else SparseTensor.from_dense(mean)
        return payload

    def apply(self, state: State, broadcast: Payload) -> State:
        pool, lr = self.pool(), self.config.ferret_server_lr
        new_state = dict(state)
        for name, value in state.items():
            if is_head(name):
                new_state[name] = _dense(broadcast[name]).clone()
                continue
            coords = _dense(broadcast[coord_name(name)])
            step = reconstruct_block(coords, name, pool, tuple(value.shape))  # sum_k clip(gammabar_k v_k)
            new_state[name] = value + lr * step
        return new_state
