"""Flower runtime: catch-up of clients that were not sampled, server checkpoints, and whole runs.

The whole-run tests drive the real ServerApp loop and ClientApp handlers: in one process through
`fedsrd.integrations.inprocess.InProcessGrid` (fast), and once as a real deployment (SuperLink + 2 SuperNodes as
subprocesses on 127.0.0.1, inside a fresh network namespace when running as root). Both must end on the same global
adapter, bit for bit, as the single-process simulation with the same settings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.client import FederatedClient
from fedsrd.integrations.catchup import (
    CatchUpError,
    OutOfSync,
    SyncLedger,
    apply_catch_up,
    decode_full_state,
    encode_full_state,
)
from fedsrd.integrations.checkpoint import ServerCheckpoint, load_checkpoint, save_checkpoint
from fedsrd.integrations.node import NodeStore, node_client_id
from fedsrd.integrations.settings import parse_run_config, run_config_to_argv
from fedsrd.server import FederatedServer, load_adapter_state

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower-app"
HAS_FLWR = importlib.util.find_spec("flwr") is not None
needs_flwr = pytest.mark.skipif(not HAS_FLWR, reason="flwr is not installed (pip install -e '.[flower]')")

# The example app's tiny settings (examples/flower-app/pyproject.toml), as Flower hands them to the apps.
RUN_CONFIG = {
    "model-name-or-path": "tiny-llama",
    "data": "synthetic",
    "domains": "arithmetic units",
    "train-size": 64,
    "max-length": 96,
    "algorithm": "fedsrd",
    "num-rounds": 3,
    "num-clients": 2,
    "clients-per-round": 1,
    "local-steps": 4,
    "lora-r": 4,
    "lora-alpha": 8,
    "lora-dropout": 0.0,
    "save-every": 1,
    "seed": 0,
    "learning-rate": 0.003,
    "per-device-train-batch-size": 8,
    "lr-scheduler-type": "constant",
    "report-to": "none",
    "use-cpu": True,
    "disable-tqdm": True,
}


# ---------------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------------


def test_run_config_becomes_main_job_arguments(tmp_path):
    rc = {**RUN_CONFIG, "output-dir": str(tmp_path), "resume": True, "round-timeout": 5.0, "args": "--local_steps 7"}
    argv = run_config_to_argv(rc)
    assert argv[argv.index("--domains") + 1 : argv.index("--domains") + 3] == ["arithmetic", "units"]
    assert "--resume" not in argv and "--round_timeout" not in argv
    s = parse_run_config(rc)
    assert s.fed.algorithm == "fedsrd" and s.fed.clients_per_round == 1
    assert s.fed.local_steps == 7  # `args` has the last word
    assert s.fed.fed_seed == 0 and s.data_seed == 42  # as `fedsrd train`: data before FederatedTrainer sets fed_seed
    assert s.model_data.domains == ["arithmetic", "units"] and s.training.use_cpu is True
    assert s.resume is True and s.round_timeout == 5.0 and s.final_sync is True
    assert s.checkpoint_dir == tmp_path / "checkpoints"
    with pytest.raises(ValueError, match="resume"):
        parse_run_config({**rc, "resume": "maybe"})


def test_node_client_id_comes_from_the_node_config():
    assert node_client_id({"partition-id": 1, "num-partitions": 2}, 2) == 1
    assert node_client_id({"client-id": 0, "partition-id": 1}, 2) == 0
    with pytest.raises(ValueError, match="partition-id"):
        node_client_id({}, 2)
    with pytest.raises(ValueError, match="0..1"):
        node_client_id({"partition-id": 2}, 2)
    with pytest.raises(ValueError, match="num-partitions"):
        node_client_id({"partition-id": 0, "num-partitions": 3}, 2)


# ---------------------------------------------------------------------------------------------------------------------
# catch-up: missed broadcasts or the full state, whichever is smaller
# ---------------------------------------------------------------------------------------------------------------------


def _lora_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.q_proj.lora_A.weight": torch.randn(4, 32, generator=g),
        "m.q_proj.lora_B.weight": torch.zeros(32, 4),
        "m.v_proj.lora_A.weight": torch.randn(4, 32, generator=g),
        "m.v_proj.lora_B.weight": torch.zeros(32, 4),
    }


def _federation(algorithm: str, rounds: int, **cfg):
    """A server run for `rounds` rounds on random local updates; returns (config, algorithm, init, server, blobs)."""
    config = FedSRDConfig(algorithm=algorithm, num_clients=2, **cfg)
    algo = get_algorithm(algorithm, config)
    init = _lora_state()
    server = FederatedServer(algo, dict(init), config)
    broadcasts = {}
    for r in range(1, rounds + 1):
        trainer = FederatedClient(algo, dict(server.state), config)
        g = torch.Generator().manual_seed(r)
        local = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in server.state.items()}
        update = trainer.make_update(local, round=r, client_id=0, num_samples=8)
        broadcasts[r] = server.step(r, [update]).broadcast
    return config, algo, init, server, broadcasts


@pytest.mark.parametrize("algorithm", ["fedsrd", "fedavg"])
def test_a_client_that_missed_rounds_catches_up_exactly(algorithm):
    config, algo, init, server, broadcasts = _federation(algorithm, 3)
    final = wire.state_digest(server.state)
    ledger = SyncLedger({0: wire.state_digest(init)})
    replay = FederatedClient(algo, dict(init), config)
    for r, b in broadcasts.items():
        replay.receive(b)
        ledger.add_round(r, b, wire.state_digest(replay.state))
    assert ledger.round == 3 and ledger.digests[3] == final
    full_state = encode_full_state(algo, server.state, 3)
    ledger.set_held(7, 0, wire.state_digest(init))
    plan = ledger.plan(7, lambda: full_state)
    concat = sum(len(b) for b in broadcasts.values())
    assert plan.num_bytes == min(concat, len(full_state))
    # fedsrd broadcasts one sparse factor: 3 of them are still smaller than the dense state; fedavg's are the state.
    assert plan.kind == ("broadcasts" if algorithm == "fedsrd" else "full")
    for kind, blobs in (("broadcasts", sorted(broadcasts.items())), ("full", [(3, full_state)])):
        client = FederatedClient(algo, dict(init), config)
        apply_catch_up(client, kind, blobs)
        assert client.round == 3 and wire.state_digest(client.state) == final
    ledger.set_held(7, 3, final)
    assert ledger.in_sync(7) and ledger.plan(7, lambda: full_state).kind == "none"


def test_catch_up_skips_what_a_client_holds_and_refuses_gaps():
    config, algo, init, server, broadcasts = _federation("fedsrd", 3)
    client = FederatedClient(algo, dict(init), config)
    apply_catch_up(client, "broadcasts", [(1, broadcasts[1])])
    applied = apply_catch_up(client, "broadcasts", sorted(broadcasts.items()))  # round 1 again: skipped
    assert [r for r, _ in applied] == [2, 3] and wire.state_digest(client.state) == wire.state_digest(server.state)
    stale = FederatedClient(algo, dict(init), config)
    with pytest.raises(OutOfSync, match="holds round 0") as err:
        apply_catch_up(stale, "broadcasts", [(2, broadcasts[2]), (3, broadcasts[3])])
    assert err.value.round == 0 and err.value.digest == wire.state_digest(init)


def test_full_state_message_is_checked():
    config, algo, init, server, _ = _federation("fedavg", 1)
    data = encode_full_state(algo, server.state, 1)
    state, round = decode_full_state(data, "fedavg", like=init)
    assert round == 1 and wire.state_digest(state) == wire.state_digest(server.state)
    with pytest.raises(wire.WireError):
        decode_full_state(data, "fedavg", like={**init, "m.extra.lora_A.weight": torch.zeros(1, 1)})
    delta = wire.encode(wire.Message("broadcast", "fedavg", 1, dict(server.state), {"digest": "x"}))
    with pytest.raises(wire.WireError, match="full-state"):
        decode_full_state(delta, "fedavg")


def test_ledger_prunes_broadcasts_nobody_needs_and_base_writers_never_get_the_full_state():
    ledger = SyncLedger({0: "d0", 1: "d1", 2: "d2", 3: "d3"}, {1: b"a" * 10, 2: b"b" * 10, 3: b"c" * 10})
    ledger.set_held(0, 3, "d3")
    ledger.set_held(1, 1, "d1")
    ledger.prune(full_size=100)
    assert sorted(ledger.broadcasts) == [2, 3]  # client 1 holds round 1: needs 2 and 3
    ledger.prune(full_size=15)
    assert sorted(ledger.broadcasts) == [3]  # 2+3 (20 bytes) exceed the full state (15): it would win anyway
    assert ledger.plan(1, lambda: b"f" * 15).kind == "full"
    with pytest.raises(CatchUpError, match="base weights"):
        ledger.plan(1, None)
    ledger.held[0] = None  # a client in an unknown state keeps everything (within the size rule)
    ledger.broadcasts = {1: b"a", 2: b"b", 3: b"c"}
    ledger.prune(full_size=None)
    assert sorted(ledger.broadcasts) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------------
# server checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def _checkpoint(round: int, seed: int = 0) -> ServerCheckpoint:
    state = _lora_state(seed)
    digests = {r: "x" for r in range(round)} | {round: wire.state_digest(state)}
    ledger = SyncLedger(digests, {round: bytes(range(256)) * 3}, {0: (round, digests[round]), 1: None})
    history = [{"round": r, "upload_bytes": 10 * r} for r in range(round + 1)]
    return ServerCheckpoint(round, "fed-abc", "fedsrd", state, ledger, history, {"algorithm": "fedsrd"}, {"r": 4})


def test_checkpoint_round_trips_without_pickle(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(1))
    path = save_checkpoint(tmp_path, _checkpoint(2, seed=1))
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 2 and loaded.federation_id == "fed-abc" and loaded.adapter_config == {"r": 4}
    assert wire.state_digest(loaded.state) == wire.state_digest(_lora_state(1))
    assert loaded.ledger.broadcasts == {2: bytes(range(256)) * 3}
    assert loaded.ledger.held == {0: (2, loaded.ledger.digests[2]), 1: None}
    assert loaded.history[-1] == {"round": 2, "upload_bytes": 20}
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "tensors.safetensors"]  # the shared format
    for i in range(3, 6):
        save_checkpoint(tmp_path, _checkpoint(i))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # the newest two are kept


def test_resume_uses_the_last_complete_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(1))
    newest = save_checkpoint(tmp_path, _checkpoint(2))
    (tmp_path / ".round_0003-deadbeef.tmp").mkdir()  # a crash while writing round 3: never renamed into place
    (newest / "tensors.safetensors").write_bytes(b"torn")  # and round 2's state damaged afterwards
    assert load_checkpoint(tmp_path).round == 1
    (tmp_path / "LATEST").write_text("round_0009")  # names a checkpoint that is not there
    assert load_checkpoint(tmp_path).round == 1
    assert load_checkpoint(tmp_path / "nothing-here") is None


def test_a_checkpoint_of_the_former_flower_format_is_refused_with_a_reason(tmp_path):
    (tmp_path / "latest.json").write_text('{"name": "round_0003-1a2b3c4d", "round": 3}')
    with pytest.raises(ValueError, match="former format"):
        load_checkpoint(tmp_path)


def test_node_store_ignores_a_state_that_does_not_match_its_digest(tmp_path):
    store = NodeStore(tmp_path)
    assert store.load_global() is None
    store.save_global(_lora_state(), 4)
    state, round = store.load_global()
    assert round == 4 and wire.state_digest(state) == wire.state_digest(_lora_state())
    from safetensors.torch import save

    (tmp_path / NodeStore.GLOBAL).write_bytes(save(_lora_state(1), metadata={"round": "4", "digest": "0" * 64}))
    assert store.load_global() is None


# ---------------------------------------------------------------------------------------------------------------------
# whole runs, in one process: the ServerApp loop and the ClientApp on an InProcessGrid
# ---------------------------------------------------------------------------------------------------------------------


@needs_flwr
def test_the_in_process_grid_answers_as_supernodes_do(task_identity):
    """Node i is node id 100 + i with its node config; a ClientApp that raises, a node that `fail` drops and an
    unknown node are answered with Flower's errors; the ClientApp edits its own copy of the message; what Flower's
    protobuf cannot carry (an integer past 64 bits) fails as it would on a deployment; sizes are the wire's."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import ErrorCode

    from fedsrd.integrations.inprocess import InProcessGrid

    def app(msg, context):
        if msg.metadata.message_type == "query.raise":
            raise ValueError("no such query")
        if msg.metadata.message_type == "query.huge":  # a record the ClientApp can build but no SuperNode can send
            return Message(RecordDict({"c": ConfigRecord({"x": 2**70})}), reply_to=msg)
        got = msg.content["c"].pop("x")  # as secaggplus_mod takes the stage out of the message it receives
        content = RecordDict({"c": ConfigRecord({"x": got, "partition": context.node_config["partition-id"]})})
        return Message(content, reply_to=msg)

    def fail(node_id, msg):
        return node_id == 101 and msg.metadata.message_type == "train"

    grid = InProcessGrid({}, [{"partition-id": 0}, {"partition-id": 1}], app=app, fail=fail)
    assert grid.get_node_ids() == [100, 101]
    sends = [(100, "train"), (101, "train"), (101, "query.x"), (100, "query.raise"), (102, "train"),
             (100, "query.huge")]
    messages = [Message(RecordDict({"c": ConfigRecord({"x": n})}), n, kind) for n, kind in sends]
    replies = grid.send_and_receive(messages)
    assert grid.sent == [kind for _, kind in sends] and [m for m, _ in grid.exchanges] == messages
    assert [r for _, r in grid.exchanges] == replies
    answered = [dict(r.content["c"]) for r in (replies[0], replies[2])]
    assert answered == [{"x": 100, "partition": 0}, {"x": 101, "partition": 1}]
    assert all(dict(m.content["c"]) == {"x": m.metadata.dst_node_id} for m in messages)  # the server's are intact
    assert [r.error.code for r in replies[1:2] + replies[3:]] == [
        ErrorCode.NODE_UNAVAILABLE,
        ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
        ErrorCode.NODE_UNAVAILABLE,
        ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
    ]
    assert "no such query" in replies[3].error.reason and "no SuperNode 102" in replies[4].error.reason
    assert "out of range" in replies[5].error.reason
    assert [r.metadata.src_node_id for r in replies[:4]] == [100, 101, 101, 100]
    assert all(sent > 0 for sent, _ in grid.sizes) and [reply > 0 for _, reply in grid.sizes] == [
        True, False, True, False, False, False]  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):  # the server's own unsendable message: its push fails
        grid.send_and_receive([Message(RecordDict({"c": ConfigRecord({"x": 2**70})}), 100, "train")])


@needs_flwr
def test_the_serverapp_task_identity_is_unset_after_the_run():
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsrd.integrations.inprocess import serverapp_task_identity

    with pytest.raises(ZeroDivisionError), serverapp_task_identity(run_id=7):
        assert Message(RecordDict(), 100, "train").metadata.run_id == TaskIdentity.run_id == 7
        _ = 1 / 0
    with pytest.raises(RuntimeError, match="run_id is not set"):
        Message(RecordDict(), 100, "train")


def _run_in_process(root: Path, node_extra: dict | None = None, **overrides):
    """A run through the in-process Grid with two nodes; `node_extra` (client id -> keys) joins their node configs."""
    from fedsrd.integrations.flower import run_server
    from fedsrd.integrations.inprocess import InProcessGrid

    rc = {**RUN_CONFIG, "output-dir": str(root / "server"), **overrides}
    extra = node_extra or {}
    nodes = [{"partition-id": i, "num-partitions": 2, "state-dir": str(root / f"node{i}"), **extra.get(i, {})}
             for i in range(2)]  # fmt: skip
    grid = InProcessGrid(rc, nodes)
    return run_server(grid, rc), grid


_SIMULATED: dict[tuple, tuple[str, Path]] = {}


def _simulated_run(tmp_path_factory, **overrides) -> tuple[str, Path]:
    """(final global-state digest, output dir) of the single-process simulation with the same settings."""
    from fedsrd.cli import run_train

    key = tuple(sorted(overrides.items()))
    if key not in _SIMULATED:
        out = tmp_path_factory.mktemp("simulation")
        argv = run_config_to_argv({**RUN_CONFIG, **overrides, "output-dir": str(out), "eval-size": 1})
        _SIMULATED[key] = (wire.state_digest(run_train(argv).global_state), out)
    return _SIMULATED[key]


def _simulated_digest(tmp_path_factory, **overrides) -> str:
    return _simulated_run(tmp_path_factory, **overrides)[0]


def _final_digest(server_dir: Path) -> str:
    """Digest of the global state the server saved as final/ (a PEFT adapter, or the raw state without LoRA)."""
    raw = server_dir / "final" / "global_state.safetensors"
    if raw.is_file():
        from safetensors.torch import load_file

        return wire.state_digest(load_file(str(raw)))
    return wire.state_digest(load_adapter_state(server_dir / "final"))


def _node_digests(root: Path) -> dict[int, tuple[int, str]]:
    """(round, digest) of the global copy each node keeps on disk."""
    out = {}
    for i in range(2):
        (path,) = (root / f"node{i}").glob(f"*/client_*/{NodeStore.GLOBAL}")
        state, round = NodeStore(path.parent).load_global()
        out[i] = (round, wire.state_digest(state))
    return out


@pytest.fixture(scope="module")
def fedsrd_run(tmp_path_factory):
    if not HAS_FLWR:
        pytest.skip("flwr is not installed")
    from fedsrd.integrations.inprocess import serverapp_task_identity

    root = tmp_path_factory.mktemp("flower-fedsrd")
    with serverapp_task_identity():
        history, grid = _run_in_process(root)
    return root, history, grid


@needs_flwr
def test_flower_round_is_the_simulation_round(fedsrd_run, tmp_path_factory):
    root, history, grid = fedsrd_run
    final = wire.state_digest(load_adapter_state(root / "server" / "final"))
    assert final == _simulated_digest(tmp_path_factory)
    assert _node_digests(root) == {0: (3, final), 1: (3, final)}  # every client ends on the final global adapter
    assert history[-1]["transport"]["clients_in_sync"] == [0, 1]
    assert json.loads((root / "server" / "history.json").read_text()) == history
    for i in range(2):  # each data owner's own adapter, as a PEFT folder
        assert len(list((root / f"node{i}").glob("*/client_*/adapter/adapter_model.safetensors"))) == 1
    assert grid.sent == ["query.hello"] * 2 + ["train"] * 3 + ["query.sync"] * 2


@needs_flwr
def test_flower_and_the_simulation_write_the_same_history_schema_and_per_client_mb(fedsrd_run, tmp_path_factory):
    from fedsrd.federation import HISTORY_KEYS

    root, history, _ = fedsrd_run
    _, sim_dir = _simulated_run(tmp_path_factory)
    simulated = json.loads((sim_dir / "history.json").read_text())
    flower = json.loads((root / "server" / "history.json").read_text())
    for record in simulated + flower:
        assert {k for k in record if not k.startswith("eval_")} == HISTORY_KEYS, record["round"]
    rounds = [r for r in simulated if r["round"] >= 1]
    assert [r["round"] for r in rounds] == [r["round"] for r in flower[1:]] == [1, 2, 3]
    for key in ("clients", "accepted", "upload_bytes", "broadcast_bytes", "upload_mb_per_client",
                "download_mb_per_client", "train_loss", "learning_rate"):
        assert [r[key] for r in rounds] == [r[key] for r in flower[1:]], key


class _StopAfterRound1:
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append("on_train_begin")

    def on_round_end(self, args, state, control, round=None, model=None, **kwargs):
        self.events.append(f"on_round_end {round}")
        control.should_training_stop = round == 1

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append("on_train_end")


@needs_flwr
def test_a_callback_stops_the_federation_on_flower(tmp_path, task_identity):
    from fedsrd.integrations.flower import run_server
    from fedsrd.integrations.inprocess import InProcessGrid

    callback = _StopAfterRound1()
    rc = {**RUN_CONFIG, "output-dir": str(tmp_path / "server")}
    nodes = [{"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / f"node{i}")} for i in range(2)]
    grid = InProcessGrid(rc, nodes)
    history = run_server(grid, rc, callbacks=[callback])
    assert [r["round"] for r in history] == [0, 1] and history[-1]["should_training_stop"] is True
    assert callback.events == ["on_train_begin", "on_round_end 1", "on_train_end"]
    assert history[-1]["transport"]["clients_in_sync"] == [0, 1]  # the final sync still brings everyone along
    assert grid.sent == ["query.hello"] * 2 + ["train"] + ["query.sync"] * 2
    assert json.loads((tmp_path / "server" / "history.json").read_text()) == history


@needs_flwr
def test_non_sampled_clients_catch_up_and_the_bytes_are_counted(fedsrd_run):
    root, history, _ = fedsrd_run
    assert [r["clients"] for r in history[1:]] == [[1], [0], [1]]  # sample_clients(seed 0, ..., 2 clients, 1)
    broadcast = {r["round"]: r["broadcast_bytes"] for r in history[1:]}
    r1, r2, r3 = history[1:]
    assert r1["transport"]["catch_up"] == {"1": {"kind": "none", "bytes": 0, "to_round": 0}}
    # round 2: client 0 missed round 1; round 3: client 1 trained from round 0, so it missed rounds 1 and 2
    assert r2["transport"]["catch_up"]["0"] == {"kind": "broadcasts", "bytes": broadcast[1], "to_round": 1}
    missed = {"kind": "broadcasts", "bytes": broadcast[1] + broadcast[2], "to_round": 2}
    assert r3["transport"]["catch_up"]["1"] == missed
    # after the last round: client 0 (round 1) gets rounds 2 and 3, client 1 (round 2) gets round 3
    assert r3["transport"]["final_sync_bytes"] == broadcast[2] + 2 * broadcast[3]
    assert r3["download_bytes"] == broadcast[1] + broadcast[2] + r3["transport"]["final_sync_bytes"]
    assert history[0]["upload_bytes"] == history[0]["transport"]["initial_adapter_bytes"] > 0  # client 0's adapter
    for r in history[1:]:
        assert r["upload_bytes"] > 0 and r["rejected"] == {} and r["dropped"] == {}
        assert r["download_mb_per_client"] == pytest.approx(r["broadcast_bytes"] / 1024**2)
    total = sum(r["upload_bytes"] + r["download_bytes"] for r in history)
    assert history[-1]["cumulative_mb"] == pytest.approx(total / 1024**2)
    assert sorted(p.name for p in (root / "server").iterdir() if p.name.startswith("round_")) == [
        "round_0001", "round_0002", "round_0003"
    ]


@needs_flwr
def test_resume_from_checkpoint_continues_the_same_federation(fedsrd_run, tmp_path, task_identity):
    root, history, _ = fedsrd_run
    first, _ = _run_in_process(tmp_path, **{"num-rounds": 2, "final-sync": False})
    ckpt = load_checkpoint(tmp_path / "server" / "checkpoints")
    assert ckpt.round == 2 and sorted(ckpt.ledger.broadcasts) == [1, 2]  # client 1 still holds round 0
    shutil.rmtree(next((tmp_path / "node0").glob(f"*/client_*/{NodeStore.GLOBAL}")).parent)  # client 0 lost its state
    resumed, grid = _run_in_process(tmp_path, **{"num-rounds": 3, "resume": True})
    assert [r["round"] for r in resumed] == [0, 1, 2, 3] and resumed[:3] == first
    final = wire.state_digest(load_adapter_state(tmp_path / "server" / "final"))
    assert final == wire.state_digest(load_adapter_state(root / "server" / "final"))  # = the uninterrupted run
    assert _node_digests(tmp_path) == {0: (3, final), 1: (3, final)}
    # client 1 trains in round 3 from the broadcasts of rounds 1-2 kept in the checkpoint
    catch_up = resumed[3]["transport"]["catch_up"]["1"]
    assert catch_up["kind"] == "broadcasts" and catch_up["to_round"] == 2
    assert grid.sent == ["query.hello"] * 2 + ["train"] + ["query.sync"] * 2


@needs_flwr
@pytest.mark.parametrize("algorithm", ["fedavg", "fedsa_lora", "flora", "fedkrso", "fed_sb", "ferret"])
def test_other_algorithms_match_the_simulation(algorithm, tmp_path, tmp_path_factory, task_identity):
    """Full-state catch-up (FedAvg), client-kept tensors (FedSA-LoRA), base-weight writes (FLoRA), no LoRA at all
    (FedKRSO: full-parameter training through seeded projections), an initial adapter computed from client 0's data
    (Fed-SB: every other node receives it as a full state before it first trains), seeds drawn per weight matrix from
    one generator (Ferret: in name order, whatever order the node's state was loaded in)."""
    history, _ = _run_in_process(tmp_path, algorithm=algorithm, **{"num-rounds": 2})
    final = _final_digest(tmp_path / "server")
    assert final == _simulated_digest(tmp_path_factory, algorithm=algorithm, **{"num-rounds": 2})
    assert _node_digests(tmp_path) == {0: (2, final), 1: (2, final)}
    # after round 2, client 1 still holds round 0. Two FedAvg broadcasts are the whole state twice; two FedSA-LoRA
    # broadcasts are all A twice, and B is as large as A here. FLoRA writes base weights: only ever broadcasts.
    # FedKRSO broadcasts per-seed accumulators, far smaller than the state of every trained weight.
    if algorithm == "fed_sb":  # client 1 computed its own initial adapter, which no broadcast applies to
        catch_ups = [r["transport"]["catch_up"]["1"]["kind"] for r in history[1:] if "1" in r["transport"]["catch_up"]]
        assert catch_ups[0] == "full" and history[0]["transport"]["initial_adapter_bytes"] > 0
        return
    expected = {"fedavg": "full", "fedsa_lora": "full", "flora": "broadcasts", "fedkrso": "broadcasts",
                "ferret": "broadcasts"}[algorithm]  # fmt: skip
    assert history[-1]["transport"]["final_sync"]["1"]["kind"] == expected


@needs_flwr
def test_round_learning_rate_schedule_reaches_the_nodes(tmp_path, tmp_path_factory, task_identity):
    """FedSRDConfig.round_lr_scheduler: each node's local phase trains at the round's rate, as in the simulation."""
    overrides = {"num-rounds": 2, "round-lr-scheduler": "cosine", "round-lr-min": 0.0003}
    history, _ = _run_in_process(tmp_path, **overrides)
    assert [r["learning_rate"] for r in history[1:]] == pytest.approx([0.003, 0.00165])  # 3e-4 + 1.35e-3 (1 + cos pi/2)
    final = _final_digest(tmp_path / "server")
    assert final == _simulated_digest(tmp_path_factory, **overrides)
    assert final != _simulated_digest(tmp_path_factory, **{"num-rounds": 2})  # the rate did change the training


# ---------------------------------------------------------------------------------------------------------------------
# hostile SuperNodes: one bad client costs at most its own update (tests/apps/hostile-app)
# ---------------------------------------------------------------------------------------------------------------------

HOSTILE_APP = REPO / "tests" / "apps" / "hostile-app"
HOSTILE_RUN = {"num-clients": 3, "clients-per-round": 3, "partition": "iid", "num-rounds": 2, "local-steps": 2,
               "save-every": 0}


def _hostile_client_app():
    sys.path.insert(0, str(HOSTILE_APP))
    try:
        from hostileapp.client_app import HELLO_ATTACKS, TRAIN_ATTACKS, app
    finally:
        sys.path.remove(str(HOSTILE_APP))
    return app, TRAIN_ATTACKS, HELLO_ATTACKS


def _reply_to_train(content):
    """A Flower reply with `content` to a train message for client 2 in round 1."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedsrd.integrations.flower import CONFIG, TRAIN

    msg = Message(RecordDict({CONFIG: ConfigRecord({"round": 1})}), 102, TRAIN, group_id="1")
    return Message(content, reply_to=msg)


@needs_flwr
def test_a_node_with_another_initial_adapter_stops_a_new_federation_with_the_reason(task_identity):
    """Every SuperNode builds the initial adapter from the seed; one that built another (another model or seed) stops
    the start before any training, naming the clients (Fed-SB, whose initial adapter comes from data, is the one
    exception: `test_other_algorithms_match_the_simulation[fed_sb]`)."""
    from fedsrd.integrations.flower import FlowerCoordinator
    from fedsrd.integrations.inprocess import InProcessGrid

    coordinator = FlowerCoordinator(InProcessGrid({}, []), parse_run_config({**RUN_CONFIG, "algorithm": "fedavg"}))
    _, algo, init, _, _ = _federation("fedavg", 0)
    coordinator.ledger = SyncLedger(held={0: (0, wire.state_digest(init)), 1: (0, "another")})
    with pytest.raises(RuntimeError, match=r"client\(s\) \[1\] built a different initial adapter than client 0"):
        coordinator._start(encode_full_state(algo, init, 0))
    assert coordinator.server is None


@needs_flwr
def test_every_hostile_train_reply_is_refused_with_a_reason(task_identity):
    """Each attack on a valid train reply: the coordinator's parsing refuses it (or the server step does) and raises
    nothing."""
    from flwr.app import ConfigRecord, RecordDict

    from fedsrd.integrations.flower import CONFIG, FlowerCoordinator, _parse_reply, bytes_record
    from fedsrd.integrations.inprocess import InProcessGrid

    _, attacks, _ = _hostile_client_app()
    coordinator = FlowerCoordinator(InProcessGrid({}, []), parse_run_config({**RUN_CONFIG, **HOSTILE_RUN}))
    config, algo, init, server, _ = _federation("fedavg", 0)
    coordinator.server = FederatedServer(algo, dict(init), config)
    coordinator.ledger = SyncLedger({0: wire.state_digest(init)})
    local = {k: v + 0.01 for k, v in init.items()}
    update = FederatedClient(algo, dict(init), config).make_update(local, round=1, client_id=2, num_samples=8)
    other = FederatedClient(algo, dict(init), config).make_update(local, round=1, client_id=3, num_samples=8)
    held = {"client-id": 2, "round": 0, "digest": wire.state_digest(init), "status": "ok"}
    honest = RecordDict({CONFIG: ConfigRecord(held), "payload": bytes_record({"update": update})})
    info, blobs, error = _parse_reply(_reply_to_train(honest))
    assert error is None and coordinator._train_reply_error(2, info, blobs) is None
    for name, attack in attacks.items():
        info, blobs, error = _parse_reply(_reply_to_train(attack(honest)))
        error = error or coordinator._train_reply_error(2, info, blobs)
        if error is None:  # well-formed reply, lying update: the server step refuses it, the state is untouched
            before = wire.state_digest(server.state)
            with pytest.raises(RuntimeError, match="valid update"):
                server.step(1, [blobs["update"]], senders=[2])
            assert wire.state_digest(server.state) == before and server.round == 0, name
            result = FederatedServer(algo, dict(init), config).step(1, [blobs["update"], other], senders=[2, 3])
            assert list(result.rejected) == ["2"] and result.accepted == [3], name
            continue
        assert "malformed" in error or "ClientApp" in error, (name, error)


@needs_flwr
def test_hostile_supernodes_cost_only_their_own_updates(tmp_path, task_identity):
    """Three clients, client 2 hostile in every reply, a fourth SuperNode posing as client 0 with a forged PEFT
    config: the run completes with clients 0 and 1, and the server's adapter_config.json is its own."""
    from fedsrd.integrations.flower import run_server
    from fedsrd.integrations.inprocess import InProcessGrid

    app, _, _ = _hostile_client_app()
    rc = {**RUN_CONFIG, **HOSTILE_RUN, "output-dir": str(tmp_path / "server")}
    nodes = [{"partition-id": i, "num-partitions": 3, "state-dir": str(tmp_path / f"node{i}")} for i in range(3)]
    nodes[2]["hostile"] = "no-round payload-config-record"
    nodes.append({"partition-id": 0, "num-partitions": 3, "hostile-hello": "claim-0"})
    history = run_server(InProcessGrid(rc, nodes, app=app), rc)
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert record["accepted"] == [0, 1] and list(record["rejected"]) == ["2"]
        assert "malformed train reply" in record["rejected"]["2"] or "malformed reply" in record["rejected"]["2"]
    assert "malformed sync reply" in history[-1]["transport"]["final_sync_rejected"]["2"]
    assert history[-1]["transport"]["clients_in_sync"] == [0, 1]
    saved = json.loads((tmp_path / "server" / "final" / "adapter_config.json").read_text())
    (own,) = (tmp_path / "node0").glob("*/client_*/adapter_config.json")
    client = json.loads(own.read_text())
    assert saved["r"] == client["r"] == 4 and saved["lora_alpha"] == client["lora_alpha"] == 8
    assert sorted(saved["target_modules"]) == sorted(client["target_modules"])
    assert saved["base_model_name_or_path"] == "tiny-llama"
    final = load_adapter_state(tmp_path / "server" / "final")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


# ---------------------------------------------------------------------------------------------------------------------
# a real deployment: SuperLink + 2 SuperNodes as subprocesses on loopback
# ---------------------------------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _isolated_network() -> bool:
    """Whether the daemons can run in a fresh network namespace (root with unshare and ip)."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        return False
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.flower
@needs_flwr
def test_deployment_on_loopback_with_resume(tmp_path, tmp_path_factory):
    """Round 1, stop; a second run resumes from the checkpoint for round 2; the clients end on the final adapter."""
    for exe in ("flower-superlink", "flower-supernode", "flwr"):
        if not (Path(sys.executable).parent / exe).exists():
            pytest.skip(f"{exe} is not next to {sys.executable}")
    server_dir = tmp_path / "server"
    node_configs = [{"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / f"node{i}")} for i in range(2)]
    runs = [
        {"output-dir": str(server_dir), "num-rounds": 1, "final-sync": False},
        {"output-dir": str(server_dir), "num-rounds": 2, "resume": True},
    ]
    isolated = _isolated_network()
    link_port, node_port = (9092, 9094) if isolated else _free_ports(2)
    driver = [
        sys.executable, "-m", "fedsrd.integrations.flower_loopback", str(APP), "--workdir", str(tmp_path / "flwr"),
        "--nodes", "2", "--link-port", str(link_port), "--node-port", str(node_port), "--timeout", "240",
        *[arg for c in node_configs for arg in ("--node-config", json.dumps(c))],
        *[arg for c in runs for arg in ("--run-config", json.dumps(c))],
    ]
    if isolated:  # nothing can leave the machine: a namespace with only lo
        driver = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *driver]
    proc = subprocess.Popen(driver, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:  # the driver stops its daemons itself; only on a hang do we end its process group
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-6000:]}"
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    statuses = [line["status"] for line in lines if "status" in line]
    assert statuses == ["finished:completed", "finished:completed"]

    history = json.loads((server_dir / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2] and [r["clients"] for r in history[1:]] == [[1], [0]]
    r1, r2 = history[1:]
    assert r1["upload_bytes"] > 0 and r2["upload_bytes"] > 0 and history[0]["transport"]["initial_adapter_bytes"] > 0
    # round 2 (second run): client 0 gets round 1's broadcast, kept across the restart in the checkpoint
    assert r2["transport"]["catch_up"]["0"] == {"kind": "broadcasts", "bytes": r1["broadcast_bytes"], "to_round": 1}
    # then client 1 (still at round 0) gets rounds 1-2, client 0 round 2
    assert r2["transport"]["final_sync_bytes"] == r1["broadcast_bytes"] + 2 * r2["broadcast_bytes"]
    assert r2["transport"]["clients_in_sync"] == [0, 1]

    final = wire.state_digest(load_adapter_state(server_dir / "final"))
    assert _node_digests(tmp_path) == {0: (2, final), 1: (2, final)}
    assert final == _simulated_digest(tmp_path_factory, **{"num-rounds": 2})


@pytest.mark.flower
@needs_flwr
def test_deployment_with_a_hostile_supernode_completes(tmp_path):
    """A real SuperLink and three SuperNodes, client 2's ClientApp hostile (train reply with round "abc", sync reply
    with round NaN, forged adapter config in hello is ignored): the run ends finished:completed with clients 0 and 1."""
    for exe in ("flower-superlink", "flower-supernode", "flwr"):
        if not (Path(sys.executable).parent / exe).exists():
            pytest.skip(f"{exe} is not next to {sys.executable}")
    server_dir = tmp_path / "server"
    nodes = [{"partition-id": i, "num-partitions": 3, "state-dir": str(tmp_path / f"node{i}")} for i in range(3)]
    nodes[2]["hostile"] = "round-abc"
    run = {**HOSTILE_RUN, "num-rounds": 1, "output-dir": str(server_dir)}
    isolated = _isolated_network()
    link_port, node_port = (9092, 9094) if isolated else _free_ports(2)
    driver = [
        sys.executable, "-m", "fedsrd.integrations.flower_loopback", str(HOSTILE_APP), "--workdir",
        str(tmp_path / "flwr"), "--nodes", "3", "--link-port", str(link_port), "--node-port", str(node_port),
        "--timeout", "240", *[arg for c in nodes for arg in ("--node-config", json.dumps(c))],
        "--run-config", json.dumps(run),
    ]
    out = run_loopback_driver(driver, isolated, timeout=420)
    statuses = [json.loads(line)["status"] for line in out.splitlines() if line.startswith('{"run_id"')]
    assert statuses == ["finished:completed"]
    history = json.loads((server_dir / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1]
    assert history[1]["accepted"] == [0, 1] and "'round'" in history[1]["rejected"]["2"]
    assert "malformed sync reply" in history[1]["transport"]["final_sync_rejected"]["2"]
    assert history[1]["transport"]["clients_in_sync"] == [0, 1]
    saved = json.loads((server_dir / "final" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == "tiny-llama"


def run_loopback_driver(driver: list[str], isolated: bool, timeout: float) -> str:
    """Run `fedsrd.integrations.flower_loopback` (in its own network namespace when `isolated`) in its own process
    group, stop the whole group whatever happens, and return its stdout; the driver must exit 0."""
    if isolated:
        driver = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *driver]
    proc = subprocess.Popen(driver, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-6000:]}"
    return out
