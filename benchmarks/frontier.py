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

The method ``fedavg@early`` is FedAvg-LoRA for ``--early-rounds`` rounds evaluated after every round (any
``NAME@early`` likewise); its evaluations fill the main FedAvg runs' unevaluated early rounds (same seed; merged only if
the train losses show the same trajectory), so a method at a few percent of FedAvg's bytes is compared at equal bytes
with FedAvg after its first round rather than with a line between rounds 0 and 3.

Clients of different LoRA ranks (``--client-ranks 4 8 16 32``: client k, the k-th domain, trains rank r_k; the global
adapter has the largest rank unless ``--lora-r`` says otherwise): every method runs with ``--client_lora_ranks``
unless it sets its own uniform rank (``fedavg+lora_r=4``: every client at rank 4). The ranks are part of every run's
settings, and the results and working folders default to ``frontier_hetrank``. The default methods are FedSRD,
FlexLoRA, FLoRA and HetLoRA (the algorithms that take unequal ranks) and the reference, FedAvg-LoRA with every client
at the smallest rank (``fedavg+lora_r=4``: the rank every client can train, the homogeneous baseline of the HetLoRA
paper); ``--reference`` picks another (e.g. ``flexlora``). MB per client per round is the mean over the clients of
what each moved (its own upload and the part of the broadcast its rank needs, ``history.json``'s ``per_client``), and
the report adds each client's upload and download MB.

    python benchmarks/frontier.py --data data/ --client-ranks 4 8 16 32 --seeds 1      # heterogeneous ranks
    python benchmarks/frontier.py --report-only --client-ranks 4 8 16 32                # its committed results

With --json the last line is one JSON object: ``{"rounds", "seeds", "reference", "client_ranks", "methods": {name:
{"final_loss_mean", "diff_vs_reference", "ci95", "mb_per_client_per_round", "bytes_vs_reference", "per_client",
"seeds_done", "rounds_done", ...}}}`` (with the reference ``fedavg`` also ``diff_vs_fedavg`` and ``bytes_vs_fedavg``).
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
RESULTS_HETRANK = REPO / "benchmarks" / "results" / "frontier_hetrank"  # --client-ranks
REFERENCE = "fedavg"
MB = 1024**2  # the MB of every communication figure (fedsrd.wire.MB)
# The error-feedback variant at 4.6% of FedAvg-LoRA's bytes diverged in its first run (docs/fedsrd.md), so the
# default sweep is the paper's method against FedAvg-LoRA; the ablations below say where FedSRD loses.
EF = "fedsrd_ef+value_dtype=bfloat16+upload_sparsity_alpha=0.88+download_drop=0.9+ef_download_selection=magnitude"
METHODS = ["fedavg", "fedsrd"]
# FedAvg-LoRA's first rounds evaluated every round (a short run of the reference, same seed, ``--early-rounds``
# rounds): a method at ~10% of FedAvg's bytes is compared, at equal bytes, with FedAvg after about one round, which
# the main runs (evaluated every 3 rounds) only give by interpolating between rounds 0 and 3.
EARLY_SUFFIX = "@early"  # "<method>@early": that method's first --early-rounds rounds, evaluated every round
EARLY = f"{REFERENCE}{EARLY_SUFFIX}"
ABLATIONS = ["fedsrd+download_drop=0", "fedsrd+upload_sparsity_alpha=0+upload_sparsity_coeff=0",
             "fedsrd_e", "fedsrd+value_dtype=bfloat16"]  # fmt: skip
# With --client-ranks: the algorithms that take clients of different ranks (issue 19), against the reference.
HETRANK_METHODS = ["fedsrd", "flexlora", "flora", "hetlora"]
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


def client_costs(record: dict) -> dict[str, tuple[int | None, float, float]] | None:
    """Per client id: (its LoRA rank, upload MB, download MB) in this round, from ``history.json``'s ``per_client``
    (each client's encoded upload and the encoded part of the broadcast its rank needs; rank null when every client
    trains the global adapter's). None when the record has no complete per-client figures (histories written before
    them, or secure aggregation, where the server holds no single upload)."""
    per_client = record.get("per_client") or {}
    if not per_client or any(c.get("upload_bytes") is None or c.get("download_bytes") is None
                             for c in per_client.values()):  # fmt: skip
        return None
    return {cid: (c.get("rank"), c["upload_bytes"] / MB, c["download_bytes"] / MB) for cid, c in per_client.items()}


def round_mb(record: dict) -> float:
    """MB one client moved in this round (upload + download): the mean over the clients of their own figures where
    the record has them (clients of different ranks move different bytes), else ``upload_mb_per_client +
    download_mb_per_client`` (the same for every client when all train one rank)."""
    costs = client_costs(record)
    if costs:
        return _mean([up + down for _, up, down in costs.values()])
    return record.get("upload_mb_per_client", 0.0) + record.get("download_mb_per_client", 0.0)


def curve(history: list[dict]) -> list[tuple[int, float, float]]:
    """(round, cumulative MB per client, mean held-out loss) of every evaluated round, round 0 first."""
    points, mb = [], 0.0
    for record in history:
        if record.get("round", 0) >= 1:
            mb += round_mb(record)
        if "eval_loss" in record:
            points.append((int(record["round"]), mb, float(record["eval_loss"])))
    return points


def mb_per_round(history: list[dict]) -> float:
    rounds = [r for r in history if r.get("round", 0) >= 1]
    return sum(round_mb(r) for r in rounds) / max(len(rounds), 1)


def per_client_mb(by_seed: dict[int, list[dict]]) -> dict[str, dict]:
    """Per client id: its rank and its upload and download MB per round, the means over the rounds and seeds whose
    records have per-client figures (`client_costs`); empty when none has."""
    seen: dict[str, list[tuple[int | None, float, float]]] = {}
    for history in by_seed.values():
        for record in history:
            for cid, cost in ((client_costs(record) or {}) if record.get("round", 0) >= 1 else {}).items():
                seen.setdefault(cid, []).append(cost)
    return {cid: {"rank": costs[0][0], "upload_mb": _mean([c[1] for c in costs]),
                  "download_mb": _mean([c[2] for c in costs])}
            for cid, costs in sorted(seen.items(), key=lambda kv: int(kv[0]))}  # fmt: skip


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


def with_early_rounds(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """Every method's histories with the evaluations of its early run (``<method>@early``, same seed) merged into the
    rounds the main run did not evaluate, and the early runs themselves removed.

    Merged only where the two runs trained the same trajectory: every round the early run has must carry the same
    train loss as the main run's (the same seed and settings give the same bits; a mismatch means other settings or
    code, and the early run is ignored with a warning).
    """
    out = {m: by_seed for m, by_seed in runs.items() if not m.endswith(EARLY_SUFFIX)}
    for name, early in runs.items():
        method = name.removesuffix(EARLY_SUFFIX)
        if name == method or method not in out:
            continue
        merged = dict(out[method])
        for seed, early_history in early.items():
            main = merged.get(seed)
            if main is None:
                continue
            by_round = {r.get("round"): r for r in main}
            trained = [r for r in early_history if r.get("round", 0) >= 1]
            if not trained or any(by_round.get(r["round"], {}).get("train_loss") != r.get("train_loss")
                                  for r in trained):  # fmt: skip
                print(f"warning: {name} seed {seed} did not train the same trajectory as {method} seed {seed}; "
                      "ignored", file=sys.stderr)  # fmt: skip
                continue
            evals = {r["round"]: {k: v for k, v in r.items() if k.startswith("eval_")}
                     for r in trained if "eval_loss" in r}  # fmt: skip
            merged[seed] = [{**r, **evals[r.get("round")]} if r.get("round") in evals and "eval_loss" not in r else r
                            for r in main]  # fmt: skip
        out[method] = merged
    return out


def analyse(runs: dict[str, dict[int, list[dict]]], reference: str = REFERENCE) -> dict:
    """Per method: loss per evaluated round (mean over seeds), paired differences to the reference with 95%
    intervals at equal rounds and at equal bytes, and the bytes. `runs`: method -> seed -> history."""
    runs = with_round_zero(with_early_rounds(runs))
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
            "per_client": per_client_mb(by_seed),
            "seeds_done": sorted(by_seed),
            "rounds_done": max(rnd for p in points.values() for rnd in p),
        }
    ref_mb = out.get(reference, {}).get("mb_per_client_per_round")
    for result in out.values():
        result["bytes_vs_reference"] = result["mb_per_client_per_round"] / ref_mb if ref_mb else None
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
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"NAME or NAME+option=value (ablations: {ABLATIONS}); NAME@early: NAME's first --early-rounds "
                        f"rounds evaluated every round. Default: {METHODS}; with --client-ranks the reference and "
                        f"{HETRANK_METHODS}.")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-size", type=int, default=64, help="Dev rows per domain (0: all).")
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument(
        "--early-rounds",
        type=int,
        default=3,
        help=f"Rounds of a method NAME@early (e.g. '{EARLY}'): NAME evaluated every round (equal-bytes detail).",
    )
    p.add_argument("--lora-r", type=int, default=None,
                   help="LoRA rank (lora_alpha twice it). Default 8; with --client-ranks the largest client rank (the "
                        "global adapter's rank, at least every client's).")  # fmt: skip
    p.add_argument("--client-ranks", nargs="+", type=int, default=None,
                   help="One LoRA rank per client, in --domains order (e.g. 4 8 16 32): every method that does not set "
                        "its own (NAME+lora_r=N) runs with these clients' ranks. Part of every run's settings; "
                        f"default --results {RESULTS_HETRANK.relative_to(REPO)}.")  # fmt: skip
    p.add_argument("--reference", default=None,
                   help="The method paired differences and byte shares are taken against. Default: fedavg; with "
                        "--client-ranks fedavg+lora_r=<smallest rank> (FedAvg-LoRA with every client at the rank all "
                        "of them can train). Its runs also measure round 0 (the base model) for all, which is part "
                        "of their settings: train a sweep with one reference; --report-only may take any.")  # fmt: skip
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--value-dtype", default="float32")
    p.add_argument("--results", default=None,
                   help=f"Where finished runs' small results are stored (commit). Default {RESULTS.relative_to(REPO)} "
                        f"({RESULTS_HETRANK.relative_to(REPO)} with --client-ranks).")  # fmt: skip
    p.add_argument(
        "--out", default=None, help="Working dirs (checkpoints). Default outputs/bench/<the results folder's name>."
    )
    p.add_argument("--report-only", action="store_true",
                   help="Read stored results; train nothing (every stored method, or only those --methods names).")
    p.add_argument("--seconds-per-round", type=float, default=165.0,
                   help="For the printed cost estimate (measured here: 32-36 min per 12-round run incl. evaluation, "
                        "single-threaded, two runs sharing 2 cores).")  # fmt: skip
    p.add_argument("--plot-dir", default=None, help="Write <prefix>_loss_vs_mb.png and <prefix>_loss_vs_round.png.")
    p.add_argument("--plot-prefix", default=None,
                   help="The plots' file name prefix (default: the results folder's name, e.g. frontier).")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.results = a.results or str(RESULTS_HETRANK if a.client_ranks else RESULTS)
    a.out = a.out or str(REPO / "outputs" / "bench" / Path(a.results).name)
    if a.client_ranks is not None:
        check_client_ranks(p, a)
    elif a.report_only:
        a.client_ranks = stored_client_ranks(a.results)  # the stored runs' ranks, for the report's defaults
    a.lora_r = a.lora_r or (max(a.client_ranks) if a.client_ranks else 8)
    a.reference = a.reference or (f"{REFERENCE}+lora_r={min(a.client_ranks)}" if a.client_ranks else REFERENCE)
    a.methods_named = a.methods is not None  # --report-only: only these; without --methods, everything stored
    a.methods = a.methods or ([a.reference, *HETRANK_METHODS] if a.client_ranks else METHODS)
    if not a.report_only:
        if a.data is None:
            p.error("--data is required unless --report-only (e.g. --data data/ from benchmarks/prepare_data.py)")
        missing = [d for d in a.domains if not (Path(a.data) / d).is_dir()]
        if missing:
            p.error(f"--data {a.data}: no folder for domain(s) {missing}; expected <data>/<domain>/train.jsonl")
        if a.client_ranks is not None:
            check_methods_take_unequal_ranks(p, a)
    return a


def check_client_ranks(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """One positive rank per client (domain), none above --lora-r; method strings do not set their own ranks."""
    if len(a.client_ranks) != len(a.domains) or min(a.client_ranks) < 1:
        p.error(f"--client-ranks {a.client_ranks}: expected one positive rank per client, i.e. per domain "
                f"({len(a.domains)}: {a.domains})")  # fmt: skip
    if a.lora_r is not None and a.lora_r < max(a.client_ranks):
        p.error(f"--lora-r {a.lora_r}: the global adapter's rank must be at least every client's (largest of "
                f"--client-ranks: {max(a.client_ranks)})")  # fmt: skip
    for method in a.methods or []:
        if "--client_lora_ranks" in avb.split_method(method)[1][::2]:
            p.error(f"--methods {method!r}: set the clients' ranks for the whole sweep with --client-ranks (part of "
                    "every run's settings), not in a method")  # fmt: skip


def check_methods_take_unequal_ranks(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Before any run starts: every method without its own rank (NAME+lora_r=N) handles clients of different ranks
    (the main job would refuse it at configuration; here the sweep stops before hours of the others' runs)."""
    if len(set(a.client_ranks)) == 1:
        return
    from fedsrd.algorithms import get_algorithm_class, list_algorithms

    able = [n for n in list_algorithms() if get_algorithm_class(n).supports_unequal_ranks]
    for method in [*a.methods, a.reference]:
        base = method.removesuffix(EARLY_SUFFIX)
        algorithm = avb.split_method(base)[0]
        if avb.method_rank(base) is None and algorithm not in able:
            p.error(f"--methods/--reference {method!r}: {algorithm} needs every client at the same rank; with "
                    f"--client-ranks give it one ({algorithm}+lora_r={min(a.client_ranks)}) or use one of: "
                    f"{', '.join(able)}")  # fmt: skip


def stored_client_ranks(results: str | Path) -> list[int] | None:
    """The clients' ranks of the stored runs under `results` (their settings' ``--client_lora_ranks``), or None."""
    for settings_file in sorted(Path(results).glob("*/seed*/settings.json")):
        args = json.loads(settings_file.read_text()).get("args", [])
        if "--client_lora_ranks" in args:
            ranks = []
            for value in args[args.index("--client_lora_ranks") + 1 :]:
                if not value.isdigit():
                    break
                ranks.append(int(value))
            return ranks or None
    return None


def run_dir(root: str | Path, method: str, seed: int) -> Path:
    return Path(root) / method.replace("+", "__").replace("=", "-") / f"seed{seed}"


def _job_args(a: argparse.Namespace, method: str, seed: int, out: Path) -> list[str]:
    """The main job's arguments for (method, seed); ``<method>@early`` (e.g. `EARLY`) is that method for
    ``--early-rounds`` rounds, evaluated every round (the base model's round 0 comes from the reference's main run)."""
    if method.endswith(EARLY_SUFFIX):
        ns = argparse.Namespace(**{**vars(a), "seed": seed, "rounds": a.early_rounds})
        args = avb.run_args(ns, method.removesuffix(EARLY_SUFFIX), out, first=False)
        args[args.index("--eval_every") + 1] = "1"
        return args
    ns = argparse.Namespace(**{**vars(a), "seed": seed})
    args = avb.run_args(ns, method, out, first=method == a.reference)
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
    if a.report_only and not getattr(a, "methods_named", False) and root.is_dir():  # without --methods: all stored
        for settings_file in sorted(root.glob("*/seed*/settings.json")):
            s = json.loads(settings_file.read_text())
            if "dp_mode=" in s["method"]:  # private runs: their own report (--methods; run_all's privacy section)
                continue
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


def reference_name(reference: str) -> str:
    return "FedAvg" if reference == REFERENCE else avb.label(reference)


def table(result: dict, reference: str = REFERENCE) -> str:
    ref = reference_name(reference)
    head = ["method", "seeds (paired)", "rounds", "MB/client/round", f"bytes vs {ref}", "final loss (mean)",
            f"diff vs {ref}, equal rounds [95% CI]", f"diff vs {ref}, equal bytes [95% CI]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for method, r in result.items():
        last = r["curve"][-1]
        share = "-" if r["bytes_vs_reference"] is None else f"{100 * r['bytes_vs_reference']:.1f}%"
        eq_r, eq_b = (fmt_diff(last, "equal_rounds"), fmt_diff(last, "equal_bytes"))
        cells = [avb.label(method), f"{len(r['seeds_done'])} ({last.get('pairs', 0)})", str(r["rounds_done"]),
                 f"{r['mb_per_client_per_round']:.3f}", share, f"{last['loss_mean']:.4f}", eq_r, eq_b]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def client_table(result: dict, domains: list[str]) -> str:
    """Each client's upload / download MB per round (mean over rounds and seeds), with its rank where clients'
    ranks differ; '-' where a method's records have no per-client figures."""
    clients = sorted({cid for r in result.values() for cid in r["per_client"]}, key=int)
    names = [f"client {c} ({domains[int(c)]})" if int(c) < len(domains) else f"client {c}" for c in clients]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(clients)]
    for method, r in result.items():
        cells = []
        for c in clients:
            cost = r["per_client"].get(c)
            if cost is None:
                cells.append("-")
                continue
            rank = "" if cost["rank"] is None else f"r={cost['rank']}: "
            cells.append(f"{rank}{cost['upload_mb']:.3f} / {cost['download_mb']:.3f}")
        lines.append(f"| {avb.label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def round_table(result: dict, reference: str = REFERENCE) -> str:
    rounds = sorted({e["round"] for r in result.values() for e in r["curve"]})
    lines = ["| method | " + " | ".join(f"round {n}" for n in rounds) + " |", "|---|" + "---:|" * len(rounds)]
    for method, r in result.items():
        by_round = {e["round"]: e for e in r["curve"]}
        cells = []
        for n in rounds:
            e = by_round.get(n)
            if e is None:
                cells.append("-")
            elif "diff_equal_rounds" in e and method != reference:
                cells.append(f"{e['loss_mean']:.4f} ({e['diff_equal_rounds']:+.4f})")
            else:
                cells.append(f"{e['loss_mean']:.4f}")
        lines.append(f"| {avb.label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, plot_dir: str, prefix: str = "frontier", title: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, name, xlabel in (("cumulative_mb", f"{prefix}_loss_vs_mb.png", "cumulative MB per client (log)"),
                                ("round", f"{prefix}_loss_vs_round.png", "round")):  # fmt: skip
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
        ax.set_title(title or "Gemma-3-270M, 4 clients (code, medical, finance, math)", fontsize=9)
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
            "diff_vs_reference": last.get("diff_equal_rounds"),
            "ci95": list(last["ci95_equal_rounds"]) if last.get("ci95_equal_rounds") else None,
            "diff_vs_reference_equal_bytes": last.get("diff_equal_bytes"),
            "ci95_equal_bytes": list(last["ci95_equal_bytes"]) if last.get("ci95_equal_bytes") else None,
            "mb_per_client_per_round": r["mb_per_client_per_round"],
            "bytes_vs_reference": r["bytes_vs_reference"],
            "per_client": r["per_client"],
            "seeds_done": r["seeds_done"],
            "pairs": last.get("pairs", 0),
            "rounds_done": r["rounds_done"],
        }
        if a.reference == REFERENCE:  # the names the FedAvg-LoRA frontier has always had (run_all's checks)
            m = methods[method]
            m.update(diff_vs_fedavg=m["diff_vs_reference"], bytes_vs_fedavg=m["bytes_vs_reference"],
                     diff_vs_fedavg_equal_bytes=m["diff_vs_reference_equal_bytes"])  # fmt: skip
    return {"rounds": a.rounds, "seeds": a.seeds, "reference": a.reference, "client_ranks": a.client_ranks,
            "methods": methods}  # fmt: skip


def describe(a: argparse.Namespace) -> str:
    """The settings line above the tables."""
    if a.client_ranks:
        ranks = f"LoRA ranks {', '.join(map(str, a.client_ranks))} per client (global adapter r={a.lora_r})"
        if avb.method_rank(a.reference) is not None:
            ranks += f"; the reference {avb.label(a.reference)} trains every client at r={avb.method_rank(a.reference)}"
    else:
        ranks = f"LoRA r={a.lora_r}"
    return (
        f"{'Gemma-3-270M' if a.model == 'gemma-3-270m' else a.model}, {len(a.domains)} clients (one domain each), "
        f"{a.rounds} rounds x {a.local_steps} local "
        f"steps, batch {a.batch_size}, lr {a.learning_rate:g} constant, {ranks} on {','.join(a.targets)}, "
        f"max_length {a.max_length}, held-out loss on {a.eval_size} dev rows per domain every {a.eval_every} "
        f"rounds; paired differences to {avb.label(a.reference)} over seeds {a.seeds}, 95% t-intervals."
    )


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
    result = analyse(runs, a.reference)
    print(f"\n{describe(a)}\n")
    print(table(result, a.reference))
    if any(c["rank"] is not None for r in result.values() for c in r["per_client"].values()):
        print("\nMB per round of each client, upload / download (mean over rounds and seeds; download: the part of "
              "the broadcast the client's rank needs):\n")  # fmt: skip
        print(client_table(result, a.domains))
    print(f"\nMean held-out loss by round (paired difference to {avb.label(a.reference)} at equal rounds):\n")
    print(round_table(result, a.reference))
    if a.plot_dir:
        title = "Gemma-3-270M, 4 clients (code, medical, finance, math)"
        if a.client_ranks:
            title += f", client ranks {', '.join(map(str, a.client_ranks))}"
        for path in plot(result, a.plot_dir, prefix=a.plot_prefix or Path(a.results).name, title=title):
            print(f"\nplot: {path}")
    summary = summary_json(a, result)
    if a.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
