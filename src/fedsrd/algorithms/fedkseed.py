"""FedKSeed (Qin et al., ICML 2024; arXiv 2312.06353): zeroth-order full fine-tuning with K shared seeds.

Sources: the paper (one pool of K candidate seeds for the run; a client uploads per-seed accumulated scalar
gradients; everyone replays the model from the initial weights) and its reference code (zhenqincn/FedKSeed, as
copied in Ahmed-Khaled-Saleh/FedKseed, `optimizers/mezo_optimizer.py`: the MeZO step, the optional skip of steps
whose two losses differ by more than `grad_clip`). docs/full_parameter.md lists every difference from that code.

One pool of K seeds serves the whole run (`seed_pool`). A local step
picks a seed uniformly, regenerates z ~ N(0, I) over the trained weights from (seed, weight name) on the CPU
(`fedsrd.ops.projection.direction`), evaluates the batch at w + eps z and w - eps z (forward passes only) and takes
the two-point estimate g = (L+ - L-) / (2 eps); then w <- w - lr g z and the seed's scalar accumulator grows by
-lr g (`KSeedZerothOrder`). With `kseed_grad_clip` > 0, a step with |L+ - L-| above it changes nothing (the
reference's optional step skip).

Upload: (seed index, scalar) pairs: a sparse K-vector (``"fedkseed.coeff"``, at most local_steps non-zeros). Server:
the weighted sum, added to the run's cumulative coefficients c. Broadcast: c (sparse while smaller). Everyone
replays the model from the initial weights: w = w_0 + sum_s c_s z_s (`materialize`), which is why the learning rate
must be constant and weight decay zero (`check_training_args` refuses anything else before training).

Deviations from the reference (docs/full_parameter.md, "Where we deviate"): the accumulators carry -lr g rather than
g (the same under a constant lr, and the server needs no learning rate); z covers the family's trained set (block
Linear weights and the classifier head) rather than every parameter; z is drawn per (seed, weight name) on the CPU,
not on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import SUM_DP, AlgorithmOptions, Payload, State, require_option
from fedsrd.algorithms.families import FullParameterAlgorithm
from fedsrd.ops import SparseTensor, densify, generator_for, weighted_sum
from fedsrd.ops.projection import direction, seed_pool

COEFF = "fedkseed.coeff"  # the global state, the upload and the broadcast: one scalar per seed of the pool
LOCAL_INCREMENT = "fedkseed.increment"  # the local state: this client's per-seed sums of -lr * g


class KSeedZerothOrder(torch.optim.Optimizer):
    """FedKSeed's local optimizer: two-point zeroth-order steps along seeded directions.

    `zeroth_order_step(loss_fn)` does the whole step (perturb, evaluate twice, restore and update in one pass,
    accumulate); Trainer's later `step()` call does nothing. `upload_state()` returns the per-seed sums of -lr g.
    With `loss_difference_clip` > 0, a step whose two losses differ by more than it only restores the weights (the
    reference's `grad_clip`); `skipped_steps` counts those.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        seeds: Sequence[int],
        *,
        lr: float,
        eps: float,
        picker: torch.Generator,
        loss_difference_clip: float = 0.0,
    ) -> None:
        if not named_params:
            raise ValueError("KSeedZerothOrder: expected at least one weight to perturb, got none.")
        if loss_difference_clip < 0:
            raise ValueError(f"KSeedZerothOrder: loss_difference_clip must be >= 0, got {loss_difference_clip}")
        super().__init__([p for _, p in named_params], {"lr": lr})
        self.named_params = list(named_params)
        self.seeds = list(seeds)
        self.eps = eps
        self.picker = picker
        self.increments = torch.zeros(len(self.seeds), dtype=torch.float32)
        self.seed_history: list[int] = []
        self.loss_difference_clip = loss_difference_clip
        self.skipped_steps = 0

    @torch.no_grad()
    def _move(self, seed: int, scale: float) -> None:
        """w <- w + scale * z_seed, weight by weight (z regenerated, never stored whole)."""
        for name, param in self.named_params:
            z = direction(seed, name, param.shape).to(param.device, param.dtype)
            param.add_(z, alpha=scale)

    def zeroth_order_step(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One local step on the batch `loss_fn` evaluates; returns the mean of the two losses."""
        k = int(torch.randint(len(self.seeds), (1,), generator=self.picker))
        self.seed_history.append(k)
        seed, eps, lr = self.seeds[k], self.eps, self.param_groups[0]["lr"]
        self._move(seed, eps)
        loss_plus = loss_fn().detach()
        self._move(seed, -2 * eps)
        loss_minus = loss_fn().detach()
        grad = float(loss_plus - loss_minus) / (2 * eps)  # the projected gradient along z
        too_far = 0 < self.loss_difference_clip < abs(float(loss_plus - loss_minus))
        if not math.isfinite(grad) or too_far:
            self._move(seed, eps)  # restore only; a non-finite or clipped estimate must not reach the accumulators
            self.skipped_steps += 1
            return (loss_plus + loss_minus) / 2
        self._move(seed, eps - lr * grad)  # restore (+eps z) and step (-lr g z) in one pass
        self.increments[k] += -lr * grad
        return (loss_plus + loss_minus) / 2

    def step(self, closure=None):
        return None  # the update happened in zeroth_order_step

    def upload_state(self) -> State:
        return {LOCAL_INCREMENT: self.increments.clone()}


@dataclass
class FedKSeedOptions(AlgorithmOptions):
    """FedKSeed: the seed pool, the perturbation scale and the optional skip of outlier steps."""

    kseed_num_seeds: int = field(
        default=4096, metadata={"help": "FedKSeed: size K of the seed pool, fixed for the whole run."}
    )
    kseed_eps: float = field(
        default=5e-4, metadata={"help": "FedKSeed: perturbation scale eps of the two-point zeroth-order estimate."}
    )
    kseed_grad_clip: float = field(
        default=0.0,
        metadata={
            "help": "FedKSeed: skip a local step whose two losses differ by more than this, |L(w + eps z) - "
            "L(w - eps z)| > kseed_grad_clip (the reference's optional grad_clip); 0: never skip."
        },
    )

    @staticmethod
    def validate(config) -> None:
        seeds, eps, clip = config.kseed_num_seeds, config.kseed_eps, config.kseed_grad_clip
        require_option(config, seeds >= 1, "kseed_num_seeds", f"must be >= 1, got {seeds}")
        require_option(config, eps > 0, "kseed_eps", f"must be > 0, got {eps}")
        require_option(config, clip >= 0, "kseed_grad_clip", f"must be >= 0 (0: off), got {clip}")


@register_algorithm
class FedKSeed(FullParameterAlgorithm):
    name = "fedkseed"
    uploads_deltas = True
    paper = "FedKSeed (Qin et al., ICML 2024; arXiv 2312.06353)"
    uploads = "(seed index, scalar) pairs for the seeds used"
    downloads = "the K cumulative scalars (sparse while smaller)"
    dp_support = SUM_DP  # noise on all K summed scalars (the broadcast becomes dense)
    options = FedKSeedOptions

    def trainable(self, name: str) -> bool:
        return False  # no backward pass: the weights move along seeded directions only

    def pool(self) -> list[int]:
        """The K candidate seeds, fixed for the whole run."""
        return seed_pool(self.config.seed, "fedkseed", size=self.config.kseed_num_seeds)

    def check_training_args(self, args: Any) -> None:
        scheduler = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        if scheduler != "constant":
            raise ValueError(
                f"fedkseed replays the global model from the initial weights with one learning rate, so it needs "
                f"TrainingArguments.lr_scheduler_type='constant', got {scheduler!r}."
            )
        if args.weight_decay != 0:
            raise ValueError(
                f"fedkseed needs TrainingArguments.weight_decay=0 (the replay is linear), got {args.weight_decay}."
            )
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                "fedkseed takes one zeroth-order step per batch: TrainingArguments.gradient_accumulation_steps must "
                f"be 1, got {args.gradient_accumulation_steps}."
            )

    def create_optimizer(self, model: torch.nn.Module, args: Any, round: int, client_id: int) -> KSeedZerothOrder:
        params = dict(model.named_parameters())
        return KSeedZerothOrder(
            [(n, params[n]) for n in self.trainable_weights(model)],
            self.pool(),
            lr=args.learning_rate,
            eps=self.config.kseed_eps,
            picker=generator_for(self.config.seed, "fedkseed_pick", round, client_id),
            loss_difference_clip=self.config.kseed_grad_clip,
        )

    # ---- state ------------------------------------------------------------------------------------------------------
    def init_global_state(self, adapter_state: State) -> State:
        self._replayed: tuple[torch.Tensor, int, State] | None = None
        return {COEFF: torch.zeros(self.config.kseed_num_seeds, dtype=torch.float32)}

    def materialize(self, state: State, initial: State) -> State:
        """w = w_0 + sum_s c_s z_s over the seeds with c_s != 0, in seed order (replayed from the initial weights)."""
        coeff = state[COEFF].to(torch.float32)
        cached = getattr(self, "_replayed", None)
        if cached is not None and cached[1] == id(initial) and torch.equal(cached[0], coeff):
            return cached[2]
        seeds = self.pool()
        weights = {name: value.to(torch.float32).clone() for name, value in initial.items()}
        for k in torch.nonzero(coeff).reshape(-1).tolist():
            c = float(coeff[k])
            for name, value in weights.items():
                value.add_(direction(seeds[k], name, value.shape), alpha=c)
        self._replayed = (coeff.clone(), id(initial), weights)
        return weights

    # ---- what travels -----------------------------------------------------------------------------------------------
    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {COEFF: ((self.config.kseed_num_seeds,), True)}

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {COEFF: ((self.config.kseed_num_seeds,), True)}

    # ---- the round --------------------------------------------------------------------------------------------------
    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        if LOCAL_INCREMENT not in local_state:
            raise ValueError(f"FedKSeed: the local state lacks {LOCAL_INCREMENT!r} (the optimizer's accumulators).")
        return {COEFF: SparseTensor.from_dense(local_state[LOCAL_INCREMENT].to("cpu", torch.float32))}

    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        increments = [densify(u[COEFF]) for u in updates]
        cumulative = global_state[COEFF] + weighted_sum(increments, weights)  # G[s] += sum_n w_n pool_n[s]
        sparse = SparseTensor.from_dense(cumulative)
        smaller = 4 * sparse.nnz + (sparse.numel + 7) // 8 < 4 * sparse.numel
        return {COEFF: sparse if smaller else cumulative}

    def apply(self, state: State, broadcast: Payload) -> State:
        return {COEFF: densify(broadcast[COEFF]).clone()}
