"""Local training throughput: one client's local phase inside FederatedTrainer against plain Trainer + PEFT.

Same model (Gemma-3-270M, float32), same LoRA (PEFT `LoraConfig`: r, alpha, dropout, target modules), same tokenised
data (one domain's train split, completion-only labels), same collator (`DataCollatorForSeq2Seq`), optimizer
(Trainer's AdamW), learning rate, batch size and number of steps, and the same batches: the global RNG is seeded with
the value `FederatedTrainer.local_train` uses before each run, so both samplers draw the same order.

* ``plain``: `peft.get_peft_model(model, LoraConfig(...))` and `transformers.Trainer(...).train()`;
* ``federated``: `FederatedTrainer.local_train(0, round)`, the call the simulation makes per client and round, with
  ``skip_prompt_logits=False`` (the same loss computation as plain Trainer: the like-for-like comparison, and the
  headline ``ratio_vs_plain``);
* ``federated (default)``: the same with FederatedTrainer's default ``skip_prompt_logits=True`` (logits only where a
  label is, the same loss and gradients), what a user gets.

Tokens per second = non-padding input tokens seen (Trainer's ``include_num_input_tokens_seen="non_padding"``) over the
wall time of the `train()` / `local_train()` call, set-up included. The runs alternate, ``--repeats`` times each after
one warm-up run each; figures are medians.

    python benchmarks/throughput.py --data data/ [--domain math] [--steps 8] [--repeats 3] [--json]

Prints a table; with --json the last line is one JSON object, ``{"ratio_vs_plain": .., ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gemma import add_run_arguments, domain_data, load_model, median, run_quietly  # noqa: E402

TARGET = 0.95


def main(argv: list[str] | None = None) -> dict:
    return run_quietly(measure, report, argv)


def measure(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--domain", default="math")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    add_run_arguments(p)
    a = p.parse_args(argv)

    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from fedsrd import FedSRDConfig
    from fedsrd.ops import derive_seed
    from fedsrd.trainer import FederatedTrainer

    cfg = FedSRDConfig(
        algorithm="fedavg", num_rounds=1, num_clients=1, local_steps=a.steps, lora_r=a.lora_r,
        lora_alpha=2 * a.lora_r, lora_target_modules=a.targets, fed_seed=42,
    )  # fmt: skip

    def training_args() -> TrainingArguments:
        return TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="fedsrd-throughput-"), max_steps=a.steps,
            per_device_train_batch_size=a.batch_size, learning_rate=5e-4, lr_scheduler_type="constant",
            report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1000, save_strategy="no", seed=42,
            include_num_input_tokens_seen="non_padding",
        )  # fmt: skip

    plain_model, tokenizer = load_model(a.model)
    _, data = domain_data(a.data, a.domain, tokenizer, a.max_length)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    plain = Trainer(model=get_peft_model(plain_model, cfg.to_lora_config()), args=training_args(), train_dataset=data,
                    data_collator=collator, processing_class=tokenizer)  # fmt: skip
    feds = {}
    for name, skip in (("federated", False), ("federated (default)", True)):
        model, _ = load_model(a.model)
        feds[name] = FederatedTrainer(model=model, args=training_args(), fed_config=cfg, client_datasets=[data],
                                      processing_class=tokenizer, skip_prompt_logits=skip)  # fmt: skip
    start_state = dict(next(iter(feds.values())).global_state)
    round_seed = derive_seed(cfg.seed, "local", 1, 0) % (2**32)  # what local_train(0, 1) seeds with

    def run_plain() -> tuple[float, int]:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(plain.model, start_state)  # every run from the same adapter
        plain.optimizer, plain.lr_scheduler = None, None
        set_seed(round_seed)
        t0 = time.perf_counter()
        plain.train()
        return time.perf_counter() - t0, plain.state.num_input_tokens_seen

    def run_federated(trainer: FederatedTrainer) -> tuple[float, int]:
        trainer.load_global_state(start_state)
        t0 = time.perf_counter()
        trainer.local_train(0, 1)
        return time.perf_counter() - t0, trainer.state.num_input_tokens_seen

    runs = {"plain": lambda: run_plain(), **{n: (lambda t=t: run_federated(t)) for n, t in feds.items()}}
    times: dict[str, list[float]] = {n: [] for n in runs}
    tokens: dict[str, list[int]] = {n: [] for n in runs}
    for repeat in range(a.repeats + 1):  # the first round of runs is a warm-up
        for name, run in runs.items():
            seconds, seen = run()
            if repeat:
                times[name].append(seconds)
                tokens[name].append(seen)
    return a, (times, tokens)


def report(a: argparse.Namespace, measured: tuple[dict[str, list[float]], dict[str, list[int]]]) -> dict:
    times, tokens = measured
    runs = list(times)
    rates = {n: median([tok / s for tok, s in zip(tokens[n], times[n])]) for n in runs}
    if len({t for n in runs for t in tokens[n]}) != 1:
        print(f"note: the runs saw different token counts: {tokens}", file=sys.stderr)

    print(
        f"\n{a.model}, LoRA r={a.lora_r} on {','.join(a.targets)}, {a.domain} train split, {a.steps} "
        f"steps of batch {a.batch_size} (max_length {a.max_length}), medians of {a.repeats} runs after a warm-up.\n"
    )
    print("| local phase | seconds | tokens | tokens/s | vs plain |")
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        print(f"| {name} | {median(times[name]):.2f} | {tokens[name][0]} | {rates[name]:.1f} | "
              f"{rates[name] / rates['plain']:.3f} |")  # fmt: skip
    result = {
        "ratio_vs_plain": rates["federated"] / rates["plain"],
        "ratio_vs_plain_default": rates["federated (default)"] / rates["plain"],
        "plain_tokens_per_s": rates["plain"],
        "federated_tokens_per_s": rates["federated"],
        "federated_default_tokens_per_s": rates["federated (default)"],
        "target": TARGET,
    }
    verdict = "meets" if result["ratio_vs_plain"] >= TARGET else "misses"
    print(f"\nFederatedTrainer / plain Trainer + PEFT (same loss computation): {result['ratio_vs_plain']:.3f}: "
          f"{verdict} the {TARGET} target; with its default completion-only logits: "
          f"{result['ratio_vs_plain_default']:.3f}.")
    if a.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
