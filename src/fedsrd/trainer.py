"""`FederatedTrainer`: a `transformers.Trainer` that runs a whole federation of LoRA clients.

Each sampled client's local phase is Trainer's own training loop (`Trainer.train` with `max_steps=local_steps` on
that client's dataset and a fresh optimizer), so `TrainingArguments` (learning rate, batch size, gradient
accumulation, precision, gradient checkpointing, logging, `report_to`, seed) mean what they always mean.
`train()` runs the rounds; see `fedsrd.runtime.local` for the round loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, TrainOutput, set_seed

from fedsrd.algorithms import State, get_algorithm
from fedsrd.config import FedSRDConfig

logger = logging.getLogger(__name__)


class FederatedCallback(TrainerCallback):
    """A `TrainerCallback` that also hears the federation's per-round events.

    `on_round_begin(args, state, control, round=, clients=, model=)` and
    `on_round_end(args, state, control, round=, record=, saved_dir=, is_last=, model=)`. `record` is the round's
    entry of `history.json` and may be extended in place (it is written after the callbacks ran); `saved_dir` is the
    `round_NNNN/` adapter directory written this round, or None; the model holds the new global adapter. The round
    metrics also reach every callback's `on_log`.
    """

    def on_round_begin(self, args, state, control, **kwargs):
        pass

    def on_round_end(self, args, state, control, **kwargs):
        pass


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
    the final global adapter.
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
        **kwargs: Any,
    ) -> None:
        if not isinstance(fed_config, FedSRDConfig):
            raise TypeError(f"fed_config: expected a FedSRDConfig, got {type(fed_config).__name__}.")
        if fed_config.fed_seed is None:
            fed_config.fed_seed = args.seed  # one --seed for local training and the federation
        self.fed_config = fed_config
        self.algorithm = get_algorithm(fed_config.algorithm, fed_config)
        self.template = template
        self.max_length = max_length
        self.client_datasets = self._prepare_clients(client_datasets, processing_class)
        eval_sets = self._prepare_eval(eval_dataset, processing_class)
        model = self._attach_adapter(model, args)
        if data_collator is None and processing_class is not None:
            data_collator = DataCollatorForSeq2Seq(processing_class, label_pad_token_id=-100, padding=True)
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
        self.remove_callback(ProgressCallback)  # one bar over rounds instead of one per local phase
        from peft import get_peft_model_state_dict

        self.global_state: State = self.algorithm.init_global_state(
            get_peft_model_state_dict(self.model, save_embedding_layers=False)
        )
        self.history: list[dict[str, Any]] = []

    # ---- set-up and validation (all before any training) ---------------------------------------------------------
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
        return {name: self._tokenized(ds, tokenizer, f"eval_dataset[{name!r}]") for name, ds in sets.items()}

    def _tokenized(self, ds: Any, tokenizer: Any, what: str) -> Any:
        columns = getattr(ds, "column_names", None) or []
        if "input_ids" in columns:
            return ds
        if tokenizer is None:
            raise ValueError(f"{what} is not tokenised (no 'input_ids' column) and no processing_class was given.")
        from fedsrd.data import tokenize_for_sft

        try:
            return tokenize_for_sft(ds, tokenizer, template=self.template, max_length=self.max_length)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from err

    def _attach_adapter(self, model: torch.nn.Module, args: TrainingArguments) -> torch.nn.Module:
        from peft import PeftModel, get_peft_model

        if not isinstance(model, PeftModel):
            from fedsrd.models import find_lora_target_modules

            requested = self.fed_config.lora_target_modules
            targets = find_lora_target_modules(model, "all-linear" if requested == ["all-linear"] else requested)
            lora_config = self.fed_config.to_lora_config(target_modules=targets)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.fed_config.seed)  # every party builds the same initial adapter
                model = get_peft_model(model, lora_config)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(self.algorithm.trainable(name))
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        return model

    # ---- the federation -----------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Run every round of the federation (the local phases use `Trainer.train`)."""
        from fedsrd.runtime.local import run_federation

        return run_federation(self)

    def local_train(self, client_id: int, round: int) -> TrainOutput:
        """One client's local phase: Trainer's loop for `local_steps` steps with a fresh optimizer."""
        from fedsrd.ops import derive_seed

        self.train_dataset = self.client_datasets[client_id]
        self.args.max_steps = self.fed_config.local_steps
        self.optimizer, self.lr_scheduler = None, None
        set_seed(derive_seed(self.fed_config.seed, "local", round, client_id) % (2**32))
        return super().train()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        extra = self.algorithm.extra_loss(model, self.global_state)
        if extra is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra

    def load_global_state(self, state: State) -> None:
        """Load a global adapter state into the model (strict: every adapter weight must be present)."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:
            raise RuntimeError(f"global state is missing adapter weights, e.g. {missing[:3]}")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"global state has weights the model does not, e.g. {unexpected[:3]}")

    def call_round_event(self, event: str, **kwargs: Any) -> None:
        for callback in self.callback_handler.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(self.args, self.state, self.control, model=self.model, **kwargs)
