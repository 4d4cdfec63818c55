"""benchmarks/prepare_data.py: parsing and splitting on made-up rows (no network, no copy of the real data)."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prep():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "benchmarks" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_data"] = module
    spec.loader.exec_module(module)
    return module


def test_gsm8k_keeps_the_answer_verbatim(prep):
    (row,) = prep.gsm8k_rows([{"question": "Tom has 2  apples.", "answer": "He eats <<2-1=1>>1.\n#### 1"}])
    assert (row["instruction"], row["input"], row["output"]) == (
        "Tom has 2  apples.",
        "",
        "He eats <<2-1=1>>1.\n#### 1",
    )
    assert row["key"] == "tom has 2 apples."


def test_code_alpaca_strips_and_drops_empty_outputs(prep):
    rows = prep.code_alpaca_rows(
        [
            {"instruction": " Add. ", "input": "a, b\n", "output": " a + b "},
            {"instruction": "Nothing", "input": "", "output": "  "},
        ]
    )
    assert [(r["instruction"], r["input"], r["output"]) for r in rows] == [("Add.", "a, b", "a + b")]


def test_medqa_in_medical_meadow_form(prep):
    options = {"A": "Aspirin ", "B": "Heparin"}
    (row,) = prep.medqa_rows([{"question": "Which drug?\n ", "options": options, "answer_idx": "A"}])
    assert row["instruction"] == "Please answer with one of the option in the bracket"
    assert row["input"] == "Q:Which drug? {'A': 'Aspirin ', 'B': 'Heparin'}"
    assert row["output"] == "A: Aspirin"
    with pytest.raises(prep.PrepareError, match="answer_idx 'C'"):
        prep.medqa_rows([{"question": "q", "options": options, "answer_idx": "C"}])


def test_tatqa_rows_and_answers(prep):
    doc = {
        "table": {"table": [["", "2019 ", "2018"], ["Revenue", "$ 10", "$ 8"]]},
        "paragraphs": [{"order": 2, "text": "Second."}, {"order": 1, "text": "First."}],
        "questions": [
            {
                "order": 2,
                "question": "Change? ",
                "answer": 25.0,
                "derivation": "(10-8)/8 ",
                "scale": "percent",
                "answer_type": "arithmetic",
            },
            {
                "order": 1,
                "question": "Which years?",
                "answer": ["2019", "2018"],
                "derivation": "",
                "scale": "",
                "answer_type": "multi-span",
            },
            {"order": 3, "question": "Which years?", "answer": ["2019"], "scale": "", "answer_type": "span"},
        ],
    }
    (rows,) = prep.tatqa_documents([doc])
    context = "Table:\n | 2019 | 2018\nRevenue | $ 10 | $ 8\n\nText:\nFirst.\nSecond."
    assert [(r["instruction"], r["input"], r["output"]) for r in rows] == [
        ("Which years?", context, "Answer: 2019, 2018"),  # the later duplicate question is dropped
        ("Change?", context, "Derivation: (10-8)/8\nAnswer: 25%"),
    ]
    assert prep.tatqa_answer(1.5, "million") == "1.5 million"
    assert prep.tatqa_answer(3.0, "thousand") == "3 thousand"
    assert prep.tatqa_answer("7", "") == "7"


def _rows(n, prefix="q"):
    return [{"instruction": f"{prefix}{i}", "input": "", "output": str(i), "key": f"{prefix}{i}"} for i in range(n)]


def test_flat_split_from_one_source(prep, monkeypatch):
    monkeypatch.setattr(prep, "HELDOUT", 3)
    monkeypatch.setattr(prep, "DEV", 2)
    source = _rows(10) + [{"instruction": "Q0", "input": "", "output": "dup", "key": "q0"}]  # a duplicate key
    splits = prep.flat_split(source, None, n_train=4)
    order = [f"q{i}" for i in range(10)]
    import random

    random.Random(0).shuffle(order)  # the split's own generator, seed 0
    assert [r["key"] for r in splits["heldout"]] == order[:3]
    assert [r["key"] for r in splits["dev"]] == order[3:5]
    assert [r["key"] for r in splits["train"]] == order[5:9]  # capped at n_train
    assert all(r["output"] != "dup" for split in splits.values() for r in split)


def test_flat_split_with_its_own_train_source_drops_held_out_keys(prep, monkeypatch):
    monkeypatch.setattr(prep, "HELDOUT", 2)
    monkeypatch.setattr(prep, "DEV", 1)
    test, train = _rows(4, "t"), _rows(5, "q") + _rows(4, "t")  # the train file repeats the test questions
    splits = prep.flat_split(test, train, n_train=100)
    held = {r["key"] for r in splits["heldout"]}
    assert len(held) == 2 and held <= {r["key"] for r in test}
    rest = [r["key"] for r in splits["dev"] + splits["train"]]
    assert not held & set(rest) and len(rest) == 9 - 2 and len(set(rest)) == len(rest)


def test_grouped_split_keeps_groups_together_and_cuts_the_overflow(prep):
    groups = [_rows(3, f"d{g}-") for g in range(5)]
    splits, used = prep.grouped_split(groups, {"dev": 4, "train": 5})
    import random

    order = list(range(5))
    random.Random(0).shuffle(order)
    group_of = {r["key"]: g for g, rows in enumerate(groups) for r in rows}
    dev_groups = [group_of[r["key"]] for r in splits["dev"]]
    assert len(splits["dev"]) == 4 and dev_groups == [order[0]] * 3 + [order[1]]  # the second group is cut at 1
    train_groups = [group_of[r["key"]] for r in splits["train"]]
    assert train_groups == [order[2]] * 3 + [order[3]] * 2  # the cut group's other rows are dropped, not moved
    assert used == order[:4]


def test_finance_split_holds_out_whole_documents(prep, monkeypatch):
    monkeypatch.setattr(prep, "HELDOUT", 4)
    monkeypatch.setattr(prep, "DEV", 2)
    monkeypatch.setattr(prep, "TRAIN", 5)
    dev_docs, test_docs = [_rows(2, f"dev{g}-") for g in range(3)], [_rows(3, f"test{g}-") for g in range(4)]
    splits = prep.finance_split(dev_docs, test_docs)
    doc = lambda key: key.split("-")[0]  # noqa: E731
    held = {doc(r["key"]) for r in splits["heldout"]}
    assert len(splits["heldout"]) == 4 and all(d.startswith("test") for d in held)
    others = {doc(r["key"]) for r in splits["dev"] + splits["train"]}
    assert not held & others  # no document on both sides
    assert len(splits["dev"]) == 2 and len(splits["train"]) == 5


def test_command_writes_the_files_from_a_source_dir(prep, tmp_path, monkeypatch):
    """End to end on a made-up GSM8K pinned by its own blob id: train.jsonl and dev.jsonl in the benchmark format."""
    test = "".join(json.dumps({"question": f"T{i}?", "answer": f"#### {i}"}) + "\n" for i in range(5)).encode()
    train = "".join(json.dumps({"question": f"Q{i}?", "answer": f"#### {i}"}) + "\n" for i in range(6)).encode()
    repo, commit = "openai/grade-school-math", "0" * 40
    files = {
        "test": ("grade_school_math/data/test.jsonl", test),
        "train": ("grade_school_math/data/train.jsonl", train),
    }
    pins = {}
    for role, (path, data) in files.items():
        (tmp_path / "src" / repo / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / repo / path).write_bytes(data)
        pins[role] = (repo, commit, path, hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest())
    monkeypatch.setitem(prep.SOURCES, "math", pins)
    monkeypatch.setattr(prep, "HELDOUT", 2)
    monkeypatch.setattr(prep, "DEV", 1)
    out = tmp_path / "data"
    assert prep.main(["--out", str(out), "--domains", "math", "--source-dir", str(tmp_path / "src")]) == 0
    dev = [json.loads(line) for line in (out / "math" / "dev.jsonl").read_text().splitlines()]
    train_rows = [json.loads(line) for line in (out / "math" / "train.jsonl").read_text().splitlines()]
    assert len(dev) == 1 and len(train_rows) == 5 and not (out / "math" / "heldout.jsonl").exists()
    assert all(list(r) == ["instruction", "input", "output"] for r in dev + train_rows)
    # a changed file is refused, with one line naming it
    (tmp_path / "src" / repo / files["test"][0]).write_bytes(test + b"\n")
    assert prep.main(["--out", str(out), "--domains", "math", "--source-dir", str(tmp_path / "src")]) == 1


def test_offline_fails_with_one_line(prep, tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert prep.main(["--out", str(tmp_path / "data"), "--domains", "code"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prepare_data: cannot download sahil280114/codealpaca/")
    assert "network access" in err and not (tmp_path / "data").exists()


# ---- GLUE: SST-2 and QNLI -----------------------------------------------------------------------------------------
def _pin(prep, monkeypatch, root, domain, files):
    """Write made-up source files under root/<repo>/<path> and pin `domain` to them by their own blob ids."""
    pins = {}
    for role, (repo, path, data) in files.items():
        (root / repo / path).parent.mkdir(parents=True, exist_ok=True)
        (root / repo / path).write_bytes(data)
        pins[role] = (repo, "0" * 40, path, hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest())
    monkeypatch.setitem(prep.SOURCES, domain, pins)


def _tsv(header, rows):
    return ("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows)).encode()


def test_glue_tsv_reads_tabs_without_quoting_and_refuses_broken_lines(prep):
    data = _tsv(("sentence", "label"), [('a "quoted , film ', "1"), ("it 's bad", "0")])
    assert prep.glue_tsv(data, ("sentence", "label")) == [
        {"sentence": 'a "quoted , film ', "label": "1"},  # quotes are text, as in GLUE's files
        {"sentence": "it 's bad", "label": "0"},
    ]
    with pytest.raises(prep.PrepareError, match=r"no column\(s\) \['label'\]"):
        prep.glue_tsv(_tsv(("sentence", "score"), [("x", "1")]), ("sentence", "label"))
    with pytest.raises(prep.PrepareError, match="line 4: expected the 2 header fields"):
        prep.glue_tsv(data + b"one\ttwo\tthree\n", ("sentence", "label"))
    with pytest.raises(prep.PrepareError, match="line 4"):
        prep.glue_tsv(data + b"no label\n", ("sentence", "label"))


def test_sst2_and_qnli_rows_strip_text_and_map_labels(prep):
    (row,) = prep.sst2_rows([{"sentence": " a  Fine film \n", "label": "1"}])
    assert row == {"sentence": "a  Fine film", "label": 1, "key": "a fine film"}
    rows = prep.qnli_rows(
        [
            {"index": "0", "question": "Who? ", "sentence": " He did.", "label": "entailment"},
            {"index": "1", "question": "Who?", "sentence": "Nobody.", "label": "not_entailment"},
        ]
    )
    assert [(r["question"], r["sentence"], r["label"]) for r in rows] == [
        ("Who?", "He did.", 0),
        ("Who?", "Nobody.", 1),
    ]
    assert rows[0]["key"] == "who? he did."
    with pytest.raises(prep.PrepareError, match="SST-2 label '2'"):
        prep.sst2_rows([{"sentence": "x", "label": "2"}])
    with pytest.raises(prep.PrepareError, match="QNLI label 'contradiction'"):
        prep.qnli_rows([{"question": "q", "sentence": "s", "label": "contradiction"}])


def test_qnli_split_keeps_questions_together_and_puts_the_rest_in_train(prep, monkeypatch):
    monkeypatch.setattr(prep, "HELDOUT", 3)
    monkeypatch.setattr(prep, "DEV", 2)
    records = [
        {"question": f"Question {q}?" if i % 2 else f"question  {q}? ", "sentence": f"s{q}-{i}.", "label": "entailment"}
        for q in range(6)
        for i in range(2)
    ]  # six questions of two rows each; the spelling of a question varies only in case and spacing
    records.append({"question": "Question 0?", "sentence": "S0-0.", "label": "not_entailment"})  # a duplicate pair
    rows = prep.qnli_rows(records)
    splits = prep.qnli_split(rows)
    assert [len(splits[s]) for s in ("heldout", "dev", "train")] == [3, 2, 6]  # one row of a cut group dropped
    questions = {s: {prep.normalize(r["question"]) for r in splits[s]} for s in splits}
    assert (
        not questions["heldout"] & questions["dev"]
        and not (questions["heldout"] | questions["dev"]) & questions["train"]
    )
    order = list(range(6))
    import random

    random.Random(0).shuffle(order)  # groups in order of first appearance, shuffled by the split's seed-0 generator
    group = lambda r: int(r["sentence"][1])  # noqa: E731
    assert [group(r) for r in splits["heldout"]] == [order[0], order[0], order[1]]  # second group cut at the quota
    assert [group(r) for r in splits["dev"]] == [order[2]] * 2
    assert [group(r) for r in splits["train"]] == [g for g in order[3:] for _ in range(2)]
    assert all(r["label"] == 0 for split in splits.values() for r in split)  # the duplicate pair was dropped


def test_sst2_command_from_a_source_dir(prep, tmp_path, monkeypatch):
    """GLUE train = ALPS train.tsv then dev.tsv (deduplicated); held out from ALPS test.tsv (the GLUE dev set)."""
    repo = "forest-snow/alps"
    test = _tsv(("sentence", "label"), [(f"held {i} ", str(i % 2)) for i in range(4)])
    train = _tsv(("sentence", "label"), [(f"train {i}", str(i % 2)) for i in range(5)] + [("HELD  0", "0")])
    dev = _tsv(("sentence", "label"), [(f"extra {i}", "1") for i in range(3)] + [("Train 0", "0")])
    files = {
        "train": (repo, "data/SST-2/train.tsv", train),
        "dev": (repo, "data/SST-2/dev.tsv", dev),
        "test": (repo, "data/SST-2/test.tsv", test),
    }
    _pin(prep, monkeypatch, tmp_path / "src", "sst2", files)
    monkeypatch.setattr(prep, "HELDOUT", 2)
    monkeypatch.setattr(prep, "DEV", 1)
    monkeypatch.setattr(prep, "SST2_TRAIN", 100)
    out, argv = tmp_path / "data", ["--domains", "sst2", "--source-dir", str(tmp_path / "src")]
    assert prep.main(["--out", str(out), *argv, "--with-heldout"]) == 0
    read = lambda split: [json.loads(line) for line in (out / "sst2" / f"{split}.jsonl").read_text().splitlines()]  # noqa: E731
    heldout, dev_rows, train_rows = read("heldout"), read("dev"), read("train")
    assert all(
        list(r) == ["sentence", "label"] and isinstance(r["label"], int) for r in heldout + dev_rows + train_rows
    )
    assert len(heldout) == 2 and all(r["sentence"].startswith("held") for r in heldout)
    rest = [r["sentence"] for r in dev_rows + train_rows]
    # 5 train + 3 extra rows; "Train 0" repeats "train 0"; "HELD  0" is dropped only if "held 0" was held out
    expected = {f"train {i}" for i in range(5)} | {f"extra {i}" for i in range(3)}
    if "held 0" not in {r["sentence"] for r in heldout}:
        expected.add("HELD  0")
    assert len(dev_rows) == 1 and set(rest) == expected and len(rest) == len(expected)
    # a modified file is refused with one line naming its blob; a missing one names the file and the commit
    (tmp_path / "src" / repo / "data/SST-2/dev.tsv").write_bytes(dev.replace(b"extra 0", b"extra 9"))
    assert prep.main(["--out", str(tmp_path / "again"), *argv]) == 1
    (tmp_path / "src" / repo / "data/SST-2/dev.tsv").unlink()
    with pytest.raises(prep.PrepareError, match=r"dev\.tsv is missing \(expected forest-snow/alps at 0{40}\)"):
        prep.build_domain("sst2", prep.directory_reader(tmp_path / "src"))
    assert not (tmp_path / "again").exists()


def test_qnli_command_from_a_source_dir_and_a_changed_file(prep, tmp_path, monkeypatch, capsys):
    rows = [(str(i), f"Q{i // 2}?", f"Sentence {i}.", ("entailment", "not_entailment")[i % 2]) for i in range(12)]
    data = _tsv(("index", "question", "sentence", "label"), rows)
    _pin(prep, monkeypatch, tmp_path / "src", "qnli", {"dev": ("jonny-vr/LLMCBench", "data/QNLI/dev.tsv", data)})
    monkeypatch.setattr(prep, "HELDOUT", 2)
    monkeypatch.setattr(prep, "DEV", 2)
    out, argv = tmp_path / "data", ["--domains", "qnli", "--source-dir", str(tmp_path / "src")]
    assert prep.main(["--out", str(out), *argv]) == 0
    written = {
        s: [json.loads(x) for x in (out / "qnli" / f"{s}.jsonl").read_text().splitlines()] for s in ("dev", "train")
    }
    assert not (out / "qnli" / "heldout.jsonl").exists()
    assert len(written["dev"]) == 2 and len(written["train"]) == 12 - 2 - 2  # train: every remaining row
    assert all(list(r) == ["question", "sentence", "label"] for r in written["dev"] + written["train"])
    assert {r["label"] for r in written["train"]} == {0, 1}
    assert not {r["question"] for r in written["dev"]} & {r["question"] for r in written["train"]}
    capsys.readouterr()
    (tmp_path / "src" / "jonny-vr/LLMCBench/data/QNLI/dev.tsv").write_bytes(data[:-10])  # truncated
    assert prep.main(["--out", str(tmp_path / "again"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dev.tsv: git blob" in err and "differs from the pinned" in err
