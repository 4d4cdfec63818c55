"""Command line: `fedsrd train` (the main job), `fedsrd merge` (the server step on files alone), `fedsrd eval`
(lm-eval on an adapter) and `fedsrd report` (plots and tables comparing runs)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLIT_ALIASES = {"eval": ("dev", "validation", "test")}


@dataclass
class ModelDataArguments:
    """Which model and data the main job uses."""

    model_name_or_path: str = field(
        default="gemma-3-270m",
        metadata={
            "help": "Causal LM: a Hub name or local dir; 'gemma-3-270m' (embedded) or 'tiny-llama' (random, tests)."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Model weights dtype: float32, bfloat16, float16, auto."})
    data: list[str] = field(
        default_factory=lambda: ["synthetic"],
        metadata={
            "help": "'synthetic' (embedded domains), or data sources: local files/dirs (dir with train.* and dev.*) "
            "or Hub dataset names, one per domain."
        },
    )
    domains: list[str] = field(
        default_factory=lambda: ["arithmetic", "code_output", "percent", "units"],
        metadata={"help": "Synthetic domains to generate (with data=synthetic)."},
    )
    train_size: int = field(default=256, metadata={"help": "Training examples per domain (0: all)."})
    eval_size: int = field(default=64, metadata={"help": "Held-out examples per domain (0: all)."})
    partition: str = field(
        default="domain",
        metadata={"help": "How data is split over clients: domain (one source each), iid, or dirichlet."},
    )
    dirichlet_column: str = field(default="domain", metadata={"help": "Label column for the Dirichlet partitioner."})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (smaller: more skew)."})
    template: str = field(default="alpaca", metadata={"help": "Prompt template: alpaca, or chat (tokenizer's)."})
    max_length: int = field(default=256, metadata={"help": "Maximum tokens per example (prompt + completion)."})
    task: str = field(
        default="causal_lm",
        metadata={
            "help": "causal_lm (instruction data), or classification: AutoModelForSequenceClassification on GLUE-style "
            "data (a sentence or a pair, a label); models 'all-minilm-l6-v2' (embedded), 'tiny-bert' or any Hub name."
        },
    )
    num_labels: int = field(default=2, metadata={"help": "Classification: number of classes."})
    text_columns: list[str] = field(
        default_factory=list,
        metadata={"help": "Classification: the text column or pair (default: sentence, sentence1/2, question/...)."},
    )
    label_column: str = field(default="label", metadata={"help": "Classification: the label column."})

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.partition not in ("domain", "iid", "dirichlet"):
            raise ValueError(f"--partition: expected domain, iid or dirichlet, got {self.partition!r}.")
        if self.template not in ("alpaca", "chat"):
            raise ValueError(f"--template: expected alpaca or chat, got {self.template!r}.")
        if self.task not in ("causal_lm", "classification"):
            raise ValueError(f"--task: expected causal_lm or classification, got {self.task!r}.")
        if self.task == "classification" and self.data == ["synthetic"]:
            raise ValueError(
                "--task classification needs --data: GLUE-style files or Hub datasets (the synthetic "
                "domains are instruction data)."
            )
        if self.num_labels < 1:
            raise ValueError(f"--num_labels: expected >= 1, got {self.num_labels}.")
        if isinstance(self.text_columns, str):
            self.text_columns = [self.text_columns]
        if len(self.text_columns) > 2:
            raise ValueError(f"--text_columns: expected one column or a pair, got {self.text_columns}.")
        if self.train_size < 0 or self.eval_size < 0:
            raise ValueError("--train_size/--eval_size: expected >= 0.")


def yaml_to_argv(path: str | Path) -> list[str]:
    """A YAML config as command-line arguments, so the command line can override any of it."""
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values.")
    argv: list[str] = []
    for key, value in config.items():
        if isinstance(value, list):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif value is None:
            continue
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_train_args(argv: list[str]):
    from transformers import HfArgumentParser, TrainingArguments

    from fedsrd.config import FedSRDConfig

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    full = (yaml_to_argv(known.config) if known.config else []) + rest
    parser = HfArgumentParser((FedSRDConfig, TrainingArguments, ModelDataArguments))
    fed, training, model_data = parser.parse_args_into_dataclasses(args=full)
    return fed, training, model_data


def _take(ds, n: int):
    return ds if n == 0 or len(ds) <= n else ds.select(range(n))


def load_domains(model_data: ModelDataArguments, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and eval datasets per domain/source."""
    from fedsrd import data

    if model_data.data == ["synthetic"]:
        splits = data.load_synthetic(
            tuple(model_data.domains),
            train_size=model_data.train_size or 256,
            test_size=model_data.eval_size or 64,
            seed=seed,
        )
        return {d: s["train"] for d, s in splits.items()}, {d: s["test"] for d, s in splits.items()}
    train, evals = {}, {}
    for source in model_data.data:
        name = Path(source).name if Path(source).exists() else source.split("/")[-1]
        train[name] = _take(data.load_instruction_data(source, split="train"), model_data.train_size)
        for split in SPLIT_ALIASES["eval"]:
            try:
                evals[name] = _take(data.load_instruction_data(source, split=split), model_data.eval_size)
                break
            except (FileNotFoundError, ValueError):
                continue
    return train, evals


def build_clients(model_data: ModelDataArguments, train: dict[str, Any], num_clients: int, seed: int) -> list[Any]:
    from datasets import concatenate_datasets

    from fedsrd import data

    if model_data.partition == "domain":
        if len(train) != num_clients:
            raise ValueError(
                f"--partition domain gives one client per domain: {len(train)} domains ({list(train)}) but "
                f"num_clients={num_clients}; set num_clients={len(train)} or use --partition iid/dirichlet."
            )
        return data.partition_by_source(train)
    pooled = concatenate_datasets(
        [ds.add_column("domain", [n] * len(ds)) if "domain" not in ds.column_names else ds for n, ds in train.items()]
    )
    if model_data.partition == "iid":
        return data.partition_iid(pooled, num_clients, seed=seed)
    return data.partition_dirichlet(
        pooled, num_clients, column=model_data.dirichlet_column, alpha=model_data.dirichlet_alpha, seed=seed
    )


def run_train(argv: list[str] | None = None):
    """The main job: parse arguments, build model and data, run the federation. Returns the trainer."""
    from fedsrd.models import load_causal_lm
    from fedsrd.trainer import FederatedTrainer

    fed, training, model_data = parse_train_args(sys.argv[1:] if argv is None else argv)
    # Under `accelerate launch` the main process downloads/converts/caches first; the others then read its caches.
    with training.main_process_first(desc="loading the model and data"):
        if model_data.task == "classification":
            from fedsrd.models import load_sequence_classifier

            model, tokenizer = load_sequence_classifier(
                model_data.model_name_or_path, num_labels=model_data.num_labels, dtype=model_data.dtype, seed=fed.seed
            )
        else:
            model, tokenizer = load_causal_lm(model_data.model_name_or_path, dtype=model_data.dtype)
        train, evals = load_domains(model_data, fed.seed)
        clients = build_clients(model_data, train, fed.num_clients, fed.seed)
        if model_data.task == "classification":
            clients = [_tokenize_classification(ds, tokenizer, model_data) for ds in clients]
            evals = {name: _tokenize_classification(ds, tokenizer, model_data) for name, ds in evals.items()}
    trainer = FederatedTrainer(
        model=model,
        args=training,
        fed_config=fed,
        client_datasets=clients,
        eval_dataset=evals or None,
        processing_class=tokenizer,
        template=model_data.template,
        max_length=model_data.max_length,
    )
    output = trainer.train()
    if training.process_index == 0:
        print(json.dumps({"output_dir": training.output_dir, **output.metrics}, indent=2))
    return trainer


def _tokenize_classification(ds, tokenizer, model_data: ModelDataArguments):
    from fedsrd.data import tokenize_for_classification

    return tokenize_for_classification(
        ds,
        tokenizer,
        text_columns=model_data.text_columns or None,
        label_column=model_data.label_column,
        max_length=model_data.max_length,
    )


def run_merge(argv: list[str]) -> None:
    from fedsrd.config import FedSRDConfig
    from fedsrd.server import ADAPTER_CONFIG, merge_adapters, save_adapter

    p = argparse.ArgumentParser(
        prog="fedsrd merge",
        description="Run one server step on files: global adapter + client updates -> new global adapter + broadcast.",
    )
    p.add_argument("--global", dest="global_dir", required=True, help="Current global PEFT adapter directory.")
    p.add_argument("--updates", nargs="+", required=True, help="Encoded client update files.")
    p.add_argument("--out", required=True, help="Directory for the new global adapter (and broadcast.bin).")
    p.add_argument(
        "--algorithm",
        default=None,
        help="Algorithm name (default: from fed_config.json next to --global, else fedavg).",
    )
    p.add_argument("--fed_config", default=None, help="A fed_config.json with the run's FedSRDConfig.")
    p.add_argument("--round", type=int, default=None, help="Round number (default: read from the updates).")
    a = p.parse_args(argv)
    cfg_path = Path(a.fed_config) if a.fed_config else Path(a.global_dir).parent / "fed_config.json"
    cfg_dict = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if a.algorithm:
        cfg_dict["algorithm"] = a.algorithm
    config = FedSRDConfig(**cfg_dict)
    state, broadcast = merge_adapters(a.global_dir, a.updates, config.algorithm, round=a.round, config=config)
    adapter_config_path = Path(a.global_dir) / ADAPTER_CONFIG
    adapter_config = json.loads(adapter_config_path.read_text()) if adapter_config_path.is_file() else None
    out = save_adapter(state, a.out, adapter_config)
    (out / "broadcast.bin").write_bytes(broadcast)
    print(json.dumps({"out": str(out), "broadcast_bytes": len(broadcast)}))


def run_eval(argv: list[str]) -> None:
    from fedsrd.eval.command import main as eval_main

    eval_main(argv)


def run_report(argv: list[str]) -> None:
    from fedsrd.report import main as report_main

    report_main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": run_train, "merge": run_merge, "eval": run_eval, "report": run_report}
    if not argv or argv[0] not in commands:
        print(
            "usage: fedsrd {train,merge,eval,report} ...\n"
            "  train  run a federation (same flags as examples/fed_train.py)\n"
            "  merge  one server step on files (see fedsrd merge --help)\n"
            "  eval   lm-eval scores of a base model + adapter (see fedsrd eval --help)\n"
            "  report Markdown report with plots comparing run directories (see fedsrd report --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
