"""Wall time per round with the round's clients trained by 1 process and by P processes (`accelerate launch`).

The tiny preset (random tiny Llama, synthetic data) with 4 clients, one per domain, all sampled every round. The
same run twice: `python examples/fed_train.py` (one process trains the 4 clients in turn) and
`accelerate launch --multi_gpu --num_processes P examples/fed_train.py` (each process trains 4/P of them; on a CPU
machine with ``--use_cpu true``, gloo between processes; on a GPU machine, one process per GPU). A round's time is
the main process's ``seconds`` in history.json: local training, gathering the updates, the server step and the
broadcast. The first round (warm-up) and the last (evaluation, final save) are left out of the mean.

    python benchmarks/parallel_clients.py [--processes 2] [--rounds 5] [--local_steps 8] [--gpu] [--json]

Threads: on the CPU each process runs one thread by default (``OMP_NUM_THREADS``), so the comparison is one worker
against P workers; ``--threads 0`` gives each process ``cores // processes`` instead (the tiny model gains little from
a second thread, and loses much if another job holds a core).

Prints a table; with --json only one JSON object: {"p1_s_per_round", "p2_s_per_round", "speedup", ...}. Times only,
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FED_TRAIN = REPO / "examples" / "fed_train.py"
TINY = REPO / "examples" / "configs" / "tiny.yaml"
DOMAINS = ["arithmetic", "code_output", "percent", "units"]


def job_args(out: Path, rounds: int, local_steps: int, gpu: bool) -> list[str]:
    return [
        "--config", str(TINY), "--output_dir", str(out), "--disable_tqdm", "true",
        "--domains", *DOMAINS, "--num_clients", str(len(DOMAINS)), "--num_rounds", str(rounds),
        "--local_steps", str(local_steps), "--eval_every", "0", "--save_every", "0", "--checkpoint", "false",
        "--use_cpu", "false" if gpu else "true",
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(processes: int, out: Path, args: argparse.Namespace) -> tuple[list[float], float]:
    """Per-round seconds (main process) and the whole command's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(processes, args.threads))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    script = [str(FED_TRAIN), *job_args(out, args.rounds, args.local_steps, args.gpu)]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        cmd = [
            str(accelerate) if accelerate.exists() else "accelerate", "launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), *script,
        ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stdout[-4000:]}")
    history = json.loads((out / "history.json").read_text())
    return [r["seconds"] for r in history if r["round"] >= 1], wall


def threads_per_process(processes: int, threads: int) -> int:
    return threads or max(1, (os.cpu_count() or 1) // processes)


def steady_mean(seconds: list[float]) -> float:
    """Mean over the rounds between the first (warm-up) and the last (evaluation and final save)."""
    middle = seconds[1:-1] or seconds
    return statistics.mean(middle)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2, help="P, compared with one process (default 2).")
    p.add_argument("--rounds", type=int, default=5, help="Rounds per run (default 5; first and last not timed).")
    p.add_argument("--local_steps", type=int, default=8, help="Optimizer steps per client and round (default 8).")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process (default 1; 0: cores // P).")
    p.add_argument("--gpu", action="store_true", help="Train on GPUs (one per process) instead of the CPU.")
    p.add_argument("--json", action="store_true", help="Print only one JSON object.")
    args = p.parse_args()
    if args.processes < 2 or args.rounds < 1:
        raise SystemExit("--processes must be >= 2 and --rounds >= 1.")
    work = Path(tempfile.mkdtemp(prefix="fedsrd-parallel-"))
    try:
        p1, wall1 = run(1, work / "p1", args)
        pn, walln = run(args.processes, work / f"p{args.processes}", args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p1_s, pn_s = steady_mean(p1), steady_mean(pn)
    result = {
        "p1_s_per_round": round(p1_s, 4),
        f"p{args.processes}_s_per_round": round(pn_s, 4),
        "speedup": round(p1_s / pn_s, 3),
        "clients_per_round": len(DOMAINS),
        "local_steps": args.local_steps,
        "rounds_timed": len(p1[1:-1] or p1),
        "p1_wall_s": round(wall1, 1),
        f"p{args.processes}_wall_s": round(walln, 1),
        "threads_per_process": {
            "p1": threads_per_process(1, args.threads),
            f"p{args.processes}": threads_per_process(args.processes, args.threads),
        },
        "device": "gpu" if args.gpu else "cpu",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'processes':>10} | {'s/round':>9} | {'job wall s':>10}")
    print(f"{1:>10} | {p1_s:>9.3f} | {wall1:>10.1f}")
    print(f"{args.processes:>10} | {pn_s:>9.3f} | {walln:>10.1f}")
    print(f"speedup {p1_s / pn_s:.2f}x per round ({len(DOMAINS)} clients, {args.local_steps} local steps each)")


if __name__ == "__main__":
    main()
