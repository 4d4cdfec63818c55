"""lm-eval tasks that run offline: the shipped synthetic-domain tasks and tasks over a user's own JSONL file.

The synthetic tasks are YAML files in `fedsrd/eval/tasks/`; their data is not shipped but generated
(deterministically, from `fedsrd.data.synthetic_domain(split="test")`) into a cache directory next to a copy of the
YAMLs whose `dataset_kwargs.data_dir` points there, so `lm_eval.tasks.TaskManager(include_path=that_dir)` loads them
with `dataset_path: json` and no network.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import yaml

from fedsrd.data import SYNTHETIC_DOMAINS

TASKS_DIR = Path(__file__).with_name("tasks")
GENERATION_TEMPLATE = "_synthetic_template_yaml"
TEST_EXAMPLES = 200  # test questions per synthetic domain
FEWSHOT_EXAMPLES = 20  # validation questions per domain, the pool for few-shot examples
TASK_KINDS = ("generate", "multiple_choice")

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ALPACA_HEAD = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n"
)
MULTIPLE_CHOICE_INSTRUCTION = "Answer the multiple-choice question with the letter of the correct option."


def default_cache_dir() -> Path:
    """`$FEDSRD_CACHE/lm_eval_tasks`, or `~/.cache/fedsrd/lm_eval_tasks` when `FEDSRD_CACHE` is unset."""
    root = os.environ.get("FEDSRD_CACHE") or Path.home() / ".cache" / "fedsrd"
    return Path(root) / "lm_eval_tasks"


def prepare_synthetic_tasks(
    cache_dir: str | os.PathLike | None = None, *, num_examples: int = TEST_EXAMPLES, seed: int = 0
) -> Path:
    """Write the synthetic-domain lm-eval tasks (YAML + JSONL data) to a directory and return it.

    Pass the directory to `lm_eval.tasks.TaskManager(include_path=...)`. Tasks: `fedsrd_<domain>` for each of
    `fedsrd.data.SYNTHETIC_DOMAINS`, and the group `fedsrd_synthetic`. The data is a pure function of
    `(num_examples, seed)`, so every call (and every machine) writes the same bytes.
    """
    if num_examples < 1:
        raise ValueError(f"prepare_synthetic_tasks: num_examples must be >= 1, got {num_examples}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _prepare(root.expanduser().resolve(), num_examples, seed)


@functools.lru_cache(maxsize=8)
def _prepare(root: Path, num_examples: int, seed: int) -> Path:
    from fedsrd.data import synthetic_domain

    directory = root / f"synthetic-n{num_examples}-seed{seed}"
    directory.mkdir(parents=True, exist_ok=True)
    for domain in SYNTHETIC_DOMAINS:
        for split, n in (("test", num_examples), ("validation", FEWSHOT_EXAMPLES)):
            rows = synthetic_domain(domain, n, seed=seed, split=split)
            lines = [json.dumps({k: row[k] for k in ("instruction", "input", "output")}) for row in rows]
            _write_if_changed(directory / f"{domain}_{split}.jsonl", "\n".join(lines) + "\n")
    for path in sorted(TASKS_DIR.iterdir()):
        if path.name.startswith("fedsrd_") and path.suffix == ".yaml":
            config = yaml.safe_load(path.read_text())
            if "dataset_kwargs" in config:  # a task (not the group): its data files live in `directory`
                config["dataset_kwargs"]["data_dir"] = str(directory)
            _write_if_changed(directory / path.name, yaml.safe_dump(config, sort_keys=False))
        elif path.name.endswith("_yaml"):
            _write_if_changed(directory / path.name, path.read_text())
    return directory


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: concurrent writers of the same bytes never expose a partial file


def jsonl_task(
    name: str,
    data_file: str | os.PathLike,
    kind: str = "generate",
    *,
    fewshot_file: str | os.PathLike | None = None,
    max_gen_toks: int = 256,
) -> dict[str, Any]:
    """An lm-eval task config (a dict `evaluate_adapter(tasks=[...])` accepts) over a local JSONL file.

    `kind="generate"`: rows with `instruction`, optional `input`, and `output` (the columns fedsrd trains on). The
    prompt is the Alpaca template, the model generates until a newline, and `exact_match` compares the first line
    with `output` (case and surrounding spaces ignored).

    `kind="multiple_choice"`: rows with `question`, `choices` (a list of strings) and `answer` (0-based index,
    letter, or the text of the right choice). The options are listed as A., B., ...; the model's log-likelihood of
    each letter gives `acc` and `acc_norm`.

    `fewshot_file` (same columns) is the pool few-shot examples are drawn from (`num_fewshot` > 0).
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"jsonl_task: kind must be one of {TASK_KINDS}, got {kind!r}")
    path = Path(data_file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"jsonl_task: no such data file: {str(path)!r}")
    data_files = {"test": str(path)}
    if fewshot_file is not None:
        data_files["validation"] = str(Path(fewshot_file).expanduser().resolve())
    if kind == "generate":
        config = copy.deepcopy(_generation_template())
        config["generation_kwargs"]["max_gen_toks"] = max_gen_toks
    else:
        config = _multiple_choice_config()
    config.pop("fewshot_split", None)
    if fewshot_file is not None:
        config["fewshot_split"] = "validation"
    config.update(task=name, dataset_path="json", dataset_kwargs={"data_files": data_files}, test_split="test")
    return config


def task_from_spec(spec: str) -> dict[str, Any] | None:
    """`jsonl:PATH` (generation) or `jsonl-mc:PATH` (multiple choice) as a task config named after the file."""
    for prefix, kind in (("jsonl:", "generate"), ("jsonl-mc:", "multiple_choice")):
        if spec.startswith(prefix):
            path = Path(spec[len(prefix) :])
            return jsonl_task(path.stem, path, kind)
    return None


@functools.cache
def _generation_template() -> dict[str, Any]:
    return yaml.safe_load((TASKS_DIR / GENERATION_TEMPLATE).read_text())


def _multiple_choice_config() -> dict[str, Any]:
    options = "{% for c in choices %}" + "{{ '" + _LETTERS + "'[loop.index0] }}. {{ c }}\n{% endfor %}"
    return {
        "output_type": "multiple_choice",
        "doc_to_text": _ALPACA_HEAD + MULTIPLE_CHOICE_INSTRUCTION + "\n\n### Input:\n{{ question }}\n" + options
        + "\n### Response:\n",
        "doc_to_choice": "{{ '" + _LETTERS + "'[:choices|length]|list }}",
        "doc_to_target": "{% if answer is string and answer in choices %}{{ choices.index(answer) }}"
        "{% else %}{{ answer }}{% endif %}",
        "target_delimiter": "",
        "fewshot_delimiter": "\n\n",
        "num_fewshot": 0,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
