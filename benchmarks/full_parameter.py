"""Communication per client per round of the full-parameter family (fedfft, fedkrso, fedkseed), measured by encoding
real messages through the client and server roles and the wire codec (no model is loaded).

Local training is simulated by what it leaves behind: FedFFT a small random change of every trained weight; FedKRSO
random out x r accumulators for the seeds the client would use (drawn exactly as `KRSOAdamW` draws them: one seed
per tau local steps, uniformly from the round's K); FedKSeed one random scalar per local step, on the seed index its
optimizer would pick. One transformer block is encoded and the bytes are scaled to all blocks (equal shapes); the
classification head, if the preset has one, is added once. FedKSeed's messages do not depend on the model.

    python benchmarks/full_parameter.py --preset roberta-base      # FedKRSO's setting (spec §2), 100 local steps
    python benchmarks/full_parameter.py --preset tiny --local-steps 8
    python benchmarks/full_parameter.py --preset minilm --json

`benchmarks/comm_table.py` calls `measure` for these algorithms on its Llama shapes. MB = 1024^2 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from fedsrd import FedSRDConfig, get_algorithm
from fedsrd.algorithms import get_algorithm_class
from fedsrd.algorithms.fedkrso import accumulator_name
from fedsrd.algorithms.fedkseed import LOCAL_INCREMENT
from fedsrd.client import FederatedClient
from fedsrd.ops import generator_for
from fedsrd.server import FederatedServer

MB = 1024 * 1024
ALGORITHMS = ["fedfft", "fedkrso", "fedkseed"]


def _bert(hidden: int, intermediate: int, layers: int, head: dict[str, tuple[int, ...]]) -> dict:
    block = [
        ("attention.self.query", hidden, hidden),
        ("attention.self.key", hidden, hidden),
        ("attention.self.value", hidden, hidden),
        ("attention.output.dense", hidden, hidden),
        ("intermediate.dense", intermediate, hidden),
        ("output.dense", hidden, intermediate),
    ]
    return {"prefix": "encoder.layer", "block": block, "layers": layers, "head": head}


PRESETS = {
    # FedKRSO's model (spec §2): RoBERTa-base, 2 classes; head classifier.dense + classifier.out_proj
    "roberta-base": _bert(
        768,
        3072,
        12,
        {
            "classifier.dense.weight": (768, 768),
            "classifier.dense.bias": (768,),
            "classifier.out_proj.weight": (2, 768),
            "classifier.out_proj.bias": (2,),
        },
    ),
    # the packaged all-MiniLM-L6-v2 as BertForSequenceClassification: pooler + classifier
    "minilm": _bert(
        384,
        1536,
        6,
        {
            "bert.pooler.dense.weight": (384, 384),
            "bert.pooler.dense.bias": (384,),
            "classifier.weight": (2, 384),
            "classifier.bias": (2,),
        },
    ),
    # the tests' tiny random Llama (fedsrd.models.build_tiny_llama): no head (lm_head stays frozen)
    "tiny": {
        "prefix": "model.layers",
        "block": [
            ("self_attn.q_proj", 64, 64),
            ("self_attn.k_proj", 32, 64),
            ("self_attn.v_proj", 32, 64),
            ("self_attn.o_proj", 64, 64),
            ("mlp.gate_proj", 128, 64),
            ("mlp.up_proj", 128, 64),
            ("mlp.down_proj", 64, 128),
        ],
        "layers": 2,
        "head": {},
    },
}


def simulated_local_state(algo, start: dict, shapes: dict, round: int, client_id: int, seed: int) -> dict:
    """What a client's local phase leaves for `client_update`, drawn as that algorithm's optimizer would draw."""
    cfg = algo.config
    gen = generator_for(seed, "bench_local", round, client_id)
    if algo.name == "fedkseed":
        picker = generator_for(cfg.seed, "fedkseed_pick", round, client_id)
        increments = torch.zeros(cfg.kseed_num_seeds)
        for _ in range(cfg.local_steps):
            increments[int(torch.randint(cfg.kseed_num_seeds, (1,), generator=picker))] += 1e-6 * float(
                torch.randn(1, generator=gen)
            )
        return {LOCAL_INCREMENT: increments}
    local = {name: 1e-4 * torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    if algo.name == "fedkrso":
        picker = generator_for(cfg.seed, "fedkrso_pick", round, client_id)
        periods = math.ceil(cfg.local_steps / cfg.krso_tau)
        used = {int(torch.randint(cfg.krso_num_seeds, (1,), generator=picker)) for _ in range(periods)}
        for name, shape in shapes.items():
            if len(shape) == 2 and name in start and not _is_head(name, algo):
                for k in used:
                    local[accumulator_name(name, k)] = 1e-4 * torch.randn(shape[0], cfg.krso_rank, generator=gen)
    return local


def _is_head(name: str, algo) -> bool:
    return algo.trainable(name) if algo.name == "fedkrso" else False


def measure(
    name: str,
    block: list[tuple[str, int, int]],
    head: dict[str, tuple[int, ...]] | None = None,
    *,
    total_layers: float,
    clients: int = 4,
    rounds: int = 2,
    local_steps: int = 10,
    seed: int = 0,
    value_dtype: str = "float32",
    positions: str = "auto",
) -> dict:
    """Mean MB per client per round of `name`: one block (`block`: weight name, d_out, d_in) encoded and scaled by
    `total_layers`, plus the head's tensors once (a message of their own: one container header more)."""
    cfg = FedSRDConfig(
        algorithm=name,
        num_clients=clients,
        fed_seed=seed,
        value_dtype=value_dtype,
        positions=positions,
        local_steps=local_steps,
    )
    parts = [({n: (d_out, d_in) for n, d_out, d_in in block}, total_layers)]
    if head and name != "fedkseed":
        parts.append((dict(head), 1.0))
    if name == "fedkseed":  # the K scalars do not depend on the model: one measurement, not scaled
        parts = [(parts[0][0], 1.0)]
    upload = [0.0] * rounds
    download = [0.0] * rounds
    for shapes, scale in parts:
        algo = get_algorithm(name, cfg)
        state = algo.init_global_state({n: torch.zeros(s) for n, s in shapes.items()})
        server = FederatedServer(algo, dict(state), cfg)
        view = FederatedClient(algo, dict(state), cfg)
        for round in range(1, rounds + 1):
            blobs = []
            for cid in range(clients):
                local = simulated_local_state(algo, state, shapes, round, cid, seed)
                blobs.append(view.make_update(local, round=round, client_id=cid, num_samples=1))
            result = server.step(round, blobs, min_updates=clients)
            view.receive(result.broadcast)
            upload[round - 1] += scale * statistics.fmean(len(b) for b in blobs) / MB
            download[round - 1] += scale * len(result.broadcast) / MB
    cls = get_algorithm_class(name)
    return {
        "algorithm": name,
        "paper": cls.paper,
        "uploads": cls.uploads,
        "downloads": cls.downloads,
        "upload_mb": statistics.fmean(upload),
        "download_mb": statistics.fmean(download),
        "total_mb": statistics.fmean(upload) + statistics.fmean(download),
        "upload_mb_by_round": upload,
        "download_mb_by_round": download,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="roberta-base")
    p.add_argument("--clients", type=int, default=10, help="Clients, all taking part every round (FedKRSO: 10).")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=100, help="Local steps per round (FedKRSO's code: 100).")
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    p.add_argument("--value-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Also print one JSON object as the last line.")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    block = [(f"{preset['prefix']}.0.{m}.weight", d_out, d_in) for m, d_out, d_in in preset["block"]]
    rows = [
        measure(
            name,
            block,
            preset["head"],
            total_layers=preset["layers"],
            clients=args.clients,
            rounds=args.rounds,
            local_steps=args.local_steps,
            seed=args.seed,
            value_dtype=args.value_dtype,
        )
        for name in args.algorithms
    ]
    defaults = FedSRDConfig()
    description = (
        f"{args.preset}: all Linear weights of {preset['layers']} blocks"
        + (" + classification head" if preset["head"] else "")
        + f"; {args.clients} clients, {args.local_steps} local steps; FedKRSO r={defaults.krso_rank}, "
        f"K={defaults.krso_num_seeds}, tau={defaults.krso_tau}; FedKSeed K={defaults.kseed_num_seeds}; "
        f"{args.value_dtype}; MB (1024^2 B) per client per round, mean of {args.rounds} rounds."
    )
    print(f"Configuration: {description}\n")
    print("| algorithm | client uploads | server broadcasts | up MB | down MB |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        mb = [f"{r['upload_mb']:.4f}", f"{r['download_mb']:.4f}"]
        cells = [f"`{r['algorithm']}`", r["uploads"], r["downloads"], *mb]
        print("| " + " | ".join(cells) + " |")
    result = {"config": {**vars(args), "description": description}, "rows": rows}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
