"""FedSRD-EF: FedSRD with error feedback on both links (this library's variant; `fedsrd` stays the paper's method).

FedSRD (Yan et al., WWW 2026; `fedsrd.algorithms.fedsrd`) loses information twice per round, and never recovers it:

* the upload keeps only the most important ~5% of each LoRA delta (Eq. 6-8); the rest of the client's progress is
  gone, because the client starts its next round from the new global state;
* the download drops 80% of the least-squares factor update at random (DARE, survivors x 5): unbiased, but the
  dropped part is gone for the same reason, and the x5 rescale adds variance.

Error feedback (Seide et al., Interspeech 2014; Stich et al., NeurIPS 2018; Karimireddy et al., ICML 2019) keeps
what a compressor removed and adds it to the next message, so every bit of progress is sent eventually:

* **upload** (``ef_upload``): client i keeps ``e_i = (delta_i + e_i_old) - sent_i``, where ``sent_i`` is the pruned
  message as the server decodes it (values rounded to the wire dtype), and adds ``e_i`` to the delta of its next
  upload. A client that is not sampled keeps its residual until it trains again. No L1 rescale: the residual carries
  the mass that the rescale would approximate.
* **download** (``ef_download``): the server keeps ``R_k = (delta_k + R_k_old) - sent_k`` for each factor k it
  broadcasts, and adds ``R_k`` to factor k's next delta (B's in B-rounds, A's in A-rounds). Survivors are sent
  unscaled. Positions still travel as the mask's seed, so the download costs the same bytes as FedSRD's.
  With ``ef_download_selection = "magnitude"`` the largest ``1 - download_drop`` of the entries are sent instead
  (positions travel explicitly): random selection with error feedback sends each entry about once per
  ``1 / (1 - p)`` of that factor's rounds, so in a short run it lags; the largest entries carry most of the change.

Residuals never travel; they are checkpointed with the run (clients' under ``memory/``, the server's under
``server_memory/``). Everything else (reconstruction, SVD target, alternating least-squares factor, wire format) is
FedSRD's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedsrd.algorithms import register_algorithm
from fedsrd.algorithms.base import Payload, State, require_option
from fedsrd.algorithms.families import LoraModule, lora_modules
from fedsrd.algorithms.fedsrd import FedSRD, FedSRDOptions, ModuleTarget
from fedsrd.ops import SparseTensor, round_to_dtype
from fedsrd.ops.lowrank import factored_difference, truncated_svd
from fedsrd.ops.sparsify import (
    dare_drop,
    importance_prune,
    importance_scores_a,
    importance_scores_b,
    magnitude_keep,
)

EF_DOWNLOAD_SELECTIONS = ("random", "magnitude")
EF_DOWNLOAD_SPACES = ("factor", "product")


@dataclass
class FedSRDEFOptions(FedSRDOptions):
    """fedsrd_ef: FedSRD's options plus the two error-feedback switches and how the download's survivors are chosen."""

    ef_upload: bool = field(
        default=True,
        metadata={
            "help": "fedsrd_ef: each client keeps what importance pruning removed from its upload and adds it "
            "to its next upload's delta (no L1 rescale: the kept residual carries that mass)."
        },
    )
    ef_download: bool = field(
        default=True,
        metadata={
            "help": "fedsrd_ef: the server keeps what the random drop removed from the broadcast and adds it to "
            "that factor's next delta (survivors are not scaled by 1/(1-p))."
        },
    )
    ef_download_selection: str = field(
        default="random",
        metadata={
            "help": "fedsrd_ef: which 1 - download_drop of the broadcast delta (plus residual) is sent: 'random' "
            "(seeded mask, no position bytes, as FedSRD) or 'magnitude' (the largest entries; positions sent)."
        },
    )
    ef_download_space: str = field(
        default="factor",
        metadata={
            "help": "fedsrd_ef: where the download's residual is kept: 'factor' (what the drop removed from the sent "
            "factor, survivors unscaled) or 'product' (ours: the part of the round's target W_target - B A that the "
            "broadcast did not apply, as a rank-capped factor pair added to the next round's target; survivors "
            "scaled by 1/(1-p) as in FedSRD, so the broadcast stays unbiased and the residual only corrects it)."
        },
    )
    ef_residual_rank: int = field(
        default=0,
        metadata={
            "help": "fedsrd_ef with ef_download_space 'product': rank of the kept product-space residual per module "
            "(its best rank-k approximation is kept; 0: twice lora_r)."
        },
    )

    @staticmethod
    def validate(config) -> None:
        selection = config.ef_download_selection
        require_option(
            config, selection in EF_DOWNLOAD_SELECTIONS, "ef_download_selection",
            f"must be one of {EF_DOWNLOAD_SELECTIONS}, got {selection!r}",
        )  # fmt: skip
        space = config.ef_download_space
        require_option(
            config, space in EF_DOWNLOAD_SPACES, "ef_download_space",
            f"must be one of {EF_DOWNLOAD_SPACES}, got {space!r}",
        )  # fmt: skip
        require_option(
            config, space == "factor" or selection == "random", "ef_download_space",
            "'product' keeps FedSRD's unbiased random drop; set ef_download_selection 'random'",
        )  # fmt: skip
        require_option(
            config, config.ef_residual_rank >= 0, "ef_residual_rank",
            f"must be >= 0 (0: twice lora_r), got {config.ef_residual_rank}",
        )  # fmt: skip
        require_option(
            config,
            not (config.download_both_factors and getattr(config, "algorithm", "fedsrd_ef") == "fedsrd_ef"
                 and config.ef_download),
            "download_both_factors",
            "is not combined with fedsrd_ef's download error feedback; use fedsrd or fedsrd_e, or ef_download false",
        )  # fmt: skip


@register_algorithm
class FedSRDEF(FedSRD):
    """FedSRD with error feedback: pruned upload entries and dropped download entries are kept and sent later."""

    name = "fedsrd_ef"
    paper = "FedSRD (Yan et al., WWW 2026) + error feedback on both links (this library; Karimireddy et al., ICML 2019)"
    uploads = "LoRA deltas plus the client's kept residual, importance-pruned (no L1 rescale)"
    downloads = "one factor's least-squares delta plus the server's kept residual, random-dropped (seeded, unscaled)"
    dp_support = frozenset()
    random_upload_mask = False  # error feedback's own importance-pruned upload
    dp_refusal = ("error feedback's uploads carry residuals of earlier rounds and its server step keeps its own "
                  "residual; this library has not derived or implemented DP for it (use fedsrd or fedsrd_e)")
    options = FedSRDEFOptions
    supports_unequal_ranks = False  # the kept residuals have the global rank's shapes

    # ---- client ------------------------------------------------------------------------------------------------
    def client_update(self, global_state: State, local_state: State, round: int, rng: torch.Generator) -> Payload:
        return self.client_update_with_memory(global_state, local_state, {}, round, rng)[0]

    def client_update_with_memory(
        self, global_state: State, local_state: State, memory: State, round: int, rng: torch.Generator
    ) -> tuple[Payload, State]:
        if not self.config.ef_upload:
            return super().client_update(global_state, local_state, round, rng), {}
        cfg = self.config
        prune = {"alpha": cfg.upload_sparsity_alpha, "coeff": cfg.upload_sparsity_coeff, "cap": cfg.upload_sparsity_cap}
        upload: Payload = {}
        kept: State = {}
        for module in lora_modules(global_state):
            a, b = global_state[module.a_key], global_state[module.b_key]
            b_new = local_state[module.b_key].detach().to("cpu", torch.float32)
            a_new = local_state[module.a_key].detach().to("cpu", torch.float32)
            delta_b = b_new - b + _residual(memory, module.b_key, b)  # the round's delta plus what was not sent
            delta_a = a_new - a + _residual(memory, module.a_key, a)
            for key, delta, score in (
                (module.b_key, delta_b, importance_scores_b(delta_b, a)),  # Eq. 6, on the corrected delta
                (module.a_key, delta_a, importance_scores_a(delta_a, b_new)),
            ):
                sent = self._as_decoded(importance_prune(delta, score, **prune, l1_rescale=False))  # Eq. 7-8
                upload[key] = sent
                kept[key] = delta - sent.to_dense(torch.float32)
        return upload, kept

    # ---- server ------------------------------------------------------------------------------------------------
    def server_step(
        self, global_state: State, updates: list[Payload], weights: list[float], round: int, rng: torch.Generator
    ) -> Payload:
        return self.server_step_with_memory(global_state, updates, weights, round, rng, {})[0]

    def server_step_with_memory(
        self,
        global_state: State,
        updates: list[Payload],
        weights: list[float],
        round: int,
        rng: torch.Generator,
        memory: State,
    ) -> tuple[Payload, State]:
        if not self.config.ef_download:
            return super().server_step(global_state, updates, weights, round, rng), {}
        if not updates:
            raise ValueError("FedSRD-EF.server_step: no client updates to aggregate.")

        def target_of(module: LoraModule, a: torch.Tensor, b: torch.Tensor) -> ModuleTarget:
            return ModuleTarget(self.target_change(module, a, b, updates, weights))  # Eq. 9-11

        return self.decompose(global_state, target_of, round, rng, memory)

    def decompose(
        self,
        global_state: State,
        target_of: Callable[[LoraModule, torch.Tensor, torch.Tensor], ModuleTarget],
        round: int,
        rng: torch.Generator,
        memory: State,
    ) -> tuple[Payload, State]:
        """FedSRD's decomposition, with the server's download residuals added to and kept from each sent delta."""
        if not self.config.ef_download:
            return super().decompose(global_state, target_of, round, rng, memory)
        if self.config.ef_download_space == "product":
            return self._decompose_product(global_state, target_of, round, rng, memory)
        payload: Payload = {}
        kept: State = dict(memory)  # the factor not sent this round keeps its residual for its next round
        for module in lora_modules(global_state):
            a, b = global_state[module.a_key].to(torch.float32), global_state[module.b_key].to(torch.float32)
            moved = self.moving_factor(module, target_of(module, a, b), a, b, round)  # as FedSRD (Eq. 12-13)
            if moved is None:
                continue
            key, delta = moved
            corrected = delta + _residual(memory, key, global_state[key])
            if self.config.ef_download_selection == "magnitude":
                sent = self._as_decoded(magnitude_keep(corrected, 1.0 - self.config.download_drop))
            else:
                sent = self._as_decoded(dare_drop(corrected, self.config.download_drop, rng, rescale=False))
            payload[key] = sent
            kept[key] = corrected - sent.to_dense(torch.float32)
        return payload, kept

    def _decompose_product(
        self,
        global_state: State,
        target_of: Callable[[LoraModule, torch.Tensor, torch.Tensor], ModuleTarget],
        round: int,
        rng: torch.Generator,
        memory: State,
    ) -> tuple[Payload, State]:
        """Download error feedback in product space (``ef_download_space: product``; ours, docs/fedsrd.md).

        FedSRD moves one factor per round towards the target, dW = W_target - B A (Eq. 11), by a least-squares delta
        (Eq. 12-13) that is then DARE-dropped: what the solve cannot express in the moving factor's space, and what
        the drop removes, is lost. Here the server keeps that remainder, ``E = (dW + E_old) - applied`` with
        ``applied = dB' A`` (B-rounds) or ``B dA'`` (A-rounds), as its best rank-k factor pair, and adds it to the
        next round's dW, whichever factor that round moves. The broadcast is FedSRD's (same drop, same 1/(1-p)
        rescale, same bytes); only the target it is solved from changes.
        """
        payload: Payload = {}
        kept: State = {}
        for module in lora_modules(global_state):
            a, b = global_state[module.a_key].to(torch.float32), global_state[module.b_key].to(torch.float32)
            target = target_of(module, a, b)
            left_key, right_key = f"{module.b_key}.residual_left", f"{module.a_key}.residual_right"
            delta_w = target.delta_w
            if left_key in memory or right_key in memory:
                residual = _residual_pair(memory, left_key, right_key, b.shape[0], a.shape[1])
                delta_w = (torch.cat([delta_w[0], residual[0]], dim=1), torch.cat([delta_w[1], residual[1]], dim=0))
            corrected = ModuleTarget(delta_w)  # fedsrd_ef is SVD-based: its targets carry no pre-solved part
            moved = self.moving_factor(module, corrected, a, b, round)  # Eq. 12 or 13, on dW + E
            if moved is None:  # never pinv a zero B: nothing sent, the remainder waits
                kept.update({k: memory[k] for k in (left_key, right_key) if k in memory})
                continue
            key, delta = moved
            sent = self._as_decoded(dare_drop(delta, self.config.download_drop, rng))  # FedSRD's unbiased drop
            payload[key] = sent
            step = sent.to_dense(torch.float32)
            applied = (step, a) if key == module.b_key else (b, step)
            remainder = factored_difference(delta_w, applied)  # (dW + E_old) - applied
            rank = self.config.ef_residual_rank or 2 * a.shape[0]
            left, right = truncated_svd(*remainder, rank=min(rank, b.shape[0], a.shape[1]))
            # contiguous, as a checkpoint reloads them: the same memory layout gives the same bits after a resume
            kept[left_key], kept[right_key] = left.contiguous(), right.contiguous()
        return payload, kept

    def _as_decoded(self, sent: SparseTensor) -> SparseTensor:
        """`sent` as its receiver decodes it (values rounded to the wire's value dtype): a residual is what the
        receiver did not get, so it must be taken against the decoded values."""
        return round_to_dtype(sent, getattr(torch, self.config.value_dtype))


def _residual_pair(memory: State, left_key: str, right_key: str, d_out: int, d_in: int) -> tuple[torch.Tensor, ...]:
    """A module's kept product-space residual (left d_out x k, right k x d_in), checked against the module's shape."""
    left, right = memory.get(left_key), memory.get(right_key)
    if left is None or right is None or left.dim() != 2 or right.dim() != 2 or left.shape[0] != d_out \
            or right.shape[1] != d_in or left.shape[1] != right.shape[0]:  # fmt: skip
        raise ValueError(
            f"FedSRD-EF: the kept product-space residual {left_key!r}/{right_key!r} does not fit a {d_out} x {d_in} "
            "module; was the run resumed with other LoRA settings?"
        )
    return left.to(torch.float32), right.to(torch.float32)


def _residual(memory: State, key: str, like: torch.Tensor) -> torch.Tensor:
    """The kept residual of `key` (zeros if none); a residual of another shape means the settings changed."""
    value = memory.get(key)
    if value is None:
        return torch.zeros(like.shape, dtype=torch.float32)
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(
            f"FedSRD-EF: the kept residual of {key!r} has shape {tuple(value.shape)}, but the tensor is "
            f"{tuple(like.shape)}; was the run resumed with other LoRA settings?"
        )
    return value.to(torch.float32)
