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

    monkeypatch.setattr(ckpt, "_write_text_atomic", crash)
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
