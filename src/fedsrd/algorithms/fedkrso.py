"""FedKRSO (Yang et al., INFOCOM 2026; arXiv 2602.03019): federated full fine-tuning in K shared random subspaces.

Sources: the paper's method section (K seeds per round, each defining a random subspace per weight matrix; clients
upload per-seed accumulators, the server averages them per seed) and the authors' code (github.com/yangguohao/RSO,
folder FedKRSO/, commit 0e6bb444: `optimizer.py` for the local step, `fed_agg.py` for the averaging), which fixes
what the paper leaves open. docs/full_parameter.md walks through the method and lists every difference from that code.

Each round the server draws K fresh seeds (`round_seeds`; every party derives them from the run seed and the round,
so nothing travels). Seed k defines, for every trained weight W (out x in), a projection P_k (r x in, entries
N(0, 1/r), so E[P^T P] = I; drawn on the CPU from (seed, weight name): `fedsrd.ops.projection`). A client trains W
only through P: W + B P with B (out x r) fixed at zero, so autograd yields G_B = grad_W f . P^T, the sketched
gradient; `KRSOAdamW` runs AdamW on B's coordinates and writes each step straight into W (W <- W + dB P). Every tau
steps it switches to a seed drawn uniformly from the K and resets the moments (as the authors' code: the step
counter keeps running). It adds every dB to the accumulator of the current seed, A_k.

Upload: A_k for the seeds the client used (``"<weight>@<k>"``, out x r, dense) and the head's change (dense).
Server: per seed, Abar_k = sum_n w_n A_k^n (a client that did not use seed k counts as zero, which equals averaging
the clients' full weights), the head averaged. Broadcast: Abar_k for every seed some client used, the head, and the
round (``"fedkrso.round"``, which names the seeds). Everyone: W <- W + sum_k Abar_k P_k (`apply`), in float32 on the
CPU, so all parties hold the same bits.

Deviations from the authors' code (docs/full_parameter.md, "Where we deviate"): weight decay is 0 on projected
weights (decay on the full W leaves the span of the P_k, and the accumulators could not carry it), seeds are 63-bit
and derived per (round, k) rather than ``randint(1, 63)``, and P is drawn per (seed, weight name) on the CPU rather
than from one CUDA stream in parameter order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import SUM_DP, AlgorithmOptions, Payload, State, require_option
from fedsrd.algorithms.families import FullParameterAlgorithm, is_head
from fedsrd.ops import generator_for, weighted_sum
from fedsrd.ops.projection import projection, reconstruct, seed_pool

ROUND_TAG = "fedkrso.round"  # broadcast: the round whose seeds the accumulators refer to, shape (1,)
SEED_SEPARATOR = "@"


def accumulator_name(weight: str, seed_index: int) -> str:
    """Wire name of weight `weight`'s accumulator for seed index `seed_index` (e.g. ``...q_proj.weight@3``)."""
    return f"{weight}{SEED_SEPARATOR}{seed_index}"


def parse_accumulator_name(key: str) -> tuple[str, int] | None:
    """(weight name, seed index) of an accumulator name, or None for any other name."""
    weight, sep, index = key.rpartition(SEED_SEPARATOR)
    if not sep or not index.isdigit():
        return None
    return weight, int(index)


class KRSOAdamW(torch.optim.Optimizer):
    """FedKRSO's local optimizer: AdamW in the r-dimensional coordinates of seeded random subspaces.

    For each projected Linear (name -> module) it keeps a zero coordinate B (out x r) and a forward hook that adds
    ``(x P^T) B^T`` to the layer's output, so backward yields ``B.grad = G P^T`` without any out x in gradient. A step
    turns B.grad into the AdamW direction dB = -lr * m_hat / (sqrt(v_hat) + eps) (moments out x r, float32), adds
    dB to the current seed's accumulator and writes ``W += dB P``; B stays zero. Every `tau` steps a new seed index
    is drawn from `picker` (uniform over `seeds`), every P is regenerated and the moments reset (not the step
    counts). Head parameters get plain AdamW with decoupled weight decay on their matrices, and on their biases too
    if `decay_head_biases` (the authors' code decays every head parameter).

    `upload_state()` returns the accumulators; `extra_parameters()` the coordinates B (clipped with the model's
    gradients); `close()` removes the hooks. Call it when the local phase ends.
    """

    def __init__(
        self,
        projected: Sequence[tuple[str, torch.nn.Linear]],
        head: Sequence[tuple[str, torch.nn.Parameter]],
        seeds: Sequence[int],
        *,
        rank: int,
        tau: int,
        picker: torch.Generator,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_head_biases: bool = False,
    ) -> None:
        if not projected:
            raise ValueError("KRSOAdamW: expected at least one projected Linear, got none.")
        if rank < 1 or tau < 1 or not seeds:
            raise ValueError(f"KRSOAdamW: rank, tau and the seed count must be >= 1, got {rank}, {tau}, {len(seeds)}.")
        self.seeds = list(seeds)
        self.rank = rank
        self.tau = tau
        self.picker = picker
        self.linears = dict(projected)
        self.coordinates = {
            name: torch.nn.Parameter(torch.zeros(m.out_features, rank, device=m.weight.device, dtype=m.weight.dtype))
            for name, m in projected
        }
        groups: list[dict[str, Any]] = [{"params": list(self.coordinates.values()), "projected": True}]
        decay = [p for _, p in head if p.dim() >= 2 or decay_head_biases]
        no_decay = [p for _, p in head if p.dim() < 2 and not decay_head_biases]
        if decay:
            groups.append({"params": decay, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self._name_of = {id(p): name for name, p in self.coordinates.items()}
        self.accumulators: dict[int, dict[str, torch.Tensor]] = {}  # seed index -> weight name -> A_k (out x r)
        self.projections: dict[str, torch.Tensor] = {}
        self.seed_index = -1
        self.seed_history: list[int] = []  # the seed index of every subspace period, in order
        self.num_steps = 0
        self._hooks = [m.register_forward_hook(self._forward_hook(name)) for name, m in projected]
        self._switch_subspace()

    # ---- the reparameterisation W + B P ---------------------------------------------------------------------------
    def _forward_hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            p = self.projections[name]
            sketch = F.linear(x, p if p.dtype == x.dtype else p.to(x.dtype))  # x P^T: r numbers per token
            return output + F.linear(sketch, self.coordinates[name].to(sketch.dtype))

        return hook

    def _switch_subspace(self) -> None:
        """Draw a seed index uniformly from the K, regenerate every P, reset the moments (not the step count)."""
        self.seed_index = int(torch.randint(len(self.seeds), (1,), generator=self.picker))
        self.seed_history.append(self.seed_index)
        seed = self.seeds[self.seed_index]
        for name, linear in self.linears.items():
            self.projections[name] = projection(seed, name, self.rank, linear.in_features).to(linear.weight.device)
        for coordinate in self.coordinates.values():
            state = self.state.get(coordinate)
            if state:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()

    # ---- the step ---------------------------------------------------------------------------------------------------
    def _adam_direction(self, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """m_hat / (sqrt(v_hat) + eps) after folding `param.grad` into the moments (float32)."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            state["exp_avg_sq"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        grad = param.grad.to(torch.float32)
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"]
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        return (state["exp_avg"] / (1 - beta1**step)).div_(denom)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.seed_index not in self.accumulators:  # first step of this seed: every weight gets an accumulator
            self.accumulators[self.seed_index] = {
                name: torch.zeros(c.shape, dtype=torch.float32, device=c.device) for name, c in self.coordinates.items()
            }
        accumulators = self.accumulators[self.seed_index]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                delta = self._adam_direction(param, group).mul_(-group["lr"])
                if group.get("projected"):
                    name = self._name_of[id(param)]
                    accumulators[name].add_(delta)  # A_k += dB
                    weight = self.linears[name].weight
                    weight.add_((delta @ self.projections[name]).to(weight.dtype))  # W <- W + dB P
                    param.grad = None  # B is not a model parameter: Trainer's model.zero_grad() misses it
                else:
                    if group["weight_decay"]:
                        param.mul_(1 - group["lr"] * group["weight_decay"])
                    param.add_(delta.to(param.dtype))
        self.num_steps += 1
        if self.num_steps % self.tau == 0:
            self._switch_subspace()
        return loss

    # ---- what the trainer reads -------------------------------------------------------------------------------------
    def upload_state(self) -> State:
        """The accumulators of the seeds used, as ``"<weight>@<seed index>"`` -> out x r float32 CPU tensors."""
        return {
            accumulator_name(name, k): acc.detach().to("cpu", torch.float32).clone()
            for k in sorted(self.accumulators)
            for name, acc in self.accumulators[k].items()
        }

    def extra_parameters(self) -> list[torch.Tensor]:
        return list(self.coordinates.values())

    def close(self) -> None:
        """Remove the forward hooks (the accumulators stay readable)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


@dataclass
class FedKRSOOptions(AlgorithmOptions):
    """FedKRSO: the random subspaces (rank, seeds per round, steps per subspace) and the head's weight decay."""

    krso_rank: int = field(
        default=4, metadata={"help": "FedKRSO: rank r of each random projection P (r x d_in, entries N(0, 1/r))."}
    )
    krso_num_seeds: int = field(
        default=10,
        metadata={"help": "FedKRSO: seeds K drawn fresh each round; each defines one projection per weight matrix."},
    )
    krso_tau: int = field(
        default=10,
        metadata={"help": "FedKRSO: local steps per subspace; then a new seed from the K and reset Adam moments."},
    )
    krso_head_bias_decay: bool = field(
        default=False,
        metadata={
            "help": "FedKRSO: apply weight_decay to the head's biases too, as the authors' code does (default: only "
            "to the head's matrices, Trainer's convention)."
        },
    )

    @staticmethod
    def validate(config) -> None:
        for option in ("krso_rank", "krso_num_seeds", "krso_tau"):
            value = getattr(config, option)
            require_option(config, value >= 1, option, f"must be >= 1, got {value}")


@register_algorithm
class FedKRSO(FullParameterAlgorithm):
    name = "fedkrso"
    paper = "FedKRSO (Yang et al., INFOCOM 2026; arXiv 2602.03019)"
    uploads = "per seed used, an out x r accumulator per weight matrix; the head's change, dense"
    downloads = "per-seed averaged accumulators (seeds some client used); the averaged head change"
    dp_support = SUM_DP  # noise on every seed's summed accumulator (all K, used or not) and on the summed head
    options = FedKRSOOptions

    def trainable(self, name: str) -> bool:
        # Projected weights change through KRSOAdamW's coordinates; autograd differentiates only the head.
        return is_head(name)

    def round_seeds(self, round: int) -> list[int]:
        """The K seeds of `round` (fresh every round, as the authors' code), the same for every party."""
        return seed_pool(self.config.seed, "fedkrso", round, size=self.config.krso_num_seeds)

    def create_optimizer(self, model: torch.nn.Module, args: Any, round: int, client_id: int) -> KRSOAdamW:
        names = self.trainable_weights(model)
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        return KRSOAdamW(
            [(n, modules[n.rsplit(".", 1)[0]]) for n in names if not is_head(n)],
            [(n, params[n]) for n in names if is_head(n)],
            self.round_seeds(round),
            rank=self.config.krso_rank,
            tau=self.config.krso_tau,
            picker=generator_for(self.config.seed, "fedkrso_pick", round, client_id),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
            decay_head_biases=self.config.krso_head_bias_decay,
        )

    # ---- what travels -----------------------------------------------------------------------------------------------
    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        shapes: dict[str, tuple[tuple[int, ...], bool]] = {}
        for name, value in global_state.items():
            if is_head(name):
                shapes[name] = (tuple(value.shape), False)
                continue
            for k in range(self.config.krso_num_seeds):
                shapes[accumulator_name(name, k)] = ((value.shape[0], self.config.krso_rank), False)
        return shapes

    def update_is_partial(self) -> bool:
        return True  # only the seeds a client used

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {**self.update_shapes(global_state), ROUND_TAG: ((1,), False)}

    def broadcast_is_partial(self) -> bool:
        return True  # only the seeds some client used

    # ---- the round --------------------------------------------------------------------------------------------------
    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        payload = {k: v.detach().to("cpu", torch.float32) for k, v in local_state.items() if parse_accumulator_name(k)}
        payload.update({k: local_state[k].detach().to("cpu", torch.float32) for k in global_state if is_head(k)})
        return payload

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        projected = sorted(n for n in global_state if not is_head(n))
        heads = [n for n in global_state if is_head(n)]
        used: set[int] = set()
        for update in updates:
            used |= _check_update(update, projected, heads)
        payload: Payload = {}
        for k in sorted(used):  # Abar_k = sum_n w_n A_k^n, a client without seed k counting as zero
            for name in projected:
                key = accumulator_name(name, k)
                terms = [(u[key], w) for u, w in zip(updates, weights, strict=True) if key in u]
                payload[key] = weighted_sum([t for t, _ in terms], [w for _, w in terms])
        for name in heads:
            payload[name] = weighted_sum([u[name] for u in updates], weights)
        payload[ROUND_TAG] = torch.tensor([float(round)])
        return payload

    def apply(self, state: State, broadcast: Payload) -> State:
        seeds = self.round_seeds(_tagged_round(broadcast))
        by_weight: dict[str, dict[int, torch.Tensor]] = {}
        for key, value in broadcast.items():
            parsed = parse_accumulator_name(key)
            if parsed is not None:
                by_weight.setdefault(parsed[0], {})[parsed[1]] = value
        new_state = dict(state)
        for name, accumulators in by_weight.items():  # W <- W + sum_k Abar_k P_k
            new_state[name] = state[name] + reconstruct(accumulators, seeds, name, state[name].shape[1])
        for name in state:
            if is_head(name) and name in broadcast:
                new_state[name] = broadcast[name].to(torch.float32).clone()
        return new_state


def _check_update(update: Payload, projected: list[str], heads: list[str]) -> set[int]:
    """The seed indices an update carries; raises ValueError if a used seed lacks a weight or the head is missing."""
    by_seed: dict[int, set[str]] = {}
    for key in update:
        parsed = parse_accumulator_name(key)
        if parsed is not None:
            by_seed.setdefault(parsed[1], set()).add(parsed[0])
    for k, names in sorted(by_seed.items()):
        if len(names) != len(projected):
            raise ValueError(
                f"FedKRSO update: seed {k} carries {len(names)} of the {len(projected)} projected weights' "
                "accumulators; a used seed must carry all of them."
            )
    missing = [h for h in heads if h not in update]
    if missing:
        raise ValueError(f"FedKRSO update: the head tensor {missing[0]!r} is missing ({len(missing)} in all).")
    return set(by_seed)


def _tagged_round(broadcast: Payload) -> int:
    tag = broadcast.get(ROUND_TAG)
    if not isinstance(tag, torch.Tensor) or tag.numel() != 1:
        raise ValueError(f"FedKRSO broadcast: expected the round tag {ROUND_TAG!r} as one number.")
    value = float(tag.reshape(-1)[0])
    if value < 1 or value != int(value):
        raise ValueError(f"FedKRSO broadcast: the round tag {ROUND_TAG!r} must be a round number >= 1, got {value}.")
    return int(value)
