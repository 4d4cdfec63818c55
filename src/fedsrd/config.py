"""`FedSRDConfig`: the federation's settings, as a dataclass `HfArgumentParser` turns into a CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

AGGREGATIONS = ("uniform", "samples")
VALUE_DTYPES = ("float32", "float16", "bfloat16")
POSITION_ENCODINGS = ("auto", "bitmap", "varint")
EF_DOWNLOAD_SELECTIONS = ("random", "magnitude")
HUB_ROUND_REFS = ("branch", "tag")
ROBUST_AGGREGATIONS = ("none", "median", "trimmed_mean")
ADAPTIVE_CLIP_MODES = ("auto", "on", "off")
SERVER_STREAMING_MODES = ("off", "on")  # many clients per round


@dataclass
class FedSRDConfig:
    """Settings of a federated fine-tuning run.

    Local training itself (learning rate, batch size, precision, ...) is configured by `transformers.TrainingArguments`;
    this config says how many parties train, for how long each round, which algorithm combines their updates, and the
    LoRA adapter they share (mapped to a standard `peft.LoraConfig` by `to_lora_config`).
    """

    algorithm: str = field(
        default="fedavg",
        metadata={"help": "Federated algorithm, one of `fedsrd.list_algorithms()` (e.g. fedavg, fedsrd, fedsrd_e)."},
    )
    num_rounds: int = field(default=10, metadata={"help": "Number of communication rounds."})
    num_clients: int = field(default=4, metadata={"help": "Number of clients (parties), one dataset each."})
    clients_per_round: int | None = field(
        default=None,
        metadata={"help": "Clients sampled (by seed) to train each round; default: all of them."},
    )
    local_steps: int = field(
        default=10, metadata={"help": "Optimizer steps each sampled client takes per round (Trainer's max_steps)."}
    )
    aggregation: str = field(
        default="uniform",
        metadata={"help": "Client weighting in the server step: 'uniform' (1/m) or 'samples' (by local dataset size)."},
    )
    fed_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the federation (adapter init, client sampling, every per-round/per-client draw); "
            "default: TrainingArguments.seed (42 when used without a Trainer)."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scaling = lora_alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input during local training."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module-name suffixes to adapt (e.g. q_proj v_proj), or 'all-linear' (all but the head)."},
    )
    # ---- FedSRD / FedSRD-e (../docs/algorithms.md; Yan et al., WWW 2026) ----
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
        metadata={"help": "FedSRD family, not in the paper: damp the one-factor least-squares solves, e.g. dA = "
                  "(B^T B + lambda I)^-1 B^T dW with lambda = decompose_ridge * mean squared singular value of B; "
                  "0 = the paper's pinv."},
    )
    download_both_factors: bool = field(
        default=False,
        metadata={"help": "FedSRD/FedSRD-e, not in the paper: broadcast both factors' least-squares deltas every round "
                  "(dB, then dA for the rest of the target), each DARE-dropped with download_drop; off = the paper's "
                  "alternation (B in odd rounds, A in even ones)."},
    )
    # ---- fedsrd_ef: FedSRD with error feedback (this library's variant; docs/fedsrd.md) ----------------------------
    ef_upload: bool = field(
        default=True,
        metadata={"help": "fedsrd_ef: each client keeps what importance pruning removed from its upload and adds it "
                  "to its next upload's delta (no L1 rescale: the kept residual carries that mass)."},
    )
    ef_download: bool = field(
        default=True,
        metadata={"help": "fedsrd_ef: the server keeps what the random drop removed from the broadcast and adds it to "
                  "that factor's next delta (survivors are not scaled by 1/(1-p))."},
    )
    ef_download_selection: str = field(
        default="random",
        metadata={"help": "fedsrd_ef: which 1 - download_drop of the broadcast delta (plus residual) is sent: 'random' "
                  "(seeded mask, no position bytes, as FedSRD) or 'magnitude' (the largest entries; positions sent)."},
    )
    # ---- baselines (docs/algorithms.md): fedprox, fed_dare, topk -------------------------------------------------
    fedprox_mu: float = field(
        default=0.01,
        metadata={"help": "FedProx: weight mu of the proximal term mu/2 * ||w - w_global||^2 over the trained LoRA."},
    )
    fed_dare_drop: float = field(
        default=0.9,
        metadata={"help": "Fed-DARE: drop probability p on the uploaded LoRA deltas (kept entries x 1/(1-p))."},
    )
    topk_density: float = field(
        default=0.1,
        metadata={"help": "Top-k: fraction of each uploaded LoRA delta's entries kept (the largest magnitudes)."},
    )
    # ---- end of baselines ------------------------------------------------------------------------------------------
    # ---- full-parameter family (docs/full_parameter.md): fedkrso, fedkseed (fedfft has no settings) -------------
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
    kseed_num_seeds: int = field(
        default=4096, metadata={"help": "FedKSeed: size K of the seed pool, fixed for the whole run."}
    )
    kseed_eps: float = field(
        default=5e-4, metadata={"help": "FedKSeed: perturbation scale eps of the two-point zeroth-order estimate."}
    )
    krso_head_bias_decay: bool = field(
        default=False,
        metadata={
            "help": "FedKRSO: apply weight_decay to the head's biases too, as the authors' code does (default: only "
            "to the head's matrices, Trainer's convention)."
        },
    )
    kseed_grad_clip: float = field(
        default=0.0,
        metadata={
            "help": "FedKSeed: skip a local step whose two losses differ by more than this, |L(w + eps z) - "
            "L(w - eps z)| > kseed_grad_clip (the reference's optional grad_clip); 0: never skip."
        },
    )
    # ---- end of full-parameter family ------------------------------------------------------------------------------
    value_dtype: str = field(
        default="float32",
        metadata={"help": "Dtype of tensor values on the wire: float32 (the papers' accounting), float16, bfloat16."},
    )
    positions: str = field(
        default="auto",
        metadata={"help": "Encoding of sparse positions: bitmap, varint (gaps), or auto (the smaller per tensor)."},
    )
    max_message_mb: float = field(
        default=2048.0, metadata={"help": "Messages larger than this (MiB) are rejected without being parsed."}
    )
    # ---- reliability: dropouts, resume ----
    min_clients: int = field(
        default=1,
        metadata={"help": "A round completes only if at least this many client updates arrive and pass validation."},
    )
    round_retries: int = field(
        default=0,
        metadata={"help": "If fewer than min_clients updates arrive, retry the round this many times (with a fresh "
                  "client sample) before stopping the run."},
    )
    client_timeout_s: float | None = field(
        default=None,
        metadata={"help": "A client whose local phase takes longer than this (seconds) is dropped from the round."},
    )
    checkpoint: bool = field(
        default=True,
        metadata={"help": "Write a resumable, pickle-free checkpoint (output_dir/checkpoints/) after every round."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the last complete round's checkpoint in output_dir (if there is one)."},
    )
    # ---- robust aggregation (fedsrd.ops.robust; docs/reliability.md, "Poisoned updates") ------------------------
    clip_update_norm: float | None = field(
        default=None,
        metadata={"help": "A fixed bound: scale each client's update so the L2 norm of the change it proposes (FedSRD: "
                  "of its LoRA product change) is at most this. Combined with adaptive_clip, the smaller bound wins."},
    )
    adaptive_clip: str = field(
        default="auto",
        metadata={"help": "Adaptive norm clipping: each client's change is scaled to at most adaptive_clip_multiplier "
                  "x the round's median change norm (Andrew et al., NeurIPS 2021), so one client moves the global by "
                  "a bounded amount. 'auto': on for the algorithms that admit it (Algorithm.robust_defences), off "
                  "for the others; 'on': refused where it cannot apply; 'off'."},
    )
    adaptive_clip_multiplier: float = field(
        default=3.0,
        metadata={"help": "k of adaptive_clip: the bound is k x the round's (lower) median client change norm."},
    )
    robust_aggregation: str = field(
        default="none",
        metadata={"help": "Replace the weighted mean by a coordinate-wise 'median' or 'trimmed_mean' (unweighted; "
                  "Yin et al., ICML 2018), for the algorithms whose server step is a sum of dense client tensors."},
    )
    trim_fraction: float = field(
        default=0.25,
        metadata={"help": "trimmed_mean: drop floor(trim_fraction x m) of the m clients' values at each end of every "
                  "coordinate (at most (m-1)/2)."},
    )
    # ---- end of robust aggregation -------------------------------------------------------------------------------
    max_update_value: float = field(
        default=1e4,
        metadata={"help": "Updates holding any value of larger magnitude are rejected as broken or hostile."},
    )
    eval_every: int = field(
        default=1, metadata={"help": "Evaluate the global adapter every k rounds (0: only at the end)."}
    )
    eval_at_start: bool = field(
        default=True,
        metadata={"help": "Evaluate the starting adapter (round 0) too, the first point of every curve."},
    )
    save_every: int = field(
        default=1, metadata={"help": "Save the global adapter as round_NNNN/ every k rounds (0: only final/)."}
    )
    # ---- learning rate across rounds (fedsrd.schedule; docs/user_guide.md) --------------------------------------
    round_lr_scheduler: str | None = field(
        default=None,
        metadata={
            "help": "One learning rate per round across the federation, constant within each round (as OpenFedLLM): "
            "'constant', 'linear' or 'cosine' from TrainingArguments.learning_rate down towards round_lr_min; "
            "replaces TrainingArguments.lr_scheduler_type. Default (None): TrainingArguments' schedule runs within "
            "each round's local phase and restarts every round."
        },
    )
    round_lr_min: float = field(
        default=0.0,
        metadata={"help": "The rate that round_lr_scheduler 'linear' / 'cosine' decays towards (OpenFedLLM: 1e-6)."},
    )
    # ---- end of learning rate across rounds ----------------------------------------------------------------------
    # ---- lm-eval during training and Hub publishing (fedsrd.eval, fedsrd.hub; docs/evaluation.md) ---------------
    # The Hub repo, token and privacy are TrainingArguments' own push_to_hub / hub_model_id / hub_token /
    # hub_private_repo; FederatedTrainer pushes the global adapter (not each client's) once per saved round.
    lm_eval_tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "lm-eval tasks or suites run on the global adapter (e.g. synthetic, fedsrd_paper, gsm8k, "
            "jsonl:my.jsonl); empty: no lm-eval. Needs the `eval` extra."
        },
    )
    lm_eval_every: int = field(
        default=1, metadata={"help": "Run the lm-eval tasks every k rounds (0: only after the last round)."}
    )
    lm_eval_limit: int | None = field(
        default=None, metadata={"help": "lm-eval documents per task (default: all of them)."}
    )
    lm_eval_max_gen_toks: int | None = field(
        default=None, metadata={"help": "Cap on tokens generated per lm-eval document (default: the task's own)."}
    )
    lm_eval_batch_size: int = field(default=8, metadata={"help": "lm-eval batch size."})
    lm_eval_include_path: str | None = field(
        default=None, metadata={"help": "A directory of your own lm-eval task YAMLs."}
    )
    lm_eval_allow_code_execution: bool = field(
        default=False,
        metadata={"help": "Let lm-eval run model-written code (HumanEval, MBPP); only inside a sandbox."},
    )
    hub_round_refs: str = field(
        default="branch",
        metadata={"help": "With push_to_hub: mark each pushed round with a 'branch' or a 'tag' (main = latest)."},
    )
    hub_revision_template: str = field(
        default="round-{round:04d}", metadata={"help": "Name of each round's branch or tag on the Hub."}
    )
    # ---- end of lm-eval / Hub ------------------------------------------------------------------------------------
    # ---- many clients per round: server step path, streaming, client state on disk (docs/fedsrd.md) --------------
    server_step_path: str = field(
        default="auto",
        metadata={"help": "FedSRD's rank-r SVD of the aggregate, per module: 'factored' (QR of the stacked m*r client "
                  "factors), 'dense' (form the d_out x d_in aggregate, thin SVD), or 'auto' (the one a flop count says "
                  "is cheaper for that module's shape and m; both agree to float32 rounding)."},
    )
    server_streaming: str = field(
        default="off",
        metadata={"help": "'on': fold each client update into a fixed-size aggregate and release it, so the server's "
                  "memory does not grow with the clients per round (weighted sums exactly; FedSRD-e exactly; FedSRD "
                  "through a one-pass sketch, see sketch_oversampling); 'off': hold the round's decoded updates."},
    )
    sketch_oversampling: int = field(
        default=64,
        metadata={"help": "FedSRD with server_streaming on: Gaussian directions of the aggregate's sketch beyond the "
                  "LoRA rank r (k = r + this, co-range 2k + 1, plus the current factors' spans); larger is more "
                  "accurate and costs (d_out + d_in) floats per direction per module."},
    )
    client_state_store: str = field(
        default="auto",
        metadata={"help": "Simulation: where each client's kept state (personal tensors, error-feedback residuals) "
                  "lives between its rounds: 'memory', 'disk' (output_dir/client_states/, one safetensors file per "
                  "client, atomic writes, snapshotted into checkpoints), or 'auto' (disk from "
                  "client_state_disk_threshold clients on)."},
    )
    client_state_disk_threshold: int = field(
        default=256, metadata={"help": "client_state_store 'auto': keep client states on disk from this many clients."}
    )
    # ---- end of many clients per round -----------------------------------------------------------------------------

    def __post_init__(self) -> None:
        # Imported here: the registry imports the algorithms, which import this module.
        from fedsrd.algorithms import list_algorithms

        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        names = list_algorithms()
        if self.algorithm not in names:
            raise ValueError(f"FedSRDConfig.algorithm: unknown algorithm {self.algorithm!r}; expected one of {names}.")
        _require(self.num_rounds >= 1, "num_rounds", f"must be >= 1, got {self.num_rounds}")
        _require(self.num_clients >= 1, "num_clients", f"must be >= 1, got {self.num_clients}")
        if self.clients_per_round is not None:
            _require(
                1 <= self.clients_per_round <= self.num_clients,
                "clients_per_round",
                f"must be between 1 and num_clients={self.num_clients}, got {self.clients_per_round}",
            )
        _require(self.local_steps >= 1, "local_steps", f"must be >= 1, got {self.local_steps}")
        _require(
            self.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}, got {self.aggregation!r}"
        )
        _require(self.lora_r >= 1, "lora_r", f"must be >= 1, got {self.lora_r}")
        _require(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _require(len(self.lora_target_modules) > 0, "lora_target_modules", "must name at least one module")
        _require(
            0.0 <= self.upload_sparsity_alpha < 1.0,
            "upload_sparsity_alpha",
            f"must be in [0, 1), got {self.upload_sparsity_alpha}",
        )
        _require(
            self.upload_sparsity_coeff >= 0, "upload_sparsity_coeff", f"must be >= 0, got {self.upload_sparsity_coeff}"
        )
        _require(self.upload_sparsity_cap >= 0, "upload_sparsity_cap", f"must be >= 0, got {self.upload_sparsity_cap}")
        _require(0.0 <= self.download_drop < 1.0, "download_drop", f"must be in [0, 1), got {self.download_drop}")
        _require(self.decompose_ridge >= 0, "decompose_ridge", f"must be >= 0 (0: the paper's pinv), got "
                 f"{self.decompose_ridge}")
        _require(
            not (self.download_both_factors and self.algorithm == "fedsrd_ef" and self.ef_download),
            "download_both_factors",
            "is not combined with fedsrd_ef's download error feedback; use fedsrd or fedsrd_e, or ef_download false",
        )
        _require(
            self.ef_download_selection in EF_DOWNLOAD_SELECTIONS,
            "ef_download_selection",
            f"must be one of {EF_DOWNLOAD_SELECTIONS}, got {self.ef_download_selection!r}",
        )
        _require(self.fedprox_mu >= 0.0, "fedprox_mu", f"must be >= 0, got {self.fedprox_mu}")
        _require(0.0 <= self.fed_dare_drop < 1.0, "fed_dare_drop", f"must be in [0, 1), got {self.fed_dare_drop}")
        _require(0.0 < self.topk_density <= 1.0, "topk_density", f"must be in (0, 1], got {self.topk_density}")
        _require(self.krso_rank >= 1, "krso_rank", f"must be >= 1, got {self.krso_rank}")
        _require(self.krso_num_seeds >= 1, "krso_num_seeds", f"must be >= 1, got {self.krso_num_seeds}")
        _require(self.krso_tau >= 1, "krso_tau", f"must be >= 1, got {self.krso_tau}")
        _require(self.kseed_num_seeds >= 1, "kseed_num_seeds", f"must be >= 1, got {self.kseed_num_seeds}")
        _require(self.kseed_eps > 0, "kseed_eps", f"must be > 0, got {self.kseed_eps}")
        _require(self.kseed_grad_clip >= 0, "kseed_grad_clip", f"must be >= 0 (0: off), got {self.kseed_grad_clip}")
        _require(
            self.value_dtype in VALUE_DTYPES, "value_dtype", f"must be one of {VALUE_DTYPES}, got {self.value_dtype!r}"
        )
        _require(
            self.positions in POSITION_ENCODINGS,
            "positions",
            f"must be one of {POSITION_ENCODINGS}, got {self.positions!r}",
        )
        _require(self.max_message_mb > 0, "max_message_mb", f"must be > 0, got {self.max_message_mb}")
        _require(self.min_clients >= 1, "min_clients", f"must be >= 1, got {self.min_clients}")
        _require(
            self.min_clients <= (self.clients_per_round or self.num_clients),
            "min_clients",
            f"must be at most the clients sampled per round ({self.clients_per_round or self.num_clients}), "
            f"got {self.min_clients}",
        )
        _require(self.round_retries >= 0, "round_retries", f"must be >= 0, got {self.round_retries}")
        _require(
            self.client_timeout_s is None or self.client_timeout_s > 0,
            "client_timeout_s",
            f"must be > 0, got {self.client_timeout_s}",
        )
        _require(
            self.clip_update_norm is None or self.clip_update_norm > 0,
            "clip_update_norm",
            f"must be > 0, got {self.clip_update_norm}",
        )
        _require(self.max_update_value > 0, "max_update_value", f"must be > 0, got {self.max_update_value}")
        self._check_robust_aggregation()
        self._check_many_clients()
        _require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        _require(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}")
        # learning rate across rounds
        from fedsrd.schedule import ROUND_LR_SCHEDULERS

        _require(
            self.round_lr_scheduler is None or self.round_lr_scheduler in ROUND_LR_SCHEDULERS,
            "round_lr_scheduler",
            f"must be one of {ROUND_LR_SCHEDULERS} or None, got {self.round_lr_scheduler!r}",
        )
        _require(self.round_lr_min >= 0, "round_lr_min", f"must be >= 0, got {self.round_lr_min}")
        # lm-eval / Hub
        if isinstance(self.lm_eval_tasks, str):
            self.lm_eval_tasks = [self.lm_eval_tasks]
        _require(
            all(isinstance(t, str) and t.strip() for t in self.lm_eval_tasks),
            "lm_eval_tasks",
            f"expected task or suite names, got {self.lm_eval_tasks!r}",
        )
        _require(self.lm_eval_every >= 0, "lm_eval_every", f"must be >= 0, got {self.lm_eval_every}")
        _require(
            self.lm_eval_limit is None or self.lm_eval_limit >= 1,
            "lm_eval_limit",
            f"must be >= 1 or None (all documents), got {self.lm_eval_limit}",
        )
        _require(
            self.lm_eval_max_gen_toks is None or self.lm_eval_max_gen_toks >= 1,
            "lm_eval_max_gen_toks",
            f"must be >= 1 or None, got {self.lm_eval_max_gen_toks}",
        )
        _require(self.lm_eval_batch_size >= 1, "lm_eval_batch_size", f"must be >= 1, got {self.lm_eval_batch_size}")
        _require(
            self.hub_round_refs in HUB_ROUND_REFS,
            "hub_round_refs",
            f"must be one of {HUB_ROUND_REFS}, got {self.hub_round_refs!r}",
        )
        try:
            ref = self.hub_revision_template.format(round=1)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"FedSRDConfig.hub_revision_template: must format with round=<int> only, e.g. 'round-{{round:04d}}'; "
                f"{self.hub_revision_template!r} fails: {err!r}."
            ) from err
        _require(
            bool(ref) and not any(c in ref for c in " ~^:?*[\\") and ref != self.hub_revision_template.format(round=2),
            "hub_revision_template",
            f"must give a valid git ref name that differs per round, got {ref!r} for round 1",
        )

    def _check_robust_aggregation(self) -> None:
        _require(
            self.adaptive_clip in ADAPTIVE_CLIP_MODES,
            "adaptive_clip",
            f"must be one of {ADAPTIVE_CLIP_MODES}, got {self.adaptive_clip!r}",
        )
        _require(
            self.adaptive_clip_multiplier > 0,
            "adaptive_clip_multiplier",
            f"must be > 0, got {self.adaptive_clip_multiplier}",
        )
        _require(
            self.robust_aggregation in ROBUST_AGGREGATIONS,
            "robust_aggregation",
            f"must be one of {ROBUST_AGGREGATIONS}, got {self.robust_aggregation!r}",
        )
        _require(0.0 <= self.trim_fraction < 0.5, "trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
        asked = {
            "clip_update_norm": "clip" if self.clip_update_norm is not None else None,
            "adaptive_clip": "clip" if self.adaptive_clip == "on" else None,
            "robust_aggregation": None if self.robust_aggregation == "none" else self.robust_aggregation,
        }
        asked = {name: defence for name, defence in asked.items() if defence is not None}
        if not asked:
            return
        from fedsrd.algorithms import get_algorithm_class, list_algorithms

        for name, defence in asked.items():
            if defence not in get_algorithm_class(self.algorithm).robust_defences:
                able = [a for a in list_algorithms() if defence in get_algorithm_class(a).robust_defences]
                raise ValueError(
                    f"FedSRDConfig.{name}: algorithm {self.algorithm!r} does not admit {defence!r} (its server step "
                    f"is not a sum it can bound that way); the algorithms that do: {', '.join(able)}."
                )

    # ---- many clients per round ------------------------------------------------------------------------------------
    def _check_many_clients(self) -> None:
        from fedsrd.ops.lowrank import SVD_PATHS

        _require(
            self.server_step_path in SVD_PATHS,
            "server_step_path",
            f"must be one of {SVD_PATHS}, got {self.server_step_path!r}",
        )
        _require(
            self.server_streaming in SERVER_STREAMING_MODES,
            "server_streaming",
            f"must be one of {SERVER_STREAMING_MODES}, got {self.server_streaming!r}",
        )
        _require(self.sketch_oversampling >= 0, "sketch_oversampling", f"must be >= 0, got {self.sketch_oversampling}")
        _require(
            self.client_state_store in ("auto", "memory", "disk"),
            "client_state_store",
            f"must be one of ('auto', 'memory', 'disk'), got {self.client_state_store!r}",
        )
        _require(
            self.client_state_disk_threshold >= 1,
            "client_state_disk_threshold",
            f"must be >= 1, got {self.client_state_disk_threshold}",
        )
        _require(
            not (self.server_streaming == "on" and self.robust_aggregation != "none"),
            "server_streaming",
            f"'on' folds updates one at a time, but robust_aggregation={self.robust_aggregation!r} needs every "
            "update of the round at once (a coordinate-wise statistic); use server_streaming 'off' or "
            "robust_aggregation 'none' (norm clipping streams)",
        )

    @property
    def seed(self) -> int:
        """The federation's seed (`fed_seed`, or 42 if unset and no Trainer has filled it in)."""
        return 42 if self.fed_seed is None else self.fed_seed

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def to_lora_config(self, task_type: str = "CAUSAL_LM", target_modules: list[str] | str | None = None):
        """The `peft.LoraConfig` every client and the server share."""
        from peft import LoraConfig

        targets = target_modules if target_modules is not None else self.lora_target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type=task_type,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"FedSRDConfig.{field_name}: {message}.")
