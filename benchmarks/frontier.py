"""The accuracy-for-bytes frontier with error bars: methods x seeds on Gemma-3-270M and four real domains.

Every method runs with the same settings as one run of the main job per (method, seed) (`accuracy_vs_bytes.run_args`,
in its own process): one client per domain, every client in every round, constant learning rate, the global adapter's
completion-only held-out loss at round 0, every ``--eval-every`` rounds and after the last. Runs with the same seed
are paired (the seed sets the LoRA initialisation, the data order and every random mask).

Statistics, per method and evaluated round: the mean held-out loss over seeds, and the paired difference to
FedAvg-LoRA (same seed) with its 95% t-interval over seeds. Reported at equal rounds and at equal bytes (FedAvg-LoRA's
loss curve interpolated at the cumulative MB per client that the method has used).

Resumable and reviewable: each finished (method, seed) run stores its ``history.json`` and settings under
``benchmarks/results/frontier/<method>/seed<N>/`` (commit them); a later call reuses a run whose settings match. An
interrupted run resumes from its round checkpoint (``--resume``) under ``--out``. ``--report-only`` reads the stored
results and trains nothing.

    python benchmarks/prepare_data.py --out data/                     # the four domains, once (needs the network)
    python benchmarks/frontier.py --data data/                        # the documented sweep (hours on 2 CPU cores)
    python benchmarks/frontier.py --report-only --json                # read the committed results, train nothing
    python benchmarks/frontier.py --data data/ --methods fedavg fedsrd_ef --seeds 1
    python benchmarks/frontier.py --data data/ --methods fedavg@early   # FedAvg-LoRA's rounds 1-3, each evaluated

The method ``fedavg@early`` is FedAvg-LoRA for ``--early-rounds`` rounds evaluated after every round; its evaluations
fill the main FedAvg runs' unevaluated early rounds (same seed; merged only if the train losses show the same
trajectory), so a method at a few percent of FedAvg's bytes is compared at equal bytes with FedAvg after its first
round rather than with a line between rounds 0 and 3.

With --json the last line is one JSON object: ``{"rounds", "seeds", "methods": {name: {"final_loss_mean",
"diff_vs_fedavg", "ci95", "mb_per_client_per_round", "bytes_vs_fedavg", "seeds_done", "rounds_done", ...}}}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_vs_bytes as avb  # noqa: E402  (the main job's arguments, method names and labels)

REPO = avb.REPO
RESULTS = REPO / "benchmarks" / "results" / "frontier"
REFERENCE = "fedavg"
# The error-feedback variant at 4.6% of FedAvg-LoRA's bytes diverged in its first run (docs/fedsrd.md), so the
# default sweep is the paper's method against FedAvg-LoRA; the ablations below say where FedSRD loses.
EF = "fedsrd_ef+value_dtype=bfloat16+upload_sparsity_alpha=0.88+download_drop=0.9+ef_download_selection=magnitude"
METHODS = ["fedavg", "fedsrd"]
# FedAvg-LoRA's first rounds evaluated every round (a short run of the reference, same seed, ``--early-rounds``
# rounds): a method at ~10% of FedAvg's bytes is compared, at equal bytes, with FedAvg after about one round, which
# the main runs (evaluated every 3 rounds) only give by interpolating between rounds 0 and 3.
EARLY = f"{REFERENCE}@early"
ABLATIONS = ["fedsrd+download_drop=0", "fedsrd+upload_sparsity_alpha=0+upload_sparsity_coeff=0",
             "fedsrd_e", "fedsrd+value_dtype=bfloat16"]  # fmt: skip
RESULT_FILES = ("history.json", "settings.json")


# ---- statistics ------------------------------------------------------------------------------------------------------
def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (scipy)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def paired_interval(diffs: list[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean of paired differences and its 95% t-interval over seeds (None with fewer than two pairs)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """Piecewise-linear y(x) through the points (xs increasing); None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def curve(history: list[dict]) -> list[tuple[int, float, float]]:
    """(round, cumulative MB per client, mean held-out loss) of every evaluated round, round 0 first."""
    points, mb = [], 0.0
    for record in history:
        if record.get("round", 0) >= 1:
            mb += record.get("upload_mb_per_client", 0.0) + record.get("download_mb_per_client", 0.0)
        if "eval_loss" in record:
            points.append((int(record["round"]), mb, float(record["eval_loss"])))
    return points


def mb_per_round(history: list[dict]) -> float:
    rounds = [r for r in history if r.get("round", 0) >= 1]
    return sum(r["upload_mb_per_client"] + r["download_mb_per_client"] for r in rounds) / max(len(rounds), 1)


def with_round_zero(runs: dict[str, dict[int, list[dict]]]) -> dict[str, dict[int, list[dict]]]:
    """Every history with a round-0 evaluation: the base model's loss, measured once (in the reference's runs).

    At round 0 every LoRA method's adapter has B = 0, so the model is the base model whatever the method and seed:
    one measurement serves all runs, and the other runs skip it (``--eval_at_start false``).
    """
    base = next((h[0] for by_seed in runs.values() for h in by_seed.values()
                 if h and h[0].get("round") == 0 and "eval_loss" in h[0]), None)  # fmt: skip
    if base is None:
        return runs
    return {method: {seed: h if (h and h[0].get("round") == 0) else [base, *h] for seed, h in by_seed.items()}
            for method, by_seed in runs.items()}  # fmt: skip


def with_early_rounds(runs: dict[str, dict[int, list[dict]]], reference: str = REFERENCE) -> dict:
    """The reference's histories with the evaluations of its early run (`EARLY`, same seed) merged into the rounds
    the main run did not evaluate, and `EARLY` itself removed.

    Merged only where the two runs trained the same trajectory: every round the early run has must carry the same
    train loss as the main run's (the same seed and settings give the same bits; a mismatch means other settings or
    code, and the early run is ignored with a warning).
    """
    early = runs.get(EARLY, {})
    out = {m: by_seed for m, by_seed in runs.items() if m != EARLY}
    if not early or reference not in out:
        return out
    merged = dict(out[reference])
    for seed, early_history in early.items():
        main = merged.get(seed)
        if main is None:
            continue
        by_round = {r.get("round"): r for r in main}
        trained = [r for r in early_history if r.get("round", 0) >= 1]
        if not trained or any(by_round.get(r["round"], {}).get("train_loss") != r.get("train_loss") for r in trained):
            print(f"warning: {EARLY} seed {seed} did not train the same trajectory as {reference} seed {seed}; "
                  "ignored", file=sys.stderr)  # fmt: skip
            continue
        evals = {r["round"]: {k: v for k, v in r.items() if k.startswith("eval_")} for r in trained if "eval_loss" in r}
        merged[seed] = [{**r, **evals[r.get("round")]} if r.get("round") in evals and "eval_loss" not in r else r
                        for r in main]  # fmt: skip
    out[reference] = merged
    return out


def analyse(runs: dict[str, dict[int, list[dict]]], reference: str = REFERENCE) -> dict:
    """Per method: loss per evaluated round (mean over seeds), paired differences to the reference with 95%
    intervals at equal rounds and at equal bytes, and the bytes. `runs`: method -> seed -> history."""
    runs = with_round_zero(with_early_rounds(runs, reference))
    ref_curves = {seed: curve(h) for seed, h in runs.get(reference, {}).items()}
    out: dict[str, dict] = {}
    for method, by_seed in runs.items():
        points = {seed: {rnd: (mb, loss) for rnd, mb, loss in curve(h)} for seed, h in by_seed.items()}
        per_round = []
        for rnd in sorted({rnd for p in points.values() for rnd in p}):
            at = {seed: p[rnd] for seed, p in points.items() if rnd in p}  # seed -> (MB, loss)
            losses = [loss for _, loss in at.values()]
            entry = {"round": rnd, "seeds": sorted(at), "loss_mean": _mean(losses),
                     "cumulative_mb": _mean([mb for mb, _ in at.values()])}  # fmt: skip
            if len(losses) >= 2:
                entry["loss_ci95"] = _interval_of(losses)
            diffs_round, diffs_bytes = [], []
            for seed, (mb, loss) in at.items():
                ref = ref_curves.get(seed, [])
                ref_loss = {r: y for r, _, y in ref}
                if rnd in ref_loss:
                    diffs_round.append(loss - ref_loss[rnd])
                at_bytes = interpolate([x for _, x, _ in ref], [y for _, _, y in ref], mb)
                if at_bytes is not None:
                    diffs_bytes.append(loss - at_bytes)
            if diffs_round:
                entry["pairs"] = len(diffs_round)  # seeds with the reference at this round: the interval's n
                entry["diff_equal_rounds"], entry["ci95_equal_rounds"] = paired_interval(diffs_round)
            if diffs_bytes:
                entry["diff_equal_bytes"], entry["ci95_equal_bytes"] = paired_interval(diffs_bytes)
            per_round.append(entry)
        out[method] = {
            "curve": per_round,
            "mb_per_client_per_round": _mean([mb_per_round(h) for h in by_seed.values()]),
            "seeds_done": sorted(by_seed),
            "rounds_done": max(rnd for p in points.values() for rnd in p),
        }
    ref_mb = out.get(reference, {}).get("mb_per_client_per_round")
    for result in out.values():
        result["bytes_vs_fedavg"] = result["mb_per_client_per_round"] / ref_mb if ref_mb else None
    return out


def _interval_of(values: list[float]) -> tuple[float, float]:
    mean, ci = paired_interval(values)
    return ci if ci is not None else (mean, mean)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ---- runs ------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="Directory with one folder per domain (train.jsonl, dev.jsonl).")
    p.add_argument("--domains", nargs="+", default=avb.DOMAINS)
    p.add_argument("--methods", nargs="+", default=METHODS, help=f"NAME or NAME+option=value (ablations: {ABLATIONS})")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-size", type=int, default=64, help="Dev rows per domain (0: all).")
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--early-rounds", type=int, default=3,
                   help=f"Rounds of the method '{EARLY}': the reference evaluated every round (equal-bytes detail).")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--value-dtype", default="float32")
    p.add_argument("--results", default=str(RESULTS), help="Where finished runs' small results are stored (commit).")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "frontier"), help="Working dirs (checkpoints).")
    p.add_argument("--report-only", action="store_true", help="Read stored results; train nothing.")
    p.add_argument("--seconds-per-round", type=float, default=165.0,
                   help="For the printed cost estimate (measured here: 32-36 min per 12-round run incl. evaluation, "
                        "single-threaded, two runs sharing 2 cores).")  # fmt: skip
    p.add_argument("--plot-dir", default=None, help="Write frontier_loss_vs_mb.png and frontier_loss_vs_round.png.")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not a.report_only:
        if a.data is None:
            p.error("--data is required unless --report-only (e.g. --data data/ from benchmarks/prepare_data.py)")
        missing = [d for d in a.domains if not (Path(a.data) / d).is_dir()]
        if missing:
            p.error(f"--data {a.data}: no folder for domain(s) {missing}; expected <data>/<domain>/train.jsonl")
    return a


def run_dir(root: str | Path, method: str, seed: int) -> Path:
    return Path(root) / method.replace("+", "__").replace("=", "-") / f"seed{seed}"


def _job_args(a: argparse.Namespace, method: str, seed: int, out: Path) -> list[str]:
    """The main job's arguments for (method, seed); `EARLY` is the reference for ``--early-rounds`` rounds,
    evaluated every round (the base model's round 0 comes from the reference's main run)."""
    if method == EARLY:
        ns = argparse.Namespace(**{**vars(a), "seed": seed, "rounds": a.early_rounds})
        args = avb.run_args(ns, REFERENCE, out, first=False)
        args[args.index("--eval_every") + 1] = "1"
        return args
    ns = argparse.Namespace(**{**vars(a), "seed": seed})
    args = avb.run_args(ns, method, out, first=method == REFERENCE)
    args[args.index("--eval_every") + 1] = str(a.eval_every)
    return args


def settings_of(a: argparse.Namespace, method: str, seed: int) -> dict:
    """What must match for a stored run to be reused: every argument of the main job but paths and flags."""
    args = _job_args(a, method, seed, Path("OUT"))
    data_at = args.index("--data")
    args[data_at + 1 : data_at + 1 + len(a.domains)] = [f"<data>/{d}" for d in a.domains]
    return {"method": method, "seed": seed, "args": args}


def main_job_args(a: argparse.Namespace, method: str, seed: int, out: Path) -> list[str]:
    args = _job_args(a, method, seed, out)
    args[args.index("--checkpoint") + 1] = "true"
    return [*args, "--resume", "true"]


def stored(a: argparse.Namespace, method: str, seed: int) -> list[dict] | None:
    """The stored history of a finished run with these settings, or None."""
    d = run_dir(a.results, method, seed)
    if not all((d / f).exists() for f in RESULT_FILES):
        return None
    if not a.report_only and json.loads((d / "settings.json").read_text()) != settings_of(a, method, seed):
        return None
    return json.loads((d / "history.json").read_text())


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip


def run_main_job(cmd: list[str], out: Path, what: str, env: dict | None = None) -> list[dict]:
    """Run one main job (`cmd`, its own process, log appended to out/train.log); its history.json."""
    env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    print(f"[{time.strftime('%H:%M:%S')}] {what}: --output_dir {out}", file=sys.stderr, flush=True)
    with (out / "train.log").open("a") as fh:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{what}: the run failed (exit {code}); see {out / 'train.log'}")
    return json.loads((out / "history.json").read_text())


def run_and_store(a: argparse.Namespace, method: str, seed: int, settings: dict, train) -> list[dict]:
    """Train one (method, seed) in its working dir and store its small result (history + settings) under
    ``a.results``. A working dir holding another settings' checkpoint is cleared first, so only a run of the same
    settings is resumed. `train(out)` returns the history."""
    out = run_dir(a.out, method, seed).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) != settings:
        shutil.rmtree(out)  # a checkpoint of other settings must not be resumed
        out.mkdir(parents=True)
    stamp.write_text(json.dumps(settings, indent=1))
    history = train(out)
    keep = run_dir(a.results, method, seed)
    keep.mkdir(parents=True, exist_ok=True)
    (keep / "history.json").write_text(json.dumps(history, indent=1))
    (keep / "settings.json").write_text(json.dumps(settings, indent=1))
    return history


def run_one(a: argparse.Namespace, method: str, seed: int) -> list[dict]:
    def train(out: Path) -> list[dict]:
        cmd = [sys.executable, str(avb.FED_TRAIN), *main_job_args(a, method, seed, out)]
        return run_main_job(cmd, out, f"{method} seed {seed}")

    return run_and_store(a, method, seed, settings_of(a, method, seed), train)


def load_all_stored(a: argparse.Namespace) -> dict[str, dict[int, list[dict]]]:
    runs: dict[str, dict[int, list[dict]]] = {}
    root = Path(a.results)
    for method in a.methods:
        for seed in a.seeds:
            history = stored(a, method, seed)
            if history is not None:
                runs.setdefault(method, {})[seed] = history
    if a.report_only and root.is_dir():  # everything stored, also methods not named
        for settings_file in sorted(root.glob("*/seed*/settings.json")):
            s = json.loads(settings_file.read_text())
            if s["seed"] in a.seeds and s["method"] not in runs:
                runs[s["method"]] = {}
            if s["seed"] in a.seeds and s["seed"] not in runs[s["method"]]:
                runs[s["method"]][s["seed"]] = json.loads((settings_file.parent / "history.json").read_text())
    return runs


# ---- report ----------------------------------------------------------------------------------------------------------
def fmt_ci(ci) -> str:
    return "-" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def fmt_diff(entry: dict, kind: str) -> str:
    if f"diff_{kind}" not in entry:
        return "-"
    return f"{entry[f'diff_{kind}']:+.4f} {fmt_ci(entry.get(f'ci95_{kind}'))}"


def table(result: dict) -> str:
    head = ["method", "seeds (paired)", "rounds", "MB/client/round", "bytes vs FedAvg", "final loss (mean)",
            "diff vs FedAvg, equal rounds [95% CI]", "diff vs FedAvg, equal bytes [95% CI]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, r in result.items():
        last = r["curve"][-1]
        share = "-" if r["bytes_vs_fedavg"] is None else f"{100 * r['bytes_vs_fedavg']:.1f}%"
        eq_r, eq_b = (fmt_diff(last, "equal_rounds"), fmt_diff(last, "equal_bytes"))
        cells = [avb.label(method), f"{len(r['seeds_done'])} ({last.get('pairs', 0)})", str(r["rounds_done"]),
                 f"{r['mb_per_client_per_round']:.3f}", share, f"{last['loss_mean']:.4f}", eq_r, eq_b]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def round_table(result: dict) -> str:
    rounds = sorted({e["round"] for r in result.values() for e in r["curve"]})
    lines = ["| method | " + " | ".join(f"round {n}" for n in rounds) + " |", "|---|" + "---:|" * len(rounds)]
    for method, r in result.items():
        by_round = {e["round"]: e for e in r["curve"]}
        cells = []
        for n in rounds:
            e = by_round.get(n)
            if e is None:
                cells.append("-")
            elif "diff_equal_rounds" in e and method != REFERENCE:
                cells.append(f"{e['loss_mean']:.4f} ({e['diff_equal_rounds']:+.4f})")
            else:
                cells.append(f"{e['loss_mean']:.4f}")
        lines.append(f"| {avb.label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, plot_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, name, xlabel in (("cumulative_mb", "frontier_loss_vs_mb.png", "cumulative MB per client (log)"),
                                ("round", "frontier_loss_vs_round.png", "round")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for method, r in result.items():
            pts = [e for e in r["curve"] if not (x_key == "cumulative_mb" and e["cumulative_mb"] <= 0)]
            xs = [e[x_key] for e in pts]
            ys = [e["loss_mean"] for e in pts]
            lo = [e.get("loss_ci95", (e["loss_mean"],) * 2)[0] for e in pts]
            hi = [e.get("loss_ci95", (e["loss_mean"],) * 2)[1] for e in pts]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{avb.label(method)} ({len(r['seeds_done'])} seeds)")
            ax.fill_between(xs, lo, hi, alpha=0.2)
        base = next((e["loss_mean"] for r in result.values() for e in r["curve"] if e["round"] == 0), None)
        if base is not None:
            ax.axhline(base, color="grey", ls="--", lw=0.8, label="base model (round 0)")
        if x_key == "cumulative_mb":
            import matplotlib.ticker

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            lo_mb = min(x for line in ax.get_lines() for x in line.get_xdata() if x > 0)
            hi_mb = max(x for line in ax.get_lines() for x in line.get_xdata())
            ax.set_xticks([t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200) if lo_mb / 2 <= t <= hi_mb * 2])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean held-out loss, 4 domains (95% CI over seeds)")
        ax.set_title("Gemma-3-270M, 4 clients (code, medical, finance, math)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        path = str(Path(plot_dir) / name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def summary_json(a: argparse.Namespace, result: dict) -> dict:
    methods = {}
    for method, r in result.items():
        last = r["curve"][-1]
        methods[method] = {
            "final_loss_mean": last["loss_mean"],
            "diff_vs_fedavg": last.get("diff_equal_rounds"),
            "ci95": list(last["ci95_equal_rounds"]) if last.get("ci95_equal_rounds") else None,
            "diff_vs_fedavg_equal_bytes": last.get("diff_equal_bytes"),
            "ci95_equal_bytes": list(last["ci95_equal_bytes"]) if last.get("ci95_equal_bytes") else None,
            "mb_per_client_per_round": r["mb_per_client_per_round"],
            "bytes_vs_fedavg": r["bytes_vs_fedavg"],
            "seeds_done": r["seeds_done"],
            "pairs": last.get("pairs", 0),
            "rounds_done": r["rounds_done"],
        }
    return {"rounds": a.rounds, "seeds": a.seeds, "methods": methods}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if not a.report_only:
        todo = [(m, s) for s in a.seeds for m in a.methods if stored(a, m, s) is None]
        per_run = a.rounds * a.seconds_per_round
        print(f"{len(todo)} run(s) to train ({len(a.methods) * len(a.seeds) - len(todo)} stored); estimated "
              f"{per_run / 60:.0f} min each at {a.seconds_per_round:.0f} s/round incl. evaluation, "
              f"{len(todo) * per_run / 3600:.1f} h in all", file=sys.stderr, flush=True)  # fmt: skip
        failed = {}
        for method, seed in todo:  # seed-major: partial sweeps stay paired
            try:
                run_one(a, method, seed)
            except RuntimeError as err:
                failed[(method, seed)] = str(err)
                print(err, file=sys.stderr, flush=True)
    runs = load_all_stored(a)
    if not runs:
        raise SystemExit(f"no stored results under {a.results}")
    result = analyse(runs)
    print(f"\nGemma-3-270M, {len(a.domains)} clients (one domain each), {a.rounds} rounds x {a.local_steps} local "
          "steps, "
          f"batch {a.batch_size}, lr {a.learning_rate:g} constant, LoRA r={a.lora_r} on {','.join(a.targets)}, "
          f"max_length {a.max_length}, held-out loss on {a.eval_size} dev rows per domain every {a.eval_every} "
          f"rounds; paired differences to FedAvg-LoRA over seeds {a.seeds}, 95% t-intervals.\n")  # fmt: skip
    print(table(result))
    print("\nMean held-out loss by round (paired difference to FedAvg-LoRA at equal rounds):\n")
    print(round_table(result))
    if a.plot_dir:
        for path in plot(result, a.plot_dir):
            print(f"\nplot: {path}")
    summary = summary_json(a, result)
    if a.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
