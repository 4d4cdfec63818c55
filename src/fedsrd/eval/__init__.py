"""Evaluation of global adapters with lm-evaluation-harness (extra `eval`: `pip install "fedsrd[eval]"`).

* `evaluate_adapter(model, tokenizer, tasks)`: `lm_eval.simple_evaluate` with `HFLM` on the in-memory model.
* `LmEvalCallback`: the same every k rounds of a federation, scores kept in `history.json`.
* `SUITES`: `synthetic` (the shipped exact-match tasks over the embedded domains, offline) and `fedsrd_paper`
  (the FedSRD paper's benchmarks that lm-eval has; the others are listed as unavailable).
* `jsonl_task(name, path, kind)`: a generation or multiple-choice task over a local JSONL file.

See docs/evaluation.md.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "AdapterEvaluation": "fedsrd.eval.harness",
    "evaluate_adapter": "fedsrd.eval.harness",
    "flatten_scores": "fedsrd.eval.harness",
    "load_adapter_model": "fedsrd.eval.harness",
    "LmEvalCallback": "fedsrd.eval.callback",
    "Benchmark": "fedsrd.eval.suites",
    "Suite": "fedsrd.eval.suites",
    "SUITES": "fedsrd.eval.suites",
    "SYNTHETIC_TASKS": "fedsrd.eval.suites",
    "get_suite": "fedsrd.eval.suites",
    "default_cache_dir": "fedsrd.eval.local_tasks",
    "jsonl_task": "fedsrd.eval.local_tasks",
    "prepare_synthetic_tasks": "fedsrd.eval.local_tasks",
}


def __getattr__(name: str):
    # lm-eval, transformers and datasets load on first use, so `import fedsrd.eval.suites` stays light.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedsrd.eval' has no attribute {name!r}")


__all__ = list(_LAZY)
