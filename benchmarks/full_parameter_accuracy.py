"""Accuracy on SST-2 with MiniLM: FedKRSO against federated full fine-tuning, FedKSeed, Ferret, FedAvg-LoRA and FedSRD.

One run of the main job per (method, seed), each in its own process (`fedsrd train --task classification`): the
packaged all-MiniLM-L6-v2 with a new 2-class head, GLUE SST-2 (``data/sst2``, written by
``python benchmarks/prepare_data.py --out data/ --domains sst2``) split over 10 clients by Dirichlet(0.5) over
labels, 5 clients sampled per round, dev accuracy (all dev rows) at round 0 and after every round. Bytes are
`len()` of the encoded messages (`history.json`: upload + download MB per client per round), from real training.

Statistics use the frontier harness's helpers (`benchmarks/frontier.py`: `paired_interval`, `interpolate`,
`run_dir`): per method and round, the mean dev accuracy over seeds and its 95% t-interval; the paired difference to
FedFFT (same seed: same split, head initialisation and client sample) at the final round, at the best round (the
FedKRSO authors' metric) and at equal cumulative bytes. Optimizer-state memory comes from the measurement of
`benchmarks/full_parameter.py --memory` when its stored result exists.

Resumable and reviewable like the frontier: each finished (method, seed) run stores ``history.json`` and
``settings.json`` under ``benchmarks/results/full_parameter/<method>/seed<N>/`` (commit them); a later call reuses a
run whose settings match; an interrupted run resumes from its round checkpoint under ``--out``. ``--report-only``
trains nothing.

    python benchmarks/full_parameter_accuracy.py --estimate              # one short run: the cost of a full one
    python benchmarks/full_parameter_accuracy.py                         # the sweep (6 methods x 3 seeds)
    python benchmarks/full_parameter_accuracy.py --methods ferret --seeds 1   # one method, one seed
    python benchmarks/full_parameter_accuracy.py --report-only --json --plot-dir docs/img

FedAvg-LoRA and FedSRD train a LoRA adapter and the new head together, as PEFT's SEQ_CLS task does (the head is PEFT's
``modules_to_save``): the adapter through each algorithm's own round, the head dense and averaged with the round's
weights (docs/full_parameter.md, "LoRA on a classifier").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_vs_bytes import split_method  # noqa: E402  (NAME+option=value, as the frontier's methods)
from frontier import interpolate, paired_interval, run_and_store, run_dir, run_main_job  # noqa: E402  (one set of statistics for every harness)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "full_parameter"
MEMORY_RESULT = RESULTS / "memory.json"
REFERENCE = "fedfft"
METHODS = ["fedkrso", "fedfft", "fedkseed", "ferret", "fedavg", "fedsrd"]
RESULT_FILES = ("history.json", "settings.json")
LABELS = {"fedkrso": "FedKRSO (r=4, K=10, tau=10)", "fedfft": "FedFFT (full fine-tuning)", "fedkseed": "FedKSeed",
          "ferret": "Ferret (K=200)", "fedavg": "FedAvg-LoRA (r=8) + head",
          "fedsrd": "FedSRD (r=8) + head"}  # fmt: skip
# Per-method optimizer settings: FedKRSO the authors' recipe (examples/configs/sst2_minilm.yaml); FedFFT a usual
# full fine-tuning rate (the authors' 2e-4 is high for it); FedKSeed its required constant rate and no decay; Ferret
# the official script's (allen4747/Ferret scripts/ferret.sh: local SGD, momentum 0, lr 1e-4 constant, weight decay 0,
# K = 200 bases, server lr 10 without annealing on the code's raw bases, whose second moment is I/(3d): 10/3 on ours,
# whose second moment is I/d, `fedsrd.algorithms.ferret`).
METHOD_ARGS = {
    "fedkrso": ["--learning_rate", "2e-4", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
                "--weight_decay", "0.01", "--krso_rank", "4", "--krso_num_seeds", "10", "--krso_tau", "10",
                "--krso_head_bias_decay", "true"],
    "fedfft": ["--learning_rate", "5e-5", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
               "--weight_decay", "0.01"],
    "fedkseed": ["--learning_rate", "1e-5", "--lr_scheduler_type", "constant", "--weight_decay", "0",
                 "--kseed_num_seeds", "4096", "--kseed_eps", "5e-4"],
    "ferret": ["--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--weight_decay", "0",
               "--ferret_num_seeds", "200", "--ferret_server_lr", "3.3333"],
    # LoRA r=8, alpha=16 (scaling 2), dropout 0.05 on every block Linear (query, key, value and the dense layers,
    # BERT's pooler included; "all-linear" leaves the classifier out, which trains whole as modules_to_save): the
    # library's defaults, and the adapter `full_parameter.py --memory` measured. lr 5e-4 as the LoRA paper's SST-2
    # runs (Hu et al., ICLR 2022, Appendix D: RoBERTa-base, r=8), cosine with 5% warm-up and weight decay 0.01 per
    # round as FedKRSO's and FedFFT's. FedSRD with the paper's sparsity (upload alpha 0.85, download drop 0.8).
    "fedavg": ["--learning_rate", "5e-4", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
               "--weight_decay", "0.01", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
               "--lora_target_modules", "all-linear"],
    "fedsrd": ["--learning_rate", "5e-4", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
               "--weight_decay", "0.01", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
               "--lora_target_modules", "all-linear", "--upload_sparsity_alpha", "0.85", "--download_drop", "0.8"],
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO / "data" / "sst2"), help="train.jsonl + dev.jsonl (prepare_data.py)")
    p.add_argument("--methods", nargs="+", default=METHODS, type=method_name,
                   help=f"NAME or NAME+option=value (an ablation, e.g. fedkrso+learning_rate=5e-4: the option is "
                        f"added after the method's settings, so it wins); NAME one of {sorted(METHOD_ARGS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--model", default="all-minilm-l6-v2", help="A sequence classifier (tests: tiny-bert).")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--clients-per-round", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration over labels.")
    p.add_argument("--local-steps", type=int, default=20, help="With tau = 10: two subspace periods per round.")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (0: torch's default).")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=0, help="Training rows (0: all).")
    p.add_argument("--results", default=str(RESULTS), help="Where finished runs' small results are stored (commit).")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "full_parameter"), help="Working dirs.")
    p.add_argument("--report-only", action="store_true", help="Read stored results; train nothing.")
    p.add_argument("--estimate", action="store_true", help="Time one 2-round run of each method; print the cost.")
    p.add_argument("--plot-dir", default=None, help="Write full_parameter_accuracy_vs_mb.png there.")
    p.add_argument("--json", action="store_true", help="Also print one JSON object as the last line.")
    a = p.parse_args(argv)
    if not a.report_only and not (Path(a.data) / "train.jsonl").is_file():
        p.error(
            f"--data {a.data}: expected train.jsonl and dev.jsonl there "
            "(`python benchmarks/prepare_data.py --out data/ --domains sst2` writes data/sst2)"
        )
    return a


# ---- runs -----------------------------------------------------------------------------------------------------------
def method_name(method: str) -> str:
    """`--methods` values: a method of METHOD_ARGS, optionally with +option=value settings."""
    try:
        name, _ = split_method(method)
    except SystemExit as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if name not in METHOD_ARGS:
        raise argparse.ArgumentTypeError(f"{method!r}: the method must be one of {sorted(METHOD_ARGS)}")
    return method


def label(method: str) -> str:
    name, extra = split_method(method)
    options = ", ".join(f"{k[2:]}={v}" for k, v in zip(extra[::2], extra[1::2]))
    return LABELS.get(name, name) + (f", {options}" if options else "")


def main_job_args(a: argparse.Namespace, method: str, seed: int, out: str, rounds: int) -> list[str]:
    """Arguments of `fedsrd train` for one (method, seed): identical for every method but its optimizer settings
    (and a variant's +option=value settings, given last so that they win)."""
    method, extra = split_method(method)
    return [
        "--task", "classification", "--model_name_or_path", a.model, "--num_labels", "2",
        "--data", str(a.data), "--train_size", str(a.train_size), "--eval_size", "0", "--max_length", str(a.max_length),
        "--partition", "dirichlet", "--dirichlet_column", "label", "--dirichlet_alpha", str(a.alpha),
        "--algorithm", method, "--num_clients", str(a.clients), "--clients_per_round", str(a.clients_per_round),
        "--num_rounds", str(rounds), "--local_steps", str(a.local_steps), "--eval_every", "1",
        "--eval_at_start", "true", "--save_every", "0", "--seed", str(seed), "--output_dir", out,
        "--per_device_train_batch_size", str(a.batch_size), "--per_device_eval_batch_size", "64",
        "--max_grad_norm", "0", "--logging_steps", "1000", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true", *METHOD_ARGS[method], *extra,
    ]  # fmt: skip


def settings_of(a: argparse.Namespace, method: str, seed: int) -> dict:
    """What must match for a stored run to be reused: every argument but the paths."""
    args = main_job_args(a, method, seed, "OUT", a.rounds)
    args[args.index("--data") + 1] = "<data>"
    return {"method": method, "seed": seed, "args": args}


def stored(a: argparse.Namespace, method: str, seed: int) -> list[dict] | None:
    d = run_dir(a.results, method, seed)
    if not all((d / f).exists() for f in RESULT_FILES):
        return None
    if not a.report_only and json.loads((d / "settings.json").read_text()) != settings_of(a, method, seed):
        return None
    return json.loads((d / "history.json").read_text())


def train(a: argparse.Namespace, method: str, seed: int, out: Path, rounds: int) -> list[dict]:
    """One run of the main job in its own process (resuming from its checkpoint); its history."""
    # on a shared CPU, fewer threads than cores avoid oversubscription (measured: 5x faster at 1 of 2)
    env = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}
    cmd = [sys.executable, "-m", "fedsrd.cli", "train", *main_job_args(a, method, seed, str(out), rounds),
           "--checkpoint", "true", "--resume", "true"]  # fmt: skip
    return run_main_job(cmd, out, f"{method} seed {seed}", env)


def run_one(a: argparse.Namespace, method: str, seed: int) -> list[dict]:
    settings = settings_of(a, method, seed)
    return run_and_store(a, method, seed, settings, lambda out: train(a, method, seed, out, a.rounds))


def estimate(a: argparse.Namespace) -> dict[str, float]:
    """Seconds per round of each method, from one fresh 2-round run (round 0's evaluation included)."""
    seconds = {}
    for method in a.methods:
        out = Path(a.out).resolve() / "estimate" / method
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        start = time.monotonic()
        train(a, method, a.seeds[0], out, 2)
        seconds[method] = (time.monotonic() - start) / 2
        print(f"{method}: {seconds[method]:.0f} s per round (2-round run incl. model load and round-0 evaluation); "
              f"a {a.rounds}-round run: about {seconds[method] * a.rounds / 60:.1f} min", flush=True)  # fmt: skip
    total = sum(seconds.values()) * a.rounds * len(a.seeds)
    print(f"sweep of {len(a.methods)} methods x {len(a.seeds)} seeds: about {total / 3600:.1f} h", flush=True)
    return seconds


def load_all_stored(a: argparse.Namespace) -> dict[str, dict[int, list[dict]]]:
    runs: dict[str, dict[int, list[dict]]] = {}
    for method in a.methods:
        for seed in a.seeds:
            history = stored(a, method, seed)
            if history is not None:
                runs.setdefault(method, {})[seed] = history
    return runs


# ---- statistics -----------------------------------------------------------------------------------------------------
def accuracy_curve(history: list[dict]) -> list[tuple[int, float, float]]:
    """(round, cumulative MB per client, dev accuracy) of every evaluated round, round 0 first."""
    points, mb = [], 0.0
    for record in history:
        if record.get("round", 0) >= 1:
            mb += record.get("upload_mb_per_client", 0.0) + record.get("download_mb_per_client", 0.0)
        if "eval_accuracy" in record:
            points.append((int(record["round"]), mb, float(record["eval_accuracy"])))
    return points


def _mean_ci(values: list[float]) -> tuple[float, tuple[float, float] | None]:
    return paired_interval(values)  # the t-interval of the values themselves


def analyse(runs: dict[str, dict[int, list[dict]]], reference: str = REFERENCE) -> dict:
    """Per method: accuracy per round (mean and 95% interval over seeds), the final and best rounds, MB per client
    per round, and the paired differences to the reference (final round, best round, equal bytes)."""
    ref_curves = {seed: accuracy_curve(h) for seed, h in runs.get(reference, {}).items()}
    out = {}
    for method, by_seed in runs.items():
        curves = {seed: accuracy_curve(h) for seed, h in by_seed.items()}
        rounds = sorted({r for c in curves.values() for r, _, _ in c})
        per_round = []
        for rnd in rounds:
            at = {s: (m, acc) for s, c in curves.items() for r, m, acc in c if r == rnd}
            mean, ci = _mean_ci([acc for _, acc in at.values()])
            per_round.append({"round": rnd, "seeds": sorted(at), "accuracy_mean": mean, "accuracy_ci95": ci,
                              "cumulative_mb": sum(m for m, _ in at.values()) / len(at)})  # fmt: skip
        final = {s: c[-1][2] for s, c in curves.items()}
        best = {s: max(acc for _, _, acc in c) for s, c in curves.items()}
        rounds_per_run = [sum(1 for r in h if r.get("round", 0) >= 1) for h in by_seed.values()]
        mb_per_round = [_per_round(h, "upload_mb_per_client", "download_mb_per_client") for h in by_seed.values()]
        upload = [_per_round(h, "upload_mb_per_client") for h in by_seed.values()]
        entry = {
            "curve": per_round,
            "seeds_done": sorted(by_seed),
            "rounds_done": min(rounds_per_run),
            "final_accuracy": _mean_ci(list(final.values())),
            "best_accuracy": _mean_ci(list(best.values())),
            "mb_per_client_per_round": sum(mb_per_round) / len(mb_per_round),
            "upload_mb_per_client_per_round": sum(upload) / len(upload),
        }
        paired = [s for s in curves if s in ref_curves]
        if method != reference and paired:
            entry["diff_final"] = paired_interval([final[s] - ref_curves[s][-1][2] for s in paired])
            entry["diff_best"] = paired_interval([best[s] - max(a for _, _, a in ref_curves[s]) for s in paired])
            at_bytes = []
            for s in paired:
                xs, ys = [m for _, m, _ in ref_curves[s]], [acc for _, _, acc in ref_curves[s]]
                ref_acc = interpolate(xs, ys, curves[s][-1][1])
                if ref_acc is not None:
                    at_bytes.append(curves[s][-1][2] - ref_acc)
            entry["diff_equal_bytes"] = paired_interval(at_bytes) if at_bytes else None
        out[method] = entry
    ref_mb = out.get(reference, {}).get("mb_per_client_per_round")
    for entry in out.values():
        entry["bytes_vs_fedfft"] = entry["mb_per_client_per_round"] / ref_mb if ref_mb else None
    return out


def _per_round(history: list[dict], *keys: str) -> float:
    rounds = [r for r in history if r.get("round", 0) >= 1]
    return sum(r.get(k, 0.0) for r in rounds for k in keys) / max(len(rounds), 1)


def stored_memory() -> dict:
    """MiniLM optimizer state per method (MB) from `full_parameter.py --memory`'s stored result, if any."""
    if not MEMORY_RESULT.is_file():
        return {}
    return json.loads(MEMORY_RESULT.read_text()).get("memory", {}).get("minilm", {})


# ---- report ---------------------------------------------------------------------------------------------------------
def _pct(mean_ci: tuple[float, tuple[float, float] | None], signed: bool = False) -> str:
    mean, ci = mean_ci
    sign = "+" if signed else ""
    text = f"{100 * mean:{sign}.1f}"
    return text if ci is None else f"{text} [{100 * ci[0]:{sign}.1f}, {100 * ci[1]:{sign}.1f}]"


def table(result: dict, memory: dict) -> str:
    head = ["method", "seeds", "rounds", "final dev acc % [95% CI]", "best dev acc %", "vs FedFFT, final (points)",
            "vs FedFFT, best", "MB/client/round (up+down)", "bytes vs FedFFT", "optimizer state MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, r in result.items():
        share = "-" if r["bytes_vs_fedfft"] is None else f"{100 * r['bytes_vs_fedfft']:.2f}%"
        opt = memory.get(split_method(method)[0], {}).get("optimizer_state_mb")
        cells = [label(method), str(len(r["seeds_done"])), str(r["rounds_done"]),
                 _pct(r["final_accuracy"]), _pct(r["best_accuracy"]),
                 _pct(r["diff_final"], True) if "diff_final" in r else "-",
                 _pct(r["diff_best"], True) if "diff_best" in r else "-",
                 f"{r['mb_per_client_per_round']:.3f}", share, "-" if opt is None else f"{opt:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def round_table(result: dict) -> str:
    rounds = sorted({e["round"] for r in result.values() for e in r["curve"]})
    lines = ["| method | " + " | ".join(str(n) for n in rounds) + " |", "|---|" + "---:|" * len(rounds)]
    for method, r in result.items():
        by_round = {e["round"]: e for e in r["curve"]}
        cells = [f"{100 * by_round[n]['accuracy_mean']:.1f}" if n in by_round else "-" for n in rounds]
        lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, plot_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, r in result.items():
        pts = [e for e in r["curve"] if e["cumulative_mb"] > 0]
        xs = [e["cumulative_mb"] for e in pts]
        ys = [100 * e["accuracy_mean"] for e in pts]
        lo = [100 * (e["accuracy_ci95"] or (e["accuracy_mean"],) * 2)[0] for e in pts]
        hi = [100 * (e["accuracy_ci95"] or (e["accuracy_mean"],) * 2)[1] for e in pts]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{label(method)} ({len(r['seeds_done'])} seeds)")
        ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB per client, up + down (log)")
    ax.set_ylabel("SST-2 dev accuracy % (mean, 95% CI over seeds)")
    ax.set_title("all-MiniLM-L6-v2, 10 clients Dirichlet(0.5), 5 per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    path = str(Path(plot_dir) / "full_parameter_accuracy_vs_mb.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def describe(a: argparse.Namespace) -> str:
    return (
        f"SST-2 ({'all' if a.train_size == 0 else a.train_size} train rows, all 200 dev rows), all-MiniLM-L6-v2 + new "
        f"2-class head, {a.clients} clients by Dirichlet({a.alpha}) over labels, {a.clients_per_round} sampled per "
        f"round, {a.rounds} rounds x {a.local_steps} local steps of batch {a.batch_size}, max_length {a.max_length}, "
        f"no gradient clipping, fp32 on CPU; seeds {a.seeds}. FedKRSO lr 2e-4 cosine (5% warm-up per round), weight "
        "decay 0.01 on the head (biases too); FedFFT lr 5e-5 cosine, weight decay 0.01; FedKSeed lr 1e-5 constant, "
        "K=4096, eps 5e-4; Ferret SGD lr 1e-4 constant, K=200, server lr 10/3 (the official script's); FedAvg-LoRA "
        "and FedSRD LoRA r=8 (alpha 16) on every block Linear plus the whole new head, lr 5e-4 cosine, weight decay "
        "0.01, FedSRD at the paper's sparsity (upload alpha 0.85, download drop 0.8). 95% "
        "t-intervals over seeds; differences to FedFFT paired by seed."
    )


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.estimate:
        return {"seconds_per_round": estimate(a)}
    if not a.report_only:
        todo = [(m, s) for s in a.seeds for m in a.methods if stored(a, m, s) is None]
        print(f"{len(todo)} run(s) to train, {len(a.methods) * len(a.seeds) - len(todo)} stored", file=sys.stderr)
        for method, seed in todo:  # seed-major: a partial sweep stays paired
            try:
                run_one(a, method, seed)
            except RuntimeError as err:
                print(err, file=sys.stderr, flush=True)
    runs = load_all_stored(a)
    if not runs:
        raise SystemExit(f"no stored results under {a.results}")
    result = analyse(runs)
    memory = stored_memory()
    print(f"\n{describe(a)}\n")
    print(table(result, memory))
    print("\nMean dev accuracy % by round (round 0: the initial model):\n")
    print(round_table(result))
    if a.plot_dir:
        print(f"\nplot: {plot(result, a.plot_dir)}")
    summary = {"config": describe(a), "methods": result, "memory": {"minilm": memory}}
    if a.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
