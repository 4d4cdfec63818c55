"""Ferret's hot path, in nanoseconds per random number: drawing one basis (torch's ``trunc_normal_`` against
`fedsrd.algorithms.ferret.truncated_normal`, the same distribution), projecting onto it and adding it back.

    OMP_NUM_THREADS=1 python benchmarks/ferret_sampler.py                      # MiniLM's 384 x 1536 matrix
    OMP_NUM_THREADS=1 python benchmarks/ferret_sampler.py --rows 384 --cols 384 --repeats 40

A basis is d = rows x cols numbers drawn on [-1/sqrt(d), 1/sqrt(d)]. "project" is one coordinate of
`ferret.project` (draw + dot), "reconstruct" one term of `ferret.reconstruct_block` (draw + norm + add); the
"before" rows time the previous code (``trunc_normal_``, then a rescale pass, then the dot, or the multiply, norm and
add). Prints a table: per row the fastest of `--repeats` timings (the least disturbed by other load), the rows
timed in turn. Times depend on the machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fedsrd.algorithms.ferret import basis_scale, reconstruct_block, truncated_normal


def per_number(rows: dict, numel: int, repeats: int) -> dict[str, float]:
    """Fastest ns per number of each row, the rows timed in turn (round robin) so that load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for repeat in range(repeats + 1):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: min(t) / numel * 1e9 for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--cols", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    d = args.rows * args.cols
    bound = 1.0 / math.sqrt(d)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(d, generator=g) * 1e-3
    total = torch.zeros(d)
    scale = basis_scale(d)

    def old_draw() -> torch.Tensor:
        x = torch.empty(d)
        return torch.nn.init.trunc_normal_(x, 0.0, 1.0, -bound, bound, generator=g).mul_(scale)

    def old_reconstruct_term() -> None:
        term = old_draw().mul_(0.5)
        if float(term.norm()) > 10.0:
            term.mul_(0.1)
        total.add_(term)

    coords = torch.zeros(2)
    coords[1] = 0.5
    rows = {
        "uniform_ (float32), for reference": lambda: torch.empty(d).uniform_(-bound, bound, generator=g),
        "draw, before: trunc_normal_ + rescale": old_draw,
        "draw, after: truncated_normal": lambda: truncated_normal(d, bound, g),
        "project, before": lambda: float(torch.dot(delta, old_draw())),
        "project, after": lambda: float(torch.dot(delta, truncated_normal(d, bound, g))),
        "reconstruct, before": old_reconstruct_term,
        "reconstruct, after": lambda: reconstruct_block(coords, "w", [0, 1], (d,)),
    }
    results = per_number(rows, d, args.repeats)
    print(f"torch {torch.__version__}, d = {args.rows} x {args.cols}, 1 thread, fastest of {args.repeats}")
    print(f"{'':40s} ns per number")
    for name, ns in results.items():
        print(f"{name:40s} {ns:8.2f}")
    return results


if __name__ == "__main__":
    main()
