"""FedSRD and FedSRD-e: Sparsify-Reconstruct-Decompose (Yan et al., WWW 2026; arXiv 2510.04601).

Per LoRA module (B d_out x r, A r x d_in), every round t = 1, 2, ...:

* **Sparsify** (client, Sec. 4.1). Upload the round deltas dB_i, dA_i pruned by importance: an entry's score is its
  magnitude times the norm of the vector it multiplies in the other factor (Eq. 6); each matrix keeps a fraction
  1 - rho of its entries, rho growing with the kurtosis of its scores (Eq. 7), thresholded at the rho-quantile (Eq. 8).
* **Reconstruct** (server, Sec. 4.2). Rebuild B_i = B + dB_i, A_i = A + dA_i and aggregate the *products*,
  W = sum_i p_i B_i A_i (Eq. 9). FedSRD targets the best rank-r approximation of W (Eq. 10); FedSRD-e targets W itself.
* **Decompose** (server, Sec. 4.3). dW = W_target - B A (Eq. 11). Update one factor by least squares, keeping the
  current basis (Eq. 12-13): odd rounds dB = dW pinv(A), even rounds dA = pinv(B) dW. Drop 80% of that delta at
  random (DARE, survivors x 5) and broadcast it; the server and every client add the same sparse delta.

On a sequence classifier, the new head (PEFT's ``modules_to_save``) is no LoRA module: its change travels up dense and
its weighted mean is broadcast dense and added by everyone (`fedsrd.algorithms.families`, "classifier head").

Nothing here forms a d_out x d_in matrix: W is kept as the factor pair ([p_i B_i], [A_i]) (`fedsrd.ops.lowrank`).
Resolved ambiguities follow docs/specs (fedsrd.md, sec. 5): B-round first, dW against the current global factors,
Pearson kurtosis with rho <= 0.99, keep score >= tau, L1 rescale on by default, sparse delta added to the global state.
The knobs are `FedSRDOptions`; the LoRA helpers (`lora_modules`) live in `fedsrd.algorithms.families`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Aggregation, Algorithm, AlgorithmOptions, Payload, State, require_option
from fedsrd.algorithms.families import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    HeadMean,
    LoraModule,
    head_change_terms,
    head_changes,
    head_keys,
    head_shapes,
    lora_modules,
    lora_shapes,
)
from fedsrd.ops import generator_for
from fedsrd.ops.lowrank import (
    Factored,
    cheapest_truncated_svd,
    factored_difference,
    left_solve_matrix,
    pad_to_rank,
    right_solve_matrix,
    solve_left_update,
    solve_right_update,
    stack_factors,
    truncated_svd,
)
from fedsrd.ops.privacy import gaussian_like
from fedsrd.ops.robust import Terms, largest_scale_within, product_change_terms, scaled_norm
from fedsrd.ops.sketch import OnePassSketch, orthonormal_basis, recommended_corange_size
from fedsrd.ops.sparse import SparseTensor, densify
from fedsrd.ops.sparsify import dare_drop, importance_prune, importance_scores_a, importance_scores_b


# ---- the options FedSRD reads (FedSRDConfig inherits them: flat fields, e.g. --upload_sparsity_alpha) -----------
@dataclass
class FedSRDOptions(AlgorithmOptions):
    """FedSRD / FedSRD-e: the upload's importance pruning (Sec. 4.1, Eq. 7) and the download's DARE drop (Sec. 4.3)."""

    upload_sparsity_alpha: float = field(
        default=0.85,
        metadata={"help": "FedSRD: base upload sparsity alpha; per matrix rho = alpha + min(cap, coeff*ln(kurtosis))."},
    )
    upload_sparsity_coeff: float = field(default=0.1, metadata={"help": "FedSRD: kurtosis coefficient of rho."})
    upload_sparsity_cap: float = field(default=0.11, metadata={"help": "FedSRD: cap on the kurtosis increment of rho."})
    upload_l1_rescale: bool = field(
        default=True,
        metadata={"help": "FedSRD: rescale kept entries to preserve the L1 mass (authors' code; off = paper text)."},
    )
    download_drop: float = field(
        default=0.8, metadata={"help": "FedSRD: DARE drop probability on the broadcast delta (kept entries x 1/(1-p))."}
    )
    decompose_ridge: float = field(
        default=0.0,
        metadata={
            "help": "FedSRD family, not in the paper: damp the one-factor least-squares solves, e.g. dA = "
            "(B^T B + lambda I)^-1 B^T dW with lambda = decompose_ridge * mean squared singular value of B; "
            "0 = the paper's pinv."
        },
    )
    download_both_factors: bool = field(
        default=False,
        metadata={
            "help": "FedSRD/FedSRD-e, not in the paper: broadcast both factors' least-squares deltas every round "
            "(dB, then dA for the rest of the target), each DARE-dropped with download_drop; off = the paper's "
            "alternation (B in odd rounds, A in even ones)."
        },
    )
    rank_start: str = field(
        default="slice",
        metadata={
            "help": "FedSRD/FedSRD-e with client_lora_ranks, not in the paper: what a client of rank r below lora_r "
            "trains from. 'slice': the first r components of the global factors, B[:, :r] A[:r] (it needs only its "
            "rank's slice of each broadcast); 'svd': the best rank-r approximation of each module's global product "
            "B A (U_r S_r and V_r^T, FlexLoRA's truncation), computed by every party from the global state (it needs "
            "the whole broadcast)."
        },
    )
    train_one_factor: bool = field(
        default=False,
        metadata={
            "help": "FedSRD/FedSRD-e, not in the paper: clients train and upload only the factor this round's "
            "broadcast updates (B in odd rounds with A frozen, A in even rounds with B frozen: RoLoRA's "
            "alternation), so the aggregated change lies in the one-factor download's space (no projection loss) "
            "and half the factors travel up."
        },
    )

    @staticmethod
    def validate(config) -> None:
        alpha = config.upload_sparsity_alpha
        require_option(config, 0.0 <= alpha < 1.0, "upload_sparsity_alpha", f"must be in [0, 1), got {alpha}")
        coeff, cap = config.upload_sparsity_coeff, config.upload_sparsity_cap
        require_option(config, coeff >= 0, "upload_sparsity_coeff", f"must be >= 0, got {coeff}")
        require_option(config, cap >= 0, "upload_sparsity_cap", f"must be >= 0, got {cap}")
        drop = config.download_drop
        require_option(config, 0.0 <= drop < 1.0, "download_drop", f"must be in [0, 1), got {drop}")
        ridge = config.decompose_ridge
        require_option(config, ridge >= 0, "decompose_ridge", f"must be >= 0 (0: the paper's pinv), got {ridge}")
        require_option(config, config.rank_start in RANK_STARTS, "rank_start",
                       f"must be one of {RANK_STARTS}, got {config.rank_start!r}")  # fmt: skip
        if config.rank_start != "slice":
            algorithm = getattr(config, "algorithm", "fedsrd")
            require_option(config, algorithm in ("fedsrd", "fedsrd_e"), "rank_start",
                           f"applies to fedsrd and fedsrd_e only (algorithm is {algorithm!r})")  # fmt: skip
            require_option(config, getattr(config, "has_unequal_ranks", True), "rank_start",
                           f"{config.rank_start!r} says what a client of a rank below lora_r trains from, but every "
                           "client trains lora_r; set client_lora_ranks or leave rank_start 'slice'")  # fmt: skip
        if config.train_one_factor:
            algorithm = getattr(config, "algorithm", "fedsrd")
            require_option(config, algorithm in ("fedsrd", "fedsrd_e"), "train_one_factor",
                           f"applies to fedsrd and fedsrd_e only (algorithm is {algorithm!r}); for plain alternating "
                           "training use algorithm 'rolora'")  # fmt: skip
            require_option(config, not config.download_both_factors, "train_one_factor",
                           "trains one factor per round, so its download is that factor's; set download_both_factors "
                           "false")  # fmt: skip
            require_option(config, not getattr(config, "has_unequal_ranks", False), "train_one_factor",
                           "is not combined with clients of different ranks (client_lora_ranks)")  # fmt: skip


RANK_STARTS = ("slice", "svd")


def rank_start_factors(b: torch.Tensor, a: torch.Tensor, rank: int, how: str = "slice") -> Factored:
    """The factors a client of LoRA rank `rank` trains one module from, given the global factors B (d_out x R) and
    A (R x d_in) (`FedSRDOptions.rank_start`): the slice ``(B[:, :rank], A[:rank])``, or with ``how="svd"`` the best
    rank-`rank` approximation of B A as ``(U_r S_r, V_r^T)`` (zero-padded where B A has a smaller rank). While B A = 0
    (round 1: B starts at zero) both are the slice. The SVD runs in float64 and is rounded to float32, so that every
    party (the server, a SuperNode, an Accelerate process with another thread count) gets the same bits."""
    if how == "slice" or rank >= a.shape[0] or not bool(b.any()):
        return b[:, :rank], a[:rank]
    left, right = pad_to_rank(*truncated_svd(b.to(torch.float64), a.to(torch.float64), rank), rank)
    return left.to(torch.float32), right.to(torch.float32)


def is_b_round(round: int) -> bool:
    """Sec. 4.3's alternation: rounds 1..T, odd rounds move B (B^0 = 0, so B first), even rounds move A."""
    return round % 2 == 1


@dataclass
class ModuleTarget:
    """One module's target change dW = W_target - B A (Eq. 11) as factors, and, in FedSRD-e's streaming step, the
    part of this round's least-squares solve that was accumulated already solved (`solved`: C pinv(A) in a B-round,
    pinv(B) C in an A-round; `StreamingTarget`)."""

    delta_w: Factored
    solved: torch.Tensor | None = None

    def left_update(self, a: torch.Tensor, ridge: float) -> torch.Tensor:
        """dB = dW pinv(A) (Eq. 12), solved in dW's precision, returned in float32."""
        delta = solve_left_update(self.delta_w, a.to(self.delta_w[0].dtype), ridge)
        return (delta if self.solved is None else delta + self.solved).to(torch.float32)

    def right_update(self, b: torch.Tensor, ridge: float) -> torch.Tensor:
        """dA = pinv(B) dW (Eq. 13), solved in dW's precision, returned in float32."""
        delta = solve_right_update(self.delta_w, b.to(self.delta_w[0].dtype), ridge)
        return (delta if self.solved is None else delta + self.solved).to(torch.float32)


@register_algorithm
class FedSRD(Algorithm):
    """FedSRD: importance-pruned upload, product aggregation, rank-r SVD target, alternating one-factor download."""

    name = "fedsrd"
    uploads_deltas = True
    paper = "FedSRD (Yan et al., WWW 2026; arXiv 2510.04601)"
    uploads = "LoRA deltas dA, dB, importance-pruned (~95% sparse, adaptive per matrix)"
    downloads = "one factor's least-squares delta per round (B odd rounds, A even), DARE-dropped (80% sparse)"
    options = FedSRDOptions

    use_svd = True  # FedSRD-e: False
    supports_unequal_ranks = True  # `_unequal_rank_change`; a client's start and download: `rank_start`
    # Clipping only, of each client's *product* change (`update_norm`): a coordinate-wise median of factor deltas has
    # no meaning for the aggregated products.
    robust_defences = frozenset({"clip"})
    # Differential privacy (docs/privacy.md, "FedSRD"): each client's product change is clipped and the server noises
    # the aggregated full-rank product before the decomposition (`server_step_private`). Only there: a client cannot
    # put full-rank noise into its factor deltas. Importance-pruned positions depend on the data: DP needs
    # upload_mask="random".
    dp_support = frozenset({"central"})
    dp_refusal = ("the server aggregates the clients' products B_i A_i, and the Gaussian noise must cover that "
                  "full-rank product space, which a client's factor deltas cannot carry; use dp_mode='central'")
    data_dependent_positions = True
    random_upload_mask = True
    trains_dense_head = True  # a classifier's head: its change dense, its weighted mean broadcast (HeadMean)

    # ---- train_one_factor (not in the paper): the local phase trains the factor the round's download updates ----
    def trains(self, name: str, round: int) -> bool:
        """Every LoRA factor (the paper); with ``train_one_factor`` only this round's factor: B in odd rounds,
        A in even rounds, as the server's one-factor decomposition (Eq. 12-13) and RoLoRA alternate."""
        if not self.config.train_one_factor:
            return self.trainable(name)
        return ("lora_B" if is_b_round(round) else "lora_A") in name

    def update_is_partial(self) -> bool:
        return bool(self.config.train_one_factor)  # one factor's deltas per round

    # ---- client: sparsify (Sec. 4.1) ---------------------------------------------------------------------------
    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        cfg = self.config
        prune = {
            "alpha": cfg.upload_sparsity_alpha,
            "coeff": cfg.upload_sparsity_coeff,
            "cap": cfg.upload_sparsity_cap,
            "l1_rescale": cfg.upload_l1_rescale,
        }
        upload: Payload = {}
        for module in lora_modules(global_state):
            a, b = global_state[module.a_key], global_state[module.b_key]
            b_new = local_state[module.b_key].detach().to("cpu", torch.float32)
            a_new = local_state[module.a_key].detach().to("cpu", torch.float32)
            delta_b, delta_a = b_new - b, a_new - a  # dB_i = B_i' - B^{t-1}, dA_i = A_i' - A^{t-1}
            train_b, train_a = self.trains(module.b_key, round), self.trains(module.a_key, round)  # train_one_factor
            if cfg.upload_mask == "random":  # not in the paper: a seeded mask whose positions leak nothing (DP)
                if train_b:
                    upload[module.b_key] = dare_drop(delta_b, cfg.upload_sparsity_alpha, rng)
                if train_a:
                    upload[module.a_key] = dare_drop(delta_a, cfg.upload_sparsity_alpha, rng)
                continue
            if train_b:
                score_b = importance_scores_b(delta_b, a)  # Eq. 6: |dB[u,v]| * ||A^{t-1}[v,:]||
                upload[module.b_key] = importance_prune(delta_b, score_b, **prune)  # Eq. 7-8 (+ L1 rescale)
            if train_a:
                score_a = importance_scores_a(delta_a, b_new)  # Eq. 6: |dA[u,v]| * ||B_i'[:,u]||
                upload[module.a_key] = importance_prune(delta_a, score_a, **prune)
        upload.update(head_changes(global_state, local_state))  # a classifier's head: dense (none for an LM)
        return upload  # train_one_factor: the frozen factor's delta is zero and is not sent

    # ---- server: reconstruct (Sec. 4.2) and decompose (Sec. 4.3) -----------------------------------------------
    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        return self._server_step(global_state, updates, weights, round, rng, noise=None)

    def server_step_private(
        self,
        global_state: State,
        updates: list[Payload],
        weights: list[float],
        round: int,
        rng: torch.Generator,
        memory: State,
        noise_std: float,
        noise_rng: torch.Generator,
    ) -> tuple[Payload, State]:
        """DP (docs/privacy.md, "FedSRD"): ``N(0, noise_std^2)`` on every entry of each module's aggregated product
        W = sum_i p_i B_i A_i (Eq. 9), before the SVD target (Eq. 10) and the decomposition (Eq. 11-13), which are
        post-processing. The noise is full rank, so each module's d_out x d_in matrix is formed, one at a time."""
        return self._server_step(global_state, updates, weights, round, rng, noise=(noise_std, noise_rng)), memory

    def _server_step(
        self,
        global_state: State,
        updates: list[Payload],
        weights: list[float],
        round: int,
        rng: torch.Generator,
        noise: tuple[float, torch.Generator] | None,
    ) -> Payload:
        if not updates:
            raise ValueError("FedSRD.server_step: no client updates to aggregate.")
        if noise is not None and head_keys(global_state):
            raise ValueError("FedSRD: differential privacy is not set up for a classifier's head (dp_mode: off).")

        def target_of(module: LoraModule, a: torch.Tensor, b: torch.Tensor) -> ModuleTarget:
            return ModuleTarget(self.target_change(module, a, b, updates, weights, noise))  # Eq. 9-11, factored

        payload = self.decompose(global_state, target_of, round, rng, {})[0]
        return {**payload, **HeadMean.of(global_state, updates, weights, changes=True)}  # the head's mean change, dense

    def begin_aggregate(self, global_state: State, round: int, rng: torch.Generator, memory: State) -> Aggregation:
        """The server step one update at a time (`server_streaming`): `StreamingTarget`."""
        return StreamingTarget(self, global_state, round, rng, memory)

    def decompose(
        self,
        global_state: State,
        target_of: Callable[[LoraModule, torch.Tensor, torch.Tensor], ModuleTarget],
        round: int,
        rng: torch.Generator,
        memory: State,
    ) -> tuple[Payload, State]:
        """Sec. 4.3 for every module, one at a time: `target_of(module, A, B)` gives that module's dW (Eq. 11), from
        the held updates (`server_step`) or from a streamed aggregate (`StreamingTarget`). Returns the broadcast and
        the server's new memory (none for FedSRD)."""
        payload: Payload = {}
        for module in lora_modules(global_state):
            a, b = global_state[module.a_key].to(torch.float32), global_state[module.b_key].to(torch.float32)
            target = target_of(module, a, b)
            if self.config.download_both_factors:  # our extension: both factors every round (docs/fedsrd.md)
                payload.update(self._both_factors(module, a, b, target.delta_w, rng))
                continue
            moved = self.moving_factor(module, target, a, b, round)
            if moved is not None:
                key, delta = moved
                payload[key] = dare_drop(delta, self.config.download_drop, rng)  # DARE download
        return payload, {}

    def moving_factor(
        self, module: LoraModule, target: ModuleTarget, a: torch.Tensor, b: torch.Tensor, round: int
    ) -> tuple[str, torch.Tensor] | None:
        """Sec. 4.3: the factor `round` moves towards `target` and its least-squares delta (damped by
        `decompose_ridge`): a B-round (`is_b_round`) sends dB = dW A^+ (Eq. 12), an A-round dA = B^+ dW (Eq. 13).
        None in an A-round while B is still zero (never pinv a zero B: the module sends nothing this round)."""
        ridge = self.config.decompose_ridge
        if is_b_round(round):
            return module.b_key, target.left_update(a, ridge)  # Eq. 12
        if bool(b.any()):
            return module.a_key, target.right_update(b, ridge)  # Eq. 13
        return None

    def _both_factors(
        self, module: LoraModule, a: torch.Tensor, b: torch.Tensor, delta_w: Factored, rng: torch.Generator
    ) -> Payload:
        """Both factors' least-squares deltas in one round (not in the paper; `download_both_factors`).

        dB = dW pinv(A) as in a B-round, DARE-dropped; then dA = pinv(B + dB') (dW - dB' A) for what the dropped dB'
        left of the target, so the A update also absorbs part of the B drop's error. Each factor is dropped with
        `download_drop` (0.9 keeps the bytes of one factor at 0.8).
        """
        drop = self.config.download_drop
        dtype = delta_w[0].dtype  # solved in dW's precision (the streamed target's: float64), sent in float32
        a, b = a.to(dtype), b.to(dtype)
        sent_b = dare_drop(solve_left_update(delta_w, a, self.config.decompose_ridge).to(torch.float32), drop, rng)
        payload: Payload = {module.b_key: sent_b}
        dense_b = densify(sent_b).to(dtype)
        b_new = b + dense_b
        if bool(b_new.any()):
            rest = factored_difference(delta_w, (dense_b, a))  # dW - dB' A
            delta_a = solve_right_update(rest, b_new, self.config.decompose_ridge).to(torch.float32)
            payload[module.a_key] = dare_drop(delta_a, drop, rng)
        return payload

    def target_change(
        self,
        module: LoraModule,
        a: torch.Tensor,
        b: torch.Tensor,
        updates: list[Payload],
        weights: list[float],
        noise: tuple[float, torch.Generator] | None = None,
    ) -> Factored:
        """dW = W_target - B A as a factor pair (Eq. 9-11), for one module; with `noise` (std, generator), W gets
        Gaussian noise on every entry first (differential privacy)."""
        # a factor a client did not send (train_one_factor: the frozen one) did not change
        deltas_b = [densify(u[module.b_key]) if module.b_key in u else torch.zeros_like(b) for u in updates]
        deltas_a = [densify(u[module.a_key]) if module.a_key in u else torch.zeros_like(a) for u in updates]
        if any(d.shape[0] != a.shape[0] for d in deltas_a):  # clients of different ranks (never with DP: config)
            return self._unequal_rank_change(a, b, deltas_b, deltas_a, weights)
        if noise is not None:  # W + Z, dense: Z is full rank (docs/privacy.md, "FedSRD")
            aggregate = stack_factors([b + d for d in deltas_b], [a + d for d in deltas_a], weights)
            d_out, d_in = b.shape[0], a.shape[1]
            noisy = aggregate[0] @ aggregate[1] + gaussian_like((d_out, d_in), noise[0], noise[1])
            # the dense matrix as a factor pair with an identity on its smaller side
            pair = (noisy, torch.eye(d_in)) if d_in <= d_out else (torch.eye(d_out), noisy)
            target = truncated_svd(*pair, rank=a.shape[0]) if self.use_svd else pair  # Eq. 10 (FedSRD-e: W itself)
            return factored_difference(target, (b, a))  # Eq. 11
        if self.use_svd:
            # Eq. 9: W = sum_i p_i (B + dB_i)(A + dA_i); Eq. 10: W_target = the rank-r truncated SVD of W, by the
            # cheaper of the factored and the dense path for this module's shape and m (`server_step_path`)
            clients_b = [b + d for d in deltas_b]
            clients_a = [a + d for d in deltas_a]
            aggregate = stack_factors(clients_b, clients_a, weights)
            target = cheapest_truncated_svd(*aggregate, rank=a.shape[0], path=self.config.server_step_path)
            return factored_difference(target, (b, a))  # Eq. 11: dW = W_target - B A
        # FedSRD-e: W_target = W, so dW = sum_i p_i (B_i A_i - B A) + (sum_i p_i - 1) B A, and
        # B_i A_i - B A = dB_i A + (B + dB_i) dA_i exactly: no large B A is cancelled against itself.
        lefts = [t for d in deltas_b for t in (d, b + d)]
        rights = [t for d in deltas_a for t in (a, d)]
        term_weights = [w for w in weights for _ in (0, 1)]
        total = sum(weights)
        if total != 1.0:
            lefts, rights, term_weights = [*lefts, b], [*rights, a], [*term_weights, total - 1.0]
        return stack_factors(lefts, rights, term_weights)

    def _unequal_rank_change(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        deltas_b: list[torch.Tensor],
        deltas_a: list[torch.Tensor],
        weights: list[float],
    ) -> Factored:
        """dW for clients of different ranks r_i <= r (`client_lora_ranks`).

        Client i trained from B_i^0, A_i^0 (`rank_start`: the first r_i components of the global factors,
        B[:, :r_i] and A[:r_i], or the best rank-r_i approximation of B A), and its product moved by
        B_i A_i - B_i^0 A_i^0 = dB_i A_i^0 + (B_i^0 + dB_i) dA_i. The server sums these *changes*:
        W = (sum_i p_i) B A + sum_i p_i (B_i A_i - B_i^0 A_i^0), so what a client could not hold is not pulled to zero
        by it; with equal ranks this is Eq. 9. FedSRD then takes the rank-r SVD of W (Eq. 10)
        and dW = W_target - B A (Eq. 11); FedSRD-e uses dW = W - B A.
        """
        lefts, rights, term_weights, starts = [], [], [], {}
        for delta_b, delta_a, weight in zip(deltas_b, deltas_a, weights, strict=True):
            rank = delta_a.shape[0]
            if rank not in starts:  # what a client of this rank trained from (`rank_start`)
                starts[rank] = self.start_factors(b, a, rank)
            b_start, a_start = starts[rank]
            lefts += [delta_b, b_start + delta_b]
            rights += [a_start, delta_a]
            term_weights += [weight, weight]
        total = sum(weights)  # 1 unless a robust rule combined the updates
        if not self.use_svd:  # dW = W - B A = sum_i p_i (B_i A_i - B_i^0 A_i^0) + (sum_i p_i - 1) B A
            if total != 1.0:
                lefts, rights, term_weights = [*lefts, b], [*rights, a], [*term_weights, total - 1.0]
            return stack_factors(lefts, rights, term_weights)
        aggregate = stack_factors([b, *lefts], [a, *rights], [total, *term_weights])  # W
        target = cheapest_truncated_svd(*aggregate, rank=a.shape[0], path=self.config.server_step_path)
        return factored_difference(target, (b, a))  # Eq. 10-11

    # ---- bounding one client's influence (docs/reliability.md, "FedSRD: the product change") ----------------------
    def update_norm(self, global_state: State, update: Payload) -> float:
        """``sqrt(sum_modules ||(B + dB_i)(A + dA_i) - B A||_F^2)``: the change client i proposes to the products the
        server aggregates (Eq. 9), from the factors alone."""
        return scaled_norm(self._product_terms(global_state, update), 1.0)

    def clip_update(self, global_state: State, update: Payload, max_norm: float) -> Payload:
        """`update` with both factor deltas scaled by the one ``s`` in [0, 1] that brings its product change to at most
        `max_norm` (positions of sparse deltas kept)."""
        # 1e-6 below the bound: the scaled deltas are rounded to float32
        scale = largest_scale_within(self._product_terms(global_state, update), max_norm * (1 - 1e-6))
        if scale >= 1.0:
            return update
        out: Payload = {}
        for key, value in update.items():
            if isinstance(value, SparseTensor):
                out[key] = SparseTensor(shape=value.shape, indices=value.indices, values=value.values * scale,
                                        mask=value.mask)
            else:
                out[key] = value.to(torch.float32) * scale
        return out

    def _product_terms(self, global_state: State, update: Payload) -> list[Terms]:
        terms = []
        for module in lora_modules(global_state):
            if module.a_key not in update and module.b_key not in update:
                continue
            a, b = global_state[module.a_key].to(torch.float32), global_state[module.b_key].to(torch.float32)
            present = update[module.a_key] if module.a_key in update else update[module.b_key]
            rank = present.shape[0] if module.a_key in update else present.shape[1]
            b, a = self.start_factors(b, a, rank)  # what a client of rank r_i trained from (`rank_start`)
            delta_a = densify(update[module.a_key]) if module.a_key in update else torch.zeros_like(a)
            delta_b = densify(update[module.b_key]) if module.b_key in update else torch.zeros_like(b)
            terms.append(product_change_terms(a, b, delta_a, delta_b))
        return terms + head_change_terms(global_state, update, uploads_deltas=True)  # a classifier's head

    # ---- clients of different ranks: what a client trains from (`rank_start`) --------------------------------------
    def start_factors(self, b: torch.Tensor, a: torch.Tensor, rank: int) -> Factored:
        """A rank-`rank` client's start factors of one module (`rank_start_factors` under `rank_start`)."""
        return rank_start_factors(b.to(torch.float32), a.to(torch.float32), rank, self.config.rank_start)

    def client_start_state(self, global_state: State, rank: int) -> State:
        start = super().client_start_state(global_state, rank)  # the slice; other tensors as they are
        if self.config.rank_start == "slice":
            return start
        for module in lora_modules(global_state):
            b, a = self.start_factors(global_state[module.b_key], global_state[module.a_key], rank)
            start[module.b_key], start[module.a_key] = b, a
        return start

    def client_download(self, broadcast: Payload, rank: int) -> Payload:
        """The slice of the broadcast (`rank_start` 'slice'), or all of it: the best rank-r approximation of the next
        B A depends on every component."""
        return super().client_download(broadcast, rank) if self.config.rank_start == "slice" else dict(broadcast)

    # ---- both roles ------------------------------------------------------------------------------------------
    def apply(self, state: State, broadcast: Payload) -> State:
        new_state = dict(state)
        for key, delta in broadcast.items():
            if key not in state:
                raise KeyError(f"FedSRD.apply: broadcast tensor {key!r} is not in the global state.")
            dense = densify(delta)
            if tuple(dense.shape) != tuple(state[key].shape):
                raise ValueError(
                    f"FedSRD.apply: broadcast tensor {key!r} has shape {tuple(dense.shape)}, "
                    f"expected {tuple(state[key].shape)}."
                )
            new_state[key] = state[key].to(torch.float32) + dense  # B += dB_s or A += dA_s
        return new_state

    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {**lora_shapes(global_state), **head_shapes(global_state)}

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {**lora_shapes(global_state), **head_shapes(global_state)}

    def broadcast_is_partial(self) -> bool:
        return True


@register_algorithm
class FedSRDe(FedSRD):
    """FedSRD-e: FedSRD without the rank-r SVD; the least-squares target is the full aggregate W (Sec. 4.3)."""

    name = "fedsrd_e"
    downloads = "one factor's least-squares delta toward the full aggregate (no SVD), DARE-dropped (80% sparse)"
    use_svd = False
    trains_dense_head = True  # FedSRD's round


class StreamingTarget(Aggregation):
    """FedSRD's server step one update at a time (`server_streaming`): each update is folded into a per-module
    aggregate of fixed size and released, so the server's memory does not grow with the number of clients.

    With normalised weights p_i (sum 1), Eq. 9's aggregate splits into running sums and one term that is not one:

        W = sum_i p_i (B + dB_i)(A + dA_i) = B (A + dA_bar) + dB_bar A + C,   C = sum_i p_i dB_i dA_i,

    dB_bar = sum_i p_i dB_i and dA_bar likewise (exact running sums, r (d_out + d_in) floats). C has rank up to m r:

    * FedSRD-e's solve needs only C pinv(A) (B-rounds, d_out x r) or pinv(B) C (A-rounds, r x d_in): running sums
      too, so FedSRD-e streams **exactly** (to float32 rounding);
    * FedSRD's rank-r SVD (Eq. 10) needs C itself: it is kept as a one-pass sketch (`fedsrd.ops.sketch`, Tropp et
      al., SIAM J. Matrix Anal. Appl. 2017) with k = r + `sketch_oversampling` Gaussian range directions plus the
      span of the factor this round solves against (A's rows in B-rounds; B's columns in A-rounds, sketching C^T), and
      2k + 1 Gaussian co-range directions plus the other factor's span. The sketch is exact along the solved-against
      factor, so only C's remaining directions are approximated. The target is then the exact rank-r SVD of
      ``[B, dB_bar, Q] [A + dA_bar; A; X]`` (inner size 2 r + k' only), taken in float64 (`finish_dtype`) with the
      difference dW = W_r - B A and its solve: dW is small against B A, and float32 rounding of that step alone was
      up to 1e-3 of dW on a 3072 x 3072 module, more than the sketch's own error (the folds stay float32).

    `download_both_factors` needs dW itself, so it uses the sketch for FedSRD-e too. Memory per module, whatever m is:
    r (d_out + d_in) for the running sums plus 2 (k' + l')(d_out + d_in) for sketches and test matrices, with
    k' = 2 r + sketch_oversampling and l' = 3 r + 2 sketch_oversampling + 1; the batch step holds the m updates and
    their stacked factors, about 3 m r (d_out + d_in).
    """

    finish_dtype = torch.float64  # the precision of the target, the difference and the solve (the broadcast: float32)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        algorithm: FedSRD = self.algorithm  # type: ignore[assignment]
        cfg = algorithm.config
        self.modules = lora_modules(self.global_state)
        self.b_round = is_b_round(self.round)
        self.sketched = algorithm.use_svd or cfg.download_both_factors
        generator = generator_for(cfg.seed, "server_sketch", self.round)  # test matrices: seeded, never the step rng
        self.parts: dict[str, dict[str, Any]] = {}
        self.head = HeadMean(self.global_state, changes=True)  # a classifier's head: running sums of its changes
        for module in self.modules:
            a = self.global_state[module.a_key].to(torch.float32)
            b = self.global_state[module.b_key].to(torch.float32)
            part: dict[str, Any] = {"sum_b": torch.zeros_like(b), "sum_a": torch.zeros_like(a)}
            if self.sketched:
                d_out, r, d_in = b.shape[0], a.shape[0], a.shape[1]
                k = min(r + cfg.sketch_oversampling, d_out, d_in)
                # B-rounds solve dW pinv(A): sketch C with A's row space among the range test directions, so the
                # sketch is exact along it; A-rounds solve pinv(B) dW: sketch C^T with B's column space likewise.
                rows, cols = (d_out, d_in) if self.b_round else (d_in, d_out)
                known_range, known_corange = (a.T, b) if self.b_round else (b, a.T)
                part["sketch"] = OnePassSketch(
                    rows, cols, k, max(k, min(recommended_corange_size(k), rows)), generator,
                    range_basis=orthonormal_basis(known_range), corange_basis=orthonormal_basis(known_corange),
                )  # fmt: skip
            elif self.b_round:
                part["solve"] = left_solve_matrix(a, cfg.decompose_ridge)  # pinv(A), d_in x r
                part["cross"] = torch.zeros_like(b)
            else:
                part["solve"] = right_solve_matrix(b, cfg.decompose_ridge)  # pinv(B), r x d_out
                part["cross"] = torch.zeros_like(a)
            self.parts[module.name] = part

    def fold(self, update: Payload, weight: float) -> None:
        self._check_weight(weight)
        terms = []  # every module's terms first: an update that fails changes nothing
        for module in self.modules:
            part = self.parts[module.name]
            # a factor a client did not send (train_one_factor: the frozen one) did not change
            delta_b = densify(update[module.b_key]) if module.b_key in update else torch.zeros_like(part["sum_b"])
            delta_a = densify(update[module.a_key]) if module.a_key in update else torch.zeros_like(part["sum_a"])
            if delta_b.shape != part["sum_b"].shape or delta_a.shape != part["sum_a"].shape:
                raise ValueError(f"FedSRD: update of module {module.name!r} has dB {tuple(delta_b.shape)} and dA "
                                 f"{tuple(delta_a.shape)}, expected {tuple(part['sum_b'].shape)} and "
                                 f"{tuple(part['sum_a'].shape)}.")
            if self.sketched:  # (dB_i dA_i) Omega and Psi (dB_i dA_i), or those of (dB_i dA_i)^T in A-rounds
                pair = (delta_b, delta_a) if self.b_round else (delta_a.T, delta_b.T)
                cross = part["sketch"].contribution(*pair)
            elif self.b_round:
                cross = delta_b @ (delta_a @ part["solve"])  # dB_i dA_i pinv(A)
            else:
                cross = (part["solve"] @ delta_b) @ delta_a  # pinv(B) dB_i dA_i
            terms.append((part, delta_b, delta_a, cross))
        head = self.head.check(update)
        self.head.add(head, weight)
        for part, delta_b, delta_a, cross in terms:
            part["sum_b"].add_(delta_b, alpha=weight)
            part["sum_a"].add_(delta_a, alpha=weight)
            if self.sketched:
                part["sketch"].add(cross, weight)
            else:
                part["cross"].add_(cross, alpha=weight)
        self.weights.append(float(weight))

    def finish(self) -> tuple[Payload, State]:
        scale = 1.0 / self._total_weight()  # the weights normalised at the end
        algorithm: FedSRD = self.algorithm  # type: ignore[assignment]

        def target_of(module: LoraModule, a: torch.Tensor, b: torch.Tensor) -> ModuleTarget:
            part = self.parts.pop(module.name)  # released once used
            mean_b, mean_a = part["sum_b"] * scale, part["sum_a"] * scale  # dB_bar, dA_bar
            if not self.sketched:  # FedSRD-e: dW = B dA_bar + dB_bar A + C, C's solve already accumulated
                return ModuleTarget((torch.cat([b, mean_b], 1), torch.cat([mean_a, a], 0)), part["cross"] * scale)
            q, x = part.pop("sketch").reconstruct()  # C ~ Q X (A-rounds: C^T ~ Q X); the sketch is released here
            if not self.b_round:
                q, x = x.T, q.T
            # the rest in float64: dW = W_r - B A cancels B A, and float32 rounding of the large B A (relative 1e-7 of
            # it) is up to 1e-3 of the small dW; the float32 sketch itself was not the limit (docs/fedsrd.md)
            dtype = self.finish_dtype
            q, x, b, a, mean_b, mean_a = (t.to(dtype) for t in (q, x, b, a, mean_b, mean_a))
            if not algorithm.use_svd:
                return ModuleTarget((torch.cat([b, mean_b, q], 1), torch.cat([mean_a, a, x * scale], 0)))
            aggregate = (torch.cat([b, mean_b, q], 1), torch.cat([a + mean_a, a, x * scale], 0))  # Eq. 9, streamed
            target = cheapest_truncated_svd(*aggregate, rank=a.shape[0], path=algorithm.config.server_step_path)
            return ModuleTarget(factored_difference(target, (b, a)))  # Eq. 10-11

        payload, memory = algorithm.decompose(self.global_state, target_of, self.round, self.rng, self.memory)
        return {**payload, **self.head.mean(self._total_weight())}, memory  # the head's weighted mean change, dense


__all__ = [
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "FedSRD",
    "FedSRDOptions",
    "RANK_STARTS",
    "rank_start_factors",
    "FedSRDe",
    "LoraModule",
    "ModuleTarget",
    "StreamingTarget",
    "lora_modules",
]
