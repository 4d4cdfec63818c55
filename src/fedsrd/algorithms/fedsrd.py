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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Algorithm, Payload, State
from fedsrd.ops.lowrank import (
    Factored,
    cheapest_truncated_svd,
    factored_difference,
    solve_left_update,
    solve_right_update,
    stack_factors,
)
from fedsrd.ops.robust import Terms, largest_scale_within, product_change_terms, scaled_norm
from fedsrd.ops.sparse import SparseTensor
from fedsrd.ops.sparsify import dare_drop, importance_prune, importance_scores_a, importance_scores_b

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoraModule:
    """The state keys of one adapted layer's LoRA factors."""

    name: str
    a_key: str  # A: r x d_in
    b_key: str  # B: d_out x r


def lora_modules(state: State) -> list[LoraModule]:
    """The LoRA modules of a PEFT adapter state (keys without adapter name), sorted by module name."""
    a_names, b_names = set(), set()
    for key in state:
        if key.endswith(LORA_A_SUFFIX):
            a_names.add(key[: -len(LORA_A_SUFFIX)])
        elif key.endswith(LORA_B_SUFFIX):
            b_names.add(key[: -len(LORA_B_SUFFIX)])
        elif "lora_A" in key or "lora_B" in key:
            raise ValueError(
                f"FedSRD: state key {key!r} names a LoRA factor but does not end in {LORA_A_SUFFIX!r} or "
                f"{LORA_B_SUFFIX!r} (expected PEFT adapter keys without the adapter name)."
            )
    unpaired = sorted(a_names ^ b_names)
    if unpaired:
        raise ValueError(f"FedSRD: LoRA module {unpaired[0]!r} has only one of lora_A/lora_B in the state.")
    modules = [LoraModule(n, n + LORA_A_SUFFIX, n + LORA_B_SUFFIX) for n in sorted(a_names)]
    for module in modules:
        a, b = state[module.a_key], state[module.b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"FedSRD: module {module.name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected A r x d_in and B d_out x r (linear LoRA layers only)."
            )
    return modules


def _lora_shapes(state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every LoRA factor of the state, which may travel sparse."""
    keys = [key for module in lora_modules(state) for key in (module.a_key, module.b_key)]
    return {key: (tuple(state[key].shape), True) for key in keys}


def _dense(value: torch.Tensor | SparseTensor) -> torch.Tensor:
    if isinstance(value, SparseTensor):
        return value.to_dense(torch.float32)
    return value.to(torch.float32)


@register_algorithm
class FedSRD(Algorithm):
    """FedSRD: importance-pruned upload, product aggregation, rank-r SVD target, alternating one-factor download."""

    name = "fedsrd"
    uploads_deltas = True
    paper = "FedSRD (Yan et al., WWW 2026; arXiv 2510.04601)"
    uploads = "LoRA deltas dA, dB, importance-pruned (~95% sparse, adaptive per matrix)"
    downloads = "one factor's least-squares delta per round (B odd rounds, A even), DARE-dropped (80% sparse)"

    use_svd = True  # FedSRD-e: False
    # Clipping only, of each client's *product* change (`update_norm`): a coordinate-wise median of factor deltas has
    # no meaning for the aggregated products.
    robust_defences = frozenset({"clip"})

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
            score_b = importance_scores_b(delta_b, a)  # Eq. 6: |dB[u,v]| * ||A^{t-1}[v,:]||
            score_a = importance_scores_a(delta_a, b_new)  # Eq. 6: |dA[u,v]| * ||B_i'[:,u]||
            upload[module.b_key] = importance_prune(delta_b, score_b, **prune)  # Eq. 7-8 (+ L1 rescale)
            upload[module.a_key] = importance_prune(delta_a, score_a, **prune)
        return upload

    # ---- server: reconstruct (Sec. 4.2) and decompose (Sec. 4.3) -----------------------------------------------
    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        if not updates:
            raise ValueError("FedSRD.server_step: no client updates to aggregate.")
        b_round = round % 2 == 1  # paper: rounds 1..T, odd -> B-round (B^0 = 0, so B first), even -> A-round
        payload: Payload = {}
        for module in lora_modules(global_state):
            a, b = global_state[module.a_key].to(torch.float32), global_state[module.b_key].to(torch.float32)
            delta_w = self.target_change(module, a, b, updates, weights)  # Eq. 9-11, factored
            if self.config.download_both_factors:  # our extension: both factors every round (docs/fedsrd.md)
                payload.update(self._both_factors(module, a, b, delta_w, rng))
                continue
            if b_round:
                key, delta = module.b_key, solve_left_update(delta_w, a, self.config.decompose_ridge)  # Eq. 12
            elif bool(b.any()):
                key, delta = module.a_key, solve_right_update(delta_w, b, self.config.decompose_ridge)  # Eq. 13
            else:
                continue  # never pinv a zero B: this module sends nothing this round
            payload[key] = self._on_wire(dare_drop(delta, self.config.download_drop, rng))  # DARE download
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
        sent_b = self._on_wire(dare_drop(solve_left_update(delta_w, a, self.config.decompose_ridge), drop, rng))
        payload: Payload = {module.b_key: sent_b}
        dense_b = _dense(sent_b)
        b_new = b + dense_b
        if bool(b_new.any()):
            rest = factored_difference(delta_w, (dense_b, a))  # dW - dB' A
            delta_a = solve_right_update(rest, b_new, self.config.decompose_ridge)
            payload[module.a_key] = self._on_wire(dare_drop(delta_a, drop, rng))
        return payload

    def target_change(
        self, module: LoraModule, a: torch.Tensor, b: torch.Tensor, updates: list[Payload], weights: list[float]
    ) -> Factored:
        """dW = W_target - B A as a factor pair (Eq. 9-11), for one module."""
        deltas_b = [_dense(u[module.b_key]) for u in updates]
        deltas_a = [_dense(u[module.a_key]) for u in updates]
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
            delta_a = _dense(update[module.a_key]) if module.a_key in update else torch.zeros_like(a)
            delta_b = _dense(update[module.b_key]) if module.b_key in update else torch.zeros_like(b)
            terms.append(product_change_terms(a, b, delta_a, delta_b))
        return terms

    def _on_wire(self, delta: SparseTensor) -> SparseTensor:
        """The delta as clients will decode it: values rounded to the wire dtype, so server and clients stay equal."""
        wire_dtype = _WIRE_DTYPES.get(self.config.value_dtype, torch.float32)
        values = delta.values.to(wire_dtype).to(torch.float32)
        return SparseTensor(shape=delta.shape, indices=delta.indices, values=values, mask=delta.mask)

    # ---- both roles ------------------------------------------------------------------------------------------
    def apply(self, state: State, broadcast: Payload) -> State:
        new_state = dict(state)
        for key, delta in broadcast.items():
            if key not in state:
                raise KeyError(f"FedSRD.apply: broadcast tensor {key!r} is not in the global state.")
            dense = _dense(delta)
            if tuple(dense.shape) != tuple(state[key].shape):
                raise ValueError(
                    f"FedSRD.apply: broadcast tensor {key!r} has shape {tuple(dense.shape)}, "
                    f"expected {tuple(state[key].shape)}."
                )
            new_state[key] = state[key].to(torch.float32) + dense  # B += dB_s or A += dA_s
        return new_state

    def update_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return _lora_shapes(global_state)

    def broadcast_shapes(self, global_state: State) -> dict[str, tuple[tuple[int, ...], bool]]:
        return _lora_shapes(global_state)

    def broadcast_is_partial(self) -> bool:
        return True


@register_algorithm
class FedSRDe(FedSRD):
    """FedSRD-e: FedSRD without the rank-r SVD; the least-squares target is the full aggregate W (Sec. 4.3)."""

    name = "fedsrd_e"
    downloads = "one factor's least-squares delta toward the full aggregate (no SVD), DARE-dropped (80% sparse)"
    use_svd = False
