"""`fedsrd report` (Markdown + PNG plots comparing runs) and the paper-reproduction script at toy scale."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fedsrd.report import comm_summary, final_scores, write_report
from fedsrd.wire import MB

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(path: Path, algorithm: str, up_mb: float, down_mb: float, clients: int = 4, rounds: int = 3) -> Path:
    """A run directory as `fedsrd train` leaves it: history.json (round 0 + rounds) and fed_config.json."""
    path.mkdir(parents=True)
    history = [{"round": 0, "upload_bytes": 0, "download_bytes": 0, "cumulative_mb": 0.0, "eval_loss": 3.0}]
    cumulative = 0.0
    for r in range(1, rounds + 1):
        cumulative += clients * (up_mb + down_mb)
        rec = {"round": r, "train_loss": 2.0, "upload_bytes": int(clients * up_mb * MB),
               "download_bytes": int(clients * down_mb * MB), "upload_mb_per_client": up_mb,
               "download_mb_per_client": down_mb, "cumulative_mb": cumulative, "eval_loss": 3.0 - 0.5 * r}
        if r % 2 == 1:  # lm-eval every 2 rounds and the last
            rec.update({"lm_eval/fedsrd_paper/GSM8K": 0.1 * r, "lm_eval/fedsrd_paper/avg_in_domain": 0.05 * r,
                        "lm_eval/gsm8k/exact_match,flexible-extract": 0.1 * r,
                        "lm_eval_unavailable": {"LawBench": "not in lm-evaluation-harness"}})
        history.append(rec)
    (path / "history.json").write_text(json.dumps(history))
    (path / "fed_config.json").write_text(json.dumps({"algorithm": algorithm, "num_clients": clients,
                                                      "num_rounds": rounds, "local_steps": 10}))
    return path


def test_comm_summary_and_final_scores(tmp_path):
    history = json.loads((fake_run(tmp_path / "run", "fedavg", 371.0, 371.0) / "history.json").read_text())
    comm = comm_summary(history)
    assert comm["rounds"] == 3
    assert comm["upload_mb_per_client_per_round"] == 371.0 and comm["download_mb_per_client_per_round"] == 371.0
    assert comm["per_client_cumulative_mb"] == pytest.approx(3 * 742.0)
    assert comm["total_upload_mb"] == pytest.approx(3 * 4 * 371.0) and comm["cumulative_mb"] == pytest.approx(8904.0)
    finals = final_scores(history)
    assert finals["eval_loss"] == (1.5, 3)
    assert finals["lm_eval/fedsrd_paper/GSM8K"] == (pytest.approx(0.3), 3)
    assert list(finals)[0] == "eval_loss"  # loss first, then the suite scores, then per-task metrics


def test_report_compares_runs_with_plots_and_tables(tmp_path):
    from fedsrd.cli import main

    fedavg = fake_run(tmp_path / "fedavg", "fedavg", 371.0, 371.0)
    fedsrd = fake_run(tmp_path / "fedsrd", "fedsrd", 31.0, 43.0)
    main(["report", str(fedavg), str(fedsrd), "--out", str(tmp_path / "report"), "--title", "Llama test"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.startswith("# Llama test")
    for png in ("scores_vs_mb.png", "eval_loss_vs_mb.png", "comm_per_round.png"):
        assert (tmp_path / "report" / png).read_bytes().startswith(PNG)
        assert f"]({png})" in report
    assert "| fedavg | fedavg | 3 | 4 | 371.00 | 371.00 | 4,452 | 4,452 | 8,904 | 1.5000 |" in report
    assert "| fedsrd | fedsrd | 3 | 4 | 31.00 | 43.00 | 372.00 | 516.00 | 888.00 | 1.5000 |" in report
    assert "| lm_eval/fedsrd_paper/GSM8K | 0.3000 (round 3) | 0.3000 (round 3) |" in report
    assert "- **LawBench**: not in lm-evaluation-harness" in report


def test_report_of_one_run_goes_next_to_it_and_missing_history_is_an_error(tmp_path):
    from fedsrd.report import main

    run = fake_run(tmp_path / "only", "fedavg", 1.0, 1.0)
    assert main([str(run)]) == run / "report" / "report.md"
    with pytest.raises(FileNotFoundError, match="history.json"):
        write_report([tmp_path / "nothing"], tmp_path / "out")


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_paper", REPO / "examples" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_paper"] = module
    spec.loader.exec_module(module)
    return module


def test_reproduction_script_uses_the_papers_setting(tmp_path, capsys):
    from fedsrd.cli import parse_train_args

    script = load_script()
    assert script.main(["--dry_run", "--out", str(tmp_path)]) is None
    printed = capsys.readouterr().out
    assert "openai/gsm8k[train] + DigitalLearningGmbH/MATH-lighteval[train]" in printed
    assert printed.count("fedsrd train ") == 3 and "fedsrd report" in printed
    data_dirs = [tmp_path / "data" / d for d in ("code", "medical", "finance", "math")]
    argv = script.train_argv("fedsrd_e", data_dirs, tmp_path / "fedsrd_e", False, 5e-5, ["--use_cpu", "True"])
    fed, training, model_data = parse_train_args(argv)  # use_cpu only because bf16 needs a GPU to validate
    assert model_data.model_name_or_path == "meta-llama/Llama-3.2-3B" and model_data.partition == "domain"
    assert (fed.algorithm, fed.num_clients, fed.num_rounds, fed.local_steps) == ("fedsrd_e", 4, 50, 10)
    assert (fed.lora_r, fed.lora_alpha, fed.lora_dropout, fed.lora_target_modules) == (64, 128, 0.05, ["all-linear"])
    assert (fed.upload_sparsity_alpha, fed.download_drop) == (0.85, 0.8)
    assert fed.lm_eval_tasks == ["fedsrd_paper"] and fed.lm_eval_every == 0
    assert (training.learning_rate, training.per_device_train_batch_size, training.gradient_accumulation_steps,
            training.lr_scheduler_type.value, training.seed, training.bf16) == (5e-5, 8, 4, "constant", 2023, True)
    assert model_data.max_length == 512


def test_reproduction_steps_at_toy_scale(tmp_path, monkeypatch):
    import fedsrd

    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path / "cache"))

    script = load_script()
    # One algorithm keeps this fast (the report test above compares several runs): FedSRD when it is registered
    # (it is being written alongside), else FedAvg.
    algorithms = ["fedsrd"] if "fedsrd" in fedsrd.list_algorithms() else ["fedavg"]
    report = script.main(["--tiny", "--out", str(tmp_path), "--algorithms", *algorithms])
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text()
    for algorithm in algorithms:
        history = json.loads((tmp_path / algorithm / "history.json").read_text())
        assert [r["round"] for r in history] == [0, 1, 2]
        assert "lm_eval/synthetic/avg" in history[-1] and history[-1]["upload_bytes"] > 0
        assert f"| {algorithm} | {algorithm} | 2 | 4 |" in text
    for domain in ("code", "medical", "finance", "math"):
        assert (tmp_path / "data" / domain / "train.jsonl").is_file()
    assert (tmp_path / "report" / "scores_vs_mb.png").read_bytes().startswith(PNG)
