"""How close FedSRD's streamed (sketched) server step is to the exact one, against the sketch size and the precision
of its finish: what chose the default `sketch_oversampling` (docs/fedsrd.md, "When to use the sketch").

The inputs of `many_clients.py` (one 3072 x 3072 module of Llama-3.2-3B's q_proj shape, r = 64, m clients with
trained-like factor deltas). For each m and round (1: a B-round, 2: an A-round) three steps are compared:

* the exact float32 step, as the server runs it (`server_streaming off`, the path `server_step_path auto` picks);
* a float64 reference: the aggregate W = sum_i p_i (B + dB_i)(A + dA_i) formed densely in float64, its top-r left
  singular space by 12 block power iterations (block 2r: the gap below the r-th singular value is large, so this is
  float64-accurate), dW = W_r - B A and the least-squares solve in float64 (Eq. 10-13);
* the streamed step (`server_streaming on`) for each variant ``P:DTYPE``: `sketch_oversampling` P with the target,
  difference and solve finished in DTYPE (`StreamingTarget.finish_dtype`; float32 was the finish before float64).

Printed: the relative error of each step's broadcast against the exact float32 step and against the float64
reference, and the streamed step's fold time per client and finish time (one process; the times are rough on a
loaded machine).

    python benchmarks/sketch_accuracy.py [--json] [--clients 4 16 64] [--rounds 1 2]
        [--variants 64:float32 64:float64 128:float64 192:float64 256:float64] [--dim 3072] [--rank 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from many_clients import A_KEY, B_KEY, client_update, global_factors  # noqa: E402  (the same inputs)


def reference_step(b: torch.Tensor, a: torch.Tensor, updates: list[dict], round: int) -> dict[str, torch.Tensor]:
    """The step in float64 (see the module docstring), without the download drop."""
    b, a = b.double(), a.double()
    m, r = len(updates), a.shape[0]
    left = torch.cat([b + u[B_KEY].double() for u in updates], 1) / m
    right = torch.cat([a + u[A_KEY].double() for u in updates], 0)
    w = left @ right
    del left, right
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(w @ torch.randn(w.shape[1], 2 * r, generator=gen, dtype=torch.float64))
    for _ in range(12):
        basis, _ = torch.linalg.qr(w @ (w.T @ basis))
    u, _, _ = torch.linalg.svd(basis.T @ w, full_matrices=False)
    top = basis @ u[:, :r]  # the top-r left singular vectors of W
    delta_w = top @ (top.T @ w) - b @ a  # Eq. 10-11
    if round % 2 == 1:
        return {B_KEY: delta_w @ torch.linalg.pinv(a)}  # Eq. 12
    return {A_KEY: torch.linalg.pinv(b) @ delta_w}  # Eq. 13


def rel_err(step: dict, reference: dict) -> float:
    dense = {k: (v.to_dense(torch.float32) if hasattr(v, "to_dense") else v) for k, v in step.items()}
    assert set(dense) == set(reference), (set(dense), set(reference))
    return max(
        float(torch.linalg.norm(dense[k].double() - reference[k].double()) / torch.linalg.norm(reference[k].double()))
        for k in reference
    )


@torch.no_grad()  # not set_grad_enabled(False): callers in the same process (tests) keep autograd
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 2], help="1: a B-round, 2: an A-round")
    variants = ["64:float32", "64:float64", "128:float64", "192:float64", "256:float64"]
    parser.add_argument("--variants", nargs="+", default=variants, help="sketch_oversampling:finish dtype")
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()

    from fedsrd import FedSRDConfig, get_algorithm
    from fedsrd.algorithms.fedsrd import StreamingTarget
    from fedsrd.ops import generator_for

    d, r = args.dim, args.rank
    print(f"FedSRD's streamed step against the exact one: one {d}x{d} module, r={r}, torch "
          f"threads={torch.get_num_threads()}; rel. err of the broadcast vs the exact float32 step / vs "
          "float64")  # fmt: skip
    header = f"{'m':>5} {'round':>6} {'step':<16} {'vs exact':>9} {'vs f64':>9} {'fold ms':>8} {'finish s':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    b, a = global_factors(d, r)
    state = {A_KEY: a, B_KEY: b}
    for m in args.clients:
        updates = [client_update("fedsrd", i, b, a) for i in range(m)]
        for rnd in args.rounds:
            kind = "B" if rnd % 2 == 1 else "A"
            exact_algo = get_algorithm("fedsrd", FedSRDConfig(algorithm="fedsrd", download_drop=0.0))
            start = time.perf_counter()
            exact = exact_algo.server_step(state, updates, [1.0 / m] * m, rnd, generator_for(0, "server_step", rnd))
            exact_s = time.perf_counter() - start
            reference = reference_step(b, a, updates, rnd)
            row = {"clients": m, "round": kind, "step": "exact float32", "rel_err_f64": rel_err(exact, reference),
                   "seconds": exact_s}  # fmt: skip
            rows.append(row)
            print(f"{m:>5} {kind:>6} {'exact float32':<16} {'-':>9} {row['rel_err_f64']:>9.1e} {'-':>8} "
                  f"{exact_s:>9.1f}", flush=True)  # fmt: skip
            for variant in args.variants:
                oversampling, dtype = variant.split(":")
                StreamingTarget.finish_dtype = getattr(torch, dtype)
                cfg = FedSRDConfig(algorithm="fedsrd", download_drop=0.0, sketch_oversampling=int(oversampling))
                aggregation = get_algorithm("fedsrd", cfg).begin_aggregate(
                    state, rnd, generator_for(0, "server_step", rnd), {}
                )
                start = time.perf_counter()
                for update in updates:
                    aggregation.fold(update, 1.0)
                folded = time.perf_counter()
                streamed = aggregation.finish()[0]
                done = time.perf_counter()
                exact_dense = {k: v.to_dense(torch.float32) for k, v in exact.items()}
                row = {"clients": m, "round": kind, "step": f"sketch {variant}",
                       "sketch_oversampling": int(oversampling), "finish_dtype": dtype,
                       "rel_err": rel_err(streamed, exact_dense),
                       "rel_err_f64": rel_err(streamed, reference), "fold_ms": (folded - start) * 1e3 / m,
                       "finish_s": done - folded}  # fmt: skip
                rows.append(row)
                print(f"{m:>5} {kind:>6} {row['step']:<16} {row['rel_err']:>9.1e} {row['rel_err_f64']:>9.1e} "
                      f"{row['fold_ms']:>8.0f} {row['finish_s']:>9.1f}", flush=True)  # fmt: skip
            StreamingTarget.finish_dtype = torch.float64
    if args.json:
        print(json.dumps({"benchmark": "sketch_accuracy", "dim": d, "rank": r, "threads": torch.get_num_threads(),
                          "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
