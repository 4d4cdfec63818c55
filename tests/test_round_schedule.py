"""FedSRDConfig.round_lr_scheduler: one learning rate per round across the federation, constant within the round."""

import json
import math
import warnings

import pytest
from transformers import TrainerCallback, TrainingArguments

from fedsrd import FedSRDConfig
from fedsrd.schedule import check_round_schedule, round_learning_rate


def rates(schedule, lr=0.5, num_rounds=4, min_lr=0.1):
    return [round_learning_rate(schedule, lr, t, num_rounds, min_lr) for t in range(1, num_rounds + 1)]


def test_constant_rate_is_the_nominal_one_every_round():
    assert rates("constant") == [0.5, 0.5, 0.5, 0.5]
    assert rates(None) == [0.5, 0.5, 0.5, 0.5]  # unset: TrainingArguments' schedule starts every round from lr


def test_linear_rates_step_down_by_a_tenth_of_the_range_per_round():
    # 0.1 + 0.4 * (1 - (t - 1) / 4)
    assert rates("linear") == pytest.approx([0.5, 0.4, 0.3, 0.2], abs=1e-15)


def test_cosine_rates_are_openfedllms():
    half = math.sqrt(2) / 2
    expected = [0.5, 0.1 + 0.2 * (1 + half), 0.3, 0.1 + 0.2 * (1 - half)]  # 0.5, 0.44142136, 0.3, 0.15857864
    assert rates("cosine") == pytest.approx(expected, abs=1e-15)
    assert rates("cosine")[1] == pytest.approx(0.44142135623730950)
    # OpenFedLLM's cosine_learning_rate(current_round, total_rounds, initial_lr, min_lr), rounds counted from 0
    openfedllm = [1e-6 + 0.5 * (2e-4 - 1e-6) * (1 + math.cos(math.pi * r / 50)) for r in range(50)]
    assert rates("cosine", lr=2e-4, num_rounds=50, min_lr=1e-6) == pytest.approx(openfedllm, rel=1e-12)


def test_rate_of_a_round_outside_the_run_is_an_error():
    with pytest.raises(ValueError, match="round must be in"):
        round_learning_rate("cosine", 0.5, 5, 4)
    with pytest.raises(ValueError, match="round must be in"):
        round_learning_rate("cosine", 0.5, 0, 4)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"round_lr_scheduler": "step"}, "round_lr_scheduler"), ({"round_lr_min": -1e-6}, "round_lr_min")],
)
def test_config_rejects_bad_round_schedules(kwargs, field):
    with pytest.raises(ValueError, match=f"FedSRDConfig.{field}"):
        FedSRDConfig(**kwargs)


def _args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def test_warmup_and_a_floor_above_the_rate_are_refused(tmp_path):
    cfg = FedSRDConfig(round_lr_scheduler="cosine")
    with pytest.raises(ValueError, match="warmup_steps"):
        check_round_schedule(cfg, _args(tmp_path, warmup_steps=2))
    with pytest.raises(ValueError, match="round_lr_min"):
        check_round_schedule(FedSRDConfig(round_lr_scheduler="linear", round_lr_min=1e-3), _args(tmp_path))


def test_warns_when_the_linear_decay_restarts_every_round(tmp_path):
    with pytest.warns(UserWarning, match="restarts it the next round"):
        check_round_schedule(FedSRDConfig(local_steps=10), _args(tmp_path))  # TrainingArguments' default: linear
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_round_schedule(FedSRDConfig(local_steps=10), _args(tmp_path, lr_scheduler_type="constant"))
        check_round_schedule(FedSRDConfig(local_steps=10, round_lr_scheduler="linear"), _args(tmp_path))
        check_round_schedule(FedSRDConfig(local_steps=1), _args(tmp_path))  # one step: nothing decays


class OptimizerRates(TrainerCallback):
    """The rate the optimizer applied at every local step, by round."""

    def __init__(self, trainer_ref):
        self.trainer_ref, self.seen = trainer_ref, {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.seen.setdefault(self.trainer_ref[0]._fed_round, []).append(optimizer.param_groups[0]["lr"])


def test_tiny_run_trains_and_records_each_rounds_rate(tmp_path):
    from fedsrd.data import load_synthetic
    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer
    from fedsrd.trainer import FederatedTrainer

    data = load_synthetic(("arithmetic", "units"), train_size=8, test_size=4, seed=0)
    args = _args(tmp_path, learning_rate=1e-3, per_device_train_batch_size=4, disable_tqdm=True)
    cfg = FedSRDConfig(
        num_clients=2,
        num_rounds=3,
        local_steps=2,
        lora_r=4,
        lora_dropout=0.0,
        save_every=0,
        round_lr_scheduler="cosine",
        round_lr_min=1e-4,
    )
    ref = []
    callback = OptimizerRates(ref)
    trainer = FederatedTrainer(
        model=build_tiny_llama(seed=0),
        args=args,
        fed_config=cfg,
        client_datasets=[d["train"] for d in data.values()],
        processing_class=build_tiny_tokenizer(),
        max_length=64,
        callbacks=[callback],
    )
    ref.append(trainer)
    trainer.train()
    expected = {
        1: 1e-3,
        2: 1e-4 + 0.45e-3 * (1 + math.cos(math.pi / 3)),
        3: 1e-4 + 0.45e-3 * (1 + math.cos(2 * math.pi / 3)),
    }
    assert expected[2] == pytest.approx(7.75e-4) and expected[3] == pytest.approx(3.25e-4)
    history = json.loads((tmp_path / "history.json").read_text())
    assert {r["round"]: r["learning_rate"] for r in history} == pytest.approx(expected)
    # constant within a round: 2 clients x 2 steps, all at the round's rate
    assert callback.seen.keys() == expected.keys()
    for round, seen in callback.seen.items():
        assert seen == pytest.approx([expected[round]] * 4), round
    assert trainer.args.learning_rate == 1e-3  # the nominal rate is restored after every local phase
