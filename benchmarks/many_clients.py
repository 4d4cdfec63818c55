"""Many clients per round: the server step's time and peak memory against the number of clients m, and a simulation
with 256 clients.

Part 1, one LoRA module of Llama-3.2-3B's q_proj shape (3072 x 3072; one module only, to keep the run short: the step
is per module, so a model's round is the sum over its modules), r = 64, m clients with trained-like factors
(`server_step.trained_like`). One B-round server step for each of:

* ``fedavg``          FedAvg-LoRA (mean of the factors), holding the updates; ``fedavg_stream`` its running sum;
* ``fedsrd_auto``     FedSRD exact, the path the flop count picks (`server_step_path auto`), holding the updates;
  ``fedsrd_factored`` / ``fedsrd_dense`` the two paths forced (to check that auto is never slower than the better);
* ``fedsrd_sketch``   FedSRD streaming (`server_streaming on`: the one-pass sketch, default `sketch_oversampling`);
* ``fedsrd_e``        FedSRD-e holding the updates; ``fedsrd_e_stream`` its exact streaming step.

Each configuration and m runs in a fresh process of its own, under a time limit (`--config-timeout-s`): the clients'
updates are made there (one at a time for the streaming steps, all of them first otherwise, as a server holding the
round's updates does), and the peak resident set above what the process held before (Linux VmHWM, reset through
/proc/self/clear_refs; `_memory.py`) is the step's memory, held updates included. The time is the step's alone
(streaming: every fold plus the finish; "fold ms" is the mean per client). The relative error of the streamed steps
is against the exact step on the same updates, for the B-round and the A-round. A configuration that is not run says
why in its row ("not run: ..."): estimated above `--max-config-s`, past `--config-timeout-s`, or failed (for example
killed for memory).

Part 2, a simulation on the tiny random model: 256 clients, 16 sampled per round, fedsrd_ef (so every client keeps
residuals: on disk, `client_state_store auto`) with the streaming server step; its wall time and peak memory, in a
process of its own.

    python benchmarks/many_clients.py [--json] [--quick] [--clients 4 16 64 256 1024] [--dim 3072] [--rank 64]
                                      [--configs ...] [--sketch-oversampling P] [--simulation CLIENTS PER_ROUND ROUNDS]

`--quick`: m in {4, 16, 64} and a 32-client simulation. The estimated cost (a flop count at a measured GEMM rate)
is printed before anything runs; configurations estimated above `--max-config-s` are not run. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REFERENCE = {"fedsrd_sketch": "fedsrd_auto", "fedsrd_e_stream": "fedsrd_e"}  # streamed step -> its exact step


# ---- the inputs --------------------------------------------------------------------------------------------------
def global_factors(d: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    b = 0.01 * torch.randn(d, r, generator=gen)
    a = (torch.rand(r, d, generator=gen) * 2 - 1) / math.sqrt(d)
    return b, a


def client_update(config: str, i: int, b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Client i's upload, made on its own seed (so the streaming steps can make one at a time)."""
    gen = torch.Generator().manual_seed(1000 + i)
    delta_b = 1e-3 * torch.randn(b.shape, generator=gen)
    delta_a = 1e-4 * torch.randn(a.shape, generator=gen)
    if config.startswith("fedavg"):
        return {A_KEY: a + delta_a, B_KEY: b + delta_b}  # FedAvg uploads the factors themselves
    return {A_KEY: delta_a, B_KEY: delta_b}


A_KEY, B_KEY = "layer.lora_A.weight", "layer.lora_B.weight"


ALGORITHMS = {  # configuration -> (algorithm, server_step_path)
    "fedavg": ("fedavg", "auto"),
    "fedavg_stream": ("fedavg", "auto"),
    "fedsrd_auto": ("fedsrd", "auto"),
    "fedsrd_factored": ("fedsrd", "factored"),
    "fedsrd_dense": ("fedsrd", "dense"),
    "fedsrd_sketch": ("fedsrd", "auto"),
    "fedsrd_e": ("fedsrd_e", "auto"),
    "fedsrd_e_stream": ("fedsrd_e", "auto"),
}


CONFIGS = tuple(ALGORITHMS)


def algorithm_for(config: str, oversampling: int | None = None):
    from fedsrd import FedSRDConfig, get_algorithm

    name, path = ALGORITHMS[config]
    extra = {} if oversampling is None else {"sketch_oversampling": oversampling}  # None: FedSRDConfig's default
    cfg = FedSRDConfig(algorithm=name, download_drop=0.0, server_step_path=path, **extra)  # no drop: the step's error
    return get_algorithm(name, cfg)


def is_streaming(config: str) -> bool:
    return config.endswith(("_stream", "_sketch"))


# ---- one configuration, in its own process ---------------------------------------------------------------------
def run_step(config: str, d: int, r: int, m: int, round: int, oversampling: int | None = None,
             folded: Callable[[], dict] | None = None) -> tuple[dict, dict]:  # fmt: skip
    """({"ms": the step, and for streaming "fold_ms" per client, "finish_ms" and what `folded()` says after the last
    fold}, its payload as dense tensors)."""
    from fedsrd.ops import generator_for

    algo = algorithm_for(config, oversampling)
    b, a = global_factors(d, r)
    state = {A_KEY: a, B_KEY: b}
    rng = generator_for(0, "server_step", round)
    if is_streaming(config):
        aggregation = algo.begin_aggregate(state, round, rng, {})
        folding = 0.0
        for i in range(m):
            update = client_update(config, i, b, a)
            start = time.perf_counter()
            aggregation.fold(update, 1.0)
            folding += time.perf_counter() - start
            del update
        after_folds = folded() if folded else {}
        start = time.perf_counter()
        payload = aggregation.finish()[0]
        finishing = time.perf_counter() - start
        times = {"ms": (folding + finishing) * 1e3, "fold_ms": folding * 1e3 / m, "finish_ms": finishing * 1e3,
                 **after_folds}  # fmt: skip
    else:
        updates = [client_update(config, i, b, a) for i in range(m)]  # what a batch server holds
        start = time.perf_counter()
        payload = algo.server_step(state, updates, [1.0 / m] * m, round, rng)
        times = {"ms": (time.perf_counter() - start) * 1e3}
    dense = {k: v.to_dense(torch.float32) if hasattr(v, "to_dense") else v for k, v in payload.items()}
    return times, dense


@torch.no_grad()  # not set_grad_enabled(False): callers in the same process (tests) keep autograd
def worker(config: str, d: int, r: int, m: int, save: str | None, reference: str | None,
           oversampling: int | None = None) -> dict:  # fmt: skip
    sys.path.insert(0, str(HERE))
    from _memory import peak_rss_mb, reset_peak, rss_mb
    from safetensors.torch import load_file, save_file

    algorithm_for(config, oversampling)  # imports done before the baseline
    base = rss_mb()
    measured = base is not None and reset_peak()

    def folded() -> dict:  # streaming: the peak while folding (the aggregate held, one update at a time)
        return {"fold_peak_mib": (peak_rss_mb() - base) if measured else None}

    times, payload = run_step(config, d, r, m, 1, oversampling, folded)
    out = {**times, "peak_mib": (peak_rss_mb() - base) if measured else None}
    # the A-round too, for the streamed steps' error (not timed: the B-round above is the measured step)
    payloads = {"1": payload, "2": run_step(config, d, r, m, 2, oversampling)[1] if (save or reference) else None}
    if save:
        save_file({f"{rnd}/{k}": v for rnd, p in payloads.items() for k, v in p.items()}, save)
    if reference and Path(reference).is_file():
        exact = load_file(reference)
        errors = []
        for rnd, p in payloads.items():
            for k, v in p.items():
                ref = exact[f"{rnd}/{k}"].double()
                errors.append(float(torch.linalg.norm(v.double() - ref) / torch.linalg.norm(ref)))
        out["rel_err"] = max(errors)
    return out


def run_worker(config: str, d: int, r: int, m: int, save: str | None, reference: str | None,
               oversampling: int | None, timeout_s: float) -> dict:  # fmt: skip
    """The worker's JSON, or {"not_run": why} if it ran past `timeout_s` (killed) or failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, str(d), str(r), str(m),
           "--save", save or "", "--reference", reference or "",
           "--sketch-oversampling", "" if oversampling is None else str(oversampling)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"not_run": f"timed out after {timeout_s:g} s (--config-timeout-s)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:160]
    return {"not_run": f"failed: {why}"}


# ---- the estimate --------------------------------------------------------------------------------------------------
def gemm_rate() -> float:
    """Measured float32 GEMM flops per second on this machine now (a 1024^3 product, best of 3)."""
    x = torch.randn(1024, 1024)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


def estimated_flops(config: str, d: int, r: int, m: int, oversampling: int | None = None) -> float:
    from fedsrd import FedSRDConfig
    from fedsrd.ops.lowrank import truncated_svd_flops

    p = FedSRDConfig().sketch_oversampling if oversampling is None else oversampling
    k = m * r
    svd = truncated_svd_flops(d, d, k, r)
    step = {
        "fedavg": 4 * m * d * r,
        "fedavg_stream": 4 * m * d * r,
        "fedsrd_auto": min(svd.values()),
        "fedsrd_factored": svd["factored"],
        "fedsrd_dense": svd["dense"],
        "fedsrd_sketch": m * 4 * d * r * (5 * r + 3 * p + 1) + 60 * d * (4 * r + p) ** 2,  # folds, float64 finish
        "fedsrd_e": 8 * m * d * r * r,
        "fedsrd_e_stream": 8 * m * d * r * r,
    }[config]
    making = 2 * m * d * r * 10  # drawing the clients' updates
    runs = 2 if config in REFERENCE or config in REFERENCE.values() else 1  # B-round, plus the A-round for errors
    return runs * (step + making)


# ---- the simulation ------------------------------------------------------------------------------------------------
def e2e_worker(num_clients: int, per_round: int, rounds: int, out_dir: str) -> dict:
    sys.path.insert(0, str(HERE))
    from _memory import peak_rss_mb

    from fedsrd.cli import run_train

    repo = HERE.parent
    start = time.perf_counter()
    run_train(["--config", str(repo / "examples" / "configs" / "tiny.yaml"), "--algorithm", "fedsrd_ef",
               "--num_clients", str(num_clients), "--clients_per_round", str(per_round), "--num_rounds", str(rounds),
               "--partition", "iid", "--train_size", str(8 * num_clients), "--local_steps", "2",
               "--eval_every", "0", "--save_every", "0", "--eval_at_start", "false", "--server_streaming", "on",
               "--client_state_store", "disk",
               "--output_dir", out_dir, "--disable_tqdm", "true"])  # fmt: skip
    wall = time.perf_counter() - start
    files = list((Path(out_dir) / "client_states").rglob("*.safetensors"))
    return {"wall_s": wall, "peak_rss_mib": peak_rss_mb(), "client_state_files": len(files),
            "client_state_mib": sum(f.stat().st_size for f in files) / 2**20}  # fmt: skip


def run_e2e(num_clients: int, per_round: int, rounds: int, timeout_s: float) -> dict:
    """The simulation's figures, or {"not_run": why} (past `timeout_s`, or failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--e2e-worker", str(num_clients), str(per_round),
               str(rounds), tmp]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"not_run": f"timed out after {timeout_s:g} s (--config-timeout-s)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"not_run": f"failed: {(proc.stderr.strip().splitlines() or [f'exit {proc.returncode}'])[-1][:160]}"}
    return json.loads(lines[-1])


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


# ---- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--quick", action="store_true", help="m in {4, 16, 64} and a 32-client simulation")
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="values of m (default 4 16 64 256 1024)")
    parser.add_argument("--dim", type=int, default=3072, help="the module's d_out = d_in (q_proj of Llama-3.2-3B)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument(
        "--max-config-s", type=float, default=600.0, help="do not run configurations estimated above this"
    )
    parser.add_argument(
        "--config-timeout-s",
        type=float,
        default=1800.0,
        help="kill a configuration's process after this many seconds (its row: not run)",
    )
    parser.add_argument("--sketch-oversampling", default="", help="fedsrd_sketch's sketch_oversampling (default: "
                        "FedSRDConfig's)")  # fmt: skip
    parser.add_argument("--no-e2e", action="store_true", help="skip the simulation")
    parser.add_argument(
        "--simulation",
        type=int,
        nargs=3,
        default=None,
        metavar=("CLIENTS", "PER_ROUND", "ROUNDS"),
        help="the simulation's size (default 256 16 3; --quick: 32 4 2)",
    )
    parser.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)  # CONFIG D R M
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    parser.add_argument("--reference", default="", help=argparse.SUPPRESS)
    parser.add_argument("--e2e-worker", nargs=4, default=None, help=argparse.SUPPRESS)  # CLIENTS PER_ROUND ROUNDS DIR
    args = parser.parse_args()
    oversampling = int(args.sketch_oversampling) if args.sketch_oversampling else None
    if args.worker is not None:
        config, *sizes = args.worker
        print(json.dumps(worker(config, *map(int, sizes), args.save or None, args.reference or None, oversampling)))
        return
    if args.e2e_worker is not None:
        *numbers, out_dir = args.e2e_worker
        print(json.dumps(e2e_worker(*map(int, numbers), out_dir)))
        return

    clients = args.clients or ([4, 16, 64] if args.quick else [4, 16, 64, 256, 1024])
    sim = tuple(args.simulation) if args.simulation else (32, 4, 2) if args.quick else (256, 16, 3)
    d, r = args.dim, args.rank
    rate = gemm_rate()
    plan = [(c, m, estimated_flops(c, d, r, m, oversampling) / rate + 3.0)  # +3 s start
            for m in clients for c in args.configs]  # fmt: skip
    run = [(c, m, est) for c, m, est in plan if est <= args.max_config_s]
    total = sum(est for *_, est in run) + (0 if args.no_e2e else 20.0 + 8.0 * sim[1] * sim[2])
    from fedsrd import FedSRDConfig

    p = FedSRDConfig().sketch_oversampling if oversampling is None else oversampling
    print(f"Many clients per round: one {d}x{d} module (Llama-3.2-3B q_proj shape; one module only, to keep the run "
          f"short), r={r}, m in {clients}, sketch_oversampling {p}, fp32, CPU, torch "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}")  # fmt: skip
    print(
        f"estimated cost: {total / 60:.1f} min at the measured {rate / 1e9:.1f} GFLOP/s "
        f"({len(plan) - len(run)} configuration(s) above --max-config-s {args.max_config_s:g} not run)",
        flush=True,
    )
    header = (f"{'m':>5} {'config':<16} {'path':<9} {'step ms':>10} {'fold ms':>8} {'peak MiB':>9} {'folding':>8} "
              f"{'rel. err':>9} {'est. s':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config, m, est in plan:
            path = "-"
            if config.startswith("fedsrd") and not config.startswith("fedsrd_e"):
                from fedsrd.ops.lowrank import choose_svd_path

                forced = {"fedsrd_factored": "factored", "fedsrd_dense": "dense"}.get(config, "auto")
                path = "sketch" if config == "fedsrd_sketch" else choose_svd_path(d, d, m * r, r, forced)
            row = {"config": config, "clients": m, "dim": d, "rank": r, "path": path, "est_s": round(est, 1)}
            if config == "fedsrd_sketch":
                row["sketch_oversampling"] = p
            if est > args.max_config_s:
                row["not_run"] = f"estimated {est:.0f} s > --max-config-s {args.max_config_s:g}"
            else:
                save = str(Path(tmp) / f"{config}_{m}.safetensors") if config in REFERENCE.values() else None
                ref = str(Path(tmp) / f"{REFERENCE[config]}_{m}.safetensors") if config in REFERENCE else None
                row.update(run_worker(config, d, r, m, save, ref, oversampling, args.config_timeout_s))
            rows.append(row)
            ms, peak = _fmt(row.get("ms"), ".1f"), _fmt(row.get("peak_mib"), ".0f")
            fold, err = _fmt(row.get("fold_ms"), ".1f"), _fmt(row.get("rel_err"), ".1e")
            folding = _fmt(row.get("fold_peak_mib"), ".0f")
            not_run = f"  not run: {row['not_run']}" if "not_run" in row else ""
            print(f"{m:>5} {config:<16} {path:<9} {ms:>10} {fold:>8} {peak:>9} {folding:>8} {err:>9} {est:>7.0f}"
                  f"{not_run}", flush=True)  # fmt: skip
    simulation = None
    if not args.no_e2e:
        simulation = {**run_e2e(*sim, args.config_timeout_s), "clients": sim[0], "per_round": sim[1], "rounds": sim[2]}
        what = f"simulation: {sim[0]} clients, {sim[1]} per round, {sim[2]} rounds, fedsrd_ef + streaming, tiny model"
        if "not_run" in simulation:
            print(f"{what}: not run: {simulation['not_run']}", flush=True)
        else:
            print(f"{what}: {simulation['wall_s']:.1f} s wall, peak RSS {simulation['peak_rss_mib']:.0f} MiB, "
                  f"{simulation['client_state_files']} client-state files ({simulation['client_state_mib']:.1f} MiB) "
                  "on disk", flush=True)  # fmt: skip
    if args.json:
        print(json.dumps({"benchmark": "many_clients", "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "gemm_gflops": rate / 1e9, "rows": rows, "simulation": simulation}))  # fmt: skip


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
