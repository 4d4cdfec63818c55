"""`fedsrd eval`: lm-eval scores of a base model + global adapter from the command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from fedsrd.eval.suites import SUITES


def build_parser() -> argparse.ArgumentParser:
    suites = ", ".join(f"{name} ({suite.description})" for name, suite in SUITES.items())
    p = argparse.ArgumentParser(
        prog="fedsrd eval",
        description="Evaluate a base model + PEFT adapter with lm-evaluation-harness (HFLM on the in-memory model).",
        epilog=f"Suites: {suites}",
    )
    p.add_argument("--adapter", default=None, help="PEFT adapter directory or Hub id (e.g. RUN_DIR/final).")
    p.add_argument("--base", default=None, help="Base model (default: base_model_name_or_path in the adapter's "
                   "adapter_config.json); without --adapter, the base model alone is evaluated.")
    p.add_argument("--tasks", nargs="+", default=["synthetic"],
                   help="Suites, lm-eval task/group names, YAML paths, jsonl:FILE (generation) or jsonl-mc:FILE "
                   "(multiple choice). Default: synthetic.")
    p.add_argument("--limit", type=float, default=None, help="Documents per task (>= 1), or a fraction (< 1).")
    p.add_argument("--num_fewshot", type=int, default=None, help="Shots for every task (default: per benchmark).")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_gen_toks", type=int, default=None, help="Cap on generated tokens per document.")
    p.add_argument("--include_path", nargs="+", default=None, help="Directories of your own task YAMLs.")
    p.add_argument("--dtype", default="float32", help="Base model dtype: float32, bfloat16, float16, auto.")
    p.add_argument("--allow_code_execution", action="store_true",
                   help="Run model-written code (HumanEval, MBPP). Only inside a sandbox.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log_samples", action="store_true", help="Keep every prompt and response in --output.")
    p.add_argument("--output", default=None, help="Write scores and lm-eval's results here (JSON).")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.adapter is None and args.base is None:
        raise SystemExit("fedsrd eval: give --adapter DIR (and optionally --base), or --base MODEL alone.")
    from fedsrd.eval.harness import evaluate_adapter, load_adapter_model

    if args.adapter is not None:
        model, tokenizer = load_adapter_model(args.adapter, args.base, dtype=args.dtype)
    else:
        from fedsrd.models import load_causal_lm

        model, tokenizer = load_causal_lm(args.base, dtype=args.dtype)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    result = evaluate_adapter(
        model,
        tokenizer,
        args.tasks,
        limit=limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks,
        include_path=args.include_path,
        allow_code_execution=args.allow_code_execution,
        log_samples=args.log_samples,
        seed=args.seed,
    )
    summary = {
        "adapter": args.adapter,
        "base": args.base or _base_of(model),
        "tasks": args.tasks,
        "limit": limit,
        "scores": result.scores,
        "unavailable": result.unavailable,
    }
    print(result.to_markdown())
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**summary, "lm_eval": result.results}, indent=2, default=str))
        print(f"wrote {out}")
    return summary


def _base_of(model) -> str | None:
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        return next(iter(peft_config.values())).base_model_name_or_path
    return getattr(getattr(model, "config", None), "_name_or_path", None)
