"""The settings of a federated run on an engine, read from that engine's flat key/value run config.

Every key is a main-job argument (a `FedSRDConfig`, `TrainingArguments` or `ModelDataArguments` field, as accepted
by ``fedsrd train``) spelled in kebab-case (``num-rounds = 3`` is ``--num_rounds 3``; list fields take a
space-separated string, ``domains = "arithmetic units"``), except the runtime options in `RUNTIME_OPTIONS`.
Precedence, lowest first: the YAML file named by ``config``, the individual keys, then the ``args`` string.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from fedsrd.build import ModelDataArguments
    from fedsrd.config import FedSRDConfig

# Options of the runtime itself (not main-job arguments), with their defaults.
RUNTIME_OPTIONS: dict[str, Any] = {
    "config": "",  # a YAML file of main-job arguments, as `fedsrd train --config`
    "args": "",  # more main-job arguments, e.g. "--num_rounds 5 --learning_rate 1e-4"; highest precedence
    "resume": False,  # continue from the last complete round checkpointed under checkpoint-dir
    "checkpoint-dir": "",  # default: <output_dir>/checkpoints
    "round-timeout": 3600.0,  # seconds the server waits for a round's replies
    "node-timeout": 600.0,  # seconds the server waits for every client's SuperNode to connect
    "final-sync": True,  # after the last round, bring every client up to the final global state
}


@dataclass
class RunSettings:
    """Everything a ServerApp or ClientApp needs to know about the run."""

    fed: FedSRDConfig
    training: TrainingArguments
    model_data: ModelDataArguments
    data_seed: int  # the seed `fedsrd train` builds and partitions the data with
    resume: bool
    checkpoint_dir: Path
    round_timeout: float
    node_timeout: float
    final_sync: bool


def parse_run_config(run_config: Mapping[str, Any]) -> RunSettings:
    """Turn a flat run config (e.g. Flower's ``context.run_config``) into the main job's three argument objects."""
    from fedsrd.build import parse_train_args

    options = {**RUNTIME_OPTIONS, **{k: v for k, v in run_config.items() if k in RUNTIME_OPTIONS}}
    argv = run_config_to_argv(run_config)
    fed, training, model_data = parse_train_args(argv)
    data_seed = fed.seed  # `fedsrd train` loads data before FederatedTrainer fills in fed_seed: same order here
    if fed.fed_seed is None:
        fed.fed_seed = training.seed  # what FederatedTrainer does: one --seed for training and the federation
    checkpoint_dir = Path(options["checkpoint-dir"] or Path(training.output_dir) / "checkpoints")
    return RunSettings(
        fed=fed,
        training=training,
        model_data=model_data,
        data_seed=data_seed,
        resume=_as_bool(options["resume"], "resume"),
        checkpoint_dir=checkpoint_dir,
        round_timeout=float(options["round-timeout"]),
        node_timeout=float(options["node-timeout"]),
        final_sync=_as_bool(options["final-sync"], "final-sync"),
    )


def run_config_to_argv(run_config: Mapping[str, Any]) -> list[str]:
    """Main-job command-line arguments from a flat run config (runtime options left out)."""
    list_options = _list_options()
    argv: list[str] = []
    if run_config.get("config"):
        argv += ["--config", str(run_config["config"])]
    for key, value in run_config.items():
        if key in RUNTIME_OPTIONS:
            continue
        dest = key.replace("-", "_").replace(".", "_")
        if dest in list_options and isinstance(value, str):
            if value.strip():
                argv += [f"--{dest}", *value.split()]
        elif isinstance(value, bool):
            argv += [f"--{dest}", "true" if value else "false"]
        else:
            argv += [f"--{dest}", str(value)]
    if run_config.get("args"):
        argv += shlex.split(str(run_config["args"]))
    return argv


@lru_cache(maxsize=1)
def _list_options() -> frozenset[str]:
    """Argument names that take several values (list fields)."""
    from transformers import HfArgumentParser, TrainingArguments

    from fedsrd.build import ModelDataArguments
    from fedsrd.config import FedSRDConfig

    parser = HfArgumentParser((FedSRDConfig, TrainingArguments, ModelDataArguments))
    return frozenset(action.dest for action in parser._actions if action.nargs in ("+", "*"))


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"run config {key!r}: expected true or false, got {value!r}.")
