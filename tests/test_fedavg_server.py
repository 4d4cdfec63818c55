import pytest
import torch

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.client import FederatedClient
from fedsrd.server import FederatedServer, load_adapter_state, merge_adapters, save_adapter


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "m.layers.0.q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
        "m.layers.0.q_proj.lora_B.weight": torch.zeros(8, 4),
        "m.layers.0.v_proj.lora_A.weight": torch.randn(4, 16, generator=g),
        "m.layers.0.v_proj.lora_B.weight": torch.zeros(8, 4),
    }


def _local(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _updates(cfg, state, n=3):
    algo = get_algorithm("fedavg", cfg)
    client = FederatedClient(algo, state, cfg)
    locals_ = [_local(state, 10 + i) for i in range(n)]
    blobs = [
        client.make_update(loc, round=1, client_id=i, num_samples=10 * (i + 1), metrics={"train_loss": 1.0 + i})
        for i, loc in enumerate(locals_)
    ]
    return algo, locals_, blobs


def _with_nan(blob: bytes) -> bytes:
    """A hostile client's message: a valid container whose values hold a NaN (our encoder refuses to write one)."""
    import json
    import struct

    from safetensors.torch import load, save

    n = struct.unpack("<Q", blob[:8])[0]
    metadata = json.loads(blob[8 : 8 + n])["__metadata__"]
    tensors = load(blob)
    tensors["m.layers.0.v_proj.lora_B.weight"][0, 0] = float("nan")
    return save(tensors, metadata=metadata)


def test_fedavg_averages_a_and_b_separately():
    cfg = FedSRDConfig(num_clients=3)
    state = _state()
    algo, locals_, blobs = _updates(cfg, state)
    server = FederatedServer(algo, dict(state), cfg)
    result = server.step(1, blobs)
    for k in state:
        expected = sum(loc[k] for loc in locals_) / 3
        torch.testing.assert_close(server.state[k], expected, rtol=0, atol=1e-6)
    assert result.accepted == [0, 1, 2] and result.rejected == {}
    assert result.metrics["train_loss"] == pytest.approx(2.0)


def test_fedavg_weights_by_samples():
    cfg = FedSRDConfig(num_clients=3, aggregation="samples")
    state = _state()
    algo, locals_, blobs = _updates(cfg, state)
    server = FederatedServer(algo, dict(state), cfg)
    server.step(1, blobs)
    w = [10 / 60, 20 / 60, 30 / 60]
    for k in state:
        expected = sum(wi * loc[k] for wi, loc in zip(w, locals_))
        torch.testing.assert_close(server.state[k], expected, rtol=0, atol=1e-6)


def test_client_applies_broadcast_to_identical_state():
    cfg = FedSRDConfig(num_clients=3)
    state = _state()
    algo, _, blobs = _updates(cfg, state)
    server = FederatedServer(algo, dict(state), cfg)
    result = server.step(1, blobs)
    client = FederatedClient(algo, dict(state), cfg)
    client.receive(result.broadcast)
    assert wire.state_digest(client.state) == wire.state_digest(server.state)


def test_bad_updates_are_excluded_and_state_untouched():
    cfg = FedSRDConfig(num_clients=3)
    state = _state()
    algo, locals_, blobs = _updates(cfg, state)
    bad_shape = wire.encode(
        wire.Message(
            "update",
            "fedavg",
            1,
            {**locals_[0], "m.layers.0.q_proj.lora_A.weight": torch.zeros(3, 3)},
            {"client_id": 7, "num_samples": 1},
        )
    )
    bad_nan = _with_nan(
        wire.encode(wire.Message("update", "fedavg", 1, locals_[0], {"client_id": 8, "num_samples": 1}))
    )
    wrong_round = wire.encode(wire.Message("update", "fedavg", 5, locals_[0], {"client_id": 9, "num_samples": 1}))
    server = FederatedServer(algo, dict(state), cfg)
    result = server.step(1, [blobs[0], blobs[1][:50], bad_shape, bad_nan, wrong_round, b"\x80\x04pickle", blobs[2]])
    assert result.accepted == [0, 2]
    assert len(result.rejected) == 5
    for k in state:
        torch.testing.assert_close(server.state[k], (locals_[0][k] + locals_[2][k]) / 2, rtol=0, atol=1e-6)


def test_too_few_valid_updates_raises_without_changing_state():
    cfg = FedSRDConfig(num_clients=3)
    state = _state()
    algo, _, _ = _updates(cfg, state)
    server = FederatedServer(algo, dict(state), cfg)
    with pytest.raises(RuntimeError, match="valid update"):
        server.step(1, [b"garbage"])
    assert wire.state_digest(server.state) == wire.state_digest(state)


def test_merge_adapters_on_files(tmp_path):
    cfg = FedSRDConfig(num_clients=3)
    state = _state()
    _, locals_, blobs = _updates(cfg, state)
    save_adapter(state, tmp_path / "global", {"r": 4, "peft_type": "LORA"})
    paths = []
    for i, b in enumerate(blobs):
        p = tmp_path / f"u{i}.bin"
        p.write_bytes(b)
        paths.append(p)
    new_state, broadcast = merge_adapters(tmp_path / "global", paths, "fedavg")
    for k in state:
        torch.testing.assert_close(new_state[k], sum(loc[k] for loc in locals_) / 3, rtol=0, atol=1e-6)
    msg = wire.decode(broadcast, kind="broadcast", algorithm="fedavg")
    assert msg.round == 1 and msg.meta["digest"] == wire.state_digest(new_state)
    # and the CLI does the same
    from fedsrd.cli import main

    main(["merge", "--global", str(tmp_path / "global"), "--updates", *map(str, paths), "--out", str(tmp_path / "new")])
    reloaded = load_adapter_state(tmp_path / "new")
    assert wire.state_digest(reloaded) == wire.state_digest(new_state)
    assert (tmp_path / "new" / "broadcast.bin").read_bytes() == broadcast


def test_norm_clipping_bounds_each_clients_change():
    cfg = FedSRDConfig(num_clients=3, clip_update_norm=0.05)
    state = _state()
    algo, locals_, blobs = _updates(cfg, state)
    server = FederatedServer(algo, dict(state), cfg)
    messages = [server.decode_update(blob, 1) for blob in blobs]
    _, record = server.bound_influence(1, messages, {})
    assert record["clip_bound"] == 0.05 and sorted(record["clipped"]) == ["0", "1", "2"]
    for msg in messages:
        change = torch.sqrt(sum(((msg.tensors[k] - state[k]) ** 2).sum() for k in state))
        assert float(change) <= 0.05 * (1 + 1e-5)
        direction = locals_[msg.meta["client_id"]]
        k = "m.layers.0.q_proj.lora_A.weight"
        torch.testing.assert_close(  # same direction, shorter
            torch.nn.functional.normalize((msg.tensors[k] - state[k]).flatten(), dim=0),
            torch.nn.functional.normalize((direction[k] - state[k]).flatten(), dim=0),
        )


@pytest.mark.parametrize("kind", ["unknown_name", "int_dtype", "inf", "declared_nnz", "oversized", "huge_value"])
def test_each_hostile_kind_is_rejected_and_logged(kind, caplog):
    import json
    import struct

    from safetensors.torch import load, save

    cfg = FedSRDConfig(num_clients=3, max_message_mb=1.0)
    state = _state()
    algo, locals_, blobs = _updates(cfg, state)
    blob = blobs[0]
    n = struct.unpack("<Q", blob[:8])[0]
    metadata = json.loads(blob[8 : 8 + n])["__metadata__"]
    header = json.loads(metadata["fedsrd"])
    tensors = load(blob)
    key = "m.layers.0.q_proj.lora_A.weight"
    if kind == "unknown_name":
        tensors["evil"] = tensors.pop(key)
        header["tensors"]["evil"] = header["tensors"].pop(key)
    elif kind == "int_dtype":
        tensors[key] = tensors[key].to(torch.int32)
    elif kind == "inf":
        tensors[key][0, 0] = float("inf")
    elif kind == "declared_nnz":
        sparse = wire.SparseTensor.from_dense(torch.eye(4, 16))
        good = wire.encode(wire.Message("update", "fedavg", 1, {**locals_[0], key: sparse}, {"num_samples": 1}))
        n = struct.unpack("<Q", good[:8])[0]
        metadata = json.loads(good[8 : 8 + n])["__metadata__"]
        header = json.loads(metadata["fedsrd"])
        header["tensors"][key]["nnz"] = 3
        tensors = load(good)
    elif kind == "oversized":
        tensors["pad"] = torch.zeros(400_000)
        header["tensors"]["pad"] = {"layout": "dense", "shape": [400_000]}
    elif kind == "huge_value":
        tensors[key][0, 0] = 1e20
    metadata["fedsrd"] = json.dumps(header)
    hostile = save(tensors, metadata=metadata)
    server = FederatedServer(algo, dict(state), cfg)
    before = wire.state_digest(server.state)
    with caplog.at_level("WARNING"):
        result = server.step(1, [hostile, *blobs[1:]])
    assert list(result.rejected) == ["#0"] and result.accepted == [1, 2]
    assert "rejected update #0" in caplog.text
    assert wire.state_digest(server.state) != before  # the honest clients still moved the state
    for k in state:
        torch.testing.assert_close(server.state[k], (locals_[1][k] + locals_[2][k]) / 2, rtol=0, atol=1e-6)
