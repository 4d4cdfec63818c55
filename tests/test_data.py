"""Tests for fedsrd.data: synthetic domains, loading, SFT tokenisation and partitioners."""

from __future__ import annotations

import contextlib
import io
import os
import re
import string
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, processors
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast

from fedsrd import data
from fedsrd.data import (
    SYNTHETIC_DOMAINS,
    build_prompt,
    load_instruction_data,
    load_synthetic,
    partition_by_source,
    partition_dirichlet,
    partition_iid,
    synthetic_domain,
    tokenize_for_sft,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII that prepends <s> (built offline)."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture()
def chat_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    chat = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>",
                               eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    chat.chat_template = CHAT_TEMPLATE
    return chat


def _rows(dataset: datasets.Dataset) -> list[tuple[str, str]]:
    return list(zip(dataset["instruction"], dataset["input"]))


def _question(row: dict[str, str]) -> str:
    return row["input"] or row["instruction"]


# --------------------------------------------------------------------------------------------
# Synthetic domains
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("domain", SYNTHETIC_DOMAINS)
def test_synthetic_columns_size_and_short_answers(domain: str) -> None:
    ds = synthetic_domain(domain, 50, seed=3)
    assert len(ds) == 50
    assert ds.column_names == ["instruction", "input", "output", "domain"]
    assert set(ds["domain"]) == {domain}
    assert all(0 < len(answer) <= 20 for answer in ds["output"])
    assert len(set(ds["instruction"])) >= 3  # several phrasings


def test_at_least_four_domains() -> None:
    assert len(SYNTHETIC_DOMAINS) >= 4
    assert {"arithmetic", "code_output", "percent", "units"} <= set(SYNTHETIC_DOMAINS)


@pytest.mark.parametrize("domain", SYNTHETIC_DOMAINS)
def test_synthetic_is_deterministic_and_seed_dependent(domain: str) -> None:
    first = synthetic_domain(domain, 40, seed=7, split="test").to_dict()
    second = synthetic_domain(domain, 40, seed=7, split="test").to_dict()
    assert first == second
    assert synthetic_domain(domain, 40, seed=8, split="test").to_dict() != first


def test_synthetic_is_identical_across_processes() -> None:
    code = ("from fedsrd.data import synthetic_domain;"
            "print(synthetic_domain('percent', 5, seed=2).to_dict())")
    src_dir = str(Path(data.__file__).resolve().parents[2])  # src/ (fedsrd/data/__init__.py)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": src_dir}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == str(synthetic_domain("percent", 5, seed=2).to_dict())


@pytest.mark.parametrize("domain", SYNTHETIC_DOMAINS)
def test_train_and_test_never_share_pairs(domain: str) -> None:
    train = synthetic_domain(domain, 400, seed=0, split="train")
    for test_seed in (0, 1):
        test = synthetic_domain(domain, 100, seed=test_seed, split="test")
        assert not set(_rows(train)) & set(_rows(test))
        assert not {_question(r) for r in train} & {_question(r) for r in test}
    assert len(set(_rows(train))) == len(train)


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown domain 'poetry'.*arithmetic"):
        synthetic_domain("poetry", 3)
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic_domain("arithmetic", 3, split="dev")
    with pytest.raises(ValueError, match="num_examples"):
        synthetic_domain("arithmetic", -1)
    assert len(synthetic_domain("units", 0)) == 0


def test_load_synthetic_structure() -> None:
    loaded = load_synthetic(("arithmetic", "units"), train_size=12, test_size=5, seed=1)
    assert list(loaded) == ["arithmetic", "units"]
    for domain, splits in loaded.items():
        assert isinstance(splits, datasets.DatasetDict)
        assert (len(splits["train"]), len(splits["test"])) == (12, 5)
        assert splits["train"].to_dict() == synthetic_domain(domain, 12, seed=1).to_dict()
    assert list(load_synthetic(train_size=2, test_size=2)) == list(SYNTHETIC_DOMAINS)


# --- each domain's answers re-derived from the question text ----------------------------------

def _num(text: str) -> Fraction:
    return Fraction(text)


_Verifier = tuple[str, Callable[..., Fraction]]

ARITHMETIC: list[_Verifier] = [
    (r"has (\d+) \w+s and buys (\d+) more\.", lambda a, b: a + b),
    (r"had (\d+) \w+s and gave (\d+) of them away", lambda a, b: a - b),
    (r"There are (\d+) boxes with (\d+) ", lambda a, b: a * b),
    (r"shares (\d+) \w+s equally among (\d+) friends", lambda a, b: a / b),
    (r"buys (\d+) \w+s at (\d+) dollars each and pays with a (\d+)-dollar", lambda a, p, b: b - a * p),
    (r"has (\d+) \w+s, buys (\d+) more, and then gives (\d+)", lambda a, b, c: a + b - c),
    (r"travels at (\d+) kilometres per hour for (\d+) hours", lambda s, h: s * h),
]
PERCENT: list[_Verifier] = [
    (r"What is (\d+)% of (\d+)\?", lambda p, n: p * n / 100),
    (r"costs (\d+) dollars and is discounted by (\d+)%", lambda c, p: c * (100 - p) / 100),
    (r"(\d+) dollars is invested at (\d+)% simple annual interest.* after (\d+) years",
     lambda c, r, t: c * r * t / 100),
    (r"(\d+) dollars is deposited at (\d+)% interest compounded annually.* after (\d+) years",
     lambda c, r, t: c * (1 + r / 100) ** int(t)),
    (r"(\d+) out of (\d+) \w+ passed", lambda a, b: 100 * a / b),
    (r"from ([\d.]+) to ([\d.]+) dollars\. What was the percentage",
     lambda old, new: abs(new - old) * 100 / old),
    (r"After a (\d+)% raise, a monthly salary is ([\d.]+) dollars", lambda p, s: s * 100 / (100 + p)),
]
FACTORS = {("kilometres", "metres"): 1000, ("metres", "centimetres"): 100,
           ("kilograms", "grams"): 1000, ("grams", "milligrams"): 1000,
           ("milligrams", "micrograms"): 1000, ("litres", "millilitres"): 1000,
           ("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("days", "hours"): 24,
           ("feet", "inches"): 12, ("inches", "centimetres"): Fraction("2.54"),
           ("pounds", "ounces"): 16, ("miles", "feet"): 5280}


def _convert(value: Fraction, source: str, target: str) -> Fraction:
    if (source, target) in FACTORS:
        return value * FACTORS[source, target]
    return value / FACTORS[target, source]


UNITS: list[tuple[str, Callable[..., Fraction]]] = [
    (r"(?:Convert|Express) ([\d.]+) (\w+) (?:to|in) (\w+)\.", _convert),
    (r"How many (\w+) are in ([\d.]+) (\w+)\?", lambda t, v, s: _convert(v, s, t)),
    (r"Convert (-?\d+) degrees Celsius", lambda c: c * 9 / 5 + 32),
    (r"Convert (-?\d+) degrees Fahrenheit", lambda f: (f - 32) * 5 / 9),
    (r"weighs (\d+) kg and is prescribed ([\d.]+) mg/kg", lambda w, d: w * d),
    (r"contains (\d+) mg of drug per mL\. How many mL are needed for a ([\d.]+) mg",
     lambda c, d: d / c),
    (r"(\d+) mL of fluid must be infused over (\d+) hours", lambda v, h: v / h),
    (r"A dose of ([\d.]+) mg is ordered and each tablet contains ([\d.]+) mg", lambda d, s: d / s),
    (r"Convert a speed of ([\d.]+) km/h to metres", lambda v: v * 5 / 18),
    (r"Convert a speed of (\d+) metres per second to km/h", lambda v: v * 18 / 5),
]


def _parse(group: str) -> Fraction | str:
    return Fraction(group) if re.fullmatch(r"-?[\d.]+", group) else group


@pytest.mark.parametrize(("domain", "verifiers"),
                         [("arithmetic", ARITHMETIC), ("percent", PERCENT), ("units", UNITS)])
def test_numeric_answers_match_rederived_values(domain: str, verifiers: list[_Verifier]) -> None:
    hits: Counter[int] = Counter()
    for row in synthetic_domain(domain, 400, seed=5):
        question = _question(row)
        matches = [(i, re.search(p, question)) for i, (p, _) in enumerate(verifiers)]
        matches = [(i, m) for i, m in matches if m]
        assert len(matches) == 1, f"{question!r} matched {len(matches)} verifiers"
        index, match = matches[0]
        expected = verifiers[index][1](*(_parse(g) for g in match.groups()))
        if "Round to two decimal places" in question:
            assert abs(_num(row["output"]) - expected) <= Fraction(1, 200), question
        else:
            assert _num(row["output"]) == expected, question
        hits[index] += 1
    assert set(hits) == set(range(len(verifiers))), "every template should appear"


def test_code_output_answers_match_execution() -> None:
    # Executing our own generated snippets is the independent check of the computed answers.
    rows = synthetic_domain("code_output", 300, seed=11)
    for row in rows:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(row["input"], {})  # trusted: snippets generated by the library
        assert buffer.getvalue().rstrip("\n") == row["output"], row["input"]
    first_lines = Counter(code.split("\n")[0].split(" ")[0] for code in rows["input"])
    assert len(first_lines) >= 6  # many templates


# --------------------------------------------------------------------------------------------
# load_instruction_data
# --------------------------------------------------------------------------------------------

SAMPLE = {"instruction": ["Add 2 and 3.", "Name a colour."], "input": ["x", "y"],
          "output": ["5", "red"]}


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_load_instruction_data_from_file(tmp_path, suffix: str) -> None:
    path = tmp_path / f"data.{suffix}"
    source = datasets.Dataset.from_dict(SAMPLE)
    if suffix in ("jsonl", "json"):
        source.to_json(str(path))
    elif suffix == "csv":
        source.to_csv(str(path), index=False)
    else:
        source.to_parquet(str(path))
    loaded = load_instruction_data(str(path), cache_dir=str(tmp_path / "cache"))
    assert isinstance(loaded, datasets.Dataset)
    assert loaded.to_dict() == SAMPLE


def test_load_instruction_data_from_directory(tmp_path) -> None:
    datasets.Dataset.from_dict(SAMPLE).to_json(str(tmp_path / "train.jsonl"))
    datasets.Dataset.from_dict({k: v[:1] for k, v in SAMPLE.items()}).to_csv(
        str(tmp_path / "test.csv"), index=False)
    cache = str(tmp_path / "cache")
    assert load_instruction_data(str(tmp_path), cache_dir=cache).to_dict() == SAMPLE
    test = load_instruction_data(str(tmp_path), split="test", cache_dir=cache)
    assert test["instruction"] == ["Add 2 and 3."]
    with pytest.raises(FileNotFoundError, match="validation.jsonl.*train.jsonl"):
        load_instruction_data(str(tmp_path), split="validation", cache_dir=cache)


def test_load_instruction_data_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_instruction_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_instruction_data("./not/here")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        load_instruction_data(str(tmp_path / "notes.txt"))


def test_load_instruction_data_hub_name_goes_to_load_dataset(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or "ds")
    assert load_instruction_data("someone/alpaca-like", split="test", revision="main") == "ds"
    assert calls == [(("someone/alpaca-like",), {"split": "test", "revision": "main"})]


# --------------------------------------------------------------------------------------------
# Prompts and SFT tokenisation
# --------------------------------------------------------------------------------------------

def test_build_prompt_alpaca_texts() -> None:
    assert build_prompt("Add.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert build_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


def test_build_prompt_chat(tokenizer, chat_tokenizer) -> None:
    assert build_prompt("Add.", "2 and 3", template="chat", tokenizer=chat_tokenizer) == (
        "<s><|user|>\nAdd.\n\n2 and 3\n<|assistant|>\n")
    with pytest.raises(ValueError, match="chat_template"):
        build_prompt("Add.", template="chat", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="chat_template"):
        build_prompt("Add.", template="chat")
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        build_prompt("Add.", template="vicuna")


def _check_row(row: dict, prompt: str, completion: str, tokenizer) -> None:
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert row["input_ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert row["labels"] == [-100] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_tokenize_for_sft_masks_exactly_the_prompt(tokenizer) -> None:
    ds = synthetic_domain("arithmetic", 20, seed=1)
    tokenized = tokenize_for_sft(ds, tokenizer, max_length=1024)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(tokenized) == len(ds)
    for row, source in zip(tokenized, ds):
        _check_row(row, build_prompt(source["instruction"], source["input"]), source["output"],
                   tokenizer)


def test_tokenize_for_sft_custom_columns_and_optional_input(tokenizer) -> None:
    ds = datasets.Dataset.from_dict({"q": ["Say hi."], "a": ["hi"], "extra": [1]})
    row = tokenize_for_sft(ds, tokenizer, instruction_column="q", output_column="a")[0]
    _check_row(row, build_prompt("Say hi."), "hi", tokenizer)
    with_none = datasets.Dataset.from_dict({"instruction": ["Say hi."], "input": [None],
                                            "output": ["hi"]})
    _check_row(tokenize_for_sft(with_none, tokenizer)[0], build_prompt("Say hi."), "hi", tokenizer)


def test_tokenize_for_sft_chat_adds_no_second_bos(chat_tokenizer) -> None:
    ds = datasets.Dataset.from_dict({"instruction": ["Add."], "input": [""], "output": ["5"]})
    row = tokenize_for_sft(ds, chat_tokenizer, template="chat")[0]
    assert row["input_ids"].count(chat_tokenizer.bos_token_id) == 1
    assert row["labels"][-2:] == [chat_tokenizer.convert_tokens_to_ids("5"),
                                  chat_tokenizer.eos_token_id]


def test_tokenize_for_sft_missing_column_error_names_columns(tokenizer) -> None:
    ds = datasets.Dataset.from_dict({"prompt": ["a"], "input": ["b"]})
    with pytest.raises(ValueError) as info:
        tokenize_for_sft(ds, tokenizer)
    message = str(info.value)
    assert "['instruction', 'output']" in message
    assert "['prompt', 'input']" in message


def test_tokenize_for_sft_rejects_empty_dataset(tokenizer) -> None:
    empty = synthetic_domain("arithmetic", 0)
    with pytest.raises(ValueError, match="empty"):
        tokenize_for_sft(empty, tokenizer)


def test_tokenize_for_sft_truncation(tokenizer) -> None:
    long_answer = datasets.Dataset.from_dict(
        {"instruction": ["Hi."], "input": [""], "output": ["z" * 500]})
    prompt_ids = tokenizer(build_prompt("Hi."))["input_ids"]
    max_length = len(prompt_ids) + 60  # the prompt fits beside max_length // 4 completion tokens
    row = tokenize_for_sft(long_answer, tokenizer, max_length=max_length)[0]
    assert len(row["input_ids"]) == max_length
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids  # prompt kept whole, start included
    assert row["labels"][len(prompt_ids):] == row["input_ids"][len(prompt_ids):]

    long_prompt = datasets.Dataset.from_dict(
        {"instruction": ["word " * 200], "input": [""], "output": ["42"]})
    row = tokenize_for_sft(long_prompt, tokenizer, max_length=64)[0]
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == 64
    assert ids[0] == tokenizer.bos_token_id
    kept = [label for label in labels if label != -100]
    assert kept == tokenizer("42", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_text = tokenizer.decode(ids[: len(ids) - len(kept)], skip_special_tokens=True)
    assert prompt_text.endswith("### Response:\n")


def test_tokenized_rows_collate_with_label_padding(tokenizer) -> None:
    tokenized = tokenize_for_sft(synthetic_domain("units", 4, seed=2), tokenizer)
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")(
        [tokenized[i] for i in range(4)])
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    assert batch["input_ids"].shape == (4, max(lengths))
    for i, length in enumerate(lengths):
        assert (batch["labels"][i, length:] == -100).all()
        assert (batch["attention_mask"][i, length:] == 0).all()


# --------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------

def _indexed(n: int, num_labels: int = 4) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"idx": list(range(n)),
                                       "label": [i % num_labels for i in range(n)]})


def _assert_partition(parts: list[datasets.Dataset], n: int) -> None:
    indices = [i for part in parts for i in part["idx"]]
    assert sorted(indices) == list(range(n))  # disjoint and covering


def test_partition_iid() -> None:
    ds = _indexed(103)
    parts = partition_iid(ds, 5, seed=1)
    _assert_partition(parts, 103)
    assert sorted(len(p) for p in parts) == [20, 20, 21, 21, 21]
    assert [p["idx"] for p in parts] == [p["idx"] for p in partition_iid(ds, 5, seed=1)]
    assert [p["idx"] for p in parts] != [p["idx"] for p in partition_iid(ds, 5, seed=2)]
    assert parts[0]["idx"] != sorted(parts[0]["idx"])  # shuffled
    assert len(partition_iid(ds, 1)[0]) == 103


@pytest.mark.parametrize("partition", [partition_iid,
                                       lambda ds, k: partition_dirichlet(ds, k, column="label")])
def test_partition_rejects_bad_client_counts(partition) -> None:
    ds = _indexed(3)
    with pytest.raises(ValueError, match="num_clients must be an integer >= 1"):
        partition(ds, 0)
    with pytest.raises(ValueError, match=r"num_clients \(4\) exceeds the number of rows \(3\)"):
        partition(ds, 4)


def _mean_top_label_share(parts: list[datasets.Dataset]) -> float:
    return float(np.mean([Counter(p["label"]).most_common(1)[0][1] / len(p) for p in parts]))


def test_partition_dirichlet() -> None:
    ds = _indexed(400)
    parts = partition_dirichlet(ds, 4, column="label", alpha=0.05, seed=3, min_size=5)
    _assert_partition(parts, 400)
    assert min(len(p) for p in parts) >= 5
    assert all(p["idx"] == sorted(p["idx"]) for p in parts)
    again = partition_dirichlet(ds, 4, column="label", alpha=0.05, seed=3, min_size=5)
    assert [p["idx"] for p in parts] == [p["idx"] for p in again]
    skewed = _mean_top_label_share(parts)
    balanced = _mean_top_label_share(partition_dirichlet(ds, 4, column="label", alpha=1000.0))
    assert skewed > 0.7
    assert balanced < 0.4


def test_partition_dirichlet_errors() -> None:
    ds = _indexed(100, num_labels=1)
    with pytest.raises(ValueError, match=r"column 'topic' not in dataset.*\['idx', 'label'\]"):
        partition_dirichlet(ds, 2, column="topic")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_dirichlet(ds, 2, column="label", alpha=0.0)
    with pytest.raises(ValueError, match="min_size=60 is impossible"):
        partition_dirichlet(ds, 2, column="label", min_size=60)
    with pytest.raises(ValueError, match="no draw in 100"):
        partition_dirichlet(ds, 10, column="label", alpha=0.01, min_size=9)


def test_partition_by_source() -> None:
    loaded = load_synthetic(("units", "arithmetic"), train_size=6, test_size=2)
    sources = {name: splits["train"] for name, splits in loaded.items()}
    clients = partition_by_source(sources)
    assert [c["domain"][0] for c in clients] == ["units", "arithmetic"]
    with pytest.raises(ValueError, match="sources is empty"):
        partition_by_source({})
    with pytest.raises(TypeError, match="'units' is a DatasetDict"):
        partition_by_source({"units": loaded["units"]})
    with pytest.raises(ValueError, match="'none' is empty"):
        partition_by_source({"none": synthetic_domain("units", 0)})


def test_public_names() -> None:
    for name in ("SYNTHETIC_DOMAINS", "synthetic_domain", "load_synthetic", "load_instruction_data",
                 "build_prompt", "tokenize_for_sft", "partition_iid", "partition_dirichlet",
                 "partition_by_source"):
        assert hasattr(data, name)
