"""Held-out loss against bytes on a real model and real data: the FedSRD paper's claim, checked.

Gemma-3-270M (the embedded copy), 4 clients, one real domain each (code, medical, finance, math from the data
directory given with ``--data``, e.g. ``data/`` written by ``benchmarks/prepare_data.py``), and the same rounds, local
steps, learning rate, batch size, LoRA rank and seed for every method. Each method is one run of the main job
(`examples/fed_train.py`, in its own process, so one failing method cannot take the others down); the figures are read
from its ``history.json``:

* ``eval_loss``: completion-only cross-entropy of the global adapter after the last round on each domain's dev split
  (the first ``--eval-size`` rows), and their mean;
A method is an algorithm name, optionally with ``+option=value`` settings of the main job that apply to it alone:
``fedsrd+value_dtype=bfloat16`` is FedSRD with bfloat16 values on the wire (the compact encoding);
``fedavg+lora_r=4`` is FedAvg-LoRA at rank 4 (lora_alpha 8: every rank has the same scaling, alpha / r = 2).

* ``upload_mb`` / ``download_mb``: MB (1024^2 bytes) per client per round, the lengths of the encoded messages, averaged
  over the rounds.

    python benchmarks/accuracy_vs_bytes.py --data data/        # the documented setting (~50 min, 2 cores)
    python benchmarks/accuracy_vs_bytes.py --data data/ --algorithms fedavg fedsrd --rounds 1
    python benchmarks/accuracy_vs_bytes.py --data data/ --reuse --json   # re-read finished runs

``--reuse`` keeps a method's finished run when its settings are the same, so an interrupted benchmark goes on where it
stopped. The base model's loss (round 0, before any training) is measured once, in the first method's run.

Prints a Markdown table; with --json the last line is one JSON object keyed by algorithm name, each with ``eval_loss``
(per domain and ``mean``), ``upload_mb``, ``download_mb``, ``train_loss`` and ``seconds_per_round``; the run settings
and the base model's loss are in the table only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FED_TRAIN = REPO / "examples" / "fed_train.py"
DOMAINS = ["code", "medical", "finance", "math"]
ALGORITHMS = ["fedavg", "fedsrd", "fedsrd_e", "ffa_lora", "fed_dare", "flexlora", "fedsrd+value_dtype=bfloat16"]
LABELS = {
    "fedavg": "FedAvg-LoRA", "fedsrd": "FedSRD", "fedsrd_e": "FedSRD-e", "ffa_lora": "FFA-LoRA",
    "fed_dare": "Fed-DARE", "flexlora": "FlexLoRA", "flora": "FLoRA", "hetlora": "HetLoRA", "rolora": "RoLoRA",
    "fedsvd": "FedSVD", "fed_sb": "Fed-SB", "fedrpca": "FedRPCA",
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Directory holding one folder per domain, each with train/dev files.")
    p.add_argument("--domains", nargs="+", default=DOMAINS)
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--eval-size", type=int, default=32, help="Dev rows per domain (0: all).")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--value-dtype", default="float32", help="Wire dtype of values (float32: the papers' accounting).")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "accuracy_vs_bytes"))
    p.add_argument("--reuse", action="store_true", help="Keep finished runs with the same settings.")
    p.add_argument("--plot", default=None, help="Write a held-out loss vs MB plot (PNG) here.")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    missing = [d for d in a.domains if not (Path(a.data) / d).is_dir()]
    if missing:
        p.error(f"--data {a.data}: no folder for domain(s) {missing}; expected <data>/<domain>/train.jsonl, dev.jsonl")
    return a


def split_method(method: str) -> tuple[str, list[str]]:
    """'fedsrd+value_dtype=bfloat16' -> ('fedsrd', ['--value_dtype', 'bfloat16'])."""
    algorithm, *options = method.split("+")
    extra = []
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise SystemExit(f"--algorithms {method!r}: expected NAME or NAME+option=value[+option=value]")
        extra += [f"--{key}", value]
    return algorithm, extra


def label(method: str) -> str:
    algorithm, extra = split_method(method)
    options = ", ".join(f"{k[2:]}={v}" for k, v in zip(extra[::2], extra[1::2]))
    return LABELS.get(algorithm, algorithm) + (f" ({options})" if options else "")


def method_rank(method: str) -> int | None:
    """The uniform LoRA rank a method sets with ``+lora_r=N`` (every client at N, lora_alpha 2N), else None."""
    _, extra = split_method(method)
    options = dict(zip(extra[::2], extra[1::2]))
    if "--lora_r" not in options:
        return None
    if not options["--lora_r"].isdigit() or int(options["--lora_r"]) < 1:
        raise SystemExit(f"method {method!r}: lora_r must be a positive int, got {options['--lora_r']!r}")
    return int(options["--lora_r"])


def run_args(a: argparse.Namespace, method: str, out: Path, first: bool) -> list[str]:
    """The main job's arguments for one method: identical for every method but the algorithm (and its options).

    ``+lora_r=N`` in a method sets its rank (lora_alpha 2N, the same scaling as every other rank) in place of
    ``--lora-r``. With per-client ranks (``a.client_ranks``, the frontier's ``--client-ranks``), every method that
    does not set its own rank gets ``--client_lora_ranks``; one that does runs with every client at that rank."""
    algorithm, extra = split_method(method)
    rank = method_rank(method)
    if rank is not None:
        at = extra.index("--lora_r")
        extra = extra[:at] + extra[at + 2 :]
    client_ranks = getattr(a, "client_ranks", None) if rank is None else None
    rank = a.lora_r if rank is None else rank
    if client_ranks:
        extra = ["--client_lora_ranks", *map(str, client_ranks), *extra]
    return [
        "--model_name_or_path", a.model, "--data", *[str((Path(a.data) / d).resolve()) for d in a.domains],
        "--partition", "domain", "--train_size", "0", "--eval_size", str(a.eval_size),
        "--max_length", str(a.max_length), "--algorithm", algorithm, "--num_clients", str(len(a.domains)),
        "--num_rounds", str(a.rounds), "--local_steps", str(a.local_steps), "--learning_rate", str(a.learning_rate),
        "--lr_scheduler_type", "constant", "--per_device_train_batch_size", str(a.batch_size),
        "--per_device_eval_batch_size", "8", "--lora_r", str(rank), "--lora_alpha", str(2 * rank),
        "--lora_dropout", "0.05", "--lora_target_modules", *a.targets, "--value_dtype", a.value_dtype,
        "--seed", str(a.seed), "--eval_every", "0", "--eval_at_start", "true" if first else "false",
        "--save_every", "0", "--checkpoint", "false", "--output_dir", str(out), "--report_to", "none",
        "--use_cpu", "true", "--disable_tqdm", "true", "--logging_steps", "1000",
        "--adaptive_clip", "off", *extra,  # methods compared as the papers define them (a method may override)
    ]  # fmt: skip


def run_method(a: argparse.Namespace, algorithm: str, first: bool) -> list[dict]:
    out = Path(a.out).resolve() / algorithm.replace("+", "__").replace("=", "-")
    settings = run_args(a, algorithm, out, first=False)  # what must match for --reuse (not the round-0 flag)
    stamp = out / "bench_settings.json"
    history_file = out / "history.json"
    if a.reuse and history_file.exists() and stamp.exists() and json.loads(stamp.read_text()) == settings:
        history = json.loads(history_file.read_text())
        if history and history[-1].get("round") == a.rounds:
            return history
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    cmd = [sys.executable, str(FED_TRAIN), *run_args(a, algorithm, out, first)]
    print(f"[{time.strftime('%H:%M:%S')}] {algorithm}: {' '.join(cmd[1:3])} ... --output_dir {out}", file=sys.stderr)
    log = out / "train.log"
    with log.open("w") as fh:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{algorithm}: the run failed (exit {code}); see {log}")
    stamp.write_text(json.dumps(settings))
    return json.loads(history_file.read_text())


def summarize(history: list[dict], domains: list[str]) -> dict:
    rounds = [r for r in history if r.get("round", 0) >= 1]
    last = rounds[-1]
    loss = {d: last[f"eval_{d}_loss"] for d in domains}
    loss["mean"] = last["eval_loss"]
    return {
        "eval_loss": loss,
        "upload_mb": sum(r["upload_mb_per_client"] for r in rounds) / len(rounds),
        "download_mb": sum(r["download_mb_per_client"] for r in rounds) / len(rounds),
        "train_loss": last["train_loss"],
        "seconds_per_round": sum(r["seconds"] for r in rounds) / len(rounds),
    }


def base_loss(histories: dict[str, list[dict]], domains: list[str]) -> dict | None:
    for history in histories.values():
        if history and history[0].get("round") == 0 and "eval_loss" in history[0]:
            return {**{d: history[0][f"eval_{d}_loss"] for d in domains}, "mean": history[0]["eval_loss"]}
    return None


def table(results: dict[str, dict], base: dict | None, domains: list[str]) -> str:
    ref = results.get("fedavg")
    head = ["method", *[f"{d} loss" for d in domains], "mean loss", "up MB", "down MB", "MB vs FedAvg", "s/round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    if base is not None:
        lines.append("| base model (round 0) | " + " | ".join(f"{base[d]:.4f}" for d in [*domains, "mean"])
                     + " | 0 | 0 | - | - |")  # fmt: skip
    for name, r in results.items():
        total = r["upload_mb"] + r["download_mb"]
        share = f"{100 * total / (ref['upload_mb'] + ref['download_mb']):.1f}%" if ref else "-"
        cells = [label(name), *(f"{r['eval_loss'][d]:.4f}" for d in [*domains, "mean"]),
                 f"{r['upload_mb']:.3f}", f"{r['download_mb']:.3f}", share,
                 f"{r['seconds_per_round']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(results.items()):
        total = r["upload_mb"] + r["download_mb"]
        ax.scatter(total, r["eval_loss"]["mean"])
        text = label(name).replace("value_dtype=bfloat16", "bf16 values")
        ax.annotate(text, (total, r["eval_loss"]["mean"]), textcoords="offset points", fontsize=8,
                    xytext=(5, -11 if i % 2 else 4))  # alternate below/above: close points stay readable
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([0.25, 0.5, 1, 2, 4, 8])
    ax.set_xlabel("MB per client per round (up + down, log scale)")
    ax.set_ylabel("mean held-out loss (4 domains)")
    ax.set_title("Gemma-3-270M, 4 clients, one real domain each")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    histories: dict[str, list[dict]] = {}
    failed: dict[str, str] = {}
    for i, algorithm in enumerate(a.algorithms):
        try:
            histories[algorithm] = run_method(a, algorithm, first=i == 0)
        except RuntimeError as err:
            failed[algorithm] = str(err)
            print(f"{algorithm}: {err}", file=sys.stderr)
    results = {name: summarize(h, a.domains) for name, h in histories.items()}
    base = base_loss(histories, a.domains)
    print(
        f"\nGemma-3-270M ({a.model}), {len(a.domains)} clients (one domain each: {', '.join(a.domains)}), "
        f"{a.rounds} rounds x {a.local_steps} local steps, batch {a.batch_size}, lr {a.learning_rate:g} (constant), "
        f"LoRA r={a.lora_r} on {','.join(a.targets)}, max_length {a.max_length}, {a.value_dtype} values, "
        f"seed {a.seed}; held-out loss on the first {a.eval_size or 'all'} dev rows per domain after the last round; "
        f"MB per client per round.\n"
    )
    print(table(results, base, a.domains))
    if failed:
        print(f"\nfailed: {failed}")
    if a.plot:
        plot(results, a.plot)
        print(f"\nplot: {a.plot}")
    if a.json:
        print(json.dumps(results))
    if failed:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
