"""Command line: `fedsrd train` (the main job), `fedsrd merge` (the server step on files alone), `fedsrd eval`
(lm-eval on an adapter) and `fedsrd report` (plots and tables comparing runs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedsrd.build import (  # noqa: F401  (defined here before fedsrd.build; kept importable)
    ModelDataArguments,
    build_clients,
    build_trainer,
    load_domains,
    parse_train_args,
    yaml_to_argv,
)


def run_train(argv: list[str] | None = None):
    """The main job: parse arguments, build model and data, run the federation. Returns the trainer."""
    fed, training, model_data = parse_train_args(sys.argv[1:] if argv is None else argv)
    trainer = build_trainer(fed, training, model_data, seed=fed.seed)
    output = trainer.train()
    if training.process_index == 0:
        print(json.dumps({"output_dir": training.output_dir, **output.metrics}, indent=2))
    return trainer


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
    if a.fed_config and not cfg_path.is_file():
        raise FileNotFoundError(f"--fed_config: no such file: {str(cfg_path)!r}; expected a run's fed_config.json.")
    cfg_dict = _read_fed_config(cfg_path) if cfg_path.is_file() else {}
    if a.algorithm:
        cfg_dict["algorithm"] = a.algorithm
    config = FedSRDConfig(**cfg_dict)
    state, broadcast = merge_adapters(a.global_dir, a.updates, config.algorithm, round=a.round, config=config)
    adapter_config_path = Path(a.global_dir) / ADAPTER_CONFIG
    adapter_config = json.loads(adapter_config_path.read_text()) if adapter_config_path.is_file() else None
    out = save_adapter(state, a.out, adapter_config)
    (out / "broadcast.bin").write_bytes(broadcast)
    print(json.dumps({"out": str(out), "broadcast_bytes": len(broadcast)}))


def _read_fed_config(path: Path) -> dict:
    """A fed_config.json as FedSRDConfig keyword arguments; ValueError naming the file and what is wrong."""
    from dataclasses import fields

    from fedsrd.config import FedSRDConfig

    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of FedSRDConfig fields, got {type(config).__name__}.")
    unknown = sorted(set(config) - {f.name for f in fields(FedSRDConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown FedSRDConfig field(s) {unknown}.")
    if config.get("dp_mode", "off") != "off" and "dp_sampling_accounting" not in config:
        from fedsrd.ops.privacy import STORED_RUN_SAMPLING_ACCOUNTING

        config["dp_sampling_accounting"] = STORED_RUN_SAMPLING_ACCOUNTING  # how runs before the option accounted
    return config


def run_eval(argv: list[str]) -> None:
    from fedsrd.eval.command import main as eval_main

    eval_main(argv)


def run_report(argv: list[str]) -> None:
    from fedsrd.report import main as report_main

    report_main(argv)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (arguments, config files, data, model or adapter paths), not a bug."""
    import yaml

    return (ValueError, OSError, KeyError, ModuleNotFoundError, yaml.YAMLError)


def one_line(error: BaseException) -> str:
    """An exception as one line: its message with line breaks folded (a KeyError says what key is missing)."""
    message = f"missing {error.args[0]!r}" if isinstance(error, KeyError) and error.args else str(error)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return message or type(error).__name__


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input ends the command with `error: <one line>` on stderr and exit code 2 instead of a traceback;
    FEDSRD_DEBUG=1 re-raises it with the traceback."""
    try:
        yield
    except _user_error_types() as error:
        if os.environ.get("FEDSRD_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {one_line(error)} (FEDSRD_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


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
    with user_errors():
        commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
