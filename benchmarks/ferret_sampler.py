"""Ferret's hot path, in nanoseconds per random number: drawing one basis (torch's ``trunc_normal_`` against
`fedsrd.algorithms.ferret.truncated_normal`, the same distribution), projecting onto it and adding it back.

    OMP_NUM_THREADS=1 python benchmarks/ferret_sampler.py                      # MiniLM's 384 x 1536 matrix
    OMP_NUM_THREADS=1 python benchmarks/ferret_sampler.py --rows 384 --cols 384 --repeats 40
    OMP_NUM_THREADS=1 python benchmarks/ferret_sampler.py --layer   # project + reconstruct one MiniLM layer, K = 200

A basis is d = rows x cols numbers drawn on [-1/sqrt(d), 1/sqrt(d)]. "project" is one coordinate of
`ferret.project` (draw + dot), "reconstruct" one term of `ferret.reconstruct_block` (draw + norm + add); the
"before" rows time the previous code (``trunc_normal_``, then a rescale pass, then the dot, or the multiply, norm and
add). `--layer` instead times `ferret.project` and `ferret.reconstruct_block` as a round calls them, with all K = 200
bases on each of one MiniLM layer's six block matrices (4 of 384 x 384, 2 of 384 x 1536), once. Otherwise prints a
table: per row the fastest of `--repeats` timings (the least disturbed by other load), the rows timed in turn. Times
depend on the machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fedsrd.algorithms.ferret import basis_scale, project, reconstruct_block, truncated_normal

MINILM_LAYER = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]  # q, k, v, attention out; FFN in, FFN out


def layer(pool_size: int = 200) -> dict[str, float]:
    """ns per basis number of `project` (all K bases) and `reconstruct_block` (K non-zero coordinates), one layer."""
    pool = list(range(1000, 1000 + pool_size))
    g = torch.Generator().manual_seed(0)
    spent = {"project": 0.0, "reconstruct": 0.0}
    for i, shape in enumerate(MINILM_LAYER):
        delta = 1e-3 * torch.randn(shape, generator=g)
        start = time.perf_counter()
        coords = project(delta, f"layer.{i}", pool, list(range(pool_size)))
        spent["project"] += time.perf_counter() - start
        start = time.perf_counter()
        reconstruct_block(coords, f"layer.{i}", pool, shape)
        spent["reconstruct"] += time.perf_counter() - start
    numbers = pool_size * sum(rows * cols for rows, cols in MINILM_LAYER)
    print(f"torch {torch.__version__}, one MiniLM layer, K = {pool_size}, 1 thread: {numbers:.3g} basis numbers each")
    for name, seconds in spent.items():
        print(f"{name:12s} {seconds:6.2f} s  {seconds / numbers * 1e9:6.2f} ns per number")
    return {name: seconds / numbers * 1e9 for name, seconds in spent.items()}


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
    parser.add_argument("--layer", action="store_true", help="time project + reconstruct on one MiniLM layer")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.layer:
        return layer()
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
