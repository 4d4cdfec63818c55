"""The real-model benchmarks run end to end on the tiny random Llama and a few rows of made-up domain data, and print
the JSON objects their documentation promises. (Figures are not asserted: these are timings and small-model losses.)"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["code", "math"]


def load_benchmark(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("domains"))


def write_domains(root: Path) -> Path:
    """<dir>/<domain>/{train,dev}.jsonl with instruction/input/output rows, as benchmarks/prepare_data.py writes."""
    for d, domain in enumerate(DOMAINS):
        (root / domain).mkdir(parents=True)
        for split, n in (("train", 24), ("dev", 6)):
            rows = [{"instruction": f"{domain} task {i}: add {i} and {d}", "input": "", "output": str(i + d)}
                    for i in range(n)]  # fmt: skip
            (root / domain / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().split("\n")[-1])


def test_accuracy_vs_bytes_json_is_keyed_by_algorithm(data_dir, tmp_path, capsys):
    bench = load_benchmark("accuracy_vs_bytes")
    argv = ["--data", str(data_dir), "--domains", *DOMAINS, "--algorithms", "fedavg", "fedsrd",
            "fedsrd+value_dtype=bfloat16", "--model",
            "tiny-llama", "--rounds", "1", "--local-steps", "2", "--eval-size", "4", "--max-length", "64",
            "--targets", "q_proj", "v_proj", "--out", str(tmp_path / "runs"), "--json"]  # fmt: skip
    bench.main(argv)
    result = last_json(capsys)
    assert list(result) == ["fedavg", "fedsrd", "fedsrd+value_dtype=bfloat16"]
    for r in result.values():
        assert set(r["eval_loss"]) == {*DOMAINS, "mean"}
        assert r["upload_mb"] > 0 and r["download_mb"] > 0
    # The bytes are the encoded messages: FedSRD's sparse upload is smaller than FedAvg's dense one.
    assert result["fedsrd"]["upload_mb"] < result["fedavg"]["upload_mb"]
    # A method's own options reach its run: bfloat16 values make FedSRD's messages smaller still.
    assert result["fedsrd+value_dtype=bfloat16"]["upload_mb"] < result["fedsrd"]["upload_mb"]
    # Only the first method evaluates the base model (round 0); the others start at round 1.
    first = json.loads((tmp_path / "runs" / "fedavg" / "history.json").read_text())
    second = json.loads((tmp_path / "runs" / "fedsrd" / "history.json").read_text())
    assert [r["round"] for r in first] == [0, 1] and [r["round"] for r in second] == [1]
    # --reuse keeps finished runs with the same settings (nothing is retrained: the histories stay as they are).
    mtime = (tmp_path / "runs" / "fedsrd" / "history.json").stat().st_mtime_ns
    bench.main([*argv, "--reuse"])
    assert last_json(capsys) == result
    assert (tmp_path / "runs" / "fedsrd" / "history.json").stat().st_mtime_ns == mtime


def test_accuracy_vs_bytes_names_a_missing_domain(data_dir, tmp_path):
    bench = load_benchmark("accuracy_vs_bytes")
    with pytest.raises(SystemExit):
        bench.main(["--data", str(data_dir), "--domains", "code", "law", "--out", str(tmp_path)])


def test_client_overhead_reports_encode_fraction(data_dir, capsys):
    bench = load_benchmark("client_overhead")
    bench.main(["--data", str(data_dir), "--domains", *DOMAINS, "--model", "tiny-llama", "--rounds", "2",
                "--local-steps", "1", "--max-length", "64", "--targets", "q_proj", "v_proj", "--json"])  # fmt: skip
    result = last_json(capsys)
    assert result["samples"] == 4  # 2 clients x 2 rounds (a B-round and an A-round)
    assert 0 < result["encode_fraction"] <= result["encode_fraction_max"]
    assert result["train_s"] > 0 and result["receive_s"] > 0


def test_throughput_compares_with_plain_trainer(data_dir, capsys):
    bench = load_benchmark("throughput")
    bench.main(["--data", str(data_dir), "--domain", "code", "--model", "tiny-llama", "--steps", "2", "--repeats", "1",
                "--max-length", "64", "--targets", "q_proj", "v_proj", "--json"])  # fmt: skip
    out = capsys.readouterr().out
    result = json.loads(out.strip().split("\n")[-1])
    assert result["ratio_vs_plain"] > 0 and result["plain_tokens_per_s"] > 0
    assert result["ratio_vs_plain"] == pytest.approx(result["federated_tokens_per_s"] / result["plain_tokens_per_s"])
    # Same batches for every run: the seeded sampler draws the same rows, so the token counts agree.
    rows = [line.split("|") for line in out.split("\n") if line.startswith("| plain") or line.startswith("| federated")]
    assert len(rows) == 3 and len({r[3].strip() for r in rows}) == 1


def test_comm_table_puts_the_paper_beside_ours(capsys):
    bench = load_benchmark("comm_table")
    bench.main(["--sample-layers", "1", "--rounds", "1", "--algorithms", "fedavg", "--compact", "--json"])
    out = capsys.readouterr().out
    assert "| `fedavg` | 371.1 | 371.1 | 742.2 | 371 / 371 / 742 | 1.00 |" in out
    assert json.loads(out.strip().split("\n")[-1])["rows"][0]["paper_up_down_mb"] == [371.0, 371.0]


def test_run_all_writes_sections_between_markers(tmp_path):
    run_all = load_benchmark("run_all")
    doc = "# Benchmarks\n\nHand-written.\n\n<!-- bench:comm:begin -->\nold\n<!-- bench:comm:end -->\n\nMore text.\n"
    doc = run_all.write_section(doc, "comm", "new table")
    assert "old" not in doc and "new table" in doc and "Hand-written." in doc and "More text." in doc
    doc = run_all.write_section(doc, "overhead", "fraction")
    assert doc.rstrip().endswith("<!-- bench:overhead:end -->")
    checks = run_all.check_throughput({"ratio_vs_plain": 0.9, "ratio_vs_plain_default": 1.2, "target": 0.95})
    assert "misses" in checks[0]
