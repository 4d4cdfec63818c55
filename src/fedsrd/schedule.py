"""The learning rate across rounds: one rate per round for the whole federation, constant within the round.

`transformers.TrainingArguments`' own schedule (linear decay by default) runs inside each local phase, and every
local phase is a fresh `Trainer.train`, so it decays to zero and restarts every round (over a 10-step round the mean
rate is 0.55 of the nominal one). `FedSRDConfig.round_lr_scheduler` replaces it with a schedule over rounds, as
OpenFedLLM's `cosine_learning_rate` does: round t (1-based) of T trains at

    constant:  lr_t = lr
    linear:    lr_t = lr_min + (lr - lr_min) * (1 - (t - 1) / T)
    cosine:    lr_t = lr_min + (lr - lr_min) * (1 + cos(pi * (t - 1) / T)) / 2

with lr = `TrainingArguments.learning_rate` and lr_min = `FedSRDConfig.round_lr_min`. The first round trains at lr;
the last at lr_min + (lr - lr_min) / T (linear) or just above lr_min (cosine), never at lr_min itself, exactly as
OpenFedLLM counts its rounds from 0. Every party computes the same rate from (config, lr, round), so nothing about
it travels on the wire.
"""

from __future__ import annotations

import math
import warnings

ROUND_LR_SCHEDULERS = ("constant", "linear", "cosine")


def round_learning_rate(
    schedule: str | None, learning_rate: float, round: int, num_rounds: int, min_learning_rate: float = 0.0
) -> float:
    """The rate of `round` (1-based) of `num_rounds`; `schedule` None: `learning_rate` (TrainingArguments' own
    schedule then runs within the round, starting from it)."""
    if not 1 <= round <= num_rounds:
        raise ValueError(f"round must be in [1, num_rounds={num_rounds}], got {round}.")
    if schedule is None or schedule == "constant":
        return float(learning_rate)
    progress = (round - 1) / num_rounds
    if schedule == "linear":
        return min_learning_rate + (learning_rate - min_learning_rate) * (1.0 - progress)
    if schedule == "cosine":
        return min_learning_rate + 0.5 * (learning_rate - min_learning_rate) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"round_lr_scheduler must be one of {ROUND_LR_SCHEDULERS} or None, got {schedule!r}.")


def check_round_schedule(fed_config, args) -> None:
    """Raise ValueError, before any training, if the round schedule conflicts with `args` (TrainingArguments); warn
    (once per process) when TrainingArguments' linear decay restarts every round."""
    schedule = fed_config.round_lr_scheduler
    scheduler_type = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if schedule is None:
        if scheduler_type == "linear" and fed_config.local_steps > 1:
            warnings.warn(
                "TrainingArguments.lr_scheduler_type='linear' decays the learning rate to zero within every round's "
                "local phase and restarts it the next round; set FedSRDConfig.round_lr_scheduler ('constant', "
                "'linear' or 'cosine') for one rate per round across the federation.",
                UserWarning,
                stacklevel=2,
            )
        return
    if args.warmup_steps or getattr(args, "warmup_ratio", 0):
        raise ValueError(
            f"FedSRDConfig.round_lr_scheduler={schedule!r} keeps the rate constant within each round, so "
            f"TrainingArguments.warmup_steps / warmup_ratio must be 0, got {args.warmup_steps} / "
            f"{getattr(args, 'warmup_ratio', 0)}."
        )
    if fed_config.round_lr_min > args.learning_rate:
        raise ValueError(
            f"FedSRDConfig.round_lr_min ({fed_config.round_lr_min}) must not exceed TrainingArguments.learning_rate "
            f"({args.learning_rate})."
        )
