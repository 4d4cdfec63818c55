"""benchmarks/frontier.py: paired intervals, interpolation at equal bytes, stored runs reused and reported."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import frontier  # noqa: E402
from test_benchmarks import DOMAINS, write_domains  # noqa: E402


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
    assert result["cheap"]["bytes_vs_reference"] == pytest.approx(0.1)
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


# ---- clients of different LoRA ranks (--client-ranks) ----------------------------------------------------------------
def _in_process(monkeypatch):
    """Run each main job in this process (`fedsrd.cli.run_train` on the same arguments): seconds, not a process start
    per run."""
    from fedsrd.cli import run_train

    def run_main_job(cmd, out, what, env=None):
        run_train(cmd[2:])  # cmd: [python, examples/fed_train.py, *arguments]
        return json.loads((out / "history.json").read_text())

    monkeypatch.setattr(frontier, "run_main_job", run_main_job)


def test_unequal_ranks_run_end_to_end_on_the_tiny_model_and_report_per_client_bytes(tmp_path, monkeypatch, capsys):
    data = write_domains(tmp_path / "data")
    _in_process(monkeypatch)
    results, out = tmp_path / "results", tmp_path / "out"
    argv = ["--data", str(data), "--domains", *DOMAINS, "--client-ranks", "2", "4", "--methods", "hetlora",
            "--seeds", "1", "--model", "tiny-llama", "--rounds", "1", "--local-steps", "1", "--eval-size", "2",
            "--eval-every", "1", "--early-rounds", "1", "--max-length", "48", "--targets", "q_proj", "v_proj",
            "--results", str(results), "--out", str(out), "--json"]  # fmt: skip
    a = frontier.parse_args(argv)
    assert a.lora_r == 4 and a.reference == "fedavg+lora_r=2"  # the largest rank globally; the smallest for all
    summary = frontier.main([*argv, "--methods", a.reference, "hetlora"])
    printed = capsys.readouterr()
    assert "2 run(s) to train (0 stored); estimated" in printed.err  # the cost, before anything trains
    methods = summary["methods"]
    assert summary["reference"] == "fedavg+lora_r=2" and summary["client_ranks"] == [2, 4]
    # the ranks are part of each run's settings: the uniform reference runs at rank 2, the others with the clients'
    ref_args = json.loads((frontier.run_dir(results, a.reference, 1) / "settings.json").read_text())["args"]
    het_args = json.loads((frontier.run_dir(results, "hetlora", 1) / "settings.json").read_text())["args"]
    assert ref_args[ref_args.index("--lora_r") + 1 : ref_args.index("--lora_r") + 4] == ["2", "--lora_alpha", "4"]
    assert "--client_lora_ranks" not in ref_args
    assert het_args[het_args.index("--client_lora_ranks") + 1 : het_args.index("--client_lora_ranks") + 3] == ["2", "4"]
    assert het_args[het_args.index("--lora_r") + 1] == "4"
    for name in ("hetlora",):
        per_client = methods[name]["per_client"]
        assert [per_client[c]["rank"] for c in ("0", "1")] == [2, 4]
        # rank 4's adapter is twice rank 2's: its upload is larger; MB/client/round is the mean over both clients
        assert per_client["1"]["upload_mb"] > per_client["0"]["upload_mb"]
        mean = sum(c["upload_mb"] + c["download_mb"] for c in per_client.values()) / 2
        assert methods[name]["mb_per_client_per_round"] == pytest.approx(mean)
        assert methods[name]["pairs"] == 1 and methods[name]["diff_vs_reference"] is not None
        assert "diff_vs_fedavg" not in methods[name]  # the reference is not FedAvg-LoRA at the global rank
    # HetLoRA's clients download the global factors cut to their rank: the rank-2 client less than the rank-4 one
    het = methods["hetlora"]["per_client"]
    assert het["0"]["download_mb"] < het["1"]["download_mb"]
    assert methods["fedavg+lora_r=2"]["per_client"]["0"]["rank"] is None  # every client at one rank
    assert "| client 0 (code) | client 1 (math) |" in printed.out and "r=2: " in printed.out
    # --report-only on the stored results: the same figures; the ranks and the reference read from the settings
    report = frontier.main(["--report-only", "--results", str(results), "--seeds", "1", "--domains", *DOMAINS,
                            "--json"])  # fmt: skip
    assert report["client_ranks"] == [2, 4] and report["reference"] == "fedavg+lora_r=2"
    assert report["methods"] == json.loads(json.dumps(methods))
    # a method that needs equal ranks is refused before any run, naming the way out
    with pytest.raises(SystemExit):
        frontier.parse_args([*argv, "--methods", "fedavg", "hetlora"])
    assert "fedavg+lora_r=2" in capsys.readouterr().err


def test_rank_slices_measures_how_much_of_the_product_a_small_rank_client_sees(tmp_path):
    """A slice of SVD-ordered factors is the best rank-r matrix; the same product with its components in reverse
    order leaves a rank-1 client only the smallest one. Read from a PEFT folder as the benchmark saves it."""
    import rank_slices
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 3, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(10, 3, generator=gen, dtype=torch.float64))
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    b, a = u * s, v.T  # B A = U diag(s) V^T, components ordered by s
    ordered = rank_slices.slice_shares(b, a, [1, 2])
    assert ordered[1] == pytest.approx((9 / 14, 9 / 14)) and ordered[2] == pytest.approx((13 / 14, 13 / 14))
    reversed_ = rank_slices.slice_shares(b.flip(1), a.flip(0), [1, 2])
    assert reversed_[1] == pytest.approx((1 / 14, 9 / 14)) and reversed_[2] == pytest.approx((5 / 14, 13 / 14))

    folder = tmp_path / "final"
    folder.mkdir()
    prefix = "base_model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a.flip(0).float().contiguous(),
               f"{prefix}.lora_B.weight": b.flip(1).float().contiguous(),
               "base_model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(3, 10),
               "base_model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(12, 3)},  # B A = 0: skipped
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    shares = rank_slices.adapter_shares(folder, [1, 2, 3])
    assert set(shares) == {1, 2} and shares[1] == pytest.approx((1 / 14, 9 / 14), rel=1e-5)
