"""The full-parameter benchmarks: measured memory of a local phase (tiny models, in-process) and the SST-2 accuracy
harness's statistics, storage and report on made-up histories (no training). Figures are not asserted beyond the
orderings that follow from what each method keeps."""

import json

import pytest
from test_benchmarks import load_benchmark


@pytest.fixture(scope="module")
def full_parameter():
    return load_benchmark("full_parameter")


@pytest.fixture(scope="module")
def accuracy():
    return load_benchmark("full_parameter_accuracy")


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_memory_of_a_local_phase_is_counted_from_the_tensors(full_parameter, model):
    rows = {
        m: full_parameter.memory_worker(model, m, steps=2, batch=4, length=24)
        for m in ("fedkrso", "fedfft", "fedkseed")
    }
    fft, krso, kseed = rows["fedfft"], rows["fedkrso"], rows["fedkseed"]
    # FedFFT: Adam's two fp32 moments over every trained weight (plus step counts), one fp32 gradient per weight
    trained_mb = fft["initial_copy_mb"]
    assert 2 * trained_mb <= fft["optimizer_state_mb"] <= 2 * trained_mb + 0.01
    assert fft["gradients_mb"] == pytest.approx(trained_mb)
    assert fft["extra_tensors_mb"] == 0
    # FedKRSO: moments over out x r coordinates (and the head), no out x in gradient; its own tensors counted
    assert 0 < krso["optimizer_state_mb"] < fft["optimizer_state_mb"] / 2
    assert 0 < krso["gradients_mb"] < fft["gradients_mb"]
    assert krso["extra_tensors_mb"] > 0
    # FedKSeed: no backward pass, no optimizer state; its K scalars are its extra tensor
    assert kseed["optimizer_state_mb"] == 0 and kseed["gradients_mb"] == 0
    assert kseed["extra_tensors_mb"] == pytest.approx(4 * 4096 / 1024**2)
    for row in rows.values():
        if row["peak_rss_mb"] is not None:  # Linux: the OS's own figures
            assert row["peak_rss_mb"] > 0 and row["rss_before_mb"] > 0


def test_memory_of_fedavg_lora_on_a_classifier_trains_adapter_and_head(full_parameter):
    row = full_parameter.memory_worker("tiny-bert", "fedavg", steps=2, batch=4, length=24)
    assert row["optimizer_state_mb"] > 0 and row["gradients_mb"] > 0
    assert row["extra_tensors_mb"] == pytest.approx(4 * row["trained_params"] / 1024**2)
    assert row["initial_copy_mb"] == 0  # LoRA keeps no copy of the base weights


def test_memory_table_states_fedkrso_share_of_fedfft(full_parameter):
    memory = {"minilm": {"fedfft": {k: 10.0 for k in full_parameter.MEMORY_KEYS} | {"trained_params": 5},
                         "fedkrso": {k: 0.1 for k in full_parameter.MEMORY_KEYS} | {"trained_params": 3},
                         "fedavg": {"error": "exit 1: boom"}}}  # fmt: skip
    text = full_parameter.memory_table(memory)
    assert "FedKRSO's optimizer state is 1.00% of FedFFT's" in text
    assert "exit 1: boom" in text


def _history(accuracies, mb_per_round):
    records = [{"round": 0, "eval_accuracy": accuracies[0]}]
    for r, acc in enumerate(accuracies[1:], start=1):
        records.append({"round": r, "eval_accuracy": acc, "upload_mb_per_client": mb_per_round / 2,
                        "download_mb_per_client": mb_per_round / 2})  # fmt: skip
    return records


def test_accuracy_statistics_pair_seeds_with_fedfft(accuracy):
    runs = {
        "fedfft": {1: _history([0.5, 0.8, 0.9], 40.0), 2: _history([0.5, 0.7, 0.8], 40.0)},
        "fedkrso": {1: _history([0.5, 0.75, 0.88], 2.0), 2: _history([0.5, 0.72, 0.78], 2.0)},
    }
    result = accuracy.analyse(runs)
    krso = result["fedkrso"]
    assert krso["final_accuracy"][0] == pytest.approx(0.83)
    assert krso["diff_final"][0] == pytest.approx(-0.02)  # paired: (-0.02, -0.02)
    assert krso["diff_final"][1] == pytest.approx((-0.02, -0.02))
    assert krso["bytes_vs_fedfft"] == pytest.approx(0.05)
    assert [e["round"] for e in krso["curve"]] == [0, 1, 2]
    assert krso["curve"][2]["cumulative_mb"] == pytest.approx(4.0)
    lo, hi = result["fedfft"]["curve"][2]["accuracy_ci95"]
    assert lo < 0.85 < hi
    # at equal bytes FedFFT's curve is interpolated between round 0 (0 MB) and round 1 (40 MB)
    assert krso["diff_equal_bytes"][0] == pytest.approx(0.83 - (0.5 + 0.25 * 4 / 40))


def test_accuracy_runs_are_stored_reused_and_reported(accuracy, tmp_path, capsys):
    data = tmp_path / "sst2"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"sentence": "fine", "label": 1}) + "\n")
    argv = ["--data", str(data), "--results", str(tmp_path / "results"), "--seeds", "1", "--methods", "fedkrso"]
    a = accuracy.parse_args(argv)
    assert accuracy.stored(a, "fedkrso", 1) is None
    keep = accuracy.run_dir(a.results, "fedkrso", 1)
    keep.mkdir(parents=True)
    (keep / "history.json").write_text(json.dumps(_history([0.5, 0.6], 1.0)))
    (keep / "settings.json").write_text(json.dumps(accuracy.settings_of(a, "fedkrso", 1)))
    assert accuracy.stored(a, "fedkrso", 1) is not None
    other = accuracy.parse_args([*argv, "--local-steps", "7"])
    assert accuracy.stored(other, "fedkrso", 1) is None  # other settings: not reused
    summary = accuracy.main([*argv, "--report-only", "--json", "--plot-dir", str(tmp_path / "img")])
    assert json.loads(capsys.readouterr().out.strip().split("\n")[-1])["methods"]["fedkrso"]["rounds_done"] == 1
    assert summary["methods"]["fedkrso"]["final_accuracy"][0] == pytest.approx(0.6)
    assert (tmp_path / "img" / "full_parameter_accuracy_vs_mb.png").is_file()


def test_accuracy_harness_needs_the_data_unless_report_only(accuracy, tmp_path):
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--data", str(tmp_path / "missing")])


def test_server_step_peak_memory_is_measured_in_own_processes():
    server_step = load_benchmark("server_step")
    factored = server_step.measure_peak("factored", 1024, 1024, 8, 2, "cpu")
    dense = server_step.measure_peak("dense", 1024, 1024, 8, 2, "cpu")
    if dense is None:  # not Linux: the OS gives no peak to read
        pytest.skip("no /proc/self/status here")
    assert dense > 4  # at least the 1024 x 1024 fp32 product it forms (4 MiB)
    assert factored is not None and factored < dense


# ---- Ferret (issue 19) -----------------------------------------------------------------------------------------------
def test_memory_of_ferret_is_fedfft_without_the_optimizer_state(full_parameter):
    ferret = full_parameter.memory_worker("tiny-bert", "ferret", steps=2, batch=4, length=24)
    fft = full_parameter.memory_worker("tiny-bert", "fedfft", steps=2, batch=4, length=24)
    # plain SGD without momentum keeps no state; the backward pass gives every trained weight a gradient, as FedFFT's
    assert ferret["optimizer_state_mb"] == 0 and fft["optimizer_state_mb"] > 0
    assert ferret["gradients_mb"] == pytest.approx(fft["gradients_mb"]) == pytest.approx(ferret["initial_copy_mb"])
    assert ferret["extra_tensors_mb"] == 0 and ferret["trained_params"] == fft["trained_params"]
    assert "ferret" in full_parameter.MEMORY_METHODS


def test_measuring_one_method_adds_it_to_the_stored_memory(full_parameter, tmp_path):
    path = tmp_path / "memory.json"
    phase = {"memory_steps": 3, "memory_batch": 8, "memory_length": 64}
    full_parameter.store_memory({"minilm": {"fedfft": {"optimizer_state_mb": 82.1}}}, {**phase}, path)
    stored = full_parameter.store_memory({"minilm": {"ferret": {"optimizer_state_mb": 0.0}}}, {**phase}, path)
    assert stored["memory"]["minilm"] == {"fedfft": {"optimizer_state_mb": 82.1}, "ferret": {"optimizer_state_mb": 0.0}}
    assert stored["config"]["memory_methods"] == ["fedfft", "ferret"] and json.loads(path.read_text()) == stored
    # another phase size is not comparable: the old rows are dropped
    stored = full_parameter.store_memory({"minilm": {"ferret": {"optimizer_state_mb": 0.0}}},
                                         {**phase, "memory_steps": 10}, path)  # fmt: skip
    assert list(stored["memory"]["minilm"]) == ["ferret"]


def test_ferret_on_the_classification_track_end_to_end_on_a_tiny_bert(accuracy, tmp_path, monkeypatch, capsys):
    argv = _tiny_bert_harness(accuracy, tmp_path, monkeypatch, ["fedfft", "ferret"], rounds=1)
    summary = accuracy.main(argv)
    ferret, fft = summary["methods"]["ferret"], summary["methods"]["fedfft"]
    assert ferret["rounds_done"] == 1 and 0 <= ferret["final_accuracy"][0] <= 1 and "diff_final" in ferret
    # coordinates on the bases (and the dense head) instead of every weight
    assert 0 < ferret["upload_mb_per_client_per_round"] < fft["upload_mb_per_client_per_round"]
    assert "| Ferret (K=200) | 1 | 1 |" in capsys.readouterr().out
    args = accuracy.settings_of(accuracy.parse_args(argv), "ferret", 1)["args"]
    for option, value in (("--ferret_num_seeds", "200"), ("--ferret_server_lr", "3.3333"), ("--learning_rate", "1e-4"),
                          ("--lr_scheduler_type", "constant"), ("--weight_decay", "0")):  # fmt: skip
        assert args[args.index(option) + 1] == value


def test_method_variants_add_their_options_last_and_store_apart(accuracy, tmp_path):
    a = accuracy.parse_args(["--report-only", "--data", str(tmp_path), "--methods", "fedkrso",
                             "fedkrso+learning_rate=5e-4+krso_tau=5"])  # fmt: skip
    plain = accuracy.main_job_args(a, "fedkrso", 1, "OUT", 20)
    variant = accuracy.main_job_args(a, "fedkrso+learning_rate=5e-4+krso_tau=5", 1, "OUT", 20)
    assert variant[: len(plain)] == plain and variant[len(plain):] == ["--learning_rate", "5e-4", "--krso_tau", "5"]
    assert variant[variant.index("--algorithm") + 1] == "fedkrso"
    assert accuracy.label("fedkrso+learning_rate=5e-4") == "FedKRSO (r=4, K=10, tau=10), learning_rate=5e-4"
    assert accuracy.run_dir(tmp_path, "fedkrso+learning_rate=5e-4", 2).parts[-2:] == ("fedkrso__learning_rate-5e-4",
                                                                                        "seed2")
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--report-only", "--methods", "fedkrsoo+learning_rate=1"])


def test_lora_methods_on_the_classification_track_end_to_end_on_a_tiny_bert(accuracy, tmp_path, monkeypatch, capsys):
    """FedAvg-LoRA and FedSRD train the adapter and the new head (PEFT's SEQ_CLS task) through the harness."""
    argv = _tiny_bert_harness(accuracy, tmp_path, monkeypatch, ["fedavg", "fedsrd"], rounds=2)
    summary = accuracy.main(argv)
    fedavg, fedsrd = summary["methods"]["fedavg"], summary["methods"]["fedsrd"]
    assert fedavg["rounds_done"] == fedsrd["rounds_done"] == 2
    assert 0 < fedsrd["upload_mb_per_client_per_round"] < fedavg["upload_mb_per_client_per_round"]
    assert "| FedSRD (r=8) + head | 1 | 2 |" in capsys.readouterr().out
    args = accuracy.settings_of(accuracy.parse_args(argv), "fedsrd", 1)["args"]
    for option, value in (("--algorithm", "fedsrd"), ("--lora_r", "8"), ("--learning_rate", "5e-4"),
                          ("--lora_target_modules", "all-linear")):  # fmt: skip
        assert args[args.index(option) + 1] == value
    # the committed runs of the other methods stay reusable: their settings did not change
    defaults = accuracy.parse_args(["--report-only"])
    for run in sorted(accuracy.RESULTS.glob("*/seed*/settings.json")):
        settings = json.loads(run.read_text())
        assert settings == accuracy.settings_of(defaults, settings["method"], settings["seed"]), run


def _tiny_bert_harness(accuracy, tmp_path, monkeypatch, methods, rounds):
    """The classification harness's arguments for a tiny-bert run on made-up sentences, its runs trained in this
    process (seconds, not a process start per run)."""
    from test_classification import _sentences

    from fedsrd.cli import run_train

    def run_main_job(cmd, out, what, env=None):
        run_train(cmd[cmd.index("train") + 1 :])  # cmd: [python, -m, fedsrd.cli, train, *arguments]
        return json.loads((out / "history.json").read_text())

    monkeypatch.setattr(accuracy, "run_main_job", run_main_job)
    data = tmp_path / "sst2"
    data.mkdir()
    for split, n, seed in (("train", 32, 1), ("dev", 8, 2)):
        _sentences(n, seed).to_json(data / f"{split}.jsonl")
    return ["--data", str(data), "--model", "tiny-bert", "--methods", *methods, "--seeds", "1", "--rounds", str(rounds),
            "--clients", "2", "--clients-per-round", "2", "--local-steps", "2", "--max-length", "24",
            "--results", str(tmp_path / "results"), "--out", str(tmp_path / "out"), "--json"]  # fmt: skip
