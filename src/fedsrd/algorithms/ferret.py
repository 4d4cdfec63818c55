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
bits. They are made by `truncated_normal`, exact rejection from the uniform (the distribution of the code's
``trunc_normal_``, at about one uniform per number: 2 to 3 times faster here; the bases are the hot path, a client
drawing n_g x d_g numbers per matrix to project and every party (seeds used) x d_g to reconstruct, once per round
in one process: `Ferret.reconstruct`). The code seeds the global torch generator with the seed alone, which repeats
one v across blocks of equal size. The head of a classifier is trained by the same SGD and sent dense, as in the
rest of the family; the code's server momentum (0 in its script) is not implemented. Upload and download: one sparse
K-vector per block (+ the head).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import AlgorithmOptions, Payload, State, require_option
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


def truncated_normal(numel: int, bound: float, generator: torch.Generator) -> torch.Tensor:
    """`numel` draws of N(0, 1) truncated to [-bound, bound] (float32, CPU), by rejection from the uniform.

    The method (von Neumann's rejection, with a squeeze): draw pairs (u_i, w_i), u_i ~ U(-b, b), w_i ~ U(0, 1)
    independent, and keep u_i when w_i <= exp(-u_i^2 / 2). A kept u has density

        P(u in du | kept) = (du / 2b) exp(-u^2/2) / int_{-b}^{b} (dx / 2b) exp(-x^2/2)  proportional to  exp(-u^2/2)

    on [-b, b]: exactly the truncated normal, so the kept values, taken in order, are i.i.d. draws of it (the same
    distribution as ``torch.nn.init.trunc_normal_(x, 0, 1, -b, b)``; tested against it). A pair is kept with
    probability sqrt(pi/2) erf(b/sqrt(2)) / b >= exp(-b^2/2): about 1 for a weight matrix's b = 1/sqrt(d).

    Most w_i are never drawn: every w_i <= t = exp(-b^2/2) <= exp(-u_i^2/2) keeps its u_i whatever u_i is, so only
    the positions with w_i > t (a Bernoulli(q) process, q = 1 - t, about 1/(2d) here) need their w_i. Those positions
    are drawn as geometric gaps, G = 1 + floor(log(1 - U) / log(1 - q)), and their w_i as t + q U', which is
    w_i's law given w_i > t: the same joint law of (u_i, kept_i) as drawing every w_i, at one uniform per number
    instead of two (or trunc_normal_'s uniform and logarithm). A batch that keeps fewer than needed is followed by a
    fresh one (the gaps are memoryless, so restarting them at a batch boundary changes nothing).

    Every number comes from `generator` in a fixed order (per batch: the u, then the gaps, then the w at the gaps),
    so the same generator state gives the same bits on any machine and any torch version with the same
    ``uniform_`` (short of a float64 exp one ulp apart deciding a test at w's exact value, chance ~1e-16 per test);
    ``trunc_normal_`` changed its method across torch versions (inverse CDF, then rejection), so its bits did not.
    Resolution: the u are float32 uniforms (2^24 levels across [-b, b)), as trunc_normal_'s are.
    """
    b = float(torch.tensor(bound, dtype=torch.float32))  # the float32 bound the uniforms use: |u| <= b exactly
    t = math.exp(-0.5 * b * b)  # the squeeze: w <= t keeps u for every u in [-b, b]
    q, log_keep = -math.expm1(-0.5 * b * b), -0.5 * b * b  # q = 1 - t and log(1 - q)
    accept = math.sqrt(math.pi / 2) * math.erf(b / math.sqrt(2)) / b  # P(kept), >= t
    parts, have = [], 0
    while have < numel:
        m = math.ceil((numel - have) / accept) + 16
        u = torch.empty(m, dtype=torch.float32).uniform_(-b, b, generator=generator)
        hits = _bernoulli_positions(m, q, log_keep, generator)  # the i with w_i > t, increasing
        if hits.numel():
            w = torch.empty(hits.numel(), dtype=torch.float64).uniform_(generator=generator).mul_(q).add_(t)
            rejected = hits[w > torch.exp(u[hits].double().square_().mul_(-0.5))]
            if rejected.numel():
                kept = torch.ones(m, dtype=torch.bool)
                kept[rejected] = False
                u = u[kept]
        parts.append(u[: numel - have])
        have += parts[-1].numel()
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _bernoulli_positions(m: int, q: float, log_keep: float, generator: torch.Generator) -> torch.Tensor:
    """The positions i < m of a Bernoulli(q) process (int64, increasing), from geometric gaps drawn by `generator`."""
    if q <= 0.0:
        return torch.empty(0, dtype=torch.int64)
    chunks, last = [], -1
    while last < m - 1:  # positions so far fall short of the batch's end: draw more gaps
        expected = (m - 1 - last) * q
        count = math.ceil(expected + 4 * math.sqrt(expected) + 4)
        gaps = torch.empty(count, dtype=torch.float64).uniform_(generator=generator).neg_().log1p_()
        gaps = gaps.div_(log_keep).floor_().add_(1).clamp_(max=float(m + 1)).to(torch.int64)  # G >= 1, capped past m
        positions = gaps.cumsum_(0).add_(last)
        chunks.append(positions)
        last = int(positions[-1])
    positions = torch.cat(chunks)
    return positions[positions < m]


def basis_scale(numel: int) -> float:
    """1 / sqrt(d Var): the factor that takes a truncated draw on [-1/sqrt(d), 1/sqrt(d)] to E[v v^T] = I / d."""
    bound = float(torch.tensor(1.0 / math.sqrt(numel), dtype=torch.float32))
    return 1.0 / math.sqrt(numel * truncated_normal_variance(bound))


def raw_direction(seed: int, name: str, numel: int) -> torch.Tensor:
    """The code's draw for block `name` under `seed`: N(0, 1) truncated to [-1/sqrt(d), 1/sqrt(d)] (not rescaled)."""
    return truncated_normal(numel, 1.0 / math.sqrt(numel), generator_for(seed, "ferret", name))


def ferret_direction(seed: int, name: str, numel: int) -> torch.Tensor:
    """v for block `name` under `seed`: the code's truncated normal on [-1/sqrt(d), 1/sqrt(d)], rescaled so that
    E[v v^T] = I / d (flat, float32, CPU)."""
    return raw_direction(seed, name, numel).mul_(basis_scale(numel))


def seeds_per_block(norms: dict[str, float], pool_size: int) -> dict[str, int]:
    """n_g = max(floor(||Delta_g|| / max_h ||Delta_h|| * K), 2), at most K (the code's `max_n_seeds`)."""
    largest = max([n for n in norms.values() if math.isfinite(n)] + [1e-8])
    return {
        name: min(pool_size, max(int(n / largest * pool_size) if math.isfinite(n) else 2, 2))
        for name, n in norms.items()
    }


_ROW = 1 << 14  # below torch's parallel grain (32,768): one thread sums each row, in the same order on any machine


def stable_dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """<x, y> of two flat float32 tensors, the same bits whatever torch's thread count.

    `torch.dot` splits a long reduction across threads, so its rounding depends on how many there are (a client's
    coordinates would differ between the simulation and a process of an Accelerate team). Here the products are summed
    in rows of a fixed length, one row per thread, and the row sums added in float64 in order."""
    total, step = 0.0, _ROW * 256
    for start in range(0, x.numel(), step):
        xs, ys = x[start : start + step], y[start : start + step]
        full = xs.numel() - xs.numel() % _ROW
        if full:
            rows = torch.mul(xs[:full].view(-1, _ROW), ys[:full].view(-1, _ROW)).sum(dim=1)
            total += float(rows.sum(dtype=torch.float64))
        if full < xs.numel():
            total += float(torch.mul(xs[full:], ys[full:]).sum(dtype=torch.float64))
    return total


def project(delta: torch.Tensor, name: str, pool: list[int], indices: list[int]) -> torch.Tensor:
    """The block's K-vector of coordinates: gamma_k = (d / n) <Delta, v_k> at `indices` (n of them), 0 elsewhere.

    Each v_k is drawn once and dotted unscaled; its rescale joins the (d / n) factor (one pass less per basis)."""
    flat = delta.reshape(-1).to(torch.float32)
    numel = flat.numel()
    coords = torch.zeros(len(pool), dtype=torch.float64)
    for k in indices:
        coords[k] = stable_dot(flat, raw_direction(pool[k], name, numel))
    return coords.mul_(basis_scale(numel) * numel / len(indices)).to(torch.float32)


def reconstruct_block(coords: torch.Tensor, name: str, pool: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """sum_k clip_10(gamma_k v_k) over the non-zero gamma_k, in increasing k (float32, CPU; the same bits anywhere).

    With v_k = s r_k (r_k the raw draw, s = `basis_scale`), ||gamma_k v_k|| = |gamma_k| s ||r_k||, so each term is
    one pass to draw r_k, one for its norm and one fused multiply-add into the total."""
    numel = math.prod(shape)
    scale = basis_scale(numel)
    total = torch.zeros(numel, dtype=torch.float32)
    values = coords.to(torch.float64)
    for k in torch.nonzero(coords).reshape(-1).tolist():
        raw = raw_direction(pool[k], name, numel)
        factor = float(values[k]) * scale  # gamma_k s
        norm = abs(factor) * float(raw.norm())
        if norm > MAX_SEED_UPDATE_NORM:  # clip_10: the term scaled to norm 10
            factor *= MAX_SEED_UPDATE_NORM / (norm + 1e-8)
        total.add_(raw, alpha=factor)
    return total.reshape(shape)


def _dense(value: torch.Tensor | SparseTensor) -> torch.Tensor:
    return value.to_dense(torch.float32) if isinstance(value, SparseTensor) else value.to(torch.float32)


@dataclass
class FerretOptions(AlgorithmOptions):
    """Ferret: the pool of shared random bases and the server learning rate."""

    ferret_num_seeds: int = field(
        default=200,
        metadata={"help": "Ferret: K, the run's pool of shared random bases; a weight matrix's update is sent as its "
                  "coordinates on n_g <= K of them, n_g proportional to its norm (the official script's K = 200)."},
    )
    ferret_server_lr: float = field(
        default=1.0,
        metadata={"help": "Ferret: server learning rate on the reconstructed update (1: unbiased; the official "
                  "script's slr = 10 on its unnormalised bases is about 3.3 here)."},
    )

    @staticmethod
    def validate(config) -> None:
        k, lr = config.ferret_num_seeds, config.ferret_server_lr
        require_option(config, k >= 2, "ferret_num_seeds", f"must be >= 2, got {k}")
        require_option(config, lr > 0, "ferret_server_lr", f"must be > 0, got {lr}")


@register_algorithm
class Ferret(FullParameterAlgorithm):
    name = "ferret"
    options = FerretOptions
    uploads_deltas = True
    paper = "Ferret (Shu et al., ICML 2025)"
    uploads = "per weight matrix, the SGD update's coordinates on n_g of K shared random bases (sparse); the head"
    downloads = "per weight matrix, the averaged coordinates (sparse K-vector); the averaged head change"

    def __init__(self, config) -> None:
        super().__init__(config)
        # The last reconstruction per block, (key, step), until it is used again (`reconstruct`).
        self._steps: dict[str, tuple[str, torch.Tensor]] = {}

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
        # In name order: `rng` picks each block's seeds in turn, and a state's key order depends on where it was
        # loaded from (the model in the simulation, a file on a Flower SuperNode); sorted, every runtime agrees.
        blocks = sorted(n for n in global_state if not is_head(n))
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
            step = self.reconstruct(coords, name, pool, tuple(value.shape))  # sum_k clip(gammabar_k v_k)
            new_state[name] = value + lr * step
        return new_state

    def reconstruct(self, coords: torch.Tensor, name: str, pool: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        """`reconstruct_block`, computed once when the same broadcast is applied twice in one process.

        The simulation's server and its client copy share this object (`shared_by_server_and_client`) and apply each
        broadcast one after the other (the server to find the next state, the client copy to check it against the
        server's digest): the second apply takes the step the first computed for the same block, coordinates, pool
        and shape (keyed by a SHA-256 of them), so the bases are drawn once per round instead of twice; the result is
        the same tensor, bit for bit. A step is kept only until it is used again (or the block's next reconstruction
        replaces it): at most one float32 copy of the trained matrices, and none between rounds. A Flower ServerApp
        or SuperNode applies each broadcast once and keeps nothing (a kept copy would sit in memory through the next
        round's local training, 0.4 GB at Gemma-3-270M's size)."""
        if not self.shared_by_server_and_client:
            return reconstruct_block(coords, name, pool, shape)
        digest = hashlib.sha256(f"{name}|{list(shape)}|{pool}|".encode())
        digest.update(coords.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        key = digest.hexdigest()
        kept = self._steps.pop(name, None)
        if kept is not None and kept[0] == key:
            return kept[1]
        step = reconstruct_block(coords, name, pool, shape)
        self._steps[name] = (key, step)
        return step
