"""Communication per client per round of every registered algorithm, measured by encoding real messages.

The stated configuration (default): Llama-3.2-3B-shaped LoRA, r = 64 on all 7 linear projections of all 28 decoder
layers (97,255,424 LoRA parameters, the FedSRD paper's Table 8 setting), 4 clients all taking part, uniform weights,
float32 values, sparse positions as bitmap or varint (whichever is smaller per tensor). No model is loaded: each layer's
adapter starts as PEFT initialises it (A Kaiming-uniform, B = 0) and a client's local training is simulated by a small
random move of the factors it trains (B by 1e-3 N(0,1), A by 1e-4 N(0,1)). Every upload and broadcast goes through the
client and server roles and the wire codec (`fedsrd.client`, `fedsrd.server`, `fedsrd.wire`); the figures are the
lengths of those bytes. One message per decoder layer is encoded and the lengths are summed over the layers (the same
tensors in one message would differ only by the container headers, about 2 KB per layer). ``--rounds 2`` (default)
averages a B-round and an A-round of FedSRD. MB = 1024^2 bytes.

    python benchmarks/comm_table.py                     # the stated configuration (a few minutes on 2 CPU cores)
    python benchmarks/comm_table.py --preset tiny       # the tiny random Llama's shapes, r = 4 (seconds)
    python benchmarks/comm_table.py --algorithms fedavg fedsrd --layers 2 --json
    python benchmarks/comm_table.py --preset tiny --client-ranks 1 2 3 4   # clients of different LoRA ranks

Prints a Markdown table; with --json the last line is one JSON object with the configuration and every row.
With ``--client-ranks`` (one rank per client, at most the table's rank) each client trains its own rank
(`FedSRDConfig.client_lora_ranks`) and only the algorithms that support unequal ranks are measured; up and down are
then the means over the clients of each one's upload and of the part of the broadcast its rank needs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time

import torch

from fedsrd import FedSRDConfig, get_algorithm, list_algorithms
from fedsrd.algorithms import get_algorithm_class
from fedsrd.client import FederatedClient
from fedsrd.ops import generator_for
from fedsrd.server import FederatedServer
from fedsrd.wire import MB

# Row order of the table: the reference, the baselines, then FedSRD; anything else registered follows, sorted.
TABLE_ORDER = [
    "fedavg", "fedprox", "ffa_lora", "flexlora", "fed_dare", "topk", "flora", "fedsa_lora", "fedex_lora", "fedsrd",
    "fedsrd_e", "fedsrd_ef",
    "rolora", "fedsvd", "fed_sb", "fedrpca",  # issue 19 (newalgos)
]  # fmt: skip
# The FedSRD paper's Table 8 (Llama-3.2-3B, r = 64, all 7 projections, float32, a 1-bit bitmap per sparse tensor):
# (up, down) MB per client per round. FedSRD-e's bytes equal FedSRD's. Methods the paper does not list have none.
PAPER_TABLE8 = {
    "fedavg": (371.0, 371.0), "fedprox": (371.0, 371.0), "flexlora": (371.0, 371.0), "ffa_lora": (185.5, 185.5),
    "fed_dare": (48.7, 141.5), "fedsrd": (31.0, 43.0), "fedsrd_e": (31.0, 43.0),
}  # fmt: skip
PRESETS = {
    # Llama-3.2-3B: hidden 3072, MLP 8192, 24 heads and 8 KV heads of 128, 28 layers
    "llama-3.2-3b": {"hidden": 3072, "intermediate": 8192, "kv": 1024, "layers": 28, "rank": 64},
    # the tests' tiny random Llama (fedsrd.models.build_tiny_llama)
    "tiny": {"hidden": 64, "intermediate": 128, "kv": 32, "layers": 2, "rank": 4},
}


def layer_modules(dims: dict[str, int], layer: int) -> list[tuple[str, int, int]]:
    """(PEFT module name, d_out, d_in) of the 7 adapted projections of one Llama decoder layer."""
    h, i, kv = dims["hidden"], dims["intermediate"], dims["kv"]
    prefix = f"base_model.model.model.layers.{layer}"
    return [
        (f"{prefix}.self_attn.q_proj", h, h),
        (f"{prefix}.self_attn.k_proj", kv, h),
        (f"{prefix}.self_attn.v_proj", kv, h),
        (f"{prefix}.self_attn.o_proj", h, h),
        (f"{prefix}.mlp.gate_proj", i, h),
        (f"{prefix}.mlp.up_proj", i, h),
        (f"{prefix}.mlp.down_proj", h, i),
    ]


def initial_state(dims: dict[str, int], layer: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """One layer's adapter as PEFT initialises it: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0."""
    state = {}
    for module, d_out, d_in in layer_modules(dims, layer):
        gen = generator_for(seed, "init", module)
        state[f"{module}.lora_A.weight"] = (torch.rand(rank, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)
        state[f"{module}.lora_B.weight"] = torch.zeros(d_out, rank)
    return state


def local_training(start: dict[str, torch.Tensor], trainable, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A stand-in for local training: a small random move of every factor the algorithm trains."""
    local = {}
    for key, value in start.items():
        if not trainable(key):
            local[key] = value.clone()
            continue
        scale = 1e-3 if "lora_B" in key else 1e-4
        local[key] = value + scale * torch.randn(value.shape, generator=gen)
    return local


def measure(name: str, dims: dict[str, int], rank: int, clients: int, rounds: int, layers: list[int], args) -> dict:
    """Bytes of every upload and broadcast of `rounds` rounds of `name`, summed over the decoder `layers`."""
    if not get_algorithm_class(name).uses_lora:  # fedfft, fedkrso, fedkseed: the layers' full weights
        return _full_parameter().measure(
            name,
            [(m.removeprefix("base_model.model.") + ".weight", o, i) for m, o, i in layer_modules(dims, layers[0])],
            total_layers=len(layers) * args.scale,
            clients=clients,
            rounds=rounds,
            seed=args.seed,
            value_dtype=args.value_dtype,
            positions=args.positions,
        )
    client_ranks = getattr(args, "client_ranks", None)  # clients of different LoRA ranks
    cfg = FedSRDConfig(
        algorithm=name,
        num_clients=clients,
        lora_r=rank,
        lora_alpha=2 * rank,
        fed_seed=args.seed,
        value_dtype=args.value_dtype,
        positions=args.positions,
        client_lora_ranks=client_ranks,
    )
    upload = [[0] * clients for _ in range(rounds)]
    download = [0] * rounds
    for layer in layers:
        algo = get_algorithm(name, cfg)
        state = initial_state(dims, layer, rank, args.seed)
        if name == "fed_sb":  # Fed-SB's adapter also holds the r x r matrix R between B and A (what it sends)
            state.update({k.replace("lora_A", "lora_R"): torch.eye(rank) for k in list(state) if "lora_A" in k})
        server = FederatedServer(algo, dict(state), cfg)
        view = FederatedClient(algo, dict(state), cfg)  # every client holds this state after each broadcast
        for round in range(1, rounds + 1):
            blobs = []
            for cid in range(clients):
                start = view.start_state(cid)
                trains = functools.partial(algo.trains, round=round)  # what this round trains (RoLoRA: by round)
                local = local_training(start, trains, generator_for(args.seed, "train", layer, round, cid))
                view.keep_personal(cid, local)
                blobs.append(view.make_update(local, round=round, client_id=cid, num_samples=1))
                upload[round - 1][cid] += len(blobs[-1])
            result = server.step(round, blobs, min_updates=clients)
            view.receive(result.broadcast)
            if client_ranks:  # what each client's rank needs of the broadcast, averaged over the clients
                download[round - 1] += statistics.fmean(result.download_bytes_by_rank[str(r)] for r in client_ranks)
            else:
                download[round - 1] += len(result.broadcast)
    scale = args.scale  # > 1 only with --sample-layers: the sampled layers stand for all layers of that shape
    up_rounds = [scale * statistics.fmean(r) / MB for r in upload]
    down_rounds = [scale * d / MB for d in download]
    cls = get_algorithm_class(name)
    return {
        "algorithm": name,
        "paper": cls.paper,
        "paper_up_down_mb": PAPER_TABLE8.get(name)
        if dims.get("layers") == 28 and rank == 64 and not client_ranks
        else None,
        "uploads": cls.uploads,
        "downloads": cls.downloads,
        "upload_mb": statistics.fmean(up_rounds),
        "download_mb": statistics.fmean(down_rounds),
        "total_mb": statistics.fmean(up_rounds) + statistics.fmean(down_rounds),
        "upload_mb_by_round": up_rounds,
        "download_mb_by_round": down_rounds,
    }


def _full_parameter():
    """benchmarks/full_parameter.py (the full-parameter family's measurement), loaded by path."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("full_parameter", Path(__file__).with_name("full_parameter.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lora_parameters(dims: dict[str, int], rank: int, layers: int) -> int:
    return layers * sum(rank * (d_out + d_in) for _, d_out, d_in in layer_modules(dims, 0))


def _mb(x: float) -> str:
    return f"{x:,.1f}" if x >= 1 else f"{x:.4f}"


def markdown(rows: list[dict], config: dict, compact: bool = False) -> str:
    """The table; with the paper's Table 8 figures beside ours for the Llama-3.2-3B preset at r = 64.
    `compact`: without the long description columns."""
    paper = config["preset"] == "llama-3.2-3b" and config["rank"] == 64 and not config.get("client_ranks")
    head = ["algorithm"] + ([] if compact else ["paper", "client uploads", "server broadcasts"])
    head += ["up MB", "down MB", "total MB"] + (["paper up / down / total MB", "ours / paper"] if paper else [])
    lines = [f"Configuration: {config['description']}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * (1 if compact else 4) + "---:|" * (len(head) - (1 if compact else 4))]  # fmt: skip
    for r in rows:
        cells = [f"`{r['algorithm']}`"] + ([] if compact else [r["paper"], r["uploads"], r["downloads"]])
        cells += [_mb(r["upload_mb"]), _mb(r["download_mb"]), _mb(r["total_mb"])]
        if paper:
            up, down = PAPER_TABLE8.get(r["algorithm"], (None, None))
            cells += ["-", "-"] if up is None else [f"{up:g} / {down:g} / {up + down:g}",
                                                   f"{r['total_mb'] / (up + down):.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-3b", help="LoRA shapes (default 3B).")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the preset's, 64 for 3B).")
    p.add_argument("--layers", type=int, default=None, help="Decoder layers of the model (default: the preset's).")
    p.add_argument(
        "--sample-layers",
        type=int,
        default=None,
        help="Encode only this many evenly spaced layers and scale their bytes to all layers (quick estimate; the "
        "layers have equal shapes). Default: encode every layer.",
    )
    p.add_argument("--clients", type=int, default=4, help="Clients, all taking part every round.")
    p.add_argument("--rounds", type=int, default=2, help="Rounds averaged (FedSRD alternates B- and A-rounds).")
    p.add_argument("--algorithms", nargs="+", default=None, help="Algorithms (default: every registered one).")
    p.add_argument("--value-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--positions", default="auto", choices=["auto", "bitmap", "varint"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--client-ranks",
        type=int,
        nargs="+",
        default=None,
        help="One LoRA rank per client (clients of different ranks); only algorithms that support them are measured.",
    )
    p.add_argument("--compact", action="store_true", help="Leave the description columns out of the table.")
    p.add_argument("--json", action="store_true", help="Also print one JSON object as the last line.")
    args = p.parse_args(argv)
    dims = PRESETS[args.preset]
    rank = args.rank or dims["rank"]
    layers = args.layers or dims["layers"]
    # The stated configuration is a LoRA adapter; full-parameter algorithms (uses_lora False) need the model's weights.
    lora = [n for n in list_algorithms() if getattr(get_algorithm_class(n), "uses_lora", True)]
    skipped = sorted(set(list_algorithms()) - set(lora))
    names = args.algorithms or [n for n in TABLE_ORDER if n in lora] + sorted(set(lora) - set(TABLE_ORDER))
    not_lora = [n for n in names if n not in lora]
    if not_lora:
        p.error(f"{not_lora} train the model's own weights, not a LoRA adapter; this table measures LoRA methods.")
    if args.client_ranks is not None:
        if len(args.client_ranks) != args.clients or max(args.client_ranks) > rank or min(args.client_ranks) < 1:
            p.error(
                f"--client-ranks: expected {args.clients} ranks (one per client) in 1..{rank}, got {args.client_ranks}"
            )
        names = [n for n in names if get_algorithm_class(n).supports_unequal_ranks]
    sample = min(args.sample_layers or layers, layers)
    measured = sorted({(i * layers) // sample for i in range(sample)})
    args.scale = layers / len(measured)
    config = {
        "preset": args.preset,
        "rank": rank,
        "layers": layers,
        "clients": args.clients,
        "rounds": args.rounds,
        "value_dtype": args.value_dtype,
        "positions": args.positions,
        "lora_parameters": lora_parameters(dims, rank, layers),
        "measured_layers": measured,
        "skipped_full_parameter": [] if args.algorithms else skipped,
        "client_ranks": args.client_ranks,
        "seed": args.seed,
    }
    sampled = "" if len(measured) == layers else f" (encoded on {len(measured)} of them, scaled)"
    config["description"] = (
        f"{args.preset} shapes, LoRA r={rank} on q,k,v,o,gate,up,down of {layers} layers{sampled} "
        f"({config['lora_parameters']:,} LoRA parameters), {args.clients} clients per round, "
        f"{args.value_dtype} values, {args.positions} positions; MB (1024^2 B) per client per round, "
        f"mean of {args.rounds} rounds."
    )
    if args.client_ranks:
        config["description"] += (
            f" Clients of LoRA ranks {args.client_ranks}: means over the clients of each one's upload and of what its "
            "rank needs of the broadcast."
        )
    rows = []
    for name in names:
        start = time.perf_counter()
        rows.append(measure(name, dims, rank, args.clients, args.rounds, measured, args))
        r = rows[-1]
        print(
            f"{name}: up {r['upload_mb']:.2f} MB, down {r['download_mb']:.2f} MB ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
        )
    print(markdown(rows, config, compact=args.compact))
    if config["skipped_full_parameter"]:
        print(f"\nNot measured here (full-parameter, no LoRA adapter): {', '.join(config['skipped_full_parameter'])}.")
    result = {"config": config, "rows": rows}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
