"""Fuzzing: mutated and random messages never crash the decoder or the server step, nor corrupt the global state."""

import numpy as np
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
