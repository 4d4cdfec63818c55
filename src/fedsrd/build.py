"""Models and data from the main job's arguments, built one way for every caller: the command line (`fedsrd train`,
`examples/fed_train.py`, every process of `accelerate launch`) and each Flower SuperNode (`fedsrd.integrations.node`).

`parse_train_args` turns a command line (and its ``--config`` YAML) into the three argument objects;
`ModelDataArguments` says which model and data; `load_model` builds the model and tokenizer; `load_data` the clients'
and eval sets (raw rows); `build_trainer` the `FederatedTrainer` over them. Tokenisation happens in one place for
each task: instruction data in `FederatedTrainer` (template, max_length), classification data here
(`prepare_dataset`), so the simulation and a node feed their Trainer the same tensors.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from fedsrd.config import FedSRDConfig
    from fedsrd.trainer import FederatedTrainer

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


def yaml_to_argv(path: str | Path) -> list[str]:
    """A YAML config as command-line arguments, so the command line can override any of it."""
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--config: no such file: {str(path)!r}; expected a YAML file of argument names to values."
        )
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(error)}.") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got a {type(config).__name__}.")
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
    from_file = yaml_to_argv(known.config) if known.config else []
    parser = HfArgumentParser((FedSRDConfig, TrainingArguments, ModelDataArguments))
    parser.error = _raise_value_error  # one line naming the argument, not argparse's 200-line usage and exit
    fed, training, model_data, unknown = parser.parse_args_into_dataclasses(
        args=from_file + rest, return_remaining_strings=True
    )
    if unknown:
        raise ValueError(_unknown_arguments_message(parser, unknown, from_file, known.config))
    return fed, training, model_data


def _raise_value_error(message: str) -> None:
    raise ValueError(message[:1].upper() + message[1:] + ".")


def _unknown_arguments_message(
    parser: argparse.ArgumentParser, unknown: list[str], from_file: list[str], config
) -> str:
    """Which arguments are unknown, where they came from, and the closest known names."""
    import difflib

    known_names = [o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--")]
    parts = []
    for option in (u for u in unknown if u.startswith("-")):
        name = option.lstrip("-").split("=")[0]
        where = f"in {config}" if option in from_file else "on the command line"
        close = difflib.get_close_matches(name, known_names, n=1)
        parts.append(f"{name!r} ({where}{'; did you mean ' + repr(close[0]) if close else ''})")
    if not parts:
        return f"unexpected values {unknown}; expected --name value pairs."
    return f"unknown argument{'s' * (len(parts) > 1)} {', '.join(parts)}; see `fedsrd train --help`."


def _yaml_problem(error: Exception) -> str:
    def at(mark) -> str:
        return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""

    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    where = f"{context}{at(getattr(error, 'context_mark', None))}: " if context else ""
    return f"{where}{problem}{at(getattr(error, 'problem_mark', None))}"


def load_model(model_data: ModelDataArguments, seed: int) -> tuple[Any, Any]:
    """(model, tokenizer): a causal LM, or a sequence classifier with a head seeded by `seed`."""
    if model_data.task == "classification":
        from fedsrd.models import load_sequence_classifier

        return load_sequence_classifier(
            model_data.model_name_or_path, num_labels=model_data.num_labels, dtype=model_data.dtype, seed=seed
        )
    from fedsrd.models import load_causal_lm

    return load_causal_lm(model_data.model_name_or_path, dtype=model_data.dtype)


def load_data(model_data: ModelDataArguments, num_clients: int, seed: int) -> tuple[list[Any], dict[str, Any]]:
    """(one dataset per client, eval sets by name), raw rows, partitioned as `model_data.partition` says."""
    train, evals = load_domains(model_data, seed)
    return build_clients(model_data, train, num_clients, seed), evals


def prepare_dataset(ds: Any, tokenizer: Any, model_data: ModelDataArguments) -> Any:
    """Classification rows tokenised with their text and label columns; instruction rows as they are (the
    `FederatedTrainer` tokenises them with the run's template and max_length)."""
    if model_data.task != "classification":
        return ds
    return _tokenize_classification(ds, tokenizer, model_data)


def build_trainer(
    fed: FedSRDConfig,
    training: TrainingArguments,
    model_data: ModelDataArguments,
    *,
    seed: int,
    client_datasets: list[Any] | None = None,
    eval_datasets: dict[str, Any] | None = None,
) -> FederatedTrainer:
    """The `FederatedTrainer` of the run: model, tokenizer, the clients' data (`load_data`'s unless given) and eval
    sets, all built from the arguments. `seed` builds and partitions the data and seeds a classifier's head."""
    from fedsrd.trainer import FederatedTrainer

    # Under `accelerate launch` the main process downloads/converts/caches first; the others then read its caches.
    with training.main_process_first(desc="loading the model and data"):
        model, tokenizer = load_model(model_data, seed)
        if client_datasets is None:
            client_datasets, eval_datasets = load_data(model_data, fed.num_clients, seed)
        clients = [prepare_dataset(ds, tokenizer, model_data) for ds in client_datasets]
        evals = {name: prepare_dataset(ds, tokenizer, model_data) for name, ds in (eval_datasets or {}).items()}
    return FederatedTrainer(
        model=model,
        args=training,
        fed_config=fed,
        client_datasets=clients,
        eval_dataset=evals or None,
        processing_class=tokenizer,
        template=model_data.template,
        max_length=model_data.max_length,
    )


def _tokenize_classification(ds, tokenizer, model_data: ModelDataArguments):
    from fedsrd.data import tokenize_for_classification

    return tokenize_for_classification(
        ds,
        tokenizer,
        text_columns=model_data.text_columns or None,
        label_column=model_data.label_column,
        max_length=model_data.max_length,
    )
