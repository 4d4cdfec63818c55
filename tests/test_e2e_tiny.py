"""End to end: the tiny preset trains, held-out loss goes down, the saved adapter reloads with plain PEFT."""

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fedsrd.cli import run_train

    out = tmp_path_factory.mktemp("tiny")
    trainer = run_train(["--config", str(TINY), "--output_dir", str(out), "--disable_tqdm", "true"])
    return trainer, out


def test_heldout_loss_goes_down(tiny_run):
    trainer, out = tiny_run
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    for r in history[1:]:
        for key in ("train_loss", "eval_loss", "upload_bytes", "download_bytes"):
            assert key in r
        assert r["upload_bytes"] > 0 and r["download_bytes"] > 0
    assert (out / "eval_loss_vs_mb.png").stat().st_size > 0


def test_bytes_are_the_encoded_messages(tiny_run):
    trainer, out = tiny_run
    history = json.loads((out / "history.json").read_text())
    n_params = sum(v.numel() for v in trainer.global_state.values())
    # FedAvg: each of the 2 clients uploads A and B in fp32, and receives them back: 4 bytes a value plus one
    # container header (names, shapes, offsets) per message.
    values = 2 * 4 * n_params
    for r in history[1:]:
        assert 0 < r["upload_bytes"] - values < 2 * 16 * 1024
        assert 0 < r["download_bytes"] - values < 2 * 16 * 1024


def test_saved_adapter_reloads_identically_with_plain_peft(tiny_run):
    from peft import PeftModel, get_peft_model_state_dict

    from fedsrd.models import build_tiny_llama

    trainer, out = tiny_run
    for folder in ("final", "round_0002"):
        model = PeftModel.from_pretrained(build_tiny_llama(seed=0), str(out / folder))
        loaded = get_peft_model_state_dict(model)
        assert set(loaded) == set(trainer.global_state)
        for k, v in loaded.items():
            assert torch.equal(v.float(), trainer.global_state[k]), k
    assert (out / "round_0001").is_dir()
    card = (out / "final" / "README.md").read_text()  # the run's card, not PEFT's empty template
    assert "algorithm **fedavg**" in card and "`fedavg` has no options of its own." in card
    assert "[More Information Needed]" not in card and str(out) not in card


def test_same_seed_same_bits(tiny_run, tmp_path):
    from fedsrd import wire
    from fedsrd.cli import run_train

    trainer, _ = tiny_run
    again = run_train(
        ["--config", str(TINY), "--output_dir", str(tmp_path), "--disable_tqdm", "true", "--eval_every", "0"]
    )
    assert wire.state_digest(again.global_state) == wire.state_digest(trainer.global_state)
