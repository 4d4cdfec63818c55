"""Shared set-up of the Gemma-3-270M benchmarks: the model, one domain's tokenised data, quiet offline settings."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():  # fmt: skip
    os.environ.setdefault(_key, _value)


def load_model(name: str = "gemma-3-270m"):
    """(model, tokenizer): the embedded Gemma-3-270M (converted once and cached as safetensors), float32."""
    from fedsrd.models import load_causal_lm

    return load_causal_lm(name, dtype="float32")


def domain_data(data_dir: str, domain: str, tokenizer, max_length: int, split: str = "train"):
    """One domain's split (raw instruction rows) and the same rows tokenised for the completion-only loss."""
    from fedsrd.data import load_instruction_data, tokenize_for_sft

    path = Path(data_dir) / domain
    if not path.is_dir():
        raise SystemExit(f"--data {data_dir}: no folder {path}; expected <data>/<domain>/train.jsonl and dev.jsonl")
    raw = load_instruction_data(str(path), split=split)
    return raw, tokenize_for_sft(raw, tokenizer, max_length=max_length)


def median(values: list[float]) -> float:
    return statistics.median(values)


def add_run_arguments(parser) -> None:
    """The settings every Gemma benchmark shares: model, LoRA, batch and sequence length, --json."""
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--json", action="store_true")


def run_quietly(measure, report, argv):
    """`report(*measure(argv))` with Trainer's logs sent to stderr: stdout holds only the table and the JSON line."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        a, measured = measure(argv)
    return report(a, measured)
