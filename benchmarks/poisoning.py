"""One poisoned client of four: how far each algorithm's global moves from the honest merge, under each defence.

    python benchmarks/poisoning.py [--seeds 3] [--json]
    python benchmarks/poisoning.py --honest [--seeds 3] [--rounds 6] [--algorithms fedavg fedsrd] [--json]

``--honest``: what the default defence costs an honest federation. The tiny preset (random tiny Llama, synthetic
data) with four clients, one domain each, trained with the default adaptive clipping and with ``adaptive_clip=off``
from the same seed; the final held-out loss of each pair, and the mean paired difference (default minus off) with
its 95% t-interval over seeds (`benchmarks/frontier.py`'s ``paired_interval``), plus how many updates were clipped.

Synthetic tiny states (two LoRA modules, r=4, 24 x 32; FedFFT: two 24 x 32 weight changes), a mid-run round (B and A
non-zero; round 3, a B-round for FedSRD). Four clients train honestly (a shared direction plus their own noise); then
client 3 is replaced by an attacker who sends either its honest change sign-flipped and scaled x50 (``sign_flip_x50``)
or every uploaded value at 9999, just under ``max_update_value`` (``max_value``). Every update goes through the real
server role (`FederatedServer.step`: decoding, validation, the defence, the algorithm's step). The figure is the
distance of the resulting global from the global of the same step on the four honest updates with no defence, as a
multiple of that honest step's own size: the *model* each holds, i.e. the sum of the LoRA products B A per module
(FedSA-LoRA: the shared A, as B stays with the clients; FedFFT: the weight changes). Defences (FedSRDConfig):

* ``off``: ``adaptive_clip="off"``, the plain weighted mean;
* ``clip (default)``: ``adaptive_clip`` at its default, each client's change clipped to 3 x the round's median norm
  (FedSRD family: the change of the client's LoRA product);
* ``median`` / ``trimmed_mean``: coordinate-wise, without clipping (with four clients and ``trim_fraction`` 0.25 the
  trimmed mean drops one value at each end, and equals the median);
* ``clip + median``.

"n/a": the algorithm refuses that defence at config time (its server step is not a sum of dense client tensors).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.ops import generator_for
from fedsrd.server import FederatedServer

ALGORITHMS = ("fedavg", "fedprox", "ffa_lora", "fedsa_lora", "fedfft", "topk", "fed_dare", "fedsrd", "fedsrd_e",
              "fedsrd_ef")  # fmt: skip
DEFENCES = {
    "off": {"adaptive_clip": "off"},
    "clip (default)": {},
    "median": {"adaptive_clip": "off", "robust_aggregation": "median"},
    "trimmed_mean": {"adaptive_clip": "off", "robust_aggregation": "trimmed_mean"},
    "clip + median": {"robust_aggregation": "median"},
}
ATTACKS = ("sign_flip_x50", "max_value")
NUM_CLIENTS, ROUND, RANK, D_OUT, D_IN = 4, 3, 4, 24, 32
POISONED = NUM_CLIENTS - 1
STEP = 0.02  # size of one honest coordinate's change


def initial_state(algorithm: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if algorithm == "fedfft":
        return {f"m.layers.{i}.mlp.weight": 0.1 * torch.randn(D_OUT, D_IN, generator=g) for i in range(2)}
    state = {}
    for i in range(2):
        state[f"m.layers.{i}.q_proj.lora_A.weight"] = torch.randn(RANK, D_IN, generator=g) / D_IN**0.5
        state[f"m.layers.{i}.q_proj.lora_B.weight"] = 0.1 * torch.randn(D_OUT, RANK, generator=g)
    return state


def honest_locals(state: dict[str, torch.Tensor], seed: int) -> list[dict[str, torch.Tensor]]:
    """Each client's trained state: a direction all clients share plus as much of the client's own."""
    g = torch.Generator().manual_seed(seed + 1)
    shared = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    return [{k: v + STEP * (shared[k] + torch.randn(v.shape, generator=g)) for k, v in state.items()}
            for _ in range(NUM_CLIENTS)]  # fmt: skip


def encode_update(algo, state, local, client_id: int, attack: str | None) -> bytes:
    rng = generator_for(algo.config.seed, "client_update", ROUND, client_id)
    if attack == "sign_flip_x50":  # the attacker trains honestly, then sends -50 x its change
        local = {k: v - 50 * (local[k] - v) for k, v in state.items()}
    payload = algo.client_update(state, local, ROUND, rng)
    if attack == "max_value":
        payload = {k: torch.full(tuple(_shape(v)), 9999.0) for k, v in payload.items()}
    msg = wire.Message(kind="update", algorithm=algo.name, round=ROUND, tensors=payload,
                       meta={"client_id": client_id, "num_samples": 10})  # fmt: skip
    return wire.encode(msg, value_dtype=algo.config.value_dtype)


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape)


def model_of(algorithm: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the global means for the model, flattened: LoRA products B A per module, else the state itself."""
    if algorithm in ("fedfft", "fedsa_lora"):
        keys = sorted(k for k in state if algorithm == "fedfft" or "lora_A" in k)
        return torch.cat([state[k].reshape(-1).double() for k in keys])
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    return torch.cat([(state[f"{m}.lora_B.weight"].double() @ state[f"{m}.lora_A.weight"].double()).reshape(-1)
                      for m in modules])  # fmt: skip


def server_state(algorithm: str, state, blobs: list[bytes], defence: dict) -> tuple[dict, dict] | None:
    try:
        cfg = FedSRDConfig(algorithm=algorithm, num_clients=NUM_CLIENTS, **defence)
    except ValueError:
        return None  # the algorithm refuses this defence
    server = FederatedServer(get_algorithm(algorithm, cfg), dict(state), cfg)
    result = server.step(ROUND, blobs)
    return server.state, result.robust


def measure(algorithm: str, seed: int) -> list[dict]:
    state = initial_state(algorithm, seed)
    cfg = FedSRDConfig(algorithm=algorithm, num_clients=NUM_CLIENTS)
    algo = get_algorithm(algorithm, cfg)
    locals_ = honest_locals(state, seed)
    honest = [encode_update(algo, state, loc, c, None) for c, loc in enumerate(locals_)]
    reference, _ = server_state(algorithm, state, honest, DEFENCES["off"])
    before, merged = model_of(algorithm, state), model_of(algorithm, reference)
    honest_step = float((merged - before).norm())
    rows = []
    for attack in ATTACKS:
        blobs = [*honest[:POISONED], encode_update(algo, state, locals_[POISONED], POISONED, attack)]
        for name, defence in DEFENCES.items():
            out = server_state(algorithm, state, blobs, defence)
            row = {"algorithm": algorithm, "seed": seed, "attack": attack, "defence": name, "honest_step": honest_step}
            if out is None:
                rows.append({**row, "distance": None, "relative": None, "clipped": None})
                continue
            distance = float((model_of(algorithm, out[0]) - merged).norm())
            rows.append({**row, "distance": distance, "relative": distance / honest_step,
                         "clipped": sorted(out[1].get("clipped", {}))})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """Median over seeds of the distance from the honest merge, in honest steps, per algorithm x attack x defence."""
    lines = ["| algorithm | attack | " + " | ".join(DEFENCES) + " |", "|---|---|" + "---|" * len(DEFENCES)]
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        for attack in ATTACKS:
            cells = []
            for defence in DEFENCES:
                values = [r["relative"] for r in rows
                          if (r["algorithm"], r["attack"], r["defence"]) == (algorithm, attack, defence)]  # fmt: skip
                cells.append("n/a" if None in values else _fmt(torch.tensor(values).median().item()))
            lines.append(f"| {algorithm} | {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 1e4 else f"{x:.2e}"


def honest_run(algorithm: str, seed: int, rounds: int, clip: str) -> dict:
    """One honest tiny federation; its final held-out loss and the number of clipped updates."""
    import contextlib
    import tempfile
    from pathlib import Path

    from fedsrd.cli import run_train

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):
        run_train([
            "--config", str(repo / "examples/configs/tiny.yaml"), "--output_dir", out, "--disable_tqdm", "true",
            "--algorithm", algorithm, "--num_rounds", str(rounds), "--num_clients", "4",
            "--domains", "arithmetic", "units", "percent", "code_output", "--seed", str(seed),
            "--fed_seed", str(seed), "--eval_every", "0", "--save_every", "0", "--adaptive_clip", clip,
        ])  # fmt: skip
        history = json.loads((Path(out) / "history.json").read_text())
    last = history[-1]
    clipped = sum(len(r.get("robust", {}).get("clipped", {})) for r in history)
    return {"eval_loss": last["eval_loss"], "clipped": clipped, "updates": sum(len(r["accepted"]) for r in history)}


def honest(algorithms: list[str], seeds: int, rounds: int) -> dict:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from frontier import paired_interval

    out = {}
    print("| algorithm | seeds | loss, default clip | loss, off | default - off (95% CI) | clipped updates |")
    print("|---|---|---|---|---|---|")
    for algorithm in algorithms:
        pairs = [(honest_run(algorithm, s, rounds, "auto"), honest_run(algorithm, s, rounds, "off"))
                 for s in range(seeds)]  # fmt: skip
        diffs = [on["eval_loss"] - off["eval_loss"] for on, off in pairs]
        mean, interval = paired_interval(diffs)
        on_mean = sum(p[0]["eval_loss"] for p in pairs) / seeds
        off_mean = sum(p[1]["eval_loss"] for p in pairs) / seeds
        clipped = f"{sum(p[0]['clipped'] for p in pairs)} of {sum(p[0]['updates'] for p in pairs)}"
        ci = "n/a" if interval is None else f"[{interval[0]:+.4f}, {interval[1]:+.4f}]"
        print(f"| {algorithm} | {seeds} | {on_mean:.4f} | {off_mean:.4f} | {mean:+.4f} {ci} | {clipped} |")
        out[algorithm] = {"pairs": [{"default": on, "off": off} for on, off in pairs], "mean_diff": mean,
                          "interval": interval}  # fmt: skip
    return {"settings": {"rounds": rounds, "seeds": seeds, "clients": 4, "preset": "tiny"}, "honest": out}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    p.add_argument("--json", action="store_true")
    p.add_argument("--honest", action="store_true", help="Run the honest tiny federations instead (minutes).")
    p.add_argument("--rounds", type=int, default=6, help="--honest: rounds per run.")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.honest:
        algorithms = a.algorithms if a.algorithms != list(ALGORITHMS) else ["fedavg", "fedsrd"]
        result = honest(algorithms, a.seeds, a.rounds)
        if a.json:
            print(json.dumps(result))
        return result
    t0 = time.time()
    rows = [row for algorithm in a.algorithms for seed in range(a.seeds) for row in measure(algorithm, seed)]
    print("Distance of the global from the honest merge, in honest steps (median over "
          f"{a.seeds} seeds; one poisoned client of {NUM_CLIENTS}):\n")  # fmt: skip
    print(table(rows))
    result = {"settings": {"clients": NUM_CLIENTS, "poisoned": 1, "round": ROUND, "rank": RANK, "shape": [D_OUT, D_IN],
                           "seeds": a.seeds, "seconds": time.time() - t0}, "rows": rows}  # fmt: skip
    if a.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
