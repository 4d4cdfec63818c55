"""Build the four benchmark domains (code, medical, finance, math) from their public sources, pinned.

    python benchmarks/prepare_data.py --out data/
    python benchmarks/accuracy_vs_bytes.py --data data/    # (or frontier.py) on what it wrote

Writes ``<out>/<domain>/train.jsonl`` and ``dev.jsonl``: one JSON object per line with ``instruction``, ``input``
and ``output`` (Alpaca style, UTF-8), the rows and order of the data set the benchmarks in docs/benchmarks.md used.

Sources. Every file is downloaded from its repository at a fixed commit and checked against its git blob id, so the
bytes are exactly the ones pinned here (a changed or truncated file is an error, not a different data set):

| domain  | data set                                  | repository: file                                | license      |
|---------|-------------------------------------------|-------------------------------------------------|--------------|
| code    | Code Alpaca, 2k release                   | sahil280114/codealpaca: code_alpaca_2k.json     | CC BY-NC 4.0 |
| medical | MedQA-USMLE (US, 5 options), test split   | xk-huang/medagents-benchmark: medqa_5options    | MIT          |
| finance | TAT-QA, official dev and test_gold        | NExTplusplus/TAT-QA: tatqa_dataset_*.json       | CC BY 4.0    |
| math    | GSM8K                                     | openai/grade-school-math: train, test.jsonl    | MIT          |

These are the data sets' original releases (the Hub copies of GSM8K and Code Alpaca hold the same rows under other
revisions; the 5-option MedQA test split and TAT-QA's raw files are not on the Hub in this form). The FedSRD paper
trains on larger relatives (CodeAlpaca-20k, MedQA train, finance-alpaca, GSM8K + MATH); docs/benchmarks.md says
where ours differ.

Parsing (per domain) and splitting (seed 0), as the data set was built:

* Deduplication key: the lowercased text with runs of whitespace collapsed; the first occurrence of a key is kept.
  Keys: code instruction + input, medical and math the question, finance question + context.
* Flat split (code, medical, math): ``rng = random.Random(0)``; the held-out source is deduplicated, shuffled, and its
  first 300 rows are the held-out split (not written unless ``--with-heldout``). Code and medical take dev and train
  from the remaining rows; math shuffles its train file (deduplicated) with the same generator. Rows whose key is
  held out are dropped; then the first 200 are dev and the next (at most) 2,000 train.
* Grouped split (finance, by document, so no table is shared between splits): the documents in order of first
  appearance are shuffled by ``Random(0)`` and fill the quotas document by document; a document that would overflow
  a quota is cut there and its other questions are dropped. First on test_gold documents (held out: 300), then,
  with a fresh ``Random(0)``, on the dev documents followed by the unused test_gold ones (dev 200, train 2,000).

Without network access the command stops with a one-line message; ``--source-dir DIR`` reads the same files from
``DIR/<repository>/<path>`` instead (checked against the same blob ids).
"""

from __future__ import annotations

import argparse
import hashlib
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
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
MEDQA_INSTRUCTION = "Please answer with one of the option in the bracket"
TATQA_SCALES = {"thousand": " thousand", "million": " million", "billion": " billion", "percent": "%"}

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
}
DOMAINS = tuple(SOURCES)

Row = dict[str, str]  # instruction, input, output, and key (the deduplication key, not written)
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


# ---- parsing: source records -> instruction / input / output ------------------------------------------------------
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
    raise PrepareError(f"unknown domain {domain!r}; expected one of {DOMAINS}.")


def write_jsonl(path: Path, rows: Iterable[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in ("instruction", "input", "output")}, ensure_ascii=False) + "\n")


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
            write_jsonl(a.out / domain / f"{name}.jsonl", splits[name])
        print(f"{domain}: " + ", ".join(f"{name} {len(splits[name])}" for name in names) + f" -> {a.out / domain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
