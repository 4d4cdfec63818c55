"""`FederatedTrainer`: a `transformers.Trainer` that runs a whole federation of LoRA clients.

Each sampled client's local phase is Trainer's own training loop (`Trainer.train` with `max_steps=local_steps` on
that client's dataset and a fresh optimizer), so `TrainingArguments` (learning rate, batch size, gradient
accumulation, precision, gradient checkpointing, logging, `report_to`, seed) mean what they always mean.
`train()` runs the rounds; see `fedsrd.runtime.local` for the round loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import CallbackHandler, ProgressCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType, TrainOutput, set_seed

from fedsrd.algorithms import State, get_algorithm
from fedsrd.base_weights import check_base_writable, quantization_reason
from fedsrd.config import FedSRDConfig
from fedsrd.federation.callbacks import FederatedCallback, RoundEvents
from fedsrd.ops import derive_seed
from fedsrd.runtime.local import run_federation
from fedsrd.schedule import check_round_schedule, round_learning_rate

logger = logging.getLogger(__name__)

__all__ = ["FederatedCallback", "FederatedTrainer"]  # FederatedCallback lives in fedsrd.federation.callbacks


class _FederationCallbackHandler(CallbackHandler):
    """Trainer's callback handler, except that a client's local phase does not fire ``on_train_begin`` and
    ``on_train_end``: those are the federation's run-level events, fired once per federation
    (`fedsrd.federation.callbacks`). The local phase still resets ``should_training_stop`` as Trainer does."""

    local_phase = False

    def on_train_begin(self, args, state, control):
        if self.local_phase:
            control.should_training_stop = False
            return control
        return super().on_train_begin(args, state, control)

    def on_train_end(self, args, state, control):
        if self.local_phase:
            return control
        return super().on_train_end(args, state, control)


class _AlgorithmGradientsCleared(TrainerCallback):
    """After every optimizer step, taken or skipped, clear the gradients of the algorithm's own optimizer.

    Trainer clears gradients with `model.zero_grad()`, which misses tensors that live outside the model (FedKRSO's
    out x r coordinates). When the fp16 loss scaler skips an overflowing step, the optimizer's `step` never runs, so
    it cannot clear them itself: the inf would stay and every later step of the local phase would be skipped too.
    """

    def __init__(self, trainer: FederatedTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.fed_optimizer is not None:
            self.trainer.fed_optimizer.zero_grad(set_to_none=True)


class FederatedTrainer(Trainer):
    """Federated fine-tuning of a LoRA adapter with the `transformers.Trainer` API.

    Example:
        ```python
        trainer = FederatedTrainer(
            model=model, args=TrainingArguments(output_dir="out", learning_rate=2e-4, per_device_train_batch_size=8),
            fed_config=FedSRDConfig(algorithm="fedsrd", num_rounds=20, num_clients=4),
            client_datasets=[ds_code, ds_med, ds_fin, ds_math], eval_dataset={"code": dev_code, ...},
            processing_class=tokenizer,
        )
        trainer.train()
        ```

    `model` is a base `PreTrainedModel` (wrapped with `fed_config.to_lora_config()`) or a `PeftModel`. Client and
    eval datasets may be raw instruction data (columns instruction / input / output) or already tokenised
    (input_ids, labels). After `train()`, `trainer.history` holds one record per round and `trainer.global_state`
    the final global adapter. `template` and `max_length` apply when datasets are tokenised here.
    `skip_prompt_logits` (default on) computes logits only at positions whose next token is labelled: the same loss
    and gradients, without most of the vocabulary projection under completion-only training.

    `model` may also be an `AutoModelForSequenceClassification` model, with GLUE-style data (a sentence or a pair,
    and a label) or tokenised data (input_ids, labels as ints). Full-parameter algorithms (fedfft, fedkrso, fedkseed;
    `Algorithm.uses_lora` False) then train the model's own weights (docs/full_parameter.md); LoRA algorithms that
    can carry the new head (`Algorithm.trains_dense_head`: fedavg, fedprox, fedsrd, fedsrd_e) wrap it as PEFT's
    SEQ_CLS task, so the adapter and the head (``modules_to_save``) train, and the head is averaged dense each round.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        fed_config: FedSRDConfig,
        client_datasets: Sequence[Any],
        eval_dataset: Mapping[str, Any] | Any | None = None,
        processing_class: Any = None,
        data_collator: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        template: str = "alpaca",
        max_length: int = 512,
        skip_prompt_logits: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(fed_config, FedSRDConfig):
            raise TypeError(f"fed_config: expected a FedSRDConfig, got {type(fed_config).__name__}.")
        if fed_config.fed_seed is None:
            fed_config.fed_seed = args.seed  # one --seed for local training and the federation
        self.fed_config = fed_config
        self.algorithm = get_algorithm(fed_config.algorithm, fed_config)
        check_round_schedule(fed_config, args)
        if fed_config.round_lr_scheduler is not None:  # one rate per round (fedsrd.schedule), constant within it
            args.lr_scheduler_type = SchedulerType.CONSTANT
        self.base_learning_rate = args.learning_rate  # round_lr_scheduler's starting rate; restored after each round
        self.algorithm.check_training_args(args)  # e.g. FedKSeed's constant learning rate, before any training
        self.is_classifier = is_sequence_classifier(model)
        self.initial_weights: State = {}  # full-parameter algorithms: the trained weights' shared initial values
        self.fed_optimizer: torch.optim.Optimizer | None = None  # the algorithm's own optimizer (this local phase)
        self._fed_round, self._fed_client = 0, 0
        self.template = template
        self.skip_prompt_logits = skip_prompt_logits
        self._accepts_logits_to_keep: bool | None = None
        self.max_length = max_length
        self.client_datasets = self._prepare_clients(client_datasets, processing_class)
        eval_sets = self._prepare_eval(eval_dataset, processing_class)
        check_base_writable(model, self.algorithm)  # FLoRA/FedEx-LoRA write into base weights: not on quantized ones
        model = self._attach_adapter(model, args)
        if data_collator is None and processing_class is not None and self.is_classifier:
            data_collator = DataCollatorWithPadding(processing_class)  # labels are one class id per example
        if data_collator is None and processing_class is not None:
            data_collator = DataCollatorForSeq2Seq(processing_class, label_pad_token_id=-100, padding=True)
        if self.is_classifier and kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = classification_accuracy
        round_callbacks = self._round_callbacks(args, callbacks or [], processing_class)  # before Trainer sees args
        super().__init__(
            model=model,
            args=args,
            train_dataset=self.client_datasets[0],
            eval_dataset=eval_sets,
            processing_class=processing_class,
            data_collator=data_collator,
            callbacks=callbacks,
            **kwargs,
        )
        # Local phases neither checkpoint nor evaluate on Trainer's schedule: the federation saves and evaluates
        # the *global* adapter once per round (FedSRDConfig.save_every / eval_every).
        if args.save_strategy != SaveStrategy.NO or args.eval_strategy != IntervalStrategy.NO:
            logger.info("FederatedTrainer: save_strategy/eval_strategy apply per round (save_every/eval_every).")
        self.args.save_strategy = SaveStrategy.NO
        self.args.eval_strategy = IntervalStrategy.NO
        handler = self.callback_handler
        self.callback_handler = _FederationCallbackHandler(
            handler.callbacks, handler.model, handler.processing_class, handler.optimizer, handler.lr_scheduler
        )
        self.remove_callback(ProgressCallback)  # one bar over rounds instead of one per local phase
        self.add_callback(_AlgorithmGradientsCleared(self))
        for callback in round_callbacks:
            self.add_callback(callback)
        if self.algorithm.uses_lora:
            from peft import get_peft_model_state_dict

            self.global_state: State = self.algorithm.init_global_state(
                get_peft_model_state_dict(self.model, save_embedding_layers=False)
            )
        else:  # full-parameter algorithms: from the initial trained weights (every party has them)
            self.global_state = self.algorithm.init_global_state(self.initial_weights)
        self.history: list[dict[str, Any]] = []

    # ---- set-up and validation (all before any training) ---------------------------------------------------------
    def _round_callbacks(self, args: TrainingArguments, callbacks: list, tokenizer: Any) -> list[TrainerCallback]:
        """lm-eval and Hub callbacks the settings ask for (lm-eval first: the Hub card shows that round's scores)."""
        extra: list[TrainerCallback] = []
        if self.fed_config.lm_eval_tasks:
            from fedsrd.eval.callback import LmEvalCallback

            if not any(isinstance(c, LmEvalCallback) or c is LmEvalCallback for c in callbacks):
                extra.append(LmEvalCallback.from_config(self.fed_config, tokenizer=tokenizer))
        if args.push_to_hub:
            from fedsrd.hub import HubPushCallback

            if not any(isinstance(c, HubPushCallback) for c in callbacks):
                extra.append(HubPushCallback.from_training_args(args, self.fed_config))
            # Trainer would create the repo in __init__ and push every client's local weights; the federation
            # pushes the global adapter once per saved round instead (fedsrd.hub).
            args.push_to_hub = False
        return extra

    def _prepare_clients(self, client_datasets: Sequence[Any], tokenizer: Any) -> list[Any]:
        cfg = self.fed_config
        if client_datasets is None or len(client_datasets) == 0:
            raise ValueError("client_datasets: expected one dataset per client, got none.")
        if len(client_datasets) != cfg.num_clients:
            raise ValueError(
                f"FedSRDConfig.num_clients is {cfg.num_clients} but {len(client_datasets)} client datasets were given; "
                "expected one dataset per client."
            )
        prepared = []
        for i, ds in enumerate(client_datasets):
            if ds is None or len(ds) == 0:
                raise ValueError(f"client_datasets[{i}] is empty; every client needs at least one example.")
            prepared.append(self._tokenized(ds, tokenizer, f"client_datasets[{i}]"))
        return prepared

    def _prepare_eval(self, eval_dataset: Any, tokenizer: Any) -> dict[str, Any] | None:
        if eval_dataset is None:
            return None
        sets = dict(eval_dataset) if isinstance(eval_dataset, Mapping) else {"eval": eval_dataset}
        for name, ds in sets.items():
            if ds is None or len(ds) == 0:
                raise ValueError(f"eval_dataset[{name!r}] is empty.")
        return {
            name: _longest_first(self._tokenized(ds, tokenizer, f"eval_dataset[{name!r}]")) for name, ds in sets.items()
        }

    def _tokenized(self, ds: Any, tokenizer: Any, what: str) -> Any:
        columns = getattr(ds, "column_names", None) or []
        if "input_ids" in columns:
            return ds
        if tokenizer is None:
            raise ValueError(f"{what} is not tokenised (no 'input_ids' column) and no processing_class was given.")
        if self.is_classifier:
            from fedsrd.data import tokenize_for_classification

            try:
                return tokenize_for_classification(ds, tokenizer, max_length=self.max_length)
            except ValueError as err:
                raise ValueError(f"{what}: {err}") from err
        from fedsrd.data import tokenize_for_sft

        try:
            return tokenize_for_sft(ds, tokenizer, template=self.template, max_length=self.max_length)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from err

    def _attach_adapter(self, model: torch.nn.Module, args: TrainingArguments) -> torch.nn.Module:
        from peft import PeftModel, get_peft_model

        if not self.algorithm.uses_lora:
            return self._prepare_full_model(model, args)
        if self.is_classifier:
            self._check_classifier_support()
        if not isinstance(model, PeftModel):
            from fedsrd.models import find_lora_target_modules

            requested = self.fed_config.lora_target_modules
            targets = find_lora_target_modules(model, "all-linear" if requested == ["all-linear"] else requested)
            # a classifier as PEFT's SEQ_CLS task: the adapter and the new head (modules_to_save) train together
            task_type = "SEQ_CLS" if self.is_classifier else "CAUSAL_LM"
            lora_config = self.fed_config.to_lora_config(task_type=task_type, target_modules=targets)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.fed_config.seed)  # every party builds the same initial adapter
                model = get_peft_model(model, lora_config)
            # issue 19 (newalgos): e.g. Fed-SB's R between B and A, initialised from client 0's first examples
            self.algorithm.prepare_adapter(model, self.client_datasets[0], args)
        self._add_client_rank_adapters(model)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(self.algorithm.trainable(name))
                if self.fed_config.client_lora_ranks is not None and f".{self.global_adapter}." not in name:
                    param.requires_grad_(False)  # a client rank's adapter trains only in that client's phase
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        return model

    def _check_classifier_support(self) -> None:
        """A LoRA algorithm on a sequence classifier must carry the new head through its round (PEFT trains it as
        ``modules_to_save``; `Algorithm.trains_dense_head`): refuse the others, and what the head is not set up for."""
        from fedsrd.algorithms import get_algorithm_class
        from fedsrd.algorithms.families import head_supporting_algorithms

        cfg, name = self.fed_config, self.algorithm.name
        if not self.algorithm.trains_dense_head:
            supported = head_supporting_algorithms()
            lora = [n for n in supported if get_algorithm_class(n).uses_lora]
            full = [n for n in supported if not get_algorithm_class(n).uses_lora]
            raise ValueError(
                f"algorithm {name!r} trains a LoRA adapter but cannot carry a sequence classifier's new head through "
                f"its round (it would stay frozen or diverge between parties); for sequence classification use a "
                f"LoRA algorithm that trains the head ({', '.join(lora)}) or a full-parameter one ({', '.join(full)})."
            )
        if cfg.dp_mode != "off":
            raise ValueError(
                f"FedSRDConfig.dp_mode={cfg.dp_mode!r}: differential privacy is not set up for a LoRA algorithm on a "
                "sequence classifier (the head's change would need its own share of the clipping and noise); use "
                "dp_mode='off' or a full-parameter algorithm (fedfft, fedkrso)."
            )
        if cfg.client_lora_ranks is not None:
            raise ValueError(
                "FedSRDConfig.client_lora_ranks: clients of different LoRA ranks are not set up for a sequence "
                "classifier's head; leave it unset."
            )

    # ---- clients of different LoRA ranks (FedSRDConfig.client_lora_ranks) ----------------------------------------
    def _add_client_rank_adapters(self, model: torch.nn.Module) -> None:
        """One PEFT adapter per client rank other than the global one (`client_adapter_name`), each a LoraConfig like
        the global adapter's with r = that rank and lora_alpha = lora_alpha * r / lora_r (the same scaling). The
        global adapter stays active; a client's local phase activates its rank's (`use_client_rank`)."""
        import dataclasses

        cfg = self.fed_config
        self.global_adapter = model.active_adapter
        if cfg.client_lora_ranks is None:
            return
        peft_config = model.peft_config[self.global_adapter]
        if getattr(peft_config, "r", None) != cfg.lora_r:
            raise ValueError(
                f"FedSRDConfig.client_lora_ranks: the model's adapter has rank {getattr(peft_config, 'r', None)}, but "
                f"lora_r={cfg.lora_r}; with per-client ranks the global adapter must have rank lora_r."
            )
        if getattr(peft_config, "rank_pattern", None) or getattr(peft_config, "alpha_pattern", None):
            raise ValueError(
                "FedSRDConfig.client_lora_ranks: the model's LoraConfig sets rank_pattern/alpha_pattern; per-client "
                "ranks need one rank per adapter (leave those patterns empty)."
            )
        for rank in sorted(set(cfg.client_lora_ranks) - {cfg.lora_r}):
            # the global adapter's scaling: alpha / r (rsLoRA: alpha / sqrt(r))
            ratio = rank / cfg.lora_r if not getattr(peft_config, "use_rslora", False) else (rank / cfg.lora_r) ** 0.5
            client_config = dataclasses.replace(peft_config, r=rank, lora_alpha=peft_config.lora_alpha * ratio)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # overwritten by the start state before any training
                model.add_adapter(client_adapter_name(rank), client_config)
        model.set_adapter(self.global_adapter)

    def use_client_rank(self, rank: int | None) -> None:
        """Activate the adapter a client of LoRA rank `rank` trains (None or lora_r: the global adapter); only the
        active adapter's factors train, as the algorithm's `trainable` says."""
        if not self.algorithm.uses_lora:
            return
        name = self.global_adapter if rank is None or rank == self.fed_config.lora_r else client_adapter_name(rank)
        if self.model.active_adapter == name:
            return
        self.model.set_adapter(name)
        for param_name, param in self.model.named_parameters():
            if "lora_" in param_name:
                param.requires_grad_(f".{name}." in param_name and self.algorithm.trainable(param_name))

    def _prepare_full_model(self, model: torch.nn.Module, args: TrainingArguments) -> torch.nn.Module:
        """Full-parameter algorithms: no adapter. The trained weights get `requires_grad` where the algorithm's
        `trainable` says autograd differentiates them; their initial values (float32, CPU) are kept, since every
        party rebuilds the global model from them (`Algorithm.materialize`)."""
        from peft import PeftModel

        name = self.algorithm.name
        if isinstance(model, PeftModel):
            raise ValueError(
                f"algorithm {name!r} fine-tunes the model's own weights, without LoRA; pass the base "
                "model, not a PeftModel."
            )
        reason = quantization_reason(model)
        if reason is not None:
            raise ValueError(
                f"algorithm {name!r} writes the model's weights, so it needs an unquantized model, but "
                f"this one is quantized ({reason})."
            )
        trained = self.algorithm.trainable_weights(model)
        params = dict(model.named_parameters())
        trained_set = set(trained)
        for param_name, param in params.items():
            param.requires_grad_(param_name in trained_set and self.algorithm.trainable(param_name))
        self.initial_weights = {n: params[n].detach().to("cpu", torch.float32).clone() for n in trained}
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        return model

    # ---- the federation -----------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Run every round of the federation (the local phases use `Trainer.train`)."""
        self.resume_requested = bool(resume_from_checkpoint or self.args.resume_from_checkpoint)
        return run_federation(self)

    def local_train(self, client_id: int, round: int) -> TrainOutput:
        """One client's local phase: Trainer's loop for `local_steps` steps with a fresh optimizer (it fires Trainer's
        step events, not ``on_train_begin``/``on_train_end``, which are the federation's)."""
        self.train_dataset = self.client_datasets[client_id]
        self.args.max_steps = self.fed_config.local_steps
        self.args.learning_rate = self.round_learning_rate(round)  # the optimizers (Trainer's, the algorithm's) read it
        self.optimizer, self.lr_scheduler = None, None
        self.fed_optimizer, self._fed_round, self._fed_client = None, round, client_id
        set_seed(derive_seed(self.fed_config.seed, "local", round, client_id) % (2**32))
        if self.algorithm.uses_lora:  # issue 19 (newalgos): what trains may change by round (RoLoRA)
            for name, param in self.model.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(self.algorithm.trains(name, round))
        self.callback_handler.local_phase = True
        try:
            return super().train()
        finally:
            self.callback_handler.local_phase = False
            self.args.learning_rate = self.base_learning_rate
            close = getattr(self.fed_optimizer, "close", None)  # e.g. FedKRSO's forward hooks
            if close is not None:
                close()

    def round_learning_rate(self, round: int) -> float:
        """The learning rate of `round`'s local phases (`FedSRDConfig.round_lr_scheduler`; unset: the rate
        TrainingArguments' own schedule starts each round from)."""
        cfg = self.fed_config
        return round_learning_rate(
            cfg.round_lr_scheduler, self.base_learning_rate, round, cfg.num_rounds, cfg.round_lr_min
        )

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The algorithm's own optimizer where it has one (`Algorithm.create_optimizer`), else Trainer's."""
        if self.optimizer is None:
            own = self.algorithm.create_optimizer(
                self.model if model is None else model, self.args, self._fed_round, self._fed_client
            )
            if own is not None:
                self.optimizer = self.fed_optimizer = own
                return own
        return super().create_optimizer(model)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Trainer's step, or a zeroth-order one (forward passes only) if the algorithm's optimizer takes those."""
        zeroth_order_step = getattr(self.fed_optimizer, "zeroth_order_step", None)
        if zeroth_order_step is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.eval()  # as MeZO: both evaluations of the batch see the same function (no dropout)
        inputs = self._prepare_inputs(inputs)

        def loss_fn() -> torch.Tensor:
            with torch.no_grad(), self.compute_loss_context_manager():
                return self.compute_loss(model, inputs)

        return zeroth_order_step(loss_fn).detach()

    def _clip_grad_norm(self, model):
        # FedKRSO trains coordinates that live outside the model: clip them together with the model's gradients.
        extra_parameters = getattr(self.fed_optimizer, "extra_parameters", None)
        if extra_parameters is None:
            return super()._clip_grad_norm(model)
        params = [*model.parameters(), *extra_parameters()]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def local_state(self) -> State:
        """What the local phase produced, as `Algorithm.client_update` reads it (float32, CPU).

        LoRA algorithms: the adapter state dict. Full-parameter algorithms: each trained weight's change from its
        initial value (for the weights the global state names), plus the algorithm optimizer's `upload_state()`
        (FedKRSO's per-seed accumulators, FedKSeed's per-seed scalars).
        """
        if self.algorithm.uses_lora:
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(
                self.model, adapter_name=self.model.active_adapter, save_embedding_layers=False
            )  # the adapter this client trained (its own rank's, with client_lora_ranks)
            return {k: v.detach().to("cpu").float().clone() for k, v in adapter.items()}
        params = dict(self.model.named_parameters())
        state = {
            name: params[name].detach().to("cpu", torch.float32) - self.initial_weights[name]
            for name in self.global_state
            if name in params and name in self.initial_weights
        }
        upload_state = getattr(self.fed_optimizer, "upload_state", None)
        if upload_state is not None:
            state.update(upload_state())
        return state

    def save_global_model(self, directory: str | Path) -> None:
        """Write the model as loaded now (after a round: the global one): a PEFT adapter folder, or for
        full-parameter algorithms a complete model folder (`save_pretrained` of the model and its tokenizer)."""
        if self.algorithm.uses_lora:
            # the global adapter only (not the per-rank client adapters of client_lora_ranks)
            self.model.save_pretrained(
                str(directory), save_embedding_layers=False, selected_adapters=[self.global_adapter]
            )
            return
        self.model.save_pretrained(str(directory))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(directory))

    def _can_skip_prompt_logits(self, model, inputs) -> bool:
        """Whether the loss can be computed from the completion positions' logits alone (same value, less work).

        With completion-only labels, most positions are prompt: their logits (a vocab-sized row each, the costliest
        matmul for small models with large vocabularies) never reach the loss. Causal LMs accept `logits_to_keep`
        with the positions to keep; this is used when nothing else needs the full logits.
        """
        if not self.skip_prompt_logits or self.is_classifier or "labels" not in inputs:
            return False
        if self.label_smoother is not None or self.compute_loss_func is not None or self.compute_metrics is not None:
            return False
        if self._accepts_logits_to_keep is None:
            import inspect

            base = self.accelerator.unwrap_model(model)
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        return self._accepts_logits_to_keep

    def _completion_only_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """Causal-LM cross-entropy over the labelled positions, computing logits only where some label counts."""
        labels = inputs["labels"]
        next_labels = labels[:, 1:]  # the logit at position t predicts token t + 1
        keep = (next_labels != -100).any(dim=0).nonzero().flatten()
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, logits_to_keep=keep)
        logits = outputs.logits.float()
        target = next_labels[:, keep].to(logits.device)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # as transformers' ForCausalLMLoss: a sum over the accumulated batch's tokens, scaled like Trainer's
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        else:
            loss = loss / (target != -100).sum().clamp(min=1)
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._can_skip_prompt_logits(model, inputs):
            result = self._completion_only_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        extra = self.algorithm.extra_loss(model, self.global_state) if model.training else None  # not in eval
        if extra is None:
            return result
        if self._loss_scaled_for_ga(num_items_in_batch):
            # Trainer will not divide this micro-batch loss by the accumulation steps; the extra term must still
            # count once per optimizer step, not once per micro-batch.
            extra = extra / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether Trainer's `training_step` leaves this loss undivided by gradient accumulation (its own test)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def load_global_state(self, state: State) -> None:
        """Load a global adapter state into the model (strict: every adapter weight must be present).

        Full-parameter algorithms: load the weights `Algorithm.materialize` rebuilds from the state and the initial
        weights (every trained weight must be rebuilt).
        """
        if not self.algorithm.uses_lora:
            self._load_full_weights(state)
            return
        from peft import set_peft_model_state_dict

        active = self.model.active_adapter
        result = set_peft_model_state_dict(self.model, state, adapter_name=active)
        # the other adapters (clients of other ranks, client_lora_ranks) are not loaded here
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{active}." in k]
        if missing:
            raise RuntimeError(f"global state is missing adapter weights, e.g. {missing[:3]}")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"global state has weights the model does not, e.g. {unexpected[:3]}")

    def _load_full_weights(self, state: State) -> None:
        weights = self.algorithm.materialize(state, self.initial_weights)
        missing = sorted(set(self.initial_weights) - set(weights))
        if missing:
            raise RuntimeError(f"the global state does not rebuild trained weight(s), e.g. {missing[:3]}")
        params = dict(self.model.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise RuntimeError(f"the global state rebuilds weights the model does not have, e.g. {unknown[:3]}")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    def round_events(self, agree=None) -> RoundEvents:
        """The federation's events on this trainer's callbacks (`fedsrd.federation.callbacks`)."""
        return RoundEvents(
            lambda: self.callback_handler.callbacks, self.args, state=lambda: self.state, model=lambda: self.model,
            agree=agree,
        )


def client_adapter_name(rank: int) -> str:
    """The PEFT adapter name of the clients of LoRA rank `rank` (no name is a substring of another's)."""
    return f"fedsrd_rank_{rank}_clients"


def is_sequence_classifier(model: torch.nn.Module) -> bool:
    """Whether `model` (or the base of a PEFT model) is an `AutoModelForSequenceClassification` model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForSequenceClassification")


def classification_accuracy(eval_prediction: Any) -> dict[str, float]:
    """`compute_metrics` of sequence classifiers: the share of examples whose arg-max logit is the label."""
    import numpy as np

    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    labels = np.asarray(eval_prediction.label_ids)
    return {"accuracy": float((np.asarray(logits).argmax(-1) == labels).mean())}


def _longest_first(ds: Any) -> Any:
    """The evaluation rows sorted by token length, longest first (stable), so each batch pads to little.

    Trainer evaluates in dataset order; rows of similar length in one batch cut the padded positions that the model
    computes for nothing, and the longest batch comes first, so running out of memory shows at once. The loss of each
    row is unchanged; Trainer's eval loss (the mean of the batch means) is taken over these batches.
    """
    columns = getattr(ds, "column_names", None) or []
    if "input_ids" not in columns or not hasattr(ds, "sort") or len(ds) < 2:
        return ds
    lengths = [len(ids) for ids in ds["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return ds.select(order)
