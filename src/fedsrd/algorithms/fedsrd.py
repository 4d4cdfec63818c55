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

Nothing here forms a d_out x d_in matrix: W is kept as the factor pair ([p_i B_i], [A_i]) (`fedsrd.ops.lowrank`).
Resolved ambiguities follow docs/specs (fedsrd.md, sec. 5): B-round first, dW against the current global factors,
Pearson kurtosis with rho <= 0.99, keep score >= tau, L1 rescale on by default, sparse delta added to the global state.
The knobs are `FedSRDOptions`; the LoRA helpers (`lora_modules`) live in `fedsrd.algorithms.families`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Algorithm, AlgorithmOptions, Payload, State, require_option
from fedsrd.algorithms.families import LORA_A_SUFFIX, LORA_B_SUFFIX, LoraModule, lora_modules, lora_shapes
from fedsrd.ops.lowrank import (
    Factored,
    factored_difference,
    solve_left_update,
    solve_right_update,
    stack_factors,
    truncated_svd,
)
from fedsrd.ops.privacy import gaussian_like
from fedsrd.ops.robust import Terms, largest_scale_within, product_change_terms, scaled_norm
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
    supports_unequal_ranks = True  # `_unequal_rank_change`; each client downloads its rank's slice of the delta
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

    # ---- train_one_factor (not in the paper): the local phase trains the factor the round's download updates ----
    def trains(self, name: str, round: int) -> bool:
        """Every LoRA factor (the paper); with ``train_one_factor`` only this round's factor: B in odd rounds,
        A in even rounds, as the server's one-factor decomposition (Eq. 12-13) and RoLoRA alternate."""
        if not self.config.train_one_factor:
            return self.trainable(name)
        return ("lora_B" if round % 2 == 1 else "lora_A") in name

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
        b_round = round % 2 == 1  # paper: rounds 1..T, odd -> B-round (B^0 = 0, so B first), even -> A-round
        payload: Payload = {}
        for module in lora_modules(global_state):
            a, b = global_state[module.a_key].to(torch.float32), global_state[module.b_key].to(torch.float32)
            delta_w = self.target_change(module, a, b, updates, weights, noise)  # Eq. 9-11, factored
            if self.config.download_both_factors:  # our extension: both factors every round (docs/fedsrd.md)
                payload.update(self._both_factors(module, a, b, delta_w, rng))
                continue
            if b_round:
                key, delta = module.b_key, solve_left_update(delta_w, a, self.config.decompose_ridge)  # Eq. 12
            elif bool(b.any()):
                key, delta = module.a_key, solve_right_update(delta_w, b, self.config.decompose_ridge)  # Eq. 13
            else:
                continue  # never pinv a zero B: this module sends nothing this round
            payload[key] = dare_drop(delta, self.config.download_drop, rng)  # DARE download
        return payload

    def _both_factors(
        self, module: LoraModule, a: torch.Tensor, b: torch.Tensor, delta_w: Factored, rng: torch.Generator
    ) -> Payload:
        """Both factors' least-squares deltas in one round (not in the paper; `download_both_factors`).

        dB = dW pinv(A) as in a B-round, DARE-dropped; then dA = pinv(B + dB') (dW - dB' A) for what the dropped dB'
        left of the target, so the A update also absorbs part of the B drop's error. Each factor is dropped with
        `download_drop` (0.9 keeps the bytes of one factor at 0.8).
        """
        drop = self.config.download_drop
        sent_b = dare_drop(solve_left_update(delta_w, a, self.config.decompose_ridge), drop, rng)
        payload: Payload = {module.b_key: sent_b}
        dense_b = densify(sent_b)
        b_new = b + dense_b
        if bool(b_new.any()):
            rest = factored_difference(delta_w, (dense_b, a))  # dW - dB' A
            delta_a = solve_right_update(rest, b_new, self.config.decompose_ridge)
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
            # Eq. 9: W = sum_i p_i (B + dB_i)(A + dA_i); Eq. 10: W_target = the rank-r truncated SVD of W
            clients_b = [b + d for d in deltas_b]
            clients_a = [a + d for d in deltas_a]
            aggregate = stack_factors(clients_b, clients_a, weights)
            target = truncated_svd(*aggregate, rank=a.shape[0])
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

        Client i trained from the first r_i components of the global factors, B_i^0 = B[:, :r_i], A_i^0 = A[:r_i],
        and its product moved by B_i A_i - B_i^0 A_i^0 = dB_i A_i^0 + (B_i^0 + dB_i) dA_i. The server sums these
        *changes*: W = (sum_i p_i) B A + sum_i p_i (B_i A_i - B_i^0 A_i^0), so the components a client could not hold
        are not pulled to zero by it; with equal ranks this is Eq. 9. FedSRD then takes the rank-r SVD of W (Eq. 10)
        and dW = W_target - B A (Eq. 11); FedSRD-e uses dW = W - B A.
        """
        lefts, rights, term_weights = [], [], []
        for delta_b, delta_a, weight in zip(deltas_b, deltas_a, weights, strict=True):
            rank = delta_a.shape[0]
            b_start, a_start = b[:, :rank], a[:rank]  # what client i trained from
            lefts += [delta_b, b_start + delta_b]
            rights += [a_start, delta_a]
            term_weights += [weight, weight]
        total = sum(weights)  # 1 unless a robust rule combined the updates
        if not self.use_svd:  # dW = W - B A = sum_i p_i (B_i A_i - B_i^0 A_i^0) + (sum_i p_i - 1) B A
            if total != 1.0:
                lefts, rights, term_weights = [*lefts, b], [*rights, a], [*term_weights, total - 1.0]
            return stack_factors(lefts, rights, term_weights)
        aggregate = stack_factors([b, *lefts], [a, *rights], [total, *term_weights])  # W
        return factored_difference(truncated_svd(*aggregate, rank=a.shape[0]), (b, a))  # Eq. 10-11

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
            a, b = a[:rank], b[:, :rank]  # a client of rank r_i changed the first r_i components
            delta_a = densify(update[module.a_key]) if module.a_key in update else torch.zeros_like(a)
            delta_b = densify(update[module.b_key]) if module.b_key in update else torch.zeros_like(b)
            terms.append(product_change_terms(a, b, delta_a, delta_b))
        return terms

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
        return lora_shapes(global_state)

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return lora_shapes(global_state)

    def broadcast_is_partial(self) -> bool:
        return True


@register_algorithm
class FedSRDe(FedSRD):
    """FedSRD-e: FedSRD without the rank-r SVD; the least-squares target is the full aggregate W (Sec. 4.3)."""

    name = "fedsrd_e"
    downloads = "one factor's least-squares delta toward the full aggregate (no SVD), DARE-dropped (80% sparse)"
    use_svd = False


__all__ = ["LORA_A_SUFFIX", "LORA_B_SUFFIX", "FedSRD", "FedSRDOptions", "FedSRDe", "LoraModule", "lora_modules"]
