"""The federation core (`fedsrd.federation`): callbacks' `control` honoured, run-level events once per federation, the
one history schema. Flower's and Accelerate's side of the same checks are in test_flower.py and test_accelerate.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import TrainerCallback, TrainerControl

from fedsrd.federation import HISTORY_KEYS, SCHEMA_VERSION, FederatedCallback, RoundEvents
from fedsrd.federation.history import MB, RoundTable, history_json, round_record, start_record

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny.yaml"


class Counter(TrainerCallback):
    """Counts every event it hears (a plain TrainerCallback: no round events)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def on_train_begin(self, args, state, control, **kwargs):
        self._count("on_train_begin")

    def on_train_end(self, args, state, control, **kwargs):
        self._count("on_train_end")

    def on_step_end(self, args, state, control, **kwargs):
        self._count("on_step_end")


class StopAfter(FederatedCallback):
    """Returns a new control that stops the federation after round `stop_round` (as transformers' callbacks may)."""

    def __init__(self, stop_round: int) -> None:
        self.stop_round = stop_round
        self.rounds: list[int] = []

    def on_round_end(self, args, state, control, round=None, **kwargs):
        self.rounds.append(round)
        if round == self.stop_round:
            new = TrainerControl()
            new.should_training_stop = True
            return new
        return None


def test_a_returned_control_replaces_the_current_one_for_later_callbacks_and_the_federation():
    seen = []

    class Reader(FederatedCallback):
        def on_round_end(self, args, state, control, **kwargs):
            seen.append(control.should_training_stop)

    events = RoundEvents([StopAfter(1), Reader()], args=None)
    events.call("on_round_end", round=1)
    assert seen == [True] and events.should_stop()
    events = RoundEvents([StopAfter(2), Reader()], args=None)
    events.call("on_round_end", round=1)
    assert seen == [True, False] and not events.should_stop()


def test_round_records_have_the_schema_and_one_per_client_mb():
    record = round_record(
        round=3, clients=[0, 1, 2], accepted=[0, 1], rejected={"1": "bad"}, dropped={"2": "timed out"},
        train_loss=0.5, learning_rate=1e-3, upload_bytes=3 * MB, download_bytes=8 * MB, broadcast_bytes=2 * MB,
        num_uploads=2, cumulative_mb=20.0,
    )  # fmt: skip
    assert set(record) == HISTORY_KEYS and record["schema_version"] == SCHEMA_VERSION
    assert record["upload_mb_per_client"] == 1.5  # per update that reached the server, not per sampled client
    assert record["download_mb_per_client"] == 2.0  # the broadcast
    zero = start_record()
    assert set(zero) == HISTORY_KEYS and zero["train_loss"] is None and zero["upload_mb_per_client"] == 0.0
    assert json.loads(history_json([{**zero, "eval_loss": math.nan}]))[0]["eval_loss"] is None  # strict JSON


def test_round_zero_prints_a_dash_not_nan(capsys):
    table = RoundTable(enabled=True)
    table.add({**start_record(), "eval_loss": 1.25})
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "-" in out.splitlines()[1] and "1.2500" in out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """The tiny preset with 3 rounds; a callback stops the federation after round 2."""
    import fedsrd.trainer
    from fedsrd.cli import run_train

    out = tmp_path_factory.mktemp("stopped")
    counter, stopper = Counter(), StopAfter(2)
    original = fedsrd.trainer.FederatedTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(counter)
        self.add_callback(stopper)

    fedsrd.trainer.FederatedTrainer.__init__ = init
    try:
        trainer = run_train(
            [
                "--config",
                str(TINY),
                "--output_dir",
                str(out),
                "--num_rounds",
                "3",
                "--local_steps",
                "2",
                "--eval_size",
                "2",
                "--algorithm",
                "fedprox",
                "--fedprox_mu",
                "0.02",
                "--disable_tqdm",
                "true",
            ]
        )
    finally:
        fedsrd.trainer.FederatedTrainer.__init__ = original
    return out, trainer, counter, stopper


def test_a_callback_stops_the_simulation_after_the_current_round(stopped_run):
    out, trainer, _, stopper = stopped_run
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2] and stopper.rounds == [1, 2]
    assert [r["should_training_stop"] for r in history] == [False, False, True]
    assert (out / "final" / "adapter_model.safetensors").is_file()  # the final adapter is the stopped round's
    for record in history:
        assert set(k for k in record if not k.startswith("eval_")) == HISTORY_KEYS


def test_every_saved_folder_carries_the_runs_model_card_not_peft_template(stopped_run):
    out, _, _, _ = stopped_run
    for folder, done in (("round_0001", 1), ("round_0002", 2), ("final", 2)):
        card = (out / folder / "README.md").read_text()
        assert "[More Information Needed]" not in card and str(out) not in card and "/tmp" not in card
        assert "algorithm **fedprox**" in card and f"round {done} of 3" in card
        assert "### Options of `fedprox`" in card and "| `fedprox_mu` | 0.02 |" in card  # its options class, read
        assert "fed_dare_drop" not in card.split("<details>")[0]  # only the options fedprox reads (the JSON has all)
        assert "MB up +" in card and "| eval_loss |" in card  # bytes and held-out scores


def test_run_level_events_fire_once_per_federation_and_not_per_local_phase(stopped_run):
    _, _, counter, _ = stopped_run
    # 2 rounds x 2 clients x 2 local steps: the step events still reach callbacks
    assert counter.calls == {"on_train_begin": 1, "on_train_end": 1, "on_step_end": 8}
