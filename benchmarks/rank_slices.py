"""How well a rank-r client's slice of a global LoRA adapter approximates the global adapter.

With clients of different ranks (`FedSRDConfig.client_lora_ranks`), a client of rank r trains from the first r
components of the global factors, B[:, :r] A[:r]. How much of the global product B A that slice holds is what the
client's local model sees of the federation. For each module this prints, averaged over modules, the share of
||B A||_F^2 the slice explains (1 - ||B A - B[:, :r] A[:r]||^2 / ||B A||^2) next to the best any rank-r matrix can
explain (the top r singular values' share, Eckart-Young). FlexLoRA's download is the best rank-r truncation, so its
two columns agree by construction; an algorithm whose components are not ordered by importance falls below.

    python benchmarks/rank_slices.py outputs/bench/frontier_hetrank/*/seed1/final --ranks 4 8 16

Reads PEFT adapter folders (`adapter_model.safetensors`), the `final` folders the heterogeneous-rank frontier runs
save (`python benchmarks/frontier.py --client-ranks 4 8 16 32 ...`). Seconds per adapter on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def slice_shares(b: torch.Tensor, a: torch.Tensor, ranks: list[int]) -> dict[int, tuple[float, float] | None]:
    """For each rank r: (share of ||B A||^2 the slice B[:, :r] A[:r] explains, share the best rank-r matrix explains).

    The first can be negative (a slice farther from B A than zero is); None where B A = 0."""
    b, a = b.to(torch.float64), a.to(torch.float64)
    product = b @ a
    singular = torch.linalg.svdvals(product)
    total = float((singular**2).sum())
    out = {}
    for r in ranks:
        if total == 0.0:  # B A = 0 (e.g. FLoRA, which merges every round's product into the base weights)
            out[r] = None
            continue
        residual = float(torch.linalg.matrix_norm(product - b[:, :r] @ a[:r]) ** 2)
        out[r] = (1.0 - residual / total, float((singular[:r] ** 2).sum()) / total)
    return out


def adapter_shares(folder: Path, ranks: list[int]) -> dict[int, tuple[float, float] | None]:
    """`slice_shares` averaged over the LoRA modules of the PEFT adapter in `folder` whose B A is not zero, for the
    `ranks` below its rank; None where every module's B A is zero."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise SystemExit(f"rank_slices: {path} does not exist (expected a PEFT adapter folder).")
    state = load_file(str(path))
    modules = sorted(key.removesuffix(".lora_A.weight") for key in state if key.endswith(".lora_A.weight"))
    if not modules:
        raise SystemExit(f"rank_slices: {path} holds no '*.lora_A.weight' tensors.")
    rank = state[modules[0] + ".lora_A.weight"].shape[0]
    ranks = [r for r in ranks if r < rank]  # a slice of the whole rank is the adapter itself
    sums = {r: [0.0, 0.0, 0] for r in ranks}
    for module in modules:
        shares = slice_shares(state[module + ".lora_B.weight"], state[module + ".lora_A.weight"], ranks)
        for r, pair in shares.items():
            if pair is not None:  # modules whose B A = 0 carry nothing to approximate
                sums[r] = [sums[r][0] + pair[0], sums[r][1] + pair[1], sums[r][2] + 1]
    return {r: (got / n, best / n) if n else None for r, (got, best, n) in sums.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", type=Path, help="PEFT adapter folders.")
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16], help="Slice ranks to measure.")
    p.add_argument("--json", action="store_true", help="Also print one JSON line with every figure.")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| adapter | " + " | ".join(f"r={r}: slice / best" for r in a.ranks) + " |")
    print("|---|" + "---:|" * len(a.ranks))
    rows = {}
    for folder in a.adapters:
        shares = adapter_shares(folder, a.ranks)
        rows[str(folder)] = {str(r): None if v is None else list(v) for r, v in shares.items()}
        cells = ["-" if r not in shares else "B A = 0" if shares[r] is None else
                 f"{shares[r][0]:.3f} / {shares[r][1]:.3f}" for r in a.ranks]
        print(f"| {folder} | " + " | ".join(cells) + " |")
    if a.json:
        print(json.dumps({"ranks": a.ranks, "adapters": rows}))


if __name__ == "__main__":
    main()
