import json

import pytest
import torch

from fedsrd.checkpoint import CHECKPOINTS, LATEST, load_checkpoint, save_checkpoint


def test_round_trip_and_latest(tmp_path):
    assert load_checkpoint(tmp_path) is None
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, {"w": torch.full((2, 3), float(r))}, {"history": [{"round": r}]})
    round, tensors, meta = load_checkpoint(tmp_path)
    assert round == 3 and torch.equal(tensors["w"], torch.full((2, 3), 3.0))
    assert meta["history"] == [{"round": 3}]
    kept = sorted(p.name for p in (tmp_path / CHECKPOINTS).glob("round_*"))
    assert kept == ["round_0002", "round_0003"]


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})
    import fedsrd.checkpoint as ckpt

    def crash(*a, **k):
        raise OSError("disk vanished")

    monkeypatch.setattr(ckpt, "atomic_write_bytes", crash)  # LATEST is written last
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {})
    round, tensors, _ = load_checkpoint(tmp_path)
    assert round == 1 and torch.equal(tensors["w"], torch.ones(2))


def test_no_pickle_in_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"x": 1})
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "fedsrd-checkpoint"
    assert (tmp_path / CHECKPOINTS / LATEST).read_text() == "round_0001"
    assert b"\x80\x04" not in (path / "tensors.safetensors").read_bytes()[:8]


def test_a_flower_checkpoint_is_read_and_digest_checked_by_the_shared_module(tmp_path):
    """The Flower coordinator writes the format every runtime uses: the shared reader loads it, checks its digest
    and falls back to the previous complete round when the newest is damaged."""
    from fedsrd.checkpoint import read_checkpoint
    from fedsrd.integrations.catchup import SyncLedger
    from fedsrd.integrations.checkpoint import ServerCheckpoint
    from fedsrd.integrations.checkpoint import save_checkpoint as save_server_checkpoint

    def server_checkpoint(round: int) -> ServerCheckpoint:
        state = {"m.lora_A.weight": torch.full((2, 3), float(round))}
        from fedsrd import wire

        digests = {round: wire.state_digest(state)}
        ledger = SyncLedger(digests, {round: bytes([round]) * 5}, {0: (round, digests[round])})
        return ServerCheckpoint(round, "fed-1", "fedavg", state, ledger, [{"round": round}], {"algorithm": "fedavg"})

    save_server_checkpoint(tmp_path, server_checkpoint(1))
    newest = save_server_checkpoint(tmp_path, server_checkpoint(2))
    round, tensors, meta = read_checkpoint(tmp_path)
    assert round == 2 and meta["runtime"] == "flower" and meta["history"] == [{"round": 2}]
    assert sorted(tensors) == ["broadcast/round_0002", "global/m.lora_A.weight"]
    assert bytes(tensors["broadcast/round_0002"].tolist()) == bytes([2]) * 5
    data = bytearray((newest / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor's values: the digest catches it
    (newest / "tensors.safetensors").write_bytes(bytes(data))
    assert read_checkpoint(tmp_path)[0] == 1


def test_resume_is_refused_naming_every_differing_setting():
    from fedsrd.checkpoint import check_resume
    from fedsrd.config import FedSRDConfig

    saved = FedSRDConfig(algorithm="fedavg", num_clients=4, lora_r=8).to_dict()
    check_resume(saved, dict(saved), "out/checkpoints")  # the same settings resume
    current = FedSRDConfig(algorithm="fedsrd", num_clients=4, lora_r=16).to_dict()
    with pytest.raises(ValueError, match="algorithm: checkpoint 'fedavg', this run 'fedsrd'; lora_r: checkpoint 8"):
        check_resume(saved, current, "out/checkpoints")
