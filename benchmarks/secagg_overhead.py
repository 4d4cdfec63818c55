"""Secure aggregation's cost on a real Flower deployment on loopback: bytes and time of SecAgg+ against the plain run.

    python benchmarks/secagg_overhead.py [--rounds 3] [--nodes 3] [--algorithm fedavg] [--runtime in-process] [--json]

Starts one SuperLink and `--nodes` SuperNodes on 127.0.0.1 (`fedsrd.integrations.flower_loopback`), runs the example
Flower app (tiny random Llama, LoRA r=4) twice with every client sampled every round: secure_aggregation off, then
secaggplus. Bytes come from each run's history.json: uploads are the encoded updates (plain) or the masked vectors
plus the protocol's key and share messages (serialized records); downloads are the catch-up broadcasts, plus the
forwarded keys and shares. Times are each round's seconds on the ServerApp (a deployment round is dominated by the
SuperNodes' 3 s polling and a fresh ClientApp process per message, so the four extra message rounds of the protocol
dominate its time cost). Prints a Markdown table; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower-app"


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_in_process(app_config: dict, run: dict, node_configs: list[dict]) -> dict:
    import time

    from fedsrd.integrations.flower import run_server
    from fedsrd.integrations.inprocess import InProcessGrid, serverapp_task_identity

    rc = {**app_config, **run}
    start = time.monotonic()
    with serverapp_task_identity():  # the same messages and bytes as a deployment, without its transport latency
        run_server(InProcessGrid(rc, node_configs), rc)
    return {"status": "finished:completed", "seconds": round(time.monotonic() - start, 1), "log": ""}


def _app_config() -> dict:
    """The example app's [tool.flwr.app.config] (what `flwr run` hands the apps)."""
    import tomllib

    return dict(tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def measure(rounds: int, nodes: int, algorithm: str, workdir: Path, runtime: str = "loopback") -> dict:
    import contextlib

    from fedsrd.integrations.flower_loopback import LoopbackDeployment

    node_configs = [
        {"partition-id": i, "num-partitions": nodes, "state-dir": str(workdir / f"node{i}")} for i in range(nodes)
    ]
    domains = ("arithmetic", "code_output", "percent", "units")
    base = {
        "num-clients": nodes,
        "clients-per-round": nodes,
        "algorithm": algorithm,
        "num-rounds": rounds,
        "save-every": 0,
        "final-sync": False,
        "domains": " ".join(domains[:nodes]) if nodes <= len(domains) else " ".join(domains),
        "partition": "domain" if nodes <= len(domains) else "iid",
    }
    link_port, node_port = _free_ports(2)
    out: dict = {"rounds": rounds, "nodes": nodes, "algorithm": algorithm, "runtime": runtime, "runs": {}}
    deployment = (
        LoopbackDeployment(workdir / "flwr", nodes, node_configs, link_port, node_port)
        if runtime == "loopback"
        else contextlib.nullcontext()
    )
    with deployment:
        for mode in ("off", "secaggplus"):
            out_dir = workdir / mode
            run = {**base, "output-dir": str(out_dir), "args": f"--secure_aggregation {mode}"}
            if runtime == "loopback":
                result = deployment.run(APP, run, timeout=1800)
            else:
                result = _run_in_process(_app_config(), run, node_configs)
            if result["status"] != "finished:completed":
                raise RuntimeError(f"{mode} run ended {result['status']}:\n{result['log']}")
            history = json.loads((out_dir / "history.json").read_text())[1:]
            sa = [r["transport"].get("secure_aggregation", {}) for r in history]
            out["runs"][mode] = {
                "run_seconds": result["seconds"],
                "round_seconds": [round(r["seconds"], 2) for r in history],
                "upload_bytes": [r["upload_bytes"] for r in history],
                "download_bytes": [r["download_bytes"] for r in history],
                "masked_vector_bytes": [s.get("masked_vector_bytes", 0) for s in sa],
                "protocol_upload_bytes": [s.get("protocol_upload_bytes", 0) for s in sa],
                "protocol_download_bytes": [s.get("protocol_download_bytes", 0) for s in sa],
                "stage_seconds": [s.get("stage_seconds", {}) for s in sa],
                "train_loss": [r["train_loss"] for r in history],
            }
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def report(result: dict) -> dict:
    plain, secure = result["runs"]["off"], result["runs"]["secaggplus"]
    rows = []
    for key, label in (
        ("upload_bytes", "upload bytes / round"),
        ("download_bytes", "download bytes / round"),
        ("round_seconds", "seconds / round"),
    ):
        a, b = _mean(plain[key]), _mean(secure[key])
        rows.append((label, a, b, b / a if a else float("nan")))
    summary = {
        "upload_ratio": rows[0][3],
        "download_ratio": rows[1][3],
        "time_ratio": rows[2][3],
        "masked_vector_bytes_per_round": _mean(secure["masked_vector_bytes"]),
        "protocol_upload_bytes_per_round": _mean(secure["protocol_upload_bytes"]),
        "protocol_download_bytes_per_round": _mean(secure["protocol_download_bytes"]),
        "unmask_server_seconds": _mean([s.get("unmask_server", 0.0) for s in secure["stage_seconds"]]),
    }
    where = "on loopback" if result["runtime"] == "loopback" else "in one process (no transport latency)"
    print(
        f"SecAgg+ overhead, {result['algorithm']}, {result['nodes']} SuperNodes {where}, "
        f"{result['rounds']} rounds, every client every round\n"
    )
    print("| per round (mean) | plain | SecAgg+ | ratio |\n|---|---:|---:|---:|")
    for label, a, b, ratio in rows:
        fmt = "{:,.0f}" if "bytes" in label else "{:.1f}"
        shown = f"{ratio:.2f}x" if math.isfinite(ratio) else "- (plain is 0)"
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {shown} |")
    print(
        f"\nSecAgg+ upload = masked vectors {summary['masked_vector_bytes_per_round']:,.0f} B (int64, vs the "
        f"float32 updates) + keys and shares {summary['protocol_upload_bytes_per_round']:,.0f} B; download adds "
        f"{summary['protocol_download_bytes_per_round']:,.0f} B of forwarded keys and shares; the server's unmasking "
        f"took {summary['unmask_server_seconds']:.3f} s per round."
    )
    stages = secure["stage_seconds"]
    if stages:
        names = [k for k in stages[0] if k != "unmask_server"]
        print("stage seconds (mean): " + ", ".join(f"{k} {_mean([s.get(k, 0.0) for s in stages]):.1f}" for k in names))
    return {**result, "summary": summary}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--algorithm", default="fedavg", help="One that admits secure aggregation (fedavg, fedprox, ...).")
    p.add_argument(
        "--runtime",
        choices=("loopback", "in-process"),
        default="loopback",
        help="loopback: SuperLink + SuperNodes as processes on 127.0.0.1; in-process: the same ServerApp and "
        "ClientApp messages through an in-process Grid (same bytes, no transport latency in the times).",
    )
    p.add_argument("--workdir", default=None, help="Scratch directory (default: a temporary one).")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="secagg-") as tmp:
        workdir = Path(a.workdir or tmp).resolve()
        result = report(measure(a.rounds, a.nodes, a.algorithm, workdir, a.runtime))
    if a.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
