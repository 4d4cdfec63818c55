"""`FedSRDConfig`: the federation's settings, as a dataclass `HfArgumentParser` turns into a CLI."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

# ---- algorithms' options: each algorithm declares its options dataclass in its own file (its knobs, help text and
# validation); FedSRDConfig inherits them all, so they stay flat fields (YAML keys, --upload_sparsity_alpha,
# FedSRDConfig(upload_sparsity_alpha=...)). A new algorithm with options adds one line to ALGORITHM_OPTIONS.
from fedsrd.algorithms.base import validate_options
from fedsrd.algorithms.fed_dare import FedDAREOptions
from fedsrd.algorithms.fed_sb import FedSBOptions
from fedsrd.algorithms.fedkrso import FedKRSOOptions
from fedsrd.algorithms.fedkseed import FedKSeedOptions
from fedsrd.algorithms.fedprox import FedProxOptions
from fedsrd.algorithms.fedrpca import FedRPCAOptions
from fedsrd.algorithms.fedsrd_ef import EF_DOWNLOAD_SELECTIONS as EF_DOWNLOAD_SELECTIONS  # re-exported
from fedsrd.algorithms.fedsrd_ef import FedSRDEFOptions
from fedsrd.algorithms.fedsvd import FedSVDOptions
from fedsrd.algorithms.ferret import FerretOptions
from fedsrd.algorithms.hetlora import HetLoRAOptions
from fedsrd.algorithms.topk import TopKOptions

ALGORITHM_OPTIONS = (
    FedSRDEFOptions,  # fedsrd_ef; it extends FedSRDOptions (fedsrd, fedsrd_e)
    FedProxOptions,  # fedprox
    FedDAREOptions,  # fed_dare
    TopKOptions,  # topk
    FedKRSOOptions,  # fedkrso
    FedKSeedOptions,  # fedkseed
    FedSVDOptions,  # fedsvd
    FedSBOptions,  # fed_sb
    FerretOptions,  # ferret
    FedRPCAOptions,  # fedrpca
    HetLoRAOptions,  # hetlora
)
# ---- end of algorithms' options --------------------------------------------------------------------------------

AGGREGATIONS = ("uniform", "samples")
VALUE_DTYPES = ("float32", "float16", "bfloat16")
POSITION_ENCODINGS = ("auto", "bitmap", "varint")
HUB_ROUND_REFS = ("branch", "tag")
ROBUST_AGGREGATIONS = ("none", "median", "trimmed_mean")
ADAPTIVE_CLIP_MODES = ("auto", "on", "off")
SERVER_STREAMING_MODES = ("off", "on")  # many clients per round
# ---- differential privacy (fedsrd.ops.privacy; docs/privacy.md) ----
DP_MODES = ("off", "central", "local")
DP_ACCOUNTANTS = ("rdp", "pld")
DP_SAMPLING_ACCOUNTINGS = ("fixed_size", "poisson")  # how a round of m < N sampled clients is accounted (issue #18)
UPLOAD_MASKS = ("importance", "random")
SECURE_AGGREGATIONS = ("off", "secaggplus")  # secure aggregation on Flower


@dataclass
class FedSRDConfig(*ALGORITHM_OPTIONS):
    """Settings of a federated fine-tuning run.

    Local training itself (learning rate, batch size, precision, ...) is configured by `transformers.TrainingArguments`;
    this config says how many parties train, for how long each round, which algorithm combines their updates, and the
    LoRA adapter they share (mapped to a standard `peft.LoraConfig` by `to_lora_config`).

    An algorithm's own knobs (e.g. FedSRD's ``upload_sparsity_alpha``) are declared by its options class
    (`fedsrd.algorithms.fedsrd.FedSRDOptions`, named by `Algorithm.options`) and inherited here as flat fields.
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
    # ---- each algorithm's own options (fedsrd, fedsrd_ef, fedprox, fed_dare, topk, fedkrso, fedkseed) are inherited
    # from the options classes in ALGORITHM_OPTIONS above, declared in the algorithm's file: still flat fields here.
    # ---- per-client LoRA ranks (heterogeneous clients; docs/user_guide.md, "Clients of different ranks") ----------
    client_lora_ranks: list[str] | None = field(
        default=None,
        metadata={
            "help": "One LoRA rank per client (e.g. 2 4 8 8: client k trains a rank-r_k adapter), or one rule "
            "'cycle:4,8,16,32' (client k gets the (k mod 4)-th rank). Every rank must be at most lora_r, the global "
            "adapter's rank. Each client's lora_alpha is lora_alpha * r_k / lora_r, so every adapter has the same "
            "scaling. Only for the algorithms whose Algorithm.supports_unequal_ranks is true (fedsrd, fedsrd_e, "
            "flexlora, flora, hetlora). Default: every client trains lora_r."
        },
    )
    # ---- end of per-client LoRA ranks ------------------------------------------------------------------------------
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
    # ---- differential privacy (fedsrd.ops.privacy; docs/privacy.md) ---------------------------------------------
    dp_mode: str = field(
        default="off",
        metadata={"help": "Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018): 'off'; 'central' "
                  "(the server clips each client's change to dp_clip_norm and adds Gaussian noise to their sum: a "
                  "trusted server); 'local' (each client clips and adds its 1/sqrt(m) share of the noise before "
                  "encoding: distributed DP, the sum of m uploads carries the central noise). Which algorithms admit "
                  "which: Algorithm.dp_support, docs/privacy.md."},
    )
    dp_clip_norm: float | None = field(
        default=None,
        metadata={"help": "DP: the L2 bound C on each client's change (the concatenated change of every uploaded "
                  "tensor; FedSRD: of its LoRA products), the sensitivity the noise is calibrated to. Required with "
                  "dp_mode central/local."},
    )
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "DP: noise multiplier z; the noise on the sum of the clipped changes is N(0, (z C)^2) per "
                  "coordinate. Give this or dp_target_epsilon."},
    )
    dp_target_epsilon: float | None = field(
        default=None,
        metadata={"help": "DP: compute the smallest noise multiplier whose epsilon after num_rounds rounds, with "
                  "clients_per_round of num_clients sampled each round (accounted as dp_sampling_accounting says), is "
                  "at most this (instead of dp_noise_multiplier)."},
    )
    dp_delta: float = field(default=1e-5, metadata={"help": "DP: the delta epsilon is reported at."})
    dp_accountant: str = field(
        default="rdp",
        metadata={"help": "DP: the dp-accounting accountant, 'rdp' (Renyi DP, fast) or 'pld' (privacy loss "
                  "distributions, tighter, slower; with clients_per_round < num_clients only with "
                  "dp_sampling_accounting 'poisson')."},
    )
    # ---- DP accounting of the fixed-size client sampler (issue #18; fedsrd.ops.privacy.round_event) ----
    dp_sampling_accounting: str = field(
        default="fixed_size",
        metadata={"help": "DP: how a round that samples clients_per_round < num_clients clients is accounted. "
                  "'fixed_size' (what the sampler does: exactly m of N without replacement; epsilon under "
                  "replace-one adjacency, Wang et al., AISTATS 2019; 'rdp' accountant only) or 'poisson' (the "
                  "Poisson-subsampled approximation of DP-FedAvg and TensorFlow Privacy, under add/remove; not a "
                  "guarantee for this sampler; what runs before this option used). With every client every round "
                  "both are the plain Gaussian mechanism."},
    )
    dp_stop_at_epsilon: float | None = field(
        default=None,
        metadata={"help": "DP budget: end the federation before a round that would take epsilon above this "
                  "(history.json's dp_budget_exhausted marks the last round run)."},
    )
    upload_mask: str = field(
        default="importance",
        metadata={"help": "FedSRD family: which upload entries are kept, 'importance' (the paper's Eq. 6-8: positions "
                  "and counts depend on the data) or 'random' (a seeded DARE mask from (seed, round, client) with drop "
                  "upload_sparsity_alpha, survivors x 1/(1-p): positions leak nothing and travel as a seed). DP needs "
                  "'random'."},
    )
    # ---- end of differential privacy -----------------------------------------------------------------------------
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
        default=192,
        metadata={"help": "FedSRD with server_streaming on: Gaussian directions of the aggregate's sketch beyond the "
                  "LoRA rank r (k = r + this, co-range 2k + 1, plus the current factors' spans). The default keeps "
                  "the step within 1e-3 of the exact one at r = 64 (docs/fedsrd.md); each unit costs about "
                  "6 (d_out + d_in) floats per module of server memory and the fold time grows with it."},
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
    # ---- secure aggregation on Flower (fedsrd.integrations.secagg; docs/flower.md, "Secure aggregation") --------
    # Names follow flwr.server.workflow.SecAggPlusWorkflow's arguments.
    secure_aggregation: str = field(
        default="off",
        metadata={"help": "'secaggplus': on the Flower deployment, the server learns only the (weighted) sum of the "
                  "round's uploads, through Flower's SecAgg+ protocol and its client mod (Bell et al., CCS 2020); only "
                  "for the algorithms whose server step is a weighted sum of equal-shape dense uploads. 'off'."},
    )
    secagg_num_shares: float = field(
        default=1.0,
        metadata={"help": "SecAgg+: shares each client's secrets are split into (its neighbours + itself); a value "
                  "<= 1 is a fraction of the round's sampled clients (1: all of them), above 1 a count (>= 3)."},
    )
    secagg_reconstruction_threshold: float = field(
        default=0.67,
        metadata={"help": "SecAgg+: shares needed to rebuild a secret; a value <= 1 is a fraction of num_shares "
                  "(at least 2), above 1 a count (< num_shares). A round with fewer surviving neighbours fails."},
    )
    secagg_clipping_range: float = field(
        default=8.0,
        metadata={"help": "SecAgg+: every uploaded value is clipped to [-r, r] before quantization."},
    )
    secagg_quantization_range: int = field(
        default=4194304,
        metadata={"help": "SecAgg+: values are quantized to integers in [0, q); the aggregate's error per value is "
                  "below 2 * clipping_range / q (4194304 = 2**22: 3.8e-6 with the default range)."},
    )
    secagg_modulus_range: int = field(
        default=4294967296,
        metadata={"help": "SecAgg+: masks and sums are taken modulo this power of two (> quantization_range, "
                  "<= 2**32)."},
    )
    secagg_max_weight: float = field(
        default=1000.0,
        metadata={"help": "SecAgg+: the largest client weight (aggregation='samples': a client's sample count, capped "
                  "here by the client); uniform weighting uses it for every client, so the full precision is kept."},
    )
    # ---- end of secure aggregation -------------------------------------------------------------------------------

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
        validate_options(self)  # every algorithm's options class checks its own fields
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
        self._check_privacy()
        self._check_client_lora_ranks()  # per-client LoRA ranks
        _require(
            self.dp_mode == "off" or not self.has_unequal_ranks,
            "client_lora_ranks",
            "clients of different ranks are not combined with differential privacy (the noised product-space target "
            "is derived for one rank); set dp_mode 'off' or give every client lora_r",
        )
        self._check_many_clients()
        self._check_dp_with_secure_aggregation()  # distributed DP: local DP under secure aggregation
        self._check_secure_aggregation()  # secure aggregation on Flower
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
        if self.server_streaming != "on":
            return
        # What the streaming step does not fold, refused before any training (train_one_factor folds: a factor a
        # client did not send is a zero delta, as in the batch step).
        _require(
            self.dp_mode == "off",
            "server_streaming",
            f"'on' is not combined with differential privacy (dp_mode={self.dp_mode!r}): the noise is added to the "
            "whole round's aggregate by the batch step (server_step_private); use server_streaming 'off' or "
            "dp_mode 'off'",
        )
        _require(
            not self.has_unequal_ranks,
            "server_streaming",
            "'on' folds updates of one shape (every client at lora_r), but client_lora_ranks gives clients different "
            "ranks; use server_streaming 'off' or give every client lora_r",
        )

    # ---- differential privacy (docs/privacy.md) ----
    def _check_privacy(self) -> None:
        _require(self.dp_mode in DP_MODES, "dp_mode", f"must be one of {DP_MODES}, got {self.dp_mode!r}")
        _require(
            self.upload_mask in UPLOAD_MASKS, "upload_mask", f"must be one of {UPLOAD_MASKS}, got {self.upload_mask!r}"
        )
        _require(
            self.dp_accountant in DP_ACCOUNTANTS,
            "dp_accountant",
            f"must be one of {DP_ACCOUNTANTS}, got {self.dp_accountant!r}",
        )
        _require(0.0 < self.dp_delta < 1.0, "dp_delta", f"must be in (0, 1), got {self.dp_delta}")
        _require(
            self.dp_sampling_accounting in DP_SAMPLING_ACCOUNTINGS,
            "dp_sampling_accounting",
            f"must be one of {DP_SAMPLING_ACCOUNTINGS}, got {self.dp_sampling_accounting!r}",
        )
        from fedsrd.algorithms import get_algorithm_class, list_algorithms

        cls = get_algorithm_class(self.algorithm)
        if self.upload_mask == "random" and not cls.random_upload_mask:
            able = [a for a in list_algorithms() if get_algorithm_class(a).random_upload_mask]
            raise ValueError(
                f"FedSRDConfig.upload_mask: algorithm {self.algorithm!r} has no 'random' upload mask; the algorithms "
                f"that do: {', '.join(able)}."
            )
        if self.dp_mode == "off":
            return
        from fedsrd.ops.privacy import require_accountant

        require_accountant()
        _require(
            not (
                self.dp_accountant == "pld"
                and self.dp_sampling_accounting == "fixed_size"
                and self.sampled_per_round < self.num_clients
            ),
            "dp_accountant",
            f"'pld' cannot account fixed-size client sampling ({self.sampled_per_round} of {self.num_clients} clients "
            "a round without replacement: dp-accounting's PLD accountant has no such event); use dp_accountant 'rdp' "
            "with dp_sampling_accounting 'fixed_size' (a guarantee for this sampler), or dp_sampling_accounting "
            "'poisson' with 'pld' (the Poisson approximation)",
        )
        if self.dp_mode not in cls.dp_support:
            able = [a for a in list_algorithms() if self.dp_mode in get_algorithm_class(a).dp_support]
            why = cls.dp_refusal or "its server step is not a sum of per-client changes whose norm can be bounded"
            raise ValueError(
                f"FedSRDConfig.dp_mode: algorithm {self.algorithm!r} does not admit dp_mode={self.dp_mode!r}: {why}. "
                f"The algorithms that do: {', '.join(able)} (docs/privacy.md)."
            )
        _require(
            self.dp_clip_norm is not None and self.dp_clip_norm > 0,
            "dp_clip_norm",
            f"must be set to a bound > 0 with dp_mode={self.dp_mode!r} (the sensitivity the noise is calibrated to), "
            f"got {self.dp_clip_norm}",
        )
        _require(
            (self.dp_noise_multiplier is None) != (self.dp_target_epsilon is None),
            "dp_noise_multiplier",
            "give exactly one of dp_noise_multiplier and dp_target_epsilon with dp_mode "
            f"{self.dp_mode!r}, got {self.dp_noise_multiplier} and {self.dp_target_epsilon}",
        )
        _require(
            self.dp_noise_multiplier is None or self.dp_noise_multiplier >= 0,
            "dp_noise_multiplier",
            f"must be >= 0, got {self.dp_noise_multiplier}",
        )
        _require(
            self.dp_target_epsilon is None or self.dp_target_epsilon > 0,
            "dp_target_epsilon",
            f"must be > 0, got {self.dp_target_epsilon}",
        )
        _require(
            self.dp_stop_at_epsilon is None or self.dp_stop_at_epsilon > 0,
            "dp_stop_at_epsilon",
            f"must be > 0, got {self.dp_stop_at_epsilon}",
        )
        _require(
            self.aggregation == "uniform",
            "aggregation",
            "must be 'uniform' with differential privacy: sample-count weights depend on the clients' data and let "
            f"one client weigh more than clip/m; got {self.aggregation!r}",
        )
        _require(
            self.robust_aggregation == "none",
            "robust_aggregation",
            f"must be 'none' with differential privacy: a coordinate-wise {self.robust_aggregation} is not a sum, so "
            "no noise calibrated to the clip bound covers it",
        )
        _require(
            self.adaptive_clip != "on",
            "adaptive_clip",
            "must be 'auto' or 'off' with differential privacy: the adaptive bound is the median of the clients' "
            "norms, which depends on their data (private quantile estimation is not implemented); dp_clip_norm is "
            "the bound ('auto' turns adaptive clipping off under DP)",
        )
        _require(
            not cls.data_dependent_positions or self.upload_mask == "random",
            "upload_mask",
            f"must be 'random' with differential privacy for {self.algorithm!r}: importance pruning's positions and "
            "counts depend on the client's data and are visible in every upload, a leak no noise covers; "
            "upload_mask='random' keeps a seeded mask instead",
        )

    @property
    def dp_sampling_rate(self) -> float:
        """The share of clients sampled each round, q = clients_per_round / num_clients (the accountant's rate)."""
        return self.sampled_per_round / self.num_clients

    @property
    def resolved_dp_noise_multiplier(self) -> float:
        """dp_noise_multiplier, or the one dp_target_epsilon asks for over num_rounds (computed by the accountant)."""
        if self.dp_noise_multiplier is not None:
            return float(self.dp_noise_multiplier)
        if self.dp_target_epsilon is None:
            raise ValueError("FedSRDConfig: no noise multiplier: differential privacy is off (dp_mode='off').")
        from fedsrd.ops.privacy import noise_multiplier_for

        return noise_multiplier_for(
            float(self.dp_target_epsilon), self.num_rounds, self.dp_sampling_rate, self.dp_delta, self.dp_accountant,
            self.dp_sampling_accounting, self.num_clients,
        )  # fmt: skip

    def dp_epsilon_after(self, rounds: int) -> float | None:
        """Epsilon (at dp_delta) after `rounds` rounds; None when differential privacy is off."""
        if self.dp_mode == "off":
            return None
        from fedsrd.ops.privacy import epsilon_after

        return epsilon_after(
            rounds, self.resolved_dp_noise_multiplier, self.dp_sampling_rate, self.dp_delta, self.dp_accountant,
            self.dp_sampling_accounting, self.num_clients,
        )  # fmt: skip

    @property
    def dp_accounting(self) -> dict[str, str] | None:
        """How epsilon is accounted (accountant, sampling model, adjacency: `fedsrd.ops.privacy.accounting_summary`);
        None when differential privacy is off."""
        if self.dp_mode == "off":
            return None
        from fedsrd.ops.privacy import accounting_summary

        return accounting_summary(self.dp_sampling_rate, self.dp_sampling_accounting, self.dp_accountant)

    # ---- end of differential privacy ----

    # ---- per-client LoRA ranks ---------------------------------------------------------------------------------
    def _check_client_lora_ranks(self) -> None:
        if self.client_lora_ranks is None:
            return
        self.client_lora_ranks = parse_client_lora_ranks(self.client_lora_ranks, self.num_clients)
        too_large = [(k, r) for k, r in enumerate(self.client_lora_ranks) if r > self.lora_r]
        _require(
            not too_large,
            "client_lora_ranks",
            f"client {too_large[0][0] if too_large else 0} has rank {too_large[0][1] if too_large else 0}, above "
            f"lora_r={self.lora_r} (the global adapter's rank); set lora_r to at least "
            f"{max(self.client_lora_ranks)}",
        )
        if not self.has_unequal_ranks:
            return
        from fedsrd.algorithms import get_algorithm_class, list_algorithms

        if not get_algorithm_class(self.algorithm).supports_unequal_ranks:
            able = [a for a in list_algorithms() if get_algorithm_class(a).supports_unequal_ranks]
            raise ValueError(
                f"FedSRDConfig.client_lora_ranks: algorithm {self.algorithm!r} needs every client at the same LoRA "
                f"rank (lora_r={self.lora_r}), got ranks {sorted(set(self.client_lora_ranks))}; the algorithms that "
                f"handle clients of different ranks: {', '.join(able)}."
            )
        if self.algorithm in ("fedsrd", "fedsrd_e") and self.decompose_ridge == 0:  # measured: docs/benchmarks.md
            logging.getLogger(__name__).warning(
                "FedSRDConfig: %s with clients of different ranks %s and the paper's undamped solve "
                "(decompose_ridge 0) diverged on Gemma-3-270M (held-out loss 2.14 -> 3.84 in 12 rounds; "
                "docs/benchmarks.md, 'Clients of different LoRA ranks'); decompose_ridge 0.1 trained stably there.",
                self.algorithm, sorted(set(self.client_lora_ranks)),
            )  # fmt: skip

    @property
    def has_unequal_ranks(self) -> bool:
        """True when some client trains a LoRA rank other than lora_r (`client_lora_ranks`)."""
        return self.client_lora_ranks is not None and any(r != self.lora_r for r in self.client_lora_ranks)

    def client_rank(self, client_id: int) -> int:
        """The LoRA rank client `client_id` trains (`client_lora_ranks`, or lora_r)."""
        if self.client_lora_ranks is None:
            return self.lora_r
        if not 0 <= client_id < len(self.client_lora_ranks):
            raise ValueError(f"client id {client_id} is outside 0..{len(self.client_lora_ranks) - 1}.")
        return int(self.client_lora_ranks[client_id])

    def client_lora_alpha(self, rank: int) -> float:
        """lora_alpha of a rank-`rank` client's adapter: lora_alpha * rank / lora_r, so its scaling (alpha / r) is the
        global adapter's and the products B A of every rank are summed on one scale."""
        return self.lora_alpha * rank / self.lora_r
    # ---- end of per-client LoRA ranks ----------------------------------------------------------------------------

    # ---- secure aggregation on Flower ------------------------------------------------------------------------------
    def _check_secure_aggregation(self) -> None:
        _require(
            self.secure_aggregation in SECURE_AGGREGATIONS,
            "secure_aggregation",
            f"must be one of {SECURE_AGGREGATIONS}, got {self.secure_aggregation!r}",
        )
        if self.secure_aggregation == "off":
            return
        from fedsrd.algorithms import get_algorithm_class, list_algorithms

        if not get_algorithm_class(self.algorithm).secure_sum:
            able = [a for a in list_algorithms() if get_algorithm_class(a).secure_sum]
            raise ValueError(
                f"FedSRDConfig.secure_aggregation: {self.secure_aggregation!r} hides each upload inside a masked sum "
                f"of equal-shape dense vectors, so it needs a server step that is a weighted sum of the uploads; "
                f"algorithm {self.algorithm!r} is not one (its uploads are sparse with client-specific positions, "
                f"partial, or its step needs each client's upload). The algorithms that support it: {', '.join(able)}."
            )
        for name, why in (
            ("clip_update_norm", self.clip_update_norm is not None),
            ("adaptive_clip", self.adaptive_clip == "on"),
            ("robust_aggregation", self.robust_aggregation != "none"),
        ):
            _require(
                not why,
                name,
                f"cannot be combined with secure_aggregation={self.secure_aggregation!r}: the server never sees an "
                f"individual update to clip or rank (leave it at its default; adaptive_clip 'auto' is off under secure "
                f"aggregation)",
            )
        sampled = self.sampled_per_round
        _require(sampled >= 3, "secure_aggregation",
                 f"{self.secure_aggregation!r} needs at least 3 clients per round (with 2, each learns the other's "
                 f"update from the sum), got {sampled}")
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        _require(shares > 0 and (shares <= 1 or (float(shares).is_integer() and 3 <= shares <= sampled)),
                 "secagg_num_shares", f"must be a fraction in (0, 1] or a count in 3..{sampled} (clients per round), "
                 f"got {shares}")
        _require(threshold > 0 and (threshold <= 1 or float(threshold).is_integer()),
                 "secagg_reconstruction_threshold", f"must be a fraction in (0, 1] or a count >= 2, got {threshold}")
        if threshold > 1 and shares > 1:
            _require(threshold < shares, "secagg_reconstruction_threshold",
                     f"must be below secagg_num_shares={shares:g}, got {threshold:g}")
        _require(self.secagg_clipping_range > 0, "secagg_clipping_range",
                 f"must be > 0, got {self.secagg_clipping_range}")
        q, mod = self.secagg_quantization_range, self.secagg_modulus_range
        _require(q >= 2, "secagg_quantization_range", f"must be an integer >= 2, got {q}")
        _require(q < mod <= 2**32 and mod & (mod - 1) == 0, "secagg_modulus_range",
                 f"must be a power of two above secagg_quantization_range={q} and at most 2**32, got {mod}")
        _require(sampled * q < mod, "secagg_quantization_range",
                 f"x clients per round ({sampled} x {q}) must stay below secagg_modulus_range={mod}, or the sum "
                 "overflows")
        _require(self.secagg_max_weight > 0, "secagg_max_weight", f"must be > 0, got {self.secagg_max_weight}")

    # ---- differential privacy with secure aggregation (distributed DP; docs/privacy.md) ----------------------------
    def _check_dp_with_secure_aggregation(self) -> None:
        """dp_mode 'local' under secure aggregation is distributed DP (each client clips and adds its share of the
        noise, the server unmasks only the noisy sum); dp_mode 'central' is refused: its server clips each update."""
        if self.dp_mode == "off" or self.secure_aggregation not in SECURE_AGGREGATIONS[1:]:
            return
        _require(
            self.dp_mode != "central",
            "secure_aggregation",
            "is not combined with central differential privacy (dp_mode 'central'): central DP clips each client's "
            "update, which secure aggregation hides from the server; set dp_mode 'local' (distributed DP: each client "
            "clips its change and adds its share of the noise, and the server unmasks only the noisy sum) or "
            "secure_aggregation 'off'",
        )
        from fedsrd.algorithms import get_algorithm_class, list_algorithms

        def admits_both(name: str) -> bool:
            cls = get_algorithm_class(name)
            return cls.secure_sum and self.dp_mode in cls.dp_support

        if not admits_both(self.algorithm):
            able = [a for a in list_algorithms() if admits_both(a)]
            raise ValueError(
                f"FedSRDConfig.secure_aggregation: distributed differential privacy (dp_mode {self.dp_mode!r} with "
                f"secure_aggregation {self.secure_aggregation!r}) needs a server step that is a weighted sum of "
                f"equal-shape dense uploads, each carrying its client's noise share; algorithm {self.algorithm!r} is "
                f"not one (its uploads are sparse with client-specific positions, partial, or its step needs each "
                f"client's upload). The algorithms that admit both: {', '.join(able)}."
            )
    # ---- end of differential privacy with secure aggregation ------------------------------------------------------

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


# ---- per-client LoRA ranks ---------------------------------------------------------------------------------------
def parse_client_lora_ranks(value: Any, num_clients: int) -> list[int]:
    """`client_lora_ranks` as one positive int per client: a list (ints or digit strings, e.g. from the command line)
    or the rule ``"cycle:r_0,r_1,..."`` (client k gets r_(k mod n)); ValueError naming what is wrong otherwise."""
    what = "FedSRDConfig.client_lora_ranks"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what}: expected one rank per client or a rule 'cycle:4,8,16,32', got {value!r}.")
    if len(value) == 1 and isinstance(value[0], str) and ":" in value[0]:
        rule, _, args = value[0].partition(":")
        if rule.strip() != "cycle":
            raise ValueError(f"{what}: unknown rule {rule.strip()!r} in {value[0]!r}; expected 'cycle:4,8,16,32'.")
        cycle = [_positive_rank(v, what) for v in args.split(",")]
        return [cycle[k % len(cycle)] for k in range(num_clients)]
    ranks = [_positive_rank(v, what) for v in value]
    if len(ranks) != num_clients:
        raise ValueError(
            f"{what}: got {len(ranks)} rank(s) for num_clients={num_clients}; expected one rank per client, or a rule "
            "such as 'cycle:4,8,16,32'."
        )
    return ranks


def _positive_rank(value: Any, what: str) -> int:
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.isdigit():
        text = int(text)
    if isinstance(text, bool) or not isinstance(text, int) or text < 1:
        raise ValueError(f"{what}: every rank must be a positive int, got {value!r}.")
    return text
# ---- end of per-client LoRA ranks ----------------------------------------------------------------------------------


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"FedSRDConfig.{field_name}: {message}.")
