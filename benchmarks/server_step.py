"""FedSRD's server step per LoRA module: factored (ours) against dense (the paper's code), by layer shape.

One module, m clients, rank r. The step is FedSRD's B-round: aggregate the client products, take the rank-r truncated
SVD, dW = W_target - B A, dB = dW pinv(A). "factored" runs the code of `FedSRD.server_step`, which never forms a
d_out x d_in matrix (`fedsrd.ops.lowrank`); "dense" forms W = sum_i p_i B_i A_i and runs a full `torch.linalg.svd`
(full_matrices=False, the cheaper variant) and a dense pinv solve, as the reference code does per module.
FedSRD-e's factored step (no SVD) is timed too. Errors are relative Frobenius errors of dB (fp32) against the same step
in float64. The "est." memory columns are estimates (fp32, LAPACK workspace not counted):
factored (3 m r + 4 r)(d_out + d_in) x 4 B; dense (3 d_out d_in + min(d_out, d_in)(d_out + d_in)) x 4 B. The
"meas." columns are measured: each step runs once more in a fresh process of its own, after its inputs are built,
and the peak above the resident set it started from is reported (CPU: the OS's peak resident set, Linux VmHWM reset
through /proc/self/clear_refs; CUDA: torch's peak allocated bytes), so LAPACK's workspace and allocator slack count.
`--no-memory` skips them.

    python benchmarks/server_step.py [--device cuda] [--repeats 5] [--dense-max-numel 3e7] [--json]

The default dense limit (3e7 entries) skips 70B q/o (8192x8192: ~220 s dense on 2 CPU cores) and gate/up/down.
Prints a table; with --json the last line is one JSON object with every row. Times only, nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedsrd.algorithms.fedsrd import FedSRD, FedSRDe, LoraModule
from fedsrd.config import FedSRDConfig
from fedsrd.ops.lowrank import factored_difference, solve_left_update, stack_factors, truncated_svd

LLAMA_3B = {"hidden": 3072, "intermediate": 8192, "kv": 1024}  # Llama-3.2-3B: 24 heads, 8 KV heads of 128
LLAMA_70B = {"hidden": 8192, "intermediate": 28672, "kv": 1024}  # Llama-3-70B: 64 heads, 8 KV heads of 128


def module_shapes(dims: dict[str, int]) -> list[tuple[str, int, int]]:
    """(projection, d_out, d_in) of the 7 adapted linear layers of one Llama decoder layer."""
    h, i, kv = dims["hidden"], dims["intermediate"], dims["kv"]
    return [
        ("q_proj", h, h),
        ("k_proj", kv, h),
        ("v_proj", kv, h),
        ("o_proj", h, h),
        ("gate_proj", i, h),
        ("up_proj", i, h),
        ("down_proj", h, i),
    ]


def trained_like(d_out: int, d_in: int, r: int, m: int, device: str, seed: int = 0):
    """Global (B, A) and m clients after a round: B small, A kaiming-uniform, small client moves."""
    gen = torch.Generator().manual_seed(seed)
    b = 0.01 * torch.randn(d_out, r, generator=gen)
    a = (torch.rand(r, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)
    bs = [b + 1e-3 * torch.randn(d_out, r, generator=gen) for _ in range(m)]
    as_ = [a + 1e-4 * torch.randn(r, d_in, generator=gen) for _ in range(m)]
    move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return b.to(device), a.to(device), move(bs), move(as_), [1.0 / m] * m


_MODULE = LoraModule("layer", "layer.lora_A.weight", "layer.lora_B.weight")
_FEDSRD, _FEDSRD_E = FedSRD(FedSRDConfig()), FedSRDe(FedSRDConfig())


def factored_step(b, a, bs, as_, weights, r: int, algo: FedSRD = _FEDSRD) -> torch.Tensor:
    """The algorithm's own code path: reconstruct, target (Eq. 9-11, factored), then the B-round solve (Eq. 12)."""
    updates = [{_MODULE.b_key: bi - b, _MODULE.a_key: ai - a} for bi, ai in zip(bs, as_, strict=True)]
    return solve_left_update(algo.target_change(_MODULE, a, b, updates, weights), a)


def factored_step_e(b, a, bs, as_, weights, r: int) -> torch.Tensor:
    return factored_step(b, a, bs, as_, weights, r, _FEDSRD_E)


def exact_step(b, a, bs, as_, weights, r: int) -> torch.Tensor:
    """The reference: the same factored math in float64 (tests/test_fedsrd.py proves it equals the dense math)."""
    b, a, bs, as_ = b.double(), a.double(), [x.double() for x in bs], [x.double() for x in as_]
    target = truncated_svd(*stack_factors(bs, as_, weights), rank=r)
    return solve_left_update(factored_difference(target, (b, a)), a)


def dense_step(b, a, bs, as_, weights, r: int) -> torch.Tensor:
    w = sum(p * bi @ ai for bi, ai, p in zip(bs, as_, weights, strict=True))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w_target = u[:, :r] * s[:r] @ vh[:r]
    return (w_target - b @ a) @ torch.linalg.pinv(a)


def timed(fn, args, repeats: int, device: str) -> tuple[float, torch.Tensor]:
    """Median wall time in ms over `repeats` runs (after one warm-up run when repeats > 1) and the last result."""
    times, out = [], None
    for k in range(repeats + (1 if repeats > 1 else 0)):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if repeats == 1 or k > 0:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def mib(n_floats: float) -> float:
    return n_floats * 4 / 2**20


@torch.no_grad()  # not set_grad_enabled(False): callers in the same process (tests) keep autograd
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="factored runs per module (median reported)")
    parser.add_argument(
        "--dense-max-numel", type=float, default=3e7, help="run the dense step only up to this d_out*d_in (time)"
    )
    parser.add_argument("--dense-max-gib", type=float, default=8.0, help="...and up to this estimated dense memory")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--no-memory", action="store_true", help="skip the measured peak memory (own processes)")
    parser.add_argument("--measure-worker", nargs=5, default=None, help=argparse.SUPPRESS)  # STEP D_OUT D_IN R M
    args = parser.parse_args()
    if args.measure_worker is not None:
        step, *sizes = args.measure_worker
        print(json.dumps({"peak_mib": measure_peak_worker(step, *map(int, sizes), args.device)}))
        return
    r, m = args.rank, args.clients

    rows, dense_cache = [], {}
    print(
        f"FedSRD server step (B-round) per module: r={r}, m={m}, fp32, device={args.device}, "
        f"torch threads={torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}"
    )
    header = (
        f"{'model':<5} {'module':<9} {'shape':>11} {'factored ms':>11} {'fedsrd_e ms':>11} {'dense ms':>9} "
        f"{'speed-up':>8} {'fact. err':>9} {'dense err':>9} {'fact. MiB est.':>14} {'meas.':>7} "
        f"{'dense MiB est.':>14} {'meas.':>7}"
    )
    print(header)
    print("-" * len(header))
    for model, dims in (("3B", LLAMA_3B), ("70B", LLAMA_70B)):
        for module, d_out, d_in in module_shapes(dims):
            inputs = (*trained_like(d_out, d_in, r, m, args.device), r)
            fact_ms, fact_out = timed(factored_step, inputs, args.repeats, args.device)
            fact_e_ms, _ = timed(factored_step_e, inputs, args.repeats, args.device)
            exact = exact_step(*inputs)
            fact_err = relative_error(fact_out, exact)
            fact_mem = mib((3 * m * r + 4 * r) * (d_out + d_in))
            dense_mem = mib(3 * d_out * d_in + min(d_out, d_in) * (d_out + d_in))
            dense_ms, dense_err, dense_peak = None, None, None
            fact_peak = None if args.no_memory else measure_peak("factored", d_out, d_in, r, m, args.device)
            if d_out * d_in <= args.dense_max_numel and dense_mem / 1024 <= args.dense_max_gib:
                if (d_out, d_in) not in dense_cache:  # same shape, same (seeded) inputs: time it once
                    ms, dense_out = timed(dense_step, inputs, 1, args.device)
                    peak = None if args.no_memory else measure_peak("dense", d_out, d_in, r, m, args.device)
                    dense_cache[(d_out, d_in)] = (ms, relative_error(dense_out, exact), peak)
                dense_ms, dense_err, dense_peak = dense_cache[(d_out, d_in)]
            rows.append(
                {
                    "model": model,
                    "module": module,
                    "d_out": d_out,
                    "d_in": d_in,
                    "rank": r,
                    "clients": m,
                    "factored_ms": round(fact_ms, 2),
                    "fedsrd_e_ms": round(fact_e_ms, 2),
                    "dense_ms": None if dense_ms is None else round(dense_ms, 1),
                    "factored_rel_err": fact_err,
                    "dense_rel_err": dense_err,
                    "factored_mib_est": round(fact_mem, 1),
                    "dense_mib_est": round(dense_mem, 1),
                    "factored_mib_measured": None if fact_peak is None else round(fact_peak, 1),
                    "dense_mib_measured": None if dense_peak is None else round(dense_peak, 1),
                }
            )
            speed = f"{dense_ms / fact_ms:.0f}x" if dense_ms else "-"
            print(
                f"{model:<5} {module:<9} {f'{d_out}x{d_in}':>11} {fact_ms:>11.1f} {fact_e_ms:>11.1f} "
                f"{(f'{dense_ms:.0f}' if dense_ms else 'skipped'):>9} {speed:>8} {fact_err:>9.1e} "
                f"{(f'{dense_err:.1e}' if dense_err is not None else '-'):>9} {fact_mem:>14.1f} {_mib(fact_peak):>7} "
                f"{dense_mem:>14.1f} {_mib(dense_peak):>7}",
                flush=True,
            )
    if args.json:
        summary = {"benchmark": "server_step", "device": args.device, "threads": torch.get_num_threads()}
        print(json.dumps({**summary, "torch": torch.__version__, "rows": rows}))


STEPS = {"factored": factored_step, "dense": dense_step}


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@torch.no_grad()  # not set_grad_enabled(False): callers in the same process (tests) keep autograd
def measure_peak_worker(step: str, d_out: int, d_in: int, r: int, m: int, device: str) -> float | None:
    """Peak memory (MiB) of one `step` above what this process held once its inputs were built; None if unknown."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _memory import peak_rss_mb, reset_peak, rss_mb

    inputs = (*trained_like(d_out, d_in, r, m, device), r)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        STEPS[step](*inputs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    start = rss_mb()
    if start is None or not reset_peak():
        return None
    STEPS[step](*inputs)
    return peak_rss_mb() - start


def measure_peak(step: str, d_out: int, d_in: int, r: int, m: int, device: str) -> float | None:
    """`measure_peak_worker` in a fresh process (nothing of an earlier step stays resident)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure-worker", step, str(d_out), str(d_in), str(r),
           str(m), "--device", device]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None
    return json.loads(lines[-1])["peak_mib"]


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() - reference) / torch.linalg.norm(reference))


if __name__ == "__main__":
    main()
