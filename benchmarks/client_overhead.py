"""The client's encode step as a fraction of its local training time, FedSRD on Gemma-3-270M.

Per client and round, the same calls as the simulation's round (`fedsrd.federation.client_phase.client_phase`), timed
apart:

* ``train``: the local phase, `FederatedTrainer.local_train` (Trainer's loop for ``--local-steps`` steps, its set-up
  included);
* ``encode``: what the client does after training to produce its upload: read the adapter (`trainer.local_state`),
  then `FederatedClient.make_update` (FedSRD's importance sparsification, `Algorithm.client_update`, plus the wire
  encoding). ``sparsify`` is `client_update` alone, timed again on the same input for the split;
* ``receive``: decoding and applying the round's broadcast (digest check included), once per round.

Rounds alternate B-rounds and A-rounds of FedSRD, with the real server step in between, so the factors evolve as in a
run. One client per domain (default: code, medical, finance, math, from ``--data``). ``encode_fraction`` is the median
over clients and rounds of encode / train.

    python benchmarks/client_overhead.py --data data/ [--rounds 2] [--local-steps 5] [--json]

Prints a table; with --json the last line is one JSON object, ``{"encode_fraction": .., ...}``.
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

TARGET = 0.03


def main(argv: list[str] | None = None) -> dict:
    return run_quietly(measure, report, argv)


def measure(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--domains", nargs="+", default=["code", "medical", "finance", "math"])
    p.add_argument("--algorithm", default="fedsrd")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=5)
    add_run_arguments(p)
    a = p.parse_args(argv)

    from transformers import TrainingArguments

    from fedsrd import FedSRDConfig
    from fedsrd.client import FederatedClient
    from fedsrd.ops import generator_for
    from fedsrd.server import FederatedServer
    from fedsrd.trainer import FederatedTrainer

    model, tokenizer = load_model(a.model)
    clients = [domain_data(a.data, d, tokenizer, a.max_length)[1] for d in a.domains]
    cfg = FedSRDConfig(
        algorithm=a.algorithm, num_rounds=a.rounds, num_clients=len(clients), local_steps=a.local_steps,
        lora_r=a.lora_r, lora_alpha=2 * a.lora_r, lora_target_modules=a.targets, fed_seed=42,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="fedsrd-overhead-"), per_device_train_batch_size=a.batch_size,
        learning_rate=5e-4, lr_scheduler_type="constant", report_to="none", use_cpu=True, disable_tqdm=True,
        logging_steps=1000, save_strategy="no", seed=42,
    )  # fmt: skip
    trainer = FederatedTrainer(model=model, args=args, fed_config=cfg, client_datasets=clients,
                               processing_class=tokenizer, max_length=a.max_length)  # fmt: skip
    server = FederatedServer(trainer.algorithm, trainer.global_state, cfg)
    view = FederatedClient(trainer.algorithm, dict(trainer.global_state), cfg)
    rows = []
    receive_s = []
    for round in range(1, a.rounds + 1):
        updates = []
        for cid in range(len(clients)):
            trainer.global_state = view.state
            trainer.load_global_state(view.start_state(cid))
            t0 = time.perf_counter()
            output = trainer.local_train(cid, round)
            t1 = time.perf_counter()
            local_state = trainer.local_state()
            update = view.make_update(local_state, round=round, client_id=cid, num_samples=len(clients[cid]),
                                      metrics={"train_loss": float(output.training_loss)})  # fmt: skip
            t2 = time.perf_counter()
            rng = generator_for(cfg.seed, "client_update", round, cid)
            t3 = time.perf_counter()
            trainer.algorithm.client_update(view.state, local_state, round, rng)
            sparsify = time.perf_counter() - t3
            rows.append({"round": round, "client": a.domains[cid], "train_s": t1 - t0, "encode_s": t2 - t1,
                         "sparsify_s": sparsify, "upload_mb": len(update) / 2**20,
                         "fraction": (t2 - t1) / (t1 - t0)})  # fmt: skip
            view.keep_personal(cid, local_state)
            updates.append(update)
        result = server.step(round, updates)
        t0 = time.perf_counter()
        view.receive(result.broadcast)
        receive_s.append(time.perf_counter() - t0)
    return a, (rows, receive_s)


def report(a: argparse.Namespace, measured: tuple[list[dict], list[float]]) -> dict:
    rows, receive_s = measured
    print(
        f"\n{a.algorithm} on {a.model}, LoRA r={a.lora_r} on {','.join(a.targets)}, {a.local_steps} "
        f"local steps of batch {a.batch_size} (max_length {a.max_length}) per client and round; times in seconds.\n"
    )
    print("| round | client | local training s | encode s | of which sparsify s | encode / training | upload MB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['round']} | {r['client']} | {r['train_s']:.2f} | {r['encode_s']:.3f} | {r['sparsify_s']:.3f} | "
              f"{100 * r['fraction']:.2f}% | {r['upload_mb']:.3f} |")  # fmt: skip
    result = {
        "encode_fraction": median([r["fraction"] for r in rows]),
        "encode_fraction_max": max(r["fraction"] for r in rows),
        "encode_s": median([r["encode_s"] for r in rows]),
        "sparsify_s": median([r["sparsify_s"] for r in rows]),
        "train_s": median([r["train_s"] for r in rows]),
        "receive_s": median(receive_s),
        "receive_fraction": median(receive_s) / median([r["train_s"] for r in rows]),
        "samples": len(rows),
        "target": TARGET,
    }
    verdict = "meets" if result["encode_fraction"] < TARGET else "misses"
    print(
        f"\nmedian encode / local training: {100 * result['encode_fraction']:.2f}% "
        f"(max {100 * result['encode_fraction_max']:.2f}%) "
        f"over {len(rows)} client-rounds: {verdict} the {100 * TARGET:.0f}% target. Receiving a broadcast: "
        f"{result['receive_s']:.3f} s ({100 * result['receive_fraction']:.2f}% of a local phase)."
    )
    if a.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
