"""Build the benchmark data sets (code, medical, finance, math; SST-2, QNLI) from their public sources, pinned.

    python benchmarks/prepare_data.py --out data/          # or `make data`: every data set, once (needs the network)
    python benchmarks/frontier.py --data data/             # (or accuracy_vs_bytes.py) on the four LLM domains
    python benchmarks/full_parameter_accuracy.py --data data/sst2

Writes ``<out>/<domain>/train.jsonl`` and ``dev.jsonl``, UTF-8, one JSON object per line, the rows and order of the
data sets the benchmarks in docs/benchmarks.md used. The four LLM domains have ``instruction``, ``input`` and
``output`` (Alpaca style); ``sst2`` has ``sentence`` and ``label`` (int: 0 negative, 1 positive); ``qnli`` has
``question``, ``sentence`` and ``label`` (int: 0 entailment, 1 not_entailment, the GLUE / HF ``nyu-mll/glue``
convention).

Sources. Every file is downloaded from its repository at a fixed commit and checked against its git blob id, so the
bytes are exactly the ones pinned here (a changed or truncated file is an error, not a different data set):

| domain  | data set                                  | repository: file                                | license      |
|---------|-------------------------------------------|-------------------------------------------------|--------------|
| code    | Code Alpaca, 2k release                   | sahil280114/codealpaca: code_alpaca_2k.json     | CC BY-NC 4.0 |
| medical | MedQA-USMLE (US, 5 options), test split   | xk-huang/medagents-benchmark: medqa_5options    | MIT          |
| finance | TAT-QA, official dev and test_gold        | NExTplusplus/TAT-QA: tatqa_dataset_*.json       | CC BY 4.0    |
| math    | GSM8K                                     | openai/grade-school-math: train, test.jsonl    | MIT          |
| sst2    | GLUE SST-2 (Socher et al., EMNLP 2013)    | forest-snow/alps: data/SST-2/*.tsv              | none stated  |
| qnli    | GLUE QNLI, official dev split only        | jonny-vr/LLMCBench: data/QNLI/dev.tsv           | CC BY-SA 4.0 |

These are the data sets' original releases (the Hub copies of GSM8K and Code Alpaca hold the same rows under other
revisions; the 5-option MedQA test split and TAT-QA's raw files are not on the Hub in this form). The FedSRD paper
trains on larger relatives (CodeAlpaca-20k, MedQA train, finance-alpaca, GSM8K + MATH); docs/benchmarks.md says
where ours differ. The GLUE tasks (Wang et al., "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural
Language Understanding", ICLR 2019) come from copies of the GLUE files inside two research repositories. SST-2: ALPS
(Yuan et al., EMNLP 2020) re-split the GLUE SST-2 train set into its ``train.tsv`` (60,614 rows) and ``dev.tsv``
(6,735), and its ``test.tsv`` (872) is the official GLUE SST-2 dev set; SST has no explicit license. QNLI: only the
GLUE QNLI dev set (5,463 rows; derived from SQuAD v1.1, CC BY-SA 4.0) is used, and all three splits are carved from
it, so do not report "GLUE validation" QNLI numbers after training on it (use the held-out split).

Parsing (per domain) and splitting (seed 0), as the data set was built:

* Deduplication key: the lowercased text with runs of whitespace collapsed; the first occurrence of a key is kept.
  Keys: code instruction + input, medical and math the question, finance question + context, sst2 the sentence,
  qnli question + sentence. GLUE text fields are whitespace-stripped.
* Flat split (code, medical, math, sst2): ``rng = random.Random(0)``; the held-out source is deduplicated, shuffled,
  and its first 300 rows are the held-out split (not written unless ``--with-heldout``). Code and medical take dev
  and train from the remaining rows; math (its train file) and sst2 (ALPS train.tsv followed by dev.tsv, the GLUE
  train set) shuffle their train source (deduplicated) with the same generator. Rows whose key is held out are
  dropped; then the first 200 are dev and the next (at most) 2,000 train (5,000 for sst2). SST-2's held-out split
  comes from the official GLUE dev set (ALPS test.tsv); GLUE's test labels are not public.
* Grouped split (finance by document, qnli by question, so no table or question is shared between splits): the
  groups in order of first appearance are shuffled by ``Random(0)`` and fill the quotas group by group; a group that
  would overflow a quota is cut there and its other rows are dropped. Finance: first on test_gold documents (held
  out: 300), then, with a fresh ``Random(0)``, on the dev documents followed by the unused test_gold ones (dev 200,
  train 2,000). QNLI: held out 300, dev 200, train all the remaining rows (4,962).

Without network access the command stops with a one-line message; ``--source-dir DIR`` reads the same files from
``DIR/<repository>/<path>`` instead (checked against the same blob ids).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

SEED = 0
HELDOUT, DEV, TRAIN = 300, 200, 2000
SST2_TRAIN = 5000
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
MEDQA_INSTRUCTION = "Please answer with one of the option in the bracket"
TATQA_SCALES = {"thousand": " thousand", "million": " million", "billion": " billion", "percent": "%"}
QNLI_LABELS = {"entailment": 0, "not_entailment": 1}  # the GLUE / HF nyu-mll/glue convention
SST2_LABELS = {"0": 0, "1": 1}  # negative, positive

# (repository, commit, path, git blob id) of every source file
SOURCES: dict[str, dict[str, tuple[str, str, str, str]]] = {
    "code": {
        "all": (
            "sahil280114/codealpaca",
            "2f78ddc5c682ed6738ad092bbbfa59ba915afcb0",
            "data/code_alpaca_2k.json",
            "72d030181710b5ab46e042a7146773dac3f88998",
        ),
    },
    "medical": {
        "all": (
            "xk-huang/medagents-benchmark",
            "56ca11eb1ef89f6bb7fad6284008bf39e08785b0",
            "data/medqa_5options/test.jsonl",
            "58356a9c6bad18435311e1b9c65509244659033d",
        ),
    },
    "finance": {
        "dev": (
            "NExTplusplus/TAT-QA",
            "870accc41953dcde885aabeb963d94aabdc0fbc3",
            "dataset_raw/tatqa_dataset_dev.json",
            "48075c812af3fe6698b1d5cb50d9dbf358d52784",
        ),
        "test_gold": (
            "NExTplusplus/TAT-QA",
            "870accc41953dcde885aabeb963d94aabdc0fbc3",
            "dataset_raw/tatqa_dataset_test_gold.json",
            "3d5d3b691af572646ba9b1ac4d8f78c5dca09732",
        ),
    },
    "math": {
        "train": (
            "openai/grade-school-math",
            "3101c7d5072418e28b9008a6636bde82a006892c",
            "grade_school_math/data/train.jsonl",
            "7d97154b91aef28d01c3301741c81ce90039a4b1",
        ),
        "test": (
            "openai/grade-school-math",
            "3101c7d5072418e28b9008a6636bde82a006892c",
            "grade_school_math/data/test.jsonl",
            "e4c2ff4942b9a78bd74f04141224c11e28d12dc9",
        ),
    },
    # ALPS's train.tsv + dev.tsv are the GLUE SST-2 train set; its test.tsv is the GLUE SST-2 dev set
    "sst2": {
        "train": (
            "forest-snow/alps",
            "3c7ef2c98249fc975a897b27f275695f97d5b7a9",
            "data/SST-2/train.tsv",
            "6a96265e114a1ccece4573d57e7f787e40ba34fe",
        ),
        "dev": (
            "forest-snow/alps",
            "3c7ef2c98249fc975a897b27f275695f97d5b7a9",
            "data/SST-2/dev.tsv",
            "49aa269cc8eee25f6fc2910ffb72dc9257b2bbe4",
        ),
        "test": (
            "forest-snow/alps",
            "3c7ef2c98249fc975a897b27f275695f97d5b7a9",
            "data/SST-2/test.tsv",
            "b1285ff5696fd163af4737dfd5adf134525d2296",
        ),
    },
    "qnli": {
        "dev": (
            "jonny-vr/LLMCBench",
            "720be179c2492271f61d7a09291ffd003f36f47d",
            "data/QNLI/dev.tsv",
            "a3bb0cb49e8cfc02707b2c4226825141dedeb459",
        ),
    },
}
DOMAINS = tuple(SOURCES)
ALPACA_COLUMNS = ("instruction", "input", "output")
COLUMNS = {
    **dict.fromkeys(("code", "medical", "finance", "math"), ALPACA_COLUMNS),
    "sst2": ("sentence", "label"),
    "qnli": ("question", "sentence", "label"),
}  # the columns written per domain, in this order

Row = dict[str, Any]  # the domain's COLUMNS, and key (the deduplication key, not written)
Reader = Callable[[str, str], bytes]  # (domain, role) -> the file's bytes


class PrepareError(Exception):
    """A source that cannot be read or does not match its pin; the message is one line."""


# ---- reading the pinned files -------------------------------------------------------------------------------------
def git_blob_id(data: bytes) -> str:
    """The id git gives a file with these bytes (sha1 of ``blob <size>\\0`` + bytes)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _checked(data: bytes, domain: str, role: str, where: str) -> bytes:
    expected = SOURCES[domain][role][3]
    if git_blob_id(data) != expected:
        raise PrepareError(f"{where}: git blob {git_blob_id(data)} differs from the pinned {expected}.")
    return data


def download_reader(timeout: float = 60.0) -> Reader:
    def read(domain: str, role: str) -> bytes:
        repo, commit, path, _ = SOURCES[domain][role]
        url = RAW_URL.format(repo=repo, commit=commit, path=path)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise PrepareError(
                f"cannot download {repo}/{path} ({reason}); this command needs network access to the data "
                "sources, or --source-dir with the files already downloaded."
            ) from err
        return _checked(data, domain, role, url)

    return read


def directory_reader(root: Path) -> Reader:
    def read(domain: str, role: str) -> bytes:
        repo, _, path, _ = SOURCES[domain][role]
        file = root / repo / path
        if not file.is_file():
            raise PrepareError(f"--source-dir: {file} is missing (expected {repo} at {SOURCES[domain][role][1]}).")
        return _checked(file.read_bytes(), domain, role, str(file))

    return read


def _json_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def glue_tsv(data: bytes, columns: Sequence[str], where: str = "GLUE file") -> list[dict[str, str]]:
    """The rows of a GLUE ``.tsv`` (a header line, tab-separated fields, no quoting: GLUE's own format, read the way
    the HF ``nyu-mll/glue`` loader reads it), checked to have `columns` and a value for each on every line."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise PrepareError(f"{where}: no column(s) {missing} in the header {reader.fieldnames}.")
    rows = []
    for record in reader:
        if any(record.get(c) is None for c in columns) or None in record:
            raise PrepareError(f"{where} line {reader.line_num}: expected the {len(reader.fieldnames)} header fields.")
        rows.append(record)
    return rows


# ---- parsing: source records -> the written columns (COLUMNS) ------------------------------------------------------
def gsm8k_rows(records: Iterable[dict[str, Any]]) -> list[Row]:
    """GSM8K: the question, and the answer verbatim (calculator annotations and the final ``#### N`` line kept)."""
    return [
        {"instruction": r["question"], "input": "", "output": r["answer"], "key": normalize(r["question"])}
        for r in records
    ]


def code_alpaca_rows(records: Iterable[dict[str, Any]]) -> list[Row]:
    """Code Alpaca: the three fields whitespace-stripped; rows with an empty output dropped."""
    rows = [{k: (r.get(k) or "").strip() for k in ("instruction", "input", "output")} for r in records]
    return [{**r, "key": normalize(r["instruction"] + " " + r["input"])} for r in rows if r["output"]]


def medqa_rows(records: Iterable[dict[str, Any]]) -> list[Row]:
    """MedQA in medalpaca/medical_meadow_medqa's form: ``Q:<question> <options dict repr>`` -> ``<letter>: <text>``
    (question and answer text whitespace-stripped; the options as given)."""
    rows = []
    for r in records:
        options = dict(r["options"])
        letter = r["answer_idx"]
        if letter not in options:
            raise PrepareError(f"MedQA row {r.get('realidx', '?')}: answer_idx {letter!r} is not an option.")
        rows.append(
            {
                "instruction": MEDQA_INSTRUCTION,
                "input": f"Q:{r['question'].strip()} {options!r}",
                "output": f"{letter}: {options[letter].strip()}",
                "key": normalize(r["question"]),
            }
        )
    return rows


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def tatqa_answer(answer: Any, scale: str) -> str:
    """Spans as given, several joined by ", ", integral floats as integers, then the scale (or % for percent)."""
    text = ", ".join(_number(a) for a in answer) if isinstance(answer, list) else _number(answer)
    return text + TATQA_SCALES.get(scale or "", "")


def tatqa_documents(documents: Iterable[dict[str, Any]]) -> list[list[Row]]:
    """One list of rows per TAT-QA document: input = the table (cells stripped, joined by " | ") and the paragraphs in
    order; output = ``Derivation: <formula>`` where one is given, then ``Answer: ...``; questions in order, stripped;
    exact duplicates of (question, context) in the file dropped."""
    groups = []
    for doc in documents:
        table = "\n".join(" | ".join(str(cell).strip() for cell in row) for row in doc["table"]["table"])
        paragraphs = sorted(doc.get("paragraphs", []), key=lambda p: p.get("order", 0))
        context = "Table:\n" + table + "\n\nText:\n" + "\n".join(p["text"] for p in paragraphs)
        rows = []
        for q in sorted(doc.get("questions", []), key=lambda q: q.get("order", 0)):
            derivation = (q.get("derivation") or "").strip()
            prefix = f"Derivation: {derivation}\n" if derivation else ""
            answer = tatqa_answer(q["answer"], q.get("scale", ""))
            question = q["question"].strip()
            key = normalize(question + " " + context)
            rows.append({"instruction": question, "input": context, "output": f"{prefix}Answer: {answer}", "key": key})
        groups.append(rows)
    seen: set[str] = set()
    return [dedup(rows, seen) for rows in groups]


def _label(value: str, labels: dict[str, int], task: str) -> int:
    if value.strip() not in labels:
        raise PrepareError(f"{task} label {value!r} is not one of {sorted(labels)}.")
    return labels[value.strip()]


def sst2_rows(records: Iterable[dict[str, str]]) -> list[Row]:
    """GLUE SST-2: the sentence whitespace-stripped, the label as an int (0 negative, 1 positive)."""
    rows = []
    for r in records:
        sentence = r["sentence"].strip()
        rows.append(
            {"sentence": sentence, "label": _label(r["label"], SST2_LABELS, "SST-2"), "key": normalize(sentence)}
        )
    return rows


def qnli_rows(records: Iterable[dict[str, str]]) -> list[Row]:
    """GLUE QNLI: question and sentence whitespace-stripped, the label as an int (0 entailment, 1 not_entailment)."""
    rows = []
    for r in records:
        question, sentence = r["question"].strip(), r["sentence"].strip()
        label = _label(r["label"], QNLI_LABELS, "QNLI")
        rows.append(
            {"question": question, "sentence": sentence, "label": label, "key": normalize(question + " " + sentence)}
        )
    return rows


def group_by(rows: Iterable[Row], column: str) -> list[list[Row]]:
    """The rows grouped by the normalized text of `column`, groups in order of first appearance, rows in order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(normalize(row[column]), []).append(row)
    return list(groups.values())


# ---- splitting ----------------------------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """A row's deduplication key: lowercased, runs of whitespace collapsed, stripped."""
    return re.sub(r"\s+", " ", text.lower()).strip()


def dedup(rows: Iterable[Row], seen: set[str] | None = None) -> list[Row]:
    """The rows whose ``key`` was not seen before (in `seen`, which is updated, or earlier in `rows`), in order."""
    seen = set() if seen is None else seen
    out = []
    for row in rows:
        if row["key"] not in seen:
            seen.add(row["key"])
            out.append(row)
    return out


def flat_split(
    heldout_source: Sequence[Row], train_source: Sequence[Row] | None, n_train: int = TRAIN
) -> dict[str, list[Row]]:
    """Held-out, dev and train of a flat split (module docstring); `train_source` None: from the held-out source."""
    rng = random.Random(SEED)
    pool = dedup(heldout_source)
    rng.shuffle(pool)
    heldout, rest = pool[:HELDOUT], pool[HELDOUT:]
    if train_source is not None:
        rest = dedup(train_source)
        rng.shuffle(rest)
    held = {r["key"] for r in heldout}
    rest = [r for r in rest if r["key"] not in held]
    return {"heldout": heldout, "dev": rest[:DEV], "train": rest[DEV : DEV + n_train]}


def grouped_split(groups: Sequence[Sequence[Row]], quotas: dict[str, int]) -> tuple[dict[str, list[Row]], list[int]]:
    """Fill `quotas` (in their order) group by group in ``Random(0)``-shuffled order, cutting the group that
    overflows a quota; returns the splits and the indices of the groups used (cut ones included)."""
    order = list(range(len(groups)))
    random.Random(SEED).shuffle(order)
    names = list(quotas)
    splits: dict[str, list[Row]] = {name: [] for name in names}
    used: list[int] = []
    current = 0
    for index in order:
        if current == len(names):
            break
        name = names[current]
        splits[name] += groups[index][: quotas[name] - len(splits[name])]
        used.append(index)
        if len(splits[name]) >= quotas[name]:
            current += 1
    return splits, used


def finance_split(
    dev_documents: Sequence[Sequence[Row]], test_documents: Sequence[Sequence[Row]]
) -> dict[str, list[Row]]:
    heldout, used = grouped_split(test_documents, {"heldout": HELDOUT})
    unused = [doc for i, doc in enumerate(test_documents) if i not in set(used)]
    rest, _ = grouped_split([*dev_documents, *unused], {"dev": DEV, "train": TRAIN})
    return {"heldout": heldout["heldout"], **rest}


def qnli_split(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """QNLI (deduplicated) grouped by question: held out 300, dev 200, train every remaining row."""
    rows = dedup(rows)
    splits, _ = grouped_split(group_by(rows, "question"), {"heldout": HELDOUT, "dev": DEV, "train": len(rows)})
    return splits


def build_domain(domain: str, read: Reader) -> dict[str, list[Row]]:
    """The held-out, dev and train rows of `domain`, from its pinned source files."""
    if domain == "math":
        return flat_split(gsm8k_rows(_json_lines(read(domain, "test"))), gsm8k_rows(_json_lines(read(domain, "train"))))
    if domain == "code":
        return flat_split(code_alpaca_rows(json.loads(read(domain, "all"))), None)
    if domain == "medical":
        return flat_split(medqa_rows(_json_lines(read(domain, "all"))), None)
    if domain == "finance":
        return finance_split(
            tatqa_documents(json.loads(read(domain, "dev"))), tatqa_documents(json.loads(read(domain, "test_gold")))
        )
    if domain == "sst2":  # held out from the GLUE dev set (ALPS test.tsv); dev and train from the GLUE train set
        glue_dev = glue_tsv(read(domain, "test"), COLUMNS[domain], "SST-2 test.tsv")
        glue_train = [glue_tsv(read(domain, role), COLUMNS[domain], f"SST-2 {role}.tsv") for role in ("train", "dev")]
        return flat_split(sst2_rows(glue_dev), sst2_rows([*glue_train[0], *glue_train[1]]), SST2_TRAIN)
    if domain == "qnli":
        return qnli_split(qnli_rows(glue_tsv(read(domain, "dev"), COLUMNS[domain], "QNLI dev.tsv")))
    raise PrepareError(f"unknown domain {domain!r}; expected one of {DOMAINS}.")


def write_jsonl(path: Path, rows: Iterable[Row], columns: Sequence[str] = ALPACA_COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in columns}, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write <domain>/train.jsonl, dev.jsonl")
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    parser.add_argument("--source-dir", type=Path, help="read the pinned files from DIR/<repository>/<path>")
    parser.add_argument(
        "--with-heldout", action="store_true", help="also write heldout.jsonl (the 300 rows kept out of train and dev)"
    )
    a = parser.parse_args(argv)
    read = directory_reader(a.source_dir) if a.source_dir else download_reader()
    try:
        built = {domain: build_domain(domain, read) for domain in a.domains}  # everything read before writing
    except PrepareError as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 1
    for domain, splits in built.items():
        names = ("train", "dev", "heldout") if a.with_heldout else ("train", "dev")
        for name in names:
            write_jsonl(a.out / domain / f"{name}.jsonl", splits[name], COLUMNS[domain])
        print(f"{domain}: " + ", ".join(f"{name} {len(splits[name])}" for name in names) + f" -> {a.out / domain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
