"""Fuzzing: mutated and random messages never crash the decoder or the server step, nor corrupt the global state."""

import json
import struct

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.client import FederatedClient
from fedsrd.server import FederatedServer

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


def _mutate(blob: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(blob)
    kind = rng.integers(0, 8)
    if kind == 0:  # flip bits anywhere
        for _ in range(rng.integers(1, 8)):
            i = rng.integers(0, len(data))
            data[i] ^= 1 << rng.integers(0, 8)
    elif kind == 1:  # truncate
        data = data[: rng.integers(0, len(data))]
    elif kind == 2:  # insert junk
        i = rng.integers(0, len(data))
        data[i:i] = rng.bytes(int(rng.integers(1, 64)))
    elif kind == 3:  # random bytes of plausible length
        data = bytearray(rng.bytes(int(rng.integers(0, 2 * len(blob)))))
    elif kind == 4:  # lie about the header length
        data[:8] = struct.pack("<Q", int(rng.integers(0, 2**40)))
    elif kind == 5:  # overwrite a run inside the header
        n = struct.unpack("<Q", bytes(data[:8]))[0]
        i = 8 + rng.integers(0, max(1, n))
        data[i : i + 4] = rng.bytes(4)
    elif kind == 6:  # rewrite the fedsrd header: shapes, nnz, names, round, kind
        return _rewrite_header(blob, rng)
    else:  # overwrite tensor payload bytes (values or positions)
        n = struct.unpack("<Q", bytes(data[:8]))[0]
        start = 8 + n
        if start < len(data):
            i = rng.integers(start, len(data))
            data[i : i + 8] = rng.bytes(8)
    return bytes(data)


def _rewrite_header(blob: bytes, rng: np.random.Generator) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    outer = json.loads(blob[8 : 8 + n])
    header = json.loads(outer["__metadata__"]["fedsrd"])
    names = list(header["tensors"])
    name = names[rng.integers(0, len(names))]
    entry = header["tensors"][name]
    choice = rng.integers(0, 6)
    if choice == 0:
        entry["shape"] = [int(rng.integers(0, 50)) for _ in range(int(rng.integers(0, 4)))]
    elif choice == 1 and "nnz" in entry:
        entry["nnz"] = int(rng.integers(-5, 500))
    elif choice == 2:
        header["tensors"]["not." + name] = header["tensors"].pop(name)
    elif choice == 3:
        header["round"] = int(rng.integers(-3, 5))
    elif choice == 4:
        header["kind"] = "broadcast"
    else:
        entry["layout"] = "sparse" if entry.get("layout") == "dense" else "dense"
    outer["__metadata__"]["fedsrd"] = json.dumps(header)
    text = json.dumps(outer).encode()
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


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
            mutants = [_mutate(blobs[rng.integers(0, len(blobs))], rng) for _ in range(per_step)]
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
