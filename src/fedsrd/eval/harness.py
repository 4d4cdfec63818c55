"""`evaluate_adapter`: lm-evaluation-harness on a base model + LoRA adapter held in memory."""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsrd.eval.local_tasks import TEST_EXAMPLES, prepare_synthetic_tasks, task_from_spec
from fedsrd.eval.suites import SUITES, Suite

logger = logging.getLogger(__name__)

INSTALL_HINT = 'lm-evaluation-harness is not installed; install it with: pip install "fedsrd[eval]"'
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class AdapterEvaluation:
    """What `evaluate_adapter` returns.

    `scores`: `"<task>/<metric>"` -> value for every task and group lm-eval scored (the metric as lm-eval names it,
    without the filter when that is `none`: `fedsrd_arithmetic/exact_match`, `gsm8k/exact_match,flexible-extract`),
    plus `"<suite>/<benchmark>"` (the benchmark's headline metric) and `"<suite>/<average>"` for each suite asked
    for. `unavailable`: benchmark -> why it was not run. `results`: lm-eval's own output (`results`, `configs`,
    `n-shot`, `versions`, and `samples` with `log_samples=True`).
    """

    scores: dict[str, float]
    unavailable: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        lines = ["| task / metric | score |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.scores.items()]
        lines += [f"| {k} | n/a: {why} |" for k, why in self.unavailable.items()]
        return "\n".join(lines)


@dataclass
class _Plan:
    batches: dict[int | None, list[Any]]  # num_fewshot override -> task specs (names, YAML paths, config dicts)
    suites: list[Suite]
    unavailable: dict[str, str]
    include_paths: list[str]


def evaluate_adapter(
    model: Any,
    tokenizer: Any = None,
    tasks: str | Sequence[str | dict] = ("synthetic",),
    *,
    adapter: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_gen_toks: int | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    allow_code_execution: bool = False,
    log_samples: bool = False,
    bootstrap_iters: int = 0,
    seed: int = 1234,
    dtype: str = "float32",
    synthetic_examples: int = TEST_EXAMPLES,
    cache_dir: str | os.PathLike | None = None,
) -> AdapterEvaluation:
    """Evaluate a model (base + global adapter) with `lm_eval.simple_evaluate` and `HFLM` on the in-memory model.

    Args:
        model: A `PeftModel` or `PreTrainedModel` in memory (evaluated as it is, nothing reloaded); a base model name
            or directory (`"tiny-llama"`, `"gemma-3-270m"`, a Hub id); an adapter directory (its base comes from
            `adapter_config.json`); or an `lm_eval.api.model.LM`, used as it is.
        tokenizer: The tokenizer; default: the base model's.
        tasks: Suite names (`fedsrd.eval.SUITES`: `synthetic`, `fedsrd_paper`), lm-eval task or group names (the
            shipped `fedsrd_<domain>` tasks, anything in `include_path`, any built-in lm-eval task), YAML paths,
            `jsonl:PATH` / `jsonl-mc:PATH` for a local JSONL file (see `jsonl_task`), or task config dicts.
        adapter: A PEFT adapter (directory or Hub id) to put on `model` first.
        limit: Documents per task (an int), or a fraction of each task; None: all of them.
        num_fewshot: Shots for every task; None: each suite benchmark's shots, else the task's default.
        max_gen_toks: Cap on generated tokens for generation tasks; None: the task's own.
        include_path: Extra directories of task YAMLs.
        allow_code_execution: Run model-written code (HumanEval, MBPP). Only in a sandbox; without it those
            benchmarks are reported as unavailable.
        seed: Seeds lm-eval's python/numpy/torch/few-shot draws. The caller's random state is restored afterwards.
        synthetic_examples: Test questions per synthetic domain.
        cache_dir: Where the synthetic tasks' data is written (default `fedsrd.eval.default_cache_dir()`).
    """
    try:
        import lm_eval
        from lm_eval.api.model import LM
        from lm_eval.tasks import TaskManager
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from error

    task_list = [tasks] if isinstance(tasks, (str, dict)) else list(tasks)
    if not task_list:
        raise ValueError("evaluate_adapter: tasks is empty; name at least one task or suite.")
    synthetic_dir = prepare_synthetic_tasks(cache_dir, num_examples=synthetic_examples)
    extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    include_paths = [str(synthetic_dir), *(str(Path(p).expanduser()) for p in extra)]
    plan = _plan(task_list, num_fewshot, allow_code_execution, include_paths)
    manager = _task_manager(TaskManager, plan)
    if not any(plan.batches.values()):
        return AdapterEvaluation(scores={}, unavailable=plan.unavailable)

    if allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # HF `evaluate`'s code_eval refuses to run without it
    merged: dict[str, Any] = {}
    with _restored_state(model if hasattr(model, "training") else None):
        lm = model if isinstance(model, LM) else _hflm(model, tokenizer, adapter, batch_size, dtype)
        for shots, specs in plan.batches.items():
            if not specs:
                continue
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=specs,
                task_manager=manager,
                num_fewshot=shots,
                limit=limit,
                gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                bootstrap_iters=bootstrap_iters,
                log_samples=log_samples,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                confirm_run_unsafe_code=allow_code_execution,
            )
            for key, value in (output or {}).items():
                if isinstance(value, dict):
                    merged.setdefault(key, {}).update(value)
                else:
                    merged[key] = value
    scores = flatten_scores(merged.get("results", {}))
    for suite in plan.suites:
        scores.update(_suite_scores(suite, merged.get("results", {})))
    return AdapterEvaluation(scores=scores, unavailable=plan.unavailable, results=merged)


def flatten_scores(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's `results` as `{"<task>/<metric>": value}`; stderr entries and non-numbers are left out."""
    scores: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not _is_number(value):
                continue
            metric, _, filter_name = key.partition(",")
            scores[f"{task}/{metric if filter_name == 'none' else key}"] = float(value)
    return scores


def pick_metric(metrics: dict[str, Any], wanted: str) -> float | None:
    """`wanted` exactly as lm-eval names it, else the first metric whose name starts with it."""
    if _is_number(metrics.get(wanted)):
        return float(metrics[wanted])
    for key, value in metrics.items():
        if key.startswith(wanted) and "_stderr" not in key and _is_number(value):
            return float(value)
    return None


def load_adapter_model(
    adapter: str | os.PathLike, base: str | None = None, *, dtype: str = "float32"
) -> tuple[Any, Any]:
    """(base model + adapter as a `PeftModel`, tokenizer); the base defaults to the one in `adapter_config.json`."""
    import json

    from peft import PeftModel

    from fedsrd.models import load_causal_lm

    if base is None:
        config_path = Path(adapter) / ADAPTER_CONFIG
        if not Path(adapter).exists() and str(adapter).startswith(("/", ".", "~")):
            raise FileNotFoundError(f"adapter {str(adapter)!r}: no such directory; expected a PEFT adapter directory "
                                    "(e.g. RUN_DIR/final) or a Hub id.")
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found; pass the base model explicitly (--base).")
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{config_path} names no base_model_name_or_path; pass the base model (--base).")
    model, tokenizer = load_causal_lm(base, dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter)), tokenizer


# ---- internals ----------------------------------------------------------------------------------------------------
def _plan(task_list: list[Any], num_fewshot: int | None, allow_code: bool, include_paths: list[str]) -> _Plan:
    batches: dict[int | None, list[Any]] = {}
    suites: list[Suite] = []
    unavailable: dict[str, str] = {}
    seen: set[str] = set()

    def add(shots: int | None, spec: Any) -> None:
        key = spec if isinstance(spec, str) else str(spec.get("task") or spec.get("group"))
        if key not in seen:  # lm-eval refuses a task asked for twice
            seen.add(key)
            batches.setdefault(shots, []).append(spec)

    for item in task_list:
        if isinstance(item, dict):
            add(num_fewshot, item)
            continue
        name = str(item)
        if name in SUITES:
            suite = SUITES[name]
            suites.append(suite)
            unavailable.update(suite.unavailable)
            for bench in suite.available:
                if bench.unsafe_code and not allow_code:
                    unavailable[bench.name] = (
                        "runs model-written code: pass allow_code_execution=True (--allow_code_execution), "
                        "in a sandbox"
                    )
                    continue
                add(num_fewshot if num_fewshot is not None else bench.num_fewshot, bench.task)
            continue
        config = task_from_spec(name)
        add(num_fewshot, config if config is not None else name)
    return _Plan(batches=batches, suites=suites, unavailable=unavailable, include_paths=include_paths)


def _task_manager(task_manager_cls: Any, plan: _Plan) -> Any:
    """A TaskManager over our task dirs; lm-eval's own (slow to index) only when a task needs it."""
    manager = task_manager_cls(include_path=plan.include_paths, include_defaults=False)
    if all(_known(manager, spec) for specs in plan.batches.values() for spec in specs):
        return manager
    manager = task_manager_cls(include_path=plan.include_paths, include_defaults=True)
    suite_tasks = {b.task: b for s in plan.suites for b in s.available}
    for shots, specs in plan.batches.items():
        kept = []
        for spec in specs:
            if _known(manager, spec):
                kept.append(spec)
            elif spec in suite_tasks:  # a suite benchmark this lm-eval version lacks: say so, do not fail
                unavailable_reason = f"task {spec!r} is not in the installed lm-eval"
                plan.unavailable[suite_tasks[spec].name] = unavailable_reason
            else:
                close = difflib.get_close_matches(str(spec), manager.all_tasks, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KeyError(
                    f"unknown lm-eval task {spec!r}: not a suite ({sorted(SUITES)}), not in the installed "
                    f"lm-eval, nor in {plan.include_paths}{hint}"
                )
        plan.batches[shots] = kept
    return manager


def _known(manager: Any, spec: Any) -> bool:
    if isinstance(spec, dict):
        return True
    return spec in manager.all_tasks or (str(spec).endswith(".yaml") and Path(spec).is_file())


def _hflm(model: Any, tokenizer: Any, adapter: Any, batch_size: int, dtype: str) -> Any:
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, os.PathLike)):
        if adapter is None and (Path(model) / ADAPTER_CONFIG).is_file():
            model, loaded_tokenizer = load_adapter_model(model, dtype=dtype)
        else:
            from fedsrd.models import load_causal_lm

            model, loaded_tokenizer = load_causal_lm(str(model), dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    if tokenizer is None:
        tokenizer = _base_tokenizer(model)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _base_tokenizer(model: Any) -> Any:
    from fedsrd.models import EMBEDDED_GEMMA, TINY_LLAMA, build_tiny_tokenizer, default_gemma_cache_dir

    peft_config = getattr(model, "peft_config", None)
    name = None
    if peft_config:
        name = next(iter(peft_config.values())).base_model_name_or_path
    name = name or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name == TINY_LLAMA:
        return build_tiny_tokenizer()
    if not name:
        raise ValueError("evaluate_adapter: cannot tell which tokenizer the model uses; pass tokenizer=.")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gemma_cache_dir() if name == EMBEDDED_GEMMA else name)


@contextlib.contextmanager
def _restored_state(module: Any) -> Iterator[None]:
    """lm-eval seeds the global RNGs and puts the model in eval mode; undo both (training goes on afterwards)."""
    import numpy as np
    import torch

    was_training = module.training if module is not None else None
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            if was_training is not None:
                module.train(was_training)


def _suite_scores(suite: Suite, results: dict[str, dict[str, Any]]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for bench in suite.available:
        value = pick_metric(results.get(bench.task, {}), bench.metric)
        if value is not None:
            scores[f"{suite.name}/{bench.name}"] = value
    for average, domains in suite.averages.items():
        values = [scores[f"{suite.name}/{b.name}"] for b in suite.benchmarks
                  if b.domain in domains and f"{suite.name}/{b.name}" in scores]
        if values:
            scores[f"{suite.name}/{average}"] = sum(values) / len(values)
    return scores


def _is_number(value: Any) -> bool:
    try:
        return not isinstance(value, (str, bool)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
