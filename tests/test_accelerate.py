"""Clients in parallel under `accelerate launch`: two CPU processes give the single-process run's bits.

The end-to-end tests launch real processes (`accelerate launch --multi_gpu --num_processes 2` with `use_cpu: true`,
gloo on the CPU; accelerate's `--cpu` flag itself starts a single process whatever `--num_processes` says) and compare
with the same settings run in this process. Every subprocess has a timeout, so a hang fails the test instead of
stalling the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedsrd.federation import sample_clients

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny.yaml"
FED_TRAIN = REPO / "examples" / "fed_train.py"
TIMEOUT_S = 180  # a hang fails the test; a normal two-process tiny run takes well under a minute

# FedSA-LoRA over 4 clients, 2 a round: client 2 trains on process 0 in round 1 and on process 1 in round 3, so its
# own LoRA B has to follow it from one process to the other.
FEDSA = [
    "--algorithm", "fedsa_lora", "--domains", "arithmetic", "code_output", "percent", "units",
    "--num_clients", "4", "--clients_per_round", "2", "--num_rounds", "3", "--local_steps", "4",
    "--lr_scheduler_type", "linear", "--eval_every", "2",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate() -> list[str]:
    script = Path(sys.executable).with_name("accelerate")
    return [str(script)] if script.exists() else [shutil.which("accelerate") or "accelerate"]


def launch(args: list[str], script: Path = FED_TRAIN, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` of `script` with `processes` CPU processes; stdout and stderr together."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        *_accelerate(), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(script), *args, "--use_cpu", "true",
    ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S
    )


def tiny_args(out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--output_dir", str(out), "--disable_tqdm", "true", *extra]


def history_without_timings(out: Path) -> str:
    history = json.loads((out / "history.json").read_text())
    for record in history:
        record.pop("seconds", None)
    return json.dumps(history, sort_keys=True)


def weight_digests(directory: Path) -> dict[str, str]:
    """sha256 of every safetensors file under `directory` (the adapter configs' module order is a set's order)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def printed_metrics(output: str) -> dict:
    start = output.rindex('{\n  "output_dir"')
    return json.loads(output[start : output.index("\n}", start) + 2])


def run_in_this_process(out: Path, *extra: str) -> None:
    from fedsrd.cli import run_train

    run_train(tiny_args(out, *extra))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The tiny preset (FedAvg, 2 clients, 2 rounds) in this process and with two processes."""
    one, two = tmp_path_factory.mktemp("p1"), tmp_path_factory.mktemp("p2")
    run_in_this_process(one)
    proc = launch(tiny_args(two))
    assert proc.returncode == 0, proc.stdout[-6000:]
    return one, two, proc.stdout


def test_two_processes_give_the_single_process_adapter_and_history(tiny_pair):
    one, two, output = tiny_pair
    assert printed_metrics(output)["num_processes"] == 2
    digests = weight_digests(two)
    assert digests == weight_digests(one)
    assert {"final/adapter_model.safetensors", "round_0001/adapter_model.safetensors"} <= set(digests)
    assert history_without_timings(two) == history_without_timings(one)  # losses, per-round bytes, clients, ...
    history = json.loads((two / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2] and all(r["upload_bytes"] > 0 for r in history[1:])


def test_only_the_main_process_reports(tiny_pair):
    _, two, output = tiny_pair
    assert output.count('"output_dir"') == 1  # the job's final metrics
    assert sum(line.lstrip().startswith("round |") for line in output.splitlines()) == 1  # the round table
    assert (two / "eval_loss_vs_mb.png").is_file() and (two / "fed_config.json").is_file()


def test_client_kept_state_follows_the_client_id_across_processes(tmp_path):
    share = {r: sample_clients(0, r, 4, 2) for r in (1, 2, 3)}  # process 0 trains the first, process 1 the second
    assert share[1][0] == 2 and share[3][1] == 2  # client 2 moves from process 0 to process 1
    one, two = tmp_path / "p1", tmp_path / "p2"
    run_in_this_process(one, *FEDSA)
    proc = launch(tiny_args(two, *FEDSA))
    assert proc.returncode == 0, proc.stdout[-6000:]
    digests = weight_digests(two)
    assert digests == weight_digests(one)
    # Each client's own adapter (shared A, its B) and the exported global one (mean of the clients' B).
    personal = {k for k in digests if k.startswith("final/personal/")}
    assert personal == {f"final/personal/client_{c:04d}/adapter_model.safetensors" for c in range(4)}
    assert history_without_timings(two) == history_without_timings(one)


RAISING_CLIENT = """
import sys
from accelerate import PartialState
from transformers import TrainerCallback
import fedsrd.trainer
from fedsrd.cli import run_train

class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if PartialState().process_index == 1:
            raise ValueError("boom in a client on process 1")

original_init = fedsrd.trainer.FederatedTrainer.__init__
def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(Boom())
fedsrd.trainer.FederatedTrainer.__init__ = init
run_train(sys.argv[1:])
"""

RAISING_PROCESS = """
import sys
from accelerate import PartialState
import fedsrd.trainer
from fedsrd.cli import run_train

class Boom(fedsrd.trainer.FederatedCallback):
    def on_round_begin(self, args, state, control, round=None, **kwargs):
        if round == 2 and PartialState().process_index == 1:
            raise ValueError("boom outside any exchange on process 1")

original_init = fedsrd.trainer.FederatedTrainer.__init__
def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(Boom())
fedsrd.trainer.FederatedTrainer.__init__ = init
run_train(sys.argv[1:])
"""


STOPPING = """
import sys
from accelerate import PartialState
import fedsrd.trainer
from fedsrd.cli import run_train
from fedsrd.federation import FederatedCallback

class Stop(FederatedCallback):
    def on_round_end(self, args, state, control, round=None, **kwargs):
        if round == 1 and PartialState().is_main_process:  # asked on one process only: the team stops together
            control.should_training_stop = True

original_init = fedsrd.trainer.FederatedTrainer.__init__
def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(Stop())
fedsrd.trainer.FederatedTrainer.__init__ = init
run_train(sys.argv[1:])
"""


def test_a_callback_stops_every_process_after_the_current_round(tmp_path):
    """The main process's callback stops the federation after round 1 of 2; the other process follows (no hang)."""
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING)
    out = tmp_path / "out"
    proc = launch(tiny_args(out, "--eval_size", "4", "--local_steps", "2"), script=script)
    assert proc.returncode == 0, proc.stdout[-6000:]
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1] and history[-1]["should_training_stop"] is True
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_a_client_failing_on_one_process_stops_every_process_with_its_error(tmp_path):
    """Process 1's client raises; with min_clients=2 the round cannot complete, and every process stops, showing it."""
    script = tmp_path / "raising_client.py"
    script.write_text(RAISING_CLIENT)
    proc = launch(tiny_args(tmp_path / "out", "--min_clients", "2", "--eval_size", "4"), script=script)
    assert proc.returncode != 0
    assert "boom in a client on process 1" in proc.stdout
    assert "fewer than min_clients=2" in proc.stdout
    assert not (tmp_path / "out" / "final").exists()


def test_a_process_failing_outside_an_exchange_does_not_hang_the_others(tmp_path):
    """Process 1 raises between exchanges; the launcher stops process 0 (waiting in a collective) with the error."""
    script = tmp_path / "raising_process.py"
    script.write_text(RAISING_PROCESS)
    proc = launch(tiny_args(tmp_path / "out", "--eval_size", "4"), script=script)  # the timeout is the hang check
    assert proc.returncode != 0
    assert "boom outside any exchange on process 1" in proc.stdout
    assert not (tmp_path / "out" / "final").exists()


# ---- the pieces, in this process --------------------------------------------------------------------------------


def test_single_process_view_hides_the_process_group_and_restores_it():
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    from fedsrd.runtime.distributed import single_process_view

    shared = (PartialState._shared_state, AcceleratorState._shared_state)
    saved = [dict(s) for s in shared]
    try:
        for s in shared:
            s.update(distributed_type=DistributedType.MULTI_CPU, num_processes=2, process_index=1)
        with single_process_view():
            for s in shared:
                assert (s["distributed_type"], s["num_processes"], s["process_index"]) == (DistributedType.NO, 1, 1)
        for s in shared:
            assert (s["distributed_type"], s["num_processes"]) == (DistributedType.MULTI_CPU, 2)
    finally:
        for s, values in zip(shared, saved):
            s.clear()
            s.update(values)


def _team_as_process_0_of_2():
    """An `AccelerateTeam` as process 0 of 2 (its collectives are monkeypatched by each test)."""
    from fedsrd.runtime.distributed import AccelerateTeam

    team = AccelerateTeam.__new__(AccelerateTeam)
    team.num_processes, team.process_index, team.is_main, team.exchanges = 2, 0, True, 0
    return team


def test_an_exchange_raises_the_other_process_error_everywhere(monkeypatch):
    import fedsrd.runtime.distributed as distributed

    def gather(objects):
        other = {"process": 1, "what": objects[0]["what"], "payload": None}
        try:
            raise RuntimeError("disk full on process 1")
        except RuntimeError as err:
            other.update(distributed.AccelerateTeam._envelope(team, objects[0]["what"], error=err), process=1)
        return [*objects, other]

    monkeypatch.setattr(distributed, "gather_object", gather)
    team = _team_as_process_0_of_2()
    with pytest.raises(distributed.ProcessFailed, match="disk full on process 1") as caught:
        team.exchange("round 1: local training", lambda: {"ok": True})
    assert isinstance(caught.value, RuntimeError)  # so `except RuntimeError` (a round retry) acts alike everywhere
    assert "process 1 failed in #1 round 1: local training" in str(caught.value)

    def gather_ok(objects):  # the other process is at a different step: a bug, reported rather than mixed up
        return [*objects, {"process": 1, "what": "#1 evaluation", "payload": {}, "error": None}]

    monkeypatch.setattr(distributed, "gather_object", gather_ok)
    with pytest.raises(RuntimeError, match="diverged"):
        team.exchange("round 2: local training", lambda: {})


def test_an_exchange_reraises_its_own_error_after_telling_the_others(monkeypatch):
    import fedsrd.runtime.distributed as distributed

    sent = []
    monkeypatch.setattr(distributed, "gather_object", lambda objects: sent.extend(objects) or list(objects))
    team = _team_as_process_0_of_2()

    def fail():
        raise KeyError("no such client")

    with pytest.raises(KeyError, match="no such client"):
        team.exchange("round 1: local training", fail)
    assert sent and "KeyError" in sent[0]["error"] and sent[0]["payload"] is None


def test_client_kept_tensors_are_ordered_as_one_process_fills_them():
    import torch

    from fedsrd.runtime.distributed import _order_like_one_process, decode_state, encode_state

    state = {"b": torch.randn(3, 2), "a": torch.arange(4, dtype=torch.float32)}
    back = decode_state(encode_state(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    personal = {5: {}, 3: {}, 1: {}, 0: {}}  # 5 and 3 known before the round; 1 arrived before 0 from another process
    _order_like_one_process(personal, known_before=[5, 3], clients=[0, 1, 3])
    assert list(personal) == [5, 3, 0, 1]
