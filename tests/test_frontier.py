"""benchmarks/frontier.py: paired intervals, interpolation at equal bytes, stored runs reused and reported."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import frontier  # noqa: E402


def _history(losses_by_round: dict[int, float], mb_per_round: float) -> list[dict]:
    """A made-up history.json: round 0 evaluated, then every round with its bytes, some evaluated."""
    history = [{"round": 0, "eval_loss": losses_by_round[0]}]
    for rnd in range(1, max(losses_by_round) + 1):
        record = {"round": rnd, "upload_mb_per_client": mb_per_round / 2, "download_mb_per_client": mb_per_round / 2}
        if rnd in losses_by_round:
            record["eval_loss"] = losses_by_round[rnd]
        history.append(record)
    return history


def test_paired_interval_matches_the_t_interval_by_hand():
    mean, (lo, hi) = frontier.paired_interval([0.1, 0.2, 0.3])
    # mean 0.2, sd 0.1, t_{0.975, 2} = 4.302652729911275, half-width = t * sd / sqrt(3)
    half = 4.302652729911275 * 0.1 / 3**0.5
    assert mean == pytest.approx(0.2)
    assert (lo, hi) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert frontier.paired_interval([0.5]) == (0.5, None)  # one pair: no interval


def test_interpolation_inside_and_outside_the_curve():
    assert frontier.interpolate([0, 10, 20], [2.0, 1.0, 0.5], 5) == pytest.approx(1.5)
    assert frontier.interpolate([0, 10, 20], [2.0, 1.0, 0.5], 20) == pytest.approx(0.5)
    assert frontier.interpolate([0, 10, 20], [2.0, 1.0, 0.5], 25) is None


def test_analysis_at_equal_rounds_and_equal_bytes():
    # FedAvg: 10 MB/round, loss 2.0 -> 1.0 linearly over 2 rounds; the method: 1 MB/round, seeds offset by +0.1, +0.2,
    # +0.3 from FedAvg at equal rounds.
    runs = {"fedavg": {}, "cheap": {}}
    for seed, offset in zip((1, 2, 3), (0.1, 0.2, 0.3)):
        runs["fedavg"][seed] = _history({0: 2.0, 1: 1.5, 2: 1.0}, 10.0)
        runs["cheap"][seed] = [r for r in _history({0: 2.0, 1: 1.5 + offset, 2: 1.0 + offset}, 1.0) if True]
    result = frontier.analyse(runs)
    last = result["cheap"]["curve"][-1]
    assert last["round"] == 2 and last["loss_mean"] == pytest.approx(1.2)
    assert last["diff_equal_rounds"] == pytest.approx(0.2)
    half = 4.302652729911275 * 0.1 / 3**0.5
    assert last["ci95_equal_rounds"] == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    # at 2 MB FedAvg's curve (0 MB: 2.0, 10 MB: 1.5) gives 1.9, so the method is 1.9 - (1.0 + offset) lower
    assert last["diff_equal_bytes"] == pytest.approx((1.1 + 1.2 + 1.3) / 3 - 1.9)
    assert result["cheap"]["bytes_vs_fedavg"] == pytest.approx(0.1)
    assert result["cheap"]["seeds_done"] == [1, 2, 3] and result["cheap"]["rounds_done"] == 2


def test_round_zero_is_shared_by_runs_that_skipped_it():
    runs = {"fedavg": {1: _history({0: 2.0, 1: 1.5}, 10.0)}, "other": {1: _history({0: 9.0, 1: 1.4}, 1.0)[1:]}}
    result = frontier.analyse(runs)
    assert result["other"]["curve"][0] == {**result["other"]["curve"][0], "round": 0, "loss_mean": 2.0}


def _args(tmp_path, *extra):
    data = tmp_path / "data"
    for d in frontier.avb.DOMAINS:
        (data / d).mkdir(parents=True, exist_ok=True)
    return frontier.parse_args(["--data", str(data), "--results", str(tmp_path / "results"),
                                "--out", str(tmp_path / "out"), *extra])  # fmt: skip


def test_stored_runs_are_reused_only_with_the_same_settings(tmp_path):
    a = _args(tmp_path, "--methods", "fedavg", "--seeds", "1")
    keep = frontier.run_dir(a.results, "fedavg", 1)
    keep.mkdir(parents=True)
    (keep / "history.json").write_text(json.dumps(_history({0: 2.0, 1: 1.0}, 5.0)))
    (keep / "settings.json").write_text(json.dumps(frontier.settings_of(a, "fedavg", 1)))
    assert frontier.stored(a, "fedavg", 1) is not None
    other = _args(tmp_path, "--methods", "fedavg", "--seeds", "1", "--local-steps", "7")
    assert frontier.stored(other, "fedavg", 1) is None  # other settings: trained again, not reused
    # the data directory's location is not a setting: the same data elsewhere reuses the run
    assert frontier.settings_of(a, "fedavg", 1)["args"] == frontier.settings_of(
        argparse_like(a, data="/elsewhere"), "fedavg", 1)["args"]  # fmt: skip


def argparse_like(a, **changes):
    import argparse

    return argparse.Namespace(**{**vars(a), **changes})


def test_the_main_job_resumes_from_its_round_checkpoint(tmp_path):
    a = _args(tmp_path, "--methods", "fedsrd_ef+value_dtype=bfloat16", "--seeds", "2")
    args = frontier.main_job_args(a, a.methods[0], 2, tmp_path / "out")
    assert args[args.index("--resume") + 1] == "true" and args[args.index("--checkpoint") + 1] == "true"
    assert args[args.index("--seed") + 1] == "2" and args[-4:-2] == ["--value_dtype", "bfloat16"]
    assert args[args.index("--eval_at_start") + 1] == "false"  # round 0 is measured once, in the reference's runs


def test_report_only_reads_committed_results_and_prints_json(tmp_path, capsys):
    a = _args(tmp_path)
    for method, offset in (("fedavg", 0.0), ("fedsrd", 0.05)):
        for seed in (1, 2):
            keep = frontier.run_dir(a.results, method, seed)
            keep.mkdir(parents=True)
            (keep / "history.json").write_text(json.dumps(_history({0: 2.0, 3: 1.0 + offset + seed / 100}, 4.0)))
            (keep / "settings.json").write_text(json.dumps({"method": method, "seed": seed, "args": []}))
    summary = frontier.main(["--report-only", "--results", str(a.results), "--seeds", "1", "2", "--json"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    assert summary["methods"]["fedsrd"]["diff_vs_fedavg"] == pytest.approx(0.05)
    assert summary["methods"]["fedsrd"]["seeds_done"] == [1, 2]
    assert "| FedSRD | 2 (2) | 3 |" in out


def test_run_and_store_clears_other_settings_and_stores_the_result(tmp_path):
    a = _args(tmp_path, "--methods", "fedavg", "--seeds", "1")
    work = frontier.run_dir(a.out, "fedavg", 1)
    work.mkdir(parents=True)
    (work / "settings.json").write_text(json.dumps({"other": True}))
    (work / "stale_checkpoint").write_text("x")
    history = _history({0: 2.0, 3: 1.0}, 4.0)
    seen = []

    def train(out):
        seen.append(sorted(p.name for p in out.iterdir()))
        return history

    settings = frontier.settings_of(a, "fedavg", 1)
    assert frontier.run_and_store(a, "fedavg", 1, settings, train) == history
    assert seen == [["settings.json"]]  # the other settings' checkpoint was removed before training
    assert frontier.stored(a, "fedavg", 1) == history  # stored, and reused with the same settings


def test_the_reference_early_run_fills_its_unevaluated_rounds_only_when_it_trained_the_same_trajectory():
    main = _history({0: 2.0, 3: 1.4, 6: 1.2}, mb_per_round=10.0)
    for record in main[1:]:
        record["train_loss"] = 3.0 - 0.1 * record["round"]
    early = [{"round": r, "train_loss": 3.0 - 0.1 * r, "eval_loss": loss, "eval_code_loss": loss}
             for r, loss in ((1, 1.7), (2, 1.5), (3, 1.4))]  # fmt: skip
    method = {0: 1.9, 6: 1.5}
    runs = {"fedavg": {1: main}, frontier.EARLY: {1: early}, "cheap": {1: _history(method, mb_per_round=1.5)}}
    result = frontier.analyse(runs)
    assert frontier.EARLY not in result
    assert [e["round"] for e in result["fedavg"]["curve"]] == [0, 1, 2, 3, 6]
    # 'cheap' used 9 MB by round 6: FedAvg-LoRA's loss between round 0 (0 MB, 2.0) and round 1 (10 MB, 1.7)
    cheap_at_6 = next(e for e in result["cheap"]["curve"] if e["round"] == 6)
    assert cheap_at_6["diff_equal_bytes"] == pytest.approx(1.5 - (2.0 - 0.3 * 0.9))
    # an early run of another trajectory (other settings or code) is ignored, not merged
    early[0]["train_loss"] = 9.9
    result = frontier.analyse(runs)
    assert [e["round"] for e in result["fedavg"]["curve"]] == [0, 3, 6]
