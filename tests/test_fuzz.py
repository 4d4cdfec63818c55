"""Fuzzing: mutated and random messages never crash the decoder or the server step, nor corrupt the global state."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.client import FederatedClient
from fedsrd.server import FederatedServer
from fedsrd.testing import mutate

NUM_MUTANTS = 10_000


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "m.0.q_proj.lora_A.weight": torch.randn(4, 12, generator=g),
        "m.0.q_proj.lora_B.weight": 0.01 * torch.randn(6, 4, generator=g),
        "m.0.v_proj.lora_A.weight": torch.randn(4, 12, generator=g),
        "m.0.v_proj.lora_B.weight": 0.01 * torch.randn(6, 4, generator=g),
    }


def _valid_updates(algorithm: str, n: int = 3):
    cfg = FedSRDConfig(algorithm=algorithm, num_clients=n, upload_sparsity_alpha=0.5)
    algo = get_algorithm(algorithm, cfg)
    state = _state()
    client = FederatedClient(algo, state, cfg)
    g = torch.Generator().manual_seed(1)
    blobs = []
    for cid in range(n):
        local = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        blobs.append(client.make_update(local, round=1, client_id=cid, num_samples=5))
    return cfg, algo, state, blobs


def _check_state(server: FederatedServer, reference: dict) -> None:
    assert set(server.state) == set(reference)
    for k, v in server.state.items():
        assert v.shape == reference[k].shape and v.dtype == torch.float32
        assert torch.isfinite(v).all()


def test_ten_thousand_mutants_through_decoder_and_server_step():
    rng = np.random.default_rng(0)
    fed = 0
    for algorithm in ("fedavg", "fedsrd"):
        cfg, algo, state, blobs = _valid_updates(algorithm)
        per_step = 50
        for _ in range(NUM_MUTANTS // 2 // per_step):
            mutants = [mutate(blobs[rng.integers(0, len(blobs))], rng) for _ in range(per_step)]
            for m in mutants:  # the decoder alone: only WireError, ever
                try:
                    wire.decode(m)
                except wire.WireError:
                    pass
            server = FederatedServer(algo, dict(state), cfg)
            result = server.step(1, [*mutants, blobs[0]])  # one honest update keeps the round alive
            assert 1 <= len(result.accepted) <= per_step + 1
            assert len(result.rejected) + len(result.accepted) == per_step + 1
            _check_state(server, state)
            client = FederatedClient(algo, dict(state), cfg)
            client.receive(result.broadcast)  # clients still reach the server's exact state
            fed += per_step
    assert fed >= NUM_MUTANTS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_are_rejected_cleanly(data):
    cfg, algo, state, blobs = _valid_updates("fedavg", n=1)
    server = FederatedServer(algo, dict(state), cfg)
    result = server.step(1, [data, blobs[0]])
    assert result.accepted == [0]
    _check_state(server, state)


# ---------------------------------------------------------------------------------------------------------------------
# metadata: validated by schema before anything changes
# ---------------------------------------------------------------------------------------------------------------------

_META_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.integers(min_value=-3, max_value=2**41)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_META_KEYS = st.sampled_from(["client_id", "num_samples", "train_loss", "x" * 65, ""]) | st.text(max_size=10)


def _with_meta(blob: bytes, meta) -> bytes | None:
    """`blob` re-encoded with `meta` (None if the encoder refuses it)."""
    msg = wire.decode(blob)
    msg.meta = meta
    try:
        return wire.encode(msg)
    except wire.WireError:
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=st.dictionaries(_META_KEYS, _META_VALUES, max_size=6), samples=st.booleans())
def test_mutated_metadata_never_crashes_the_step_nor_takes_the_weight(meta, samples):
    cfg, algo, state, blobs = _valid_updates("fedavg", n=2)
    cfg.aggregation = "samples" if samples else "uniform"
    hostile = _with_meta(blobs[1], meta)
    if hostile is None:
        return
    server = FederatedServer(algo, dict(state), cfg)
    result = server.step(1, [hostile, blobs[0]], senders=[1, 0])  # never raises: client 0 is honest
    assert 0 in result.accepted and "0" not in result.rejected
    if 1 in result.accepted:  # then its metadata met the schema
        assert meta.get("client_id") == 1 and not isinstance(meta["client_id"], bool)
        assert all(isinstance(v, float) and abs(v) <= 1e30 for v in result.metrics.values())
    else:
        assert "1" in result.rejected and "meta" in result.rejected["1"]
    _check_state(server, state)
    FederatedClient(algo, dict(state), cfg).receive(result.broadcast)


def test_a_claimed_sample_count_cannot_take_all_the_weight():
    from fedsrd.server import MAX_NUM_SAMPLES, capped_sample_counts

    assert capped_sample_counts([5, 2**40]) == [5, 50] and capped_sample_counts([7]) == [7]
    cfg, algo, state, blobs = _valid_updates("fedavg", n=2)
    cfg.aggregation = "samples"
    greedy = _with_meta(blobs[1], {"client_id": 1, "num_samples": MAX_NUM_SAMPLES})
    mixed = FederatedServer(algo, dict(state), cfg)
    mixed.step(1, [greedy, blobs[0]])
    alone = FederatedServer(algo, dict(state), cfg)
    alone.step(1, [blobs[1]])
    key = "m.0.q_proj.lora_A.weight"
    share = float((mixed.state[key] - state[key]).norm() / (alone.state[key] - state[key]).norm())
    assert share < 0.95  # capped at 10 x the other client's 5 samples: weight 50/55 at most, not ~1
    with_huge = _with_meta(blobs[1], {"client_id": 1, "num_samples": 10**300})
    result = FederatedServer(algo, dict(state), cfg).step(1, [with_huge, blobs[0]])
    assert result.accepted == [0] and "num_samples" in result.rejected["#0"]


@pytest.mark.parametrize("where", ["server_step", "encode"])
def test_a_failing_step_leaves_state_round_and_memory_untouched(where, monkeypatch):
    import fedsrd.server as server_module

    cfg, algo, state, blobs = _valid_updates("fedavg", n=2)
    server = FederatedServer(algo, dict(state), cfg)
    server.memory = {"kept": torch.ones(2)}
    before = (wire.state_digest(server.state), server.round, wire.state_digest(server.memory))

    def fail(*args, **kwargs):
        raise TypeError(f"{where} fails")

    if where == "encode":
        monkeypatch.setattr(server_module.wire, "encode", fail)
    else:
        monkeypatch.setattr(algo, "server_step", fail)
    with pytest.raises((TypeError, RuntimeError)):
        server.step(1, blobs)
    assert (wire.state_digest(server.state), server.round, wire.state_digest(server.memory)) == before


# ---------------------------------------------------------------------------------------------------------------------
# Flower message records: the coordinator's reply parsing (fedsrd.integrations.flower)
# ---------------------------------------------------------------------------------------------------------------------

NUM_RECORD_CASES = 600
MAX_CASE_SECONDS = 1.0
MAX_CASE_PEAK_MB = 64.0


def _field_value(rng: np.random.Generator, blob: bytes):
    """A value a ConfigRecord accepts: odd ints, floats (NaN, inf), strings, bytes, bools, lists."""
    choices = [
        lambda: int(rng.integers(-(2**62), 2**62)),
        lambda: int(rng.integers(-3, 5)),
        lambda: 2**63 - 1,
        lambda: float(rng.choice([np.nan, np.inf, -np.inf, 1.0, 1e308, -0.0])),
        lambda: bool(rng.integers(0, 2)),
        lambda: "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, size=int(rng.integers(0, 70)))),
        lambda: "ok",
        lambda: "0" * 64,
        lambda: mutate(blob, rng)[:256],
        lambda: [int(v) for v in rng.integers(0, 4, size=int(rng.integers(0, 4)))],
        lambda: ["ok", "out-of-sync"],
    ]
    return choices[int(rng.integers(0, len(choices)))]()


def _mutated_reply_content(rng: np.random.Generator, held: dict, update: bytes):
    """An honest train reply's RecordDict with its control fields, payload and records mutated."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedsrd.integrations.flower import CONFIG, PAYLOAD, WIRE_STYPE, bytes_record

    info = dict(held)
    for key in [*held, "extra", "x" * 300]:
        action = rng.integers(0, 4)
        if action == 1:
            info.pop(key, None)
        elif action == 2:
            info[key] = _field_value(rng, update)
    payload = {
        0: lambda: bytes_record({"update": update}),
        1: lambda: bytes_record({"update": mutate(update, rng)}),
        2: lambda: bytes_record({"other": update, "update": b""}),
        3: lambda: ArrayRecord({"update": Array(np.frombuffer(update[: len(update) // 4 * 4], dtype=np.float32))}),
        4: lambda: ArrayRecord({"update": Array("uint8", (len(update),), "numpy.ndarray", update)}),
        5: lambda: ArrayRecord({"update": Array("float64", (3,), WIRE_STYPE, update[:24])}),
        6: lambda: ConfigRecord({"update": update}),
        7: lambda: MetricRecord({"update": 1.0}),
        8: lambda: None,
    }[int(rng.integers(0, 9))]()
    control = {
        0: lambda: ConfigRecord(info),
        1: lambda: MetricRecord({"round": 1.0}),
        2: lambda: bytes_record({"round": b"1"}),
        3: lambda: None,
    }[int(rng.choice(4, p=[0.85, 0.05, 0.05, 0.05]))]()
    content = RecordDict()
    if control is not None:
        content[CONFIG] = control
    if payload is not None:
        content[PAYLOAD] = payload
    return content


def test_mutated_flower_records_are_refused_with_a_reason_in_bounded_time_and_memory(task_identity):
    """600 mutated train replies (control fields missing, mistyped, NaN, huge, long; payloads of the wrong record
    or array type, or mutated bytes; control records of the wrong type) through the coordinator's parsing and, where
    they pass, the server step beside an honest update: nothing raises, the honest update is always aggregated, and
    every case stays under MAX_CASE_SECONDS and MAX_CASE_PEAK_MB (tracemalloc's peak of Python allocations)."""
    import time
    import tracemalloc
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, Message, RecordDict

    from fedsrd.integrations.flower import CONFIG, TRAIN, FlowerCoordinator, _parse_reply

    cfg, algo, state, blobs = _valid_updates("fedavg", n=3)
    held = {"client-id": 2, "round": 0, "digest": wire.state_digest(state), "status": "ok"}
    coordinator = SimpleNamespace(cfg=SimpleNamespace(num_clients=3), ledger=SimpleNamespace(round=0))
    request = Message(RecordDict({CONFIG: ConfigRecord({"round": 1})}), 102, TRAIN, group_id="1")
    rng = np.random.default_rng(16)
    times, peaks, outcomes = [], [], {"refused": 0, "rejected by the step": 0, "accepted": 0}
    tracemalloc.start()
    try:
        for _ in range(NUM_RECORD_CASES):
            content = _mutated_reply_content(rng, held, blobs[2])
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            start = time.perf_counter()
            info, payload, error = _parse_reply(Message(content, reply_to=request))
            error = error or FlowerCoordinator._train_reply_error(coordinator, 2, info, payload)
            if error is None:
                server = FederatedServer(algo, dict(state), cfg)
                result = server.step(1, [payload["update"], blobs[0]], senders=[2, 0])
                assert 0 in result.accepted
                outcomes["accepted" if 2 in result.accepted else "rejected by the step"] += 1
            else:
                assert "malformed" in error, error
                outcomes["refused"] += 1
            times.append(time.perf_counter() - start)
            peaks.append((tracemalloc.get_traced_memory()[1] - base) / 2**20)
    finally:
        tracemalloc.stop()
    print(
        f"\n{NUM_RECORD_CASES} mutated Flower replies: {outcomes}; per case max {max(times) * 1e3:.1f} ms "
        f"(median {np.median(times) * 1e3:.2f} ms), peak memory max {max(peaks):.2f} MB (median {np.median(peaks):.3f})"
    )
    assert outcomes["refused"] > 0 and outcomes["accepted"] > 0
    assert max(times) < MAX_CASE_SECONDS and max(peaks) < MAX_CASE_PEAK_MB
