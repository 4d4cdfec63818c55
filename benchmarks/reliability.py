"""Fault injection on a real federation (tiny preset) plus decoder/server fuzzing; prints the reliability table.

    python benchmarks/reliability.py [--rounds 6] [--clients 4] [--fuzz 10000] [--json]

Each sampled client's phase is hit, with probability --fault_rate, by one of: an exception during local training, a
timeout (the phase overruns client_timeout_s), or a hostile upload (its encoded bytes corrupted by
`fedsrd.testing.mutate`). The run must complete every round; the table counts what was injected and what the server
did with it. Then --fuzz mutated messages go through the decoder and the server step (with one honest update per
step) and every resulting state is checked (finite, right names and shapes) and re-derived by a client through the
broadcast's digest. "Data lost" counts rounds that did not complete and honest updates that were not aggregated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def run_with_faults(rounds: int, clients: int, fault_rate: float, seed: int) -> dict:
    import fedsrd.runtime.local as local
    from fedsrd.cli import run_train
    from fedsrd.testing import mutate
    from fedsrd.trainer import FederatedTrainer

    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    injected = {"exception": 0, "timeout": 0, "hostile": 0}
    plan: dict[tuple[int, int], str] = {}
    original_train = FederatedTrainer.local_train
    original_make = local.FederatedClient.make_update

    def faulty_train(self, client_id, round):
        kind = plan.setdefault((round, client_id), rng.choice(list(injected)) if rng.random() < fault_rate else "")
        if kind == "exception":
            injected["exception"] += 1
            raise RuntimeError("injected: client crashed")
        output = original_train(self, client_id, round)
        if kind == "timeout":
            injected["timeout"] += 1
            time.sleep(self.fed_config.client_timeout_s + 0.05)
        return output

    def faulty_make(self, local_state, *, round, client_id, **kw):
        data = original_make(self, local_state, round=round, client_id=client_id, **kw)
        if plan.get((round, client_id)) == "hostile":
            injected["hostile"] += 1
            return mutate(data, nprng)
        return data

    FederatedTrainer.local_train = faulty_train
    local.FederatedClient.make_update = faulty_make
    try:
        with tempfile.TemporaryDirectory() as out:
            trainer = run_train([
                "--config", str(REPO / "examples/configs/tiny.yaml"), "--output_dir", out, "--disable_tqdm", "true",
                "--num_rounds", str(rounds), "--num_clients", str(clients), "--domains", *["arithmetic", "units",
                "percent", "code_output"][:clients], "--client_timeout_s", "2", "--round_retries", "3",
                "--eval_every", "0",
            ])  # fmt: skip
            history = json.loads((Path(out) / "history.json").read_text())
    finally:
        FederatedTrainer.local_train = original_train
        local.FederatedClient.make_update = original_make
    rounds_done = [r for r in history if r["round"] >= 1]
    dropped = sum(len(r["dropped"]) for r in rounds_done)
    rejected = sum(len(r["rejected"]) for r in rounds_done)
    honest_lost = 0
    for r in rounds_done:  # an honest client of this round must have been aggregated
        honest = [c for c in r["clients"] if not plan.get((r["round"], c))]
        honest_lost += sum(1 for c in honest if str(c) in r["dropped"])
    finite = all(bool(torch.isfinite(v).all()) for v in trainer.global_state.values())
    return {
        "faults_injected": sum(injected.values()),
        **{f"faults_{k}": v for k, v in injected.items()},
        "dropped_clients": dropped,
        "rejected_updates": rejected,
        "rounds_completed": len(rounds_done),
        "rounds_planned": rounds,
        "honest_updates_lost": honest_lost,
        "state_finite": finite,
    }


def fuzz(count: int, seed: int) -> dict:
    from fedsrd import FedSRDConfig, get_algorithm
    from fedsrd.client import FederatedClient
    from fedsrd.server import FederatedServer
    from fedsrd.testing import mutate

    nprng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    state = {f"m.{i}.lora_{f}.weight": (torch.randn(4, 12, generator=g) if f == "A" else torch.zeros(6, 4))
             for i in range(2) for f in "AB"}
    fed, crashes, corrupt = 0, 0, 0
    for algorithm in ("fedavg", "fedsrd"):
        cfg = FedSRDConfig(algorithm=algorithm, num_clients=2)
        algo = get_algorithm(algorithm, cfg)
        client = FederatedClient(algo, state, cfg)
        honest = [client.make_update({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()},
                                     round=1, client_id=c, num_samples=4) for c in range(2)]
        for _ in range(count // 2 // 50):
            mutants = [mutate(honest[int(nprng.integers(0, 2))], nprng) for _ in range(50)]
            server = FederatedServer(algo, dict(state), cfg)
            try:
                result = server.step(1, [*mutants, honest[0]])
                FederatedClient(algo, dict(state), cfg).receive(result.broadcast)
            except Exception:  # noqa: BLE001 - counted, and reported as a failure
                crashes += 1
            ok = all(bool(torch.isfinite(v).all()) and v.shape == state[k].shape for k, v in server.state.items())
            corrupt += 0 if ok and set(server.state) == set(state) else 1
            fed += 50
    return {"messages_fuzzed": fed, "server_crashes": crashes, "corrupted_states": corrupt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--fault_rate", type=float, default=0.3)
    p.add_argument("--fuzz", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(sys.stderr):  # the runs' logs; stdout is the table (and the JSON line)
        row = {**run_with_faults(a.rounds, a.clients, a.fault_rate, a.seed), **fuzz(a.fuzz, a.seed)}
    print("| figure | value |\n|---|---|")
    for k, v in row.items():
        print(f"| {k} | {v} |")
    if a.json:
        print(json.dumps(row))
    sys.exit(0 if row["rounds_completed"] == a.rounds and row["server_crashes"] == 0 else 1)


if __name__ == "__main__":
    main()
