"""lm-eval integration: shipped synthetic tasks, local JSONL tasks, the paper suite, HFLM on the in-memory model,
the per-round callback and `fedsrd eval`. Offline: tasks read local JSONL; the model is the tiny random Llama."""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from lm_eval.api.model import LM  # noqa: E402

from fedsrd.data import build_prompt, synthetic_domain  # noqa: E402
from fedsrd.eval import (  # noqa: E402
    SUITES,
    SYNTHETIC_TASKS,
    evaluate_adapter,
    jsonl_task,
    local_tasks,
    prepare_synthetic_tasks,
)
from fedsrd.eval.local_tasks import TASKS_DIR  # noqa: E402


class OracleLM(LM):
    """Answers from a table prompt -> answer (wrong on purpose for prompts in `wrong`); records every prompt."""

    def __init__(self, answers: dict[str, str], wrong: set[str] = frozenset(), letters: dict[str, str] | None = None):
        super().__init__()
        self.answers, self.wrong, self.letters = answers, wrong, letters or {}
        self.prompts: list[str] = []

    def generate_until(self, requests):
        out = []
        for request in requests:
            prompt = request.args[0]
            self.prompts.append(prompt)
            answer = self.answers[prompt]
            out.append("nonsense" if prompt in self.wrong else f"  {answer.upper()} \n")  # case/space-insensitive
        return out

    def loglikelihood(self, requests):
        out = []
        for request in requests:
            context, continuation = request.args
            self.prompts.append(context)
            out.append((0.0 if self.letters[context] == continuation else -5.0, True))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def tiny_peft():
    from peft import get_peft_model

    from fedsrd import FedSRDConfig
    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer

    config = FedSRDConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0).to_lora_config(target_modules="all-linear")
    return get_peft_model(build_tiny_llama(), config), build_tiny_tokenizer()


def test_synthetic_tasks_are_written_deterministically_from_the_test_split(tmp_path):
    first = prepare_synthetic_tasks(tmp_path, num_examples=12, seed=0)
    files = {p.name: p.read_bytes() for p in first.iterdir()}
    local_tasks._prepare.cache_clear()  # write again, not from the per-process memo
    again = prepare_synthetic_tasks(tmp_path, num_examples=12, seed=0)
    assert again == first and {p.name: p.read_bytes() for p in again.iterdir()} == files
    shipped = sorted(p.stem for p in TASKS_DIR.glob("fedsrd_*.yaml"))
    assert sorted([*SYNTHETIC_TASKS, "fedsrd_synthetic"]) == shipped
    for task in SYNTHETIC_TASKS:
        domain = task.removeprefix("fedsrd_")
        config = yaml.safe_load((first / f"{task}.yaml").read_text())
        assert config["dataset_kwargs"]["data_dir"] == str(first)
        rows = [json.loads(line) for line in (first / f"{domain}_test.jsonl").read_text().splitlines()]
        expected = synthetic_domain(domain, 12, seed=0, split="test")
        assert rows == [{k: r[k] for k in ("instruction", "input", "output")} for r in expected]


def test_synthetic_tasks_prompt_like_training_and_score_exact_match(tmp_path):
    domains = ("arithmetic", "code_output")
    answers, wrong = {}, set()
    for domain in domains:
        for i, row in enumerate(synthetic_domain(domain, 6, seed=0, split="test")):
            prompt = build_prompt(row["instruction"], row["input"])  # the training prompt, exactly
            answers[prompt] = row["output"]
            if i % 3 == 0:
                wrong.add(prompt)
    lm = OracleLM(answers, wrong)
    result = evaluate_adapter(lm, tasks=[f"fedsrd_{d}" for d in domains], limit=6, synthetic_examples=6,
                              cache_dir=tmp_path)
    assert result.scores == {"fedsrd_arithmetic/exact_match": pytest.approx(4 / 6),
                             "fedsrd_code_output/exact_match": pytest.approx(4 / 6)}
    assert sorted(lm.prompts) == sorted(answers)
    assert result.unavailable == {}


def test_local_jsonl_tasks_generation_and_multiple_choice(tmp_path):
    gen = [{"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
           {"instruction": "Name the capital of France.", "output": "Paris"}]  # no input column in this row
    mc = [{"question": "2 + 2 = ?", "choices": ["3", "4", "5"], "answer": 1},
          {"question": "Capital of Italy?", "choices": ["Rome", "Oslo"], "answer": "Rome"},
          {"question": "1 + 1 = ?", "choices": ["2", "3"], "answer": "A"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (tmp_path / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    answers = {build_prompt(r["instruction"], r.get("input", "")): r["output"] for r in gen}
    letters = {}
    for row, right in zip(mc, ("B", "A", "A")):
        options = "\n".join(f"{'ABC'[i]}. {c}" for i, c in enumerate(row["choices"]))
        letters[build_prompt("Answer the multiple-choice question with the letter of the correct option.",
                             f"{row['question']}\n{options}")] = right
    lm = OracleLM(answers, letters=letters)
    result = evaluate_adapter(lm, tasks=[f"jsonl:{tmp_path / 'qa.jsonl'}", jsonl_task("quiz", tmp_path / "quiz.jsonl",
                              "multiple_choice")], cache_dir=tmp_path / "cache", synthetic_examples=4)
    assert result.scores["qa/exact_match"] == 1.0
    assert result.scores["quiz/acc"] == 1.0
    assert result.results["n-samples"]["quiz"]["effective"] == 3
    with pytest.raises(FileNotFoundError):
        jsonl_task("missing", tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="kind"):
        jsonl_task("bad", tmp_path / "qa.jsonl", kind="essay")


def test_paper_suite_names_lm_eval_tasks_and_lists_the_missing_ones():
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fedsrd.eval.harness import _plan

    suite = SUITES["fedsrd_paper"]
    assert [b.name for b in suite.benchmarks] == ["HumanEval", "MBPP", "MedQA", "MedMCQA", "FinEval", "FinanceIQ",
                                                   "GSM8K", "MATH", "AGIEval", "LawBench"]
    assert set(suite.unavailable) == {"FinEval", "FinanceIQ", "LawBench"}
    # Every task the suite names exists in the installed lm-eval (indexing only those task folders: fast).
    root = Path(lm_eval.__file__).parent / "tasks"
    dirs = ["humaneval", "mbpp", "medqa", "medmcqa", "gsm8k", "hendrycks_math", "agieval"]
    manager = TaskManager(include_path=[str(root / d) for d in dirs], include_defaults=False)
    assert {b.task for b in suite.available} <= set(manager.all_tasks)
    plan = _plan(["fedsrd_paper"], None, False, [])
    assert plan.batches == {1: ["medqa_4options", "medmcqa"], 0: ["gsm8k", "hendrycks_math", "agieval"]}
    assert set(plan.unavailable) == {"FinEval", "FinanceIQ", "LawBench", "HumanEval", "MBPP"}
    assert "sandbox" in plan.unavailable["HumanEval"]
    plan = _plan(["fedsrd_paper", "gsm8k"], None, True, [])  # code allowed; gsm8k asked twice runs once
    assert plan.batches == {0: ["humaneval", "gsm8k", "hendrycks_math", "agieval"], 3: ["mbpp"],
                            1: ["medqa_4options", "medmcqa"]}


def test_hflm_on_the_in_memory_adapter_leaves_training_state_alone(tmp_path):
    model, tokenizer = tiny_peft()
    model.train()
    torch.manual_seed(7)
    random.seed(7)
    rng_before, py_before = torch.get_rng_state(), random.getstate()
    result = evaluate_adapter(model, tokenizer, ["synthetic"], limit=2, max_gen_toks=3, batch_size=2,
                              cache_dir=tmp_path, synthetic_examples=4, log_samples=True)
    expected = {f"{t}/exact_match" for t in SYNTHETIC_TASKS} | {f"synthetic/{d}" for d in
                                                                ("arithmetic", "code_output", "percent", "units")}
    assert set(result.scores) == expected | {"synthetic/avg"}
    assert all(0.0 <= v <= 1.0 for v in result.scores.values())
    assert result.results["n-samples"]["fedsrd_units"]["effective"] == 2
    sample = result.results["samples"]["fedsrd_arithmetic"][0]
    assert sample["arguments"][0][1]["max_gen_toks"] == 3
    assert model.training and tokenizer.padding_side == "right"
    assert torch.equal(torch.get_rng_state(), rng_before) and random.getstate() == py_before


def test_callback_is_due_every_k_rounds_and_after_the_last():
    from fedsrd.eval import LmEvalCallback

    every_2 = LmEvalCallback(["fedsrd_units"], every=2)
    assert [every_2.is_due(r, r == 5) for r in range(1, 6)] == [False, True, False, True, True]
    only_last = LmEvalCallback(["fedsrd_units"], every=0)
    assert [only_last.is_due(r, r == 3) for r in range(1, 4)] == [False, False, True]
    with pytest.raises(ValueError, match="every"):
        LmEvalCallback(["fedsrd_units"], every=-1)


def test_callback_adds_scores_to_history_during_training(tmp_path, monkeypatch):
    from datasets import Dataset
    from transformers import TrainingArguments

    from fedsrd import FederatedTrainer, FedSRDConfig
    from fedsrd.eval import LmEvalCallback
    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer

    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(4)]
    fed = FedSRDConfig(num_rounds=2, num_clients=2, local_steps=1, lora_r=2, lora_alpha=4, save_every=0,
                       lm_eval_tasks=["fedsrd_arithmetic"], lm_eval_every=0, lm_eval_limit=2,
                       lm_eval_max_gen_toks=2)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    trainer = FederatedTrainer(model=build_tiny_llama(), args=args, fed_config=fed,
                               client_datasets=[Dataset.from_list(rows[:2]), Dataset.from_list(rows[2:])],
                               processing_class=build_tiny_tokenizer(), max_length=64)
    assert sum(isinstance(c, LmEvalCallback) for c in trainer.callback_handler.callbacks) == 1
    trainer.train()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    key = "lm_eval/fedsrd_arithmetic/exact_match"
    assert [key in r for r in history] == [False, True]  # every=0: after the last round only
    assert 0.0 <= history[-1][key] <= 1.0 and history[-1]["upload_bytes"] > 0


def test_fedsrd_eval_command_on_a_saved_adapter(tmp_path, capsys, monkeypatch):
    from fedsrd.cli import main

    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path / "cache"))

    model, _ = tiny_peft()
    model.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "scores.json"
    main(["eval", "--adapter", str(tmp_path / "adapter"), "--tasks", "fedsrd_percent", "--limit", "2",
          "--max_gen_toks", "2", "--output", str(out)])
    written = json.loads(out.read_text())
    assert written["base"] == "tiny-llama" and set(written["scores"]) == {"fedsrd_percent/exact_match"}
    assert written["lm_eval"]["n-samples"]["fedsrd_percent"]["effective"] == 2
    assert "fedsrd_percent/exact_match" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs, field",
    [({"lm_eval_every": -1}, "lm_eval_every"), ({"lm_eval_limit": 0}, "lm_eval_limit"),
     ({"lm_eval_batch_size": 0}, "lm_eval_batch_size"), ({"lm_eval_max_gen_toks": 0}, "lm_eval_max_gen_toks"),
     ({"lm_eval_tasks": [""]}, "lm_eval_tasks")],
)
def test_config_validates_lm_eval_fields(kwargs, field):
    from fedsrd import FedSRDConfig

    with pytest.raises(ValueError, match=f"FedSRDConfig.{field}"):
        FedSRDConfig(**kwargs)
