"""Dropouts, retries, hostile updates at the server, and SIGKILL + resume giving the same bits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsrd import wire
from fedsrd.cli import run_train

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "configs" / "tiny.yaml")
QUIET = ["--disable_tqdm", "true"]


def _digest(out: Path) -> str:
    from fedsrd.server import load_adapter_state

    return wire.state_digest(load_adapter_state(out / "final"))


def test_a_failing_client_is_dropped_and_the_round_completes(tmp_path, monkeypatch):
    from fedsrd.trainer import FederatedTrainer

    original = FederatedTrainer.local_train

    def flaky(self, client_id, round):
        if client_id == 1 and round == 1:
            raise RuntimeError("out of memory on client 1")
        return original(self, client_id, round)

    monkeypatch.setattr(FederatedTrainer, "local_train", flaky)
    trainer = run_train(["--config", TINY, "--output_dir", str(tmp_path), "--num_clients", "2", *QUIET])
    history = json.loads((tmp_path / "history.json").read_text())
    assert "out of memory" in history[1]["dropped"]["1"]
    assert history[2]["dropped"] == {}
    assert all(torch.isfinite(v).all() for v in trainer.global_state.values())


def test_too_few_clients_retries_then_stops_with_a_clear_message(tmp_path, monkeypatch):
    from fedsrd.trainer import FederatedTrainer

    calls = []

    def broken(self, client_id, round):
        calls.append((round, client_id))
        raise RuntimeError("disk full")

    monkeypatch.setattr(FederatedTrainer, "local_train", broken)
    with pytest.raises(RuntimeError, match="fewer than min_clients=1 usable updates after 2 attempt"):
        run_train(["--config", TINY, "--output_dir", str(tmp_path), "--round_retries", "1", *QUIET])
    assert len(calls) == 4  # 2 clients x 2 attempts


def test_min_clients_larger_than_sample_is_a_config_error():
    from fedsrd import FedSRDConfig

    with pytest.raises(ValueError, match="FedSRDConfig.min_clients"):
        FedSRDConfig(num_clients=4, clients_per_round=2, min_clients=3)


def test_resume_after_sigkill_mid_round_gives_identical_adapter(tmp_path):
    args = ["--config", TINY, "--num_rounds", "4", "--eval_every", "0", *QUIET]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, str(REPO / "examples" / "fed_train.py"), *args, "--output_dir", str(reference)],
                   check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    # A slow client phase (the test hook below) makes sure the kill lands inside round 3's local training.
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, *args, "--output_dir", str(killed)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    marker = killed / "checkpoints" / "round_0002"
    try:
        deadline = time.time() + 240
        while not (killed / "in_round_3").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "round 3 never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.is_dir() and not (killed / "final").exists()
    assert not (killed / "checkpoints" / "round_0003").exists()

    subprocess.run([sys.executable, str(REPO / "examples" / "fed_train.py"), *args, "--output_dir", str(killed),
                    "--resume", "true"], check=True, env=env, capture_output=True)
    assert _digest(killed) == _digest(reference)
    resumed = json.loads((killed / "history.json").read_text())
    full = json.loads((reference / "history.json").read_text())
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed] == [
        {k: v for k, v in r.items() if k not in strip} for r in full
    ]


# Runs the main job with a hook that announces round 3's first client phase and then sleeps, so the parent can
# SIGKILL the process in the middle of that round.
_SLOW_RUN = """
import sys, time
from pathlib import Path
from fedsrd.trainer import FederatedTrainer
from fedsrd.cli import run_train

original = FederatedTrainer.local_train

def slow(self, client_id, round):
    if round == 3:
        Path(self.args.output_dir, "in_round_3").touch()
        time.sleep(600)
    return original(self, client_id, round)

FederatedTrainer.local_train = slow
run_train(sys.argv[1:])
"""


def test_a_new_run_in_an_old_output_dir_replaces_the_old_run(tmp_path, caplog):
    """An old run with more rounds used to make the new run prune its own checkpoints, leave LATEST naming a deleted
    folder and its round adapters beside the new final/: now its files are removed first, with a warning."""
    from fedsrd.checkpoint import CHECKPOINTS, LATEST, load_checkpoint

    fast = ["--config", TINY, "--output_dir", str(tmp_path), "--num_clients", "2", "--local_steps", "1",
            "--eval_every", "0", *QUIET]  # fmt: skip
    run_train([*fast, "--num_rounds", "4", "--save_every", "1"])
    (tmp_path / "notes.txt").write_text("mine")  # not a run's file: kept
    with caplog.at_level("WARNING", logger="fedsrd.checkpoint"):
        run_train([*fast, "--num_rounds", "2", "--save_every", "0"])
    assert "holds a previous run" in caplog.text and "--resume true" in caplog.text
    latest = (tmp_path / CHECKPOINTS / LATEST).read_text().strip()
    assert latest == "round_0002" and (tmp_path / CHECKPOINTS / latest).is_dir()
    assert load_checkpoint(tmp_path)[0] == 2
    assert sorted(p.name for p in tmp_path.glob("round_*")) == ["round_0002"]  # the new run's last round only
    assert [r["round"] for r in json.loads((tmp_path / "history.json").read_text())] == [0, 1, 2]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    resumed = run_train([*fast, "--num_rounds", "3", "--save_every", "0", "--resume", "true"])
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    """Every tensor (personal/ and base/ too) is under the checkpoint's digest; a flipped bit or a truncated file in
    the latest checkpoint falls back to the previous complete one, with a warning naming the file."""
    from fedsrd.checkpoint import CHECKPOINTS, TENSORS, load_checkpoint, save_checkpoint

    def tensors(round):
        return {"global/w": torch.full((4, 4), float(round)), "personal/1/b": torch.ones(8), "base/x": torch.zeros(3)}

    save_checkpoint(tmp_path, 1, tensors(1), {"history": []})
    save_checkpoint(tmp_path, 2, tensors(2), {"history": []})
    latest = tmp_path / CHECKPOINTS / "round_0002" / TENSORS
    data = bytearray(latest.read_bytes())
    data[-1] ^= 0x01  # one bit of base/x, the last tensor stored
    latest.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="fedsrd.checkpoint"):
        round, loaded, _ = load_checkpoint(tmp_path)
    assert round == 1 and torch.equal(loaded["personal/1/b"], torch.ones(8))
    assert str(latest) in caplog.text and "digest" in caplog.text
    previous = tmp_path / CHECKPOINTS / "round_0001" / TENSORS
    previous.write_bytes(previous.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match="round_0001") as err:
        load_checkpoint(tmp_path)
    assert "round_0002" in str(err.value)
