"""A whole Flower deployment on one machine, on loopback: one SuperLink and N SuperNodes as subprocesses.

For trying a deployment before spreading it over machines, and for the tests. Everything binds to 127.0.0.1,
Flower's telemetry and update check are off, the SuperLink never installs dependencies (the daemons import fedsrd and
flwr from this Python's environment), and every process is stopped by its PID. As root, run it inside a fresh
network namespace so nothing can leave the machine::

    unshare -n sh -c 'ip link set lo up && python -m fedsrd.integrations.flower_loopback examples/flower-app \\
        --workdir /tmp/flwr-demo --nodes 2 --run-config num-rounds=3'

It prints one JSON line per run: its id, final status and the output of ``flwr run --stream``'s tail.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # no telemetry to telemetry.flower.ai
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # no update check to api.flower.ai
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync` of the app's dependencies
    "COLUMNS": "150",
}
CONNECTION = "loopback"


def toml_value(value: Any) -> str:
    """`value` as a TOML literal, the way Flower parses ``--node-config`` and ``--run-config`` pairs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string for the characters used here


def config_string(config: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


class LoopbackDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 under `workdir`; use as a context manager, which stops them all.

    `node_configs[i]` is SuperNode i's ``--node-config`` (default ``partition-id=i num-partitions=N``). Each daemon
    gets its own ``FLWR_HOME`` and log file under `workdir`.
    """

    def __init__(
        self,
        workdir: str | Path,
        num_nodes: int = 2,
        node_configs: list[Mapping[str, Any]] | None = None,
        link_port: int = 9092,
        node_port: int = 9094,
        start_timeout: float = 120.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.node_configs = node_configs or [
            {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)
        ]
        self.link_port = link_port
        self.node_port = node_port
        self.start_timeout = start_timeout
        self.processes: list[subprocess.Popen] = []
        bin_dir = str(Path(sys.executable).parent)  # the daemons start `flower-superexec` and friends via PATH
        self.env = {**os.environ, **OFFLINE_ENV, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        self.bin_dir = Path(bin_dir)

    # ---- life cycle -----------------------------------------------------------------------------------------------
    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._spawn(
            "superlink",
            [
                "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.link_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        self._wait(lambda: _healthy(self.link_port), "the SuperLink to answer /health")
        for i, node_config in enumerate(self.node_configs):
            self._spawn(
                f"supernode{i}",
                [
                    "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link_port}",
                    "--host", "127.0.0.1", "--port", str(self.node_port + i),
                    "--node-config", config_string(node_config),
                ],
            )
        cli_home = self.workdir / "cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )
        self._wait(lambda: self.online_nodes() >= len(self.node_configs), "every SuperNode to be online")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every daemon by PID, wait, then SIGKILL what is left."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes = []

    # ---- runs -----------------------------------------------------------------------------------------------------
    def run(self, app_dir: str | Path, run_config: Mapping[str, Any] | None = None, timeout: float = 600) -> dict:
        """``flwr run APP loopback --stream``; returns the run's id, final status and the log's tail."""
        before = {r["run-id"] for r in self.runs()}
        cmd = [str(self.bin_dir / "flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        if run_config:
            overrides = self.workdir / f"run-config-{len(before)}.toml"
            overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
            cmd += ["--run-config", str(overrides)]
        log_path = self.workdir / "logs" / f"run{len(before)}.log"
        start = time.monotonic()
        with open(log_path, "wb") as log:
            try:
                subprocess.run(cmd, env=self._cli_env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        new = [r for r in self.runs() if r["run-id"] not in before]
        run = new[-1] if new else {}
        if run and not str(run.get("status", "")).startswith("finished"):
            subprocess.run([str(self.bin_dir / "flwr"), "stop", str(run["run-id"]), CONNECTION], env=self._cli_env(),
                           capture_output=True, timeout=60)
        text = log_path.read_text(errors="replace")
        return {"run_id": run.get("run-id"), "status": run.get("status", "unknown"), "log": text[-4000:],
                "log_path": str(log_path), "seconds": round(time.monotonic() - start, 1)}

    def runs(self) -> list[dict]:
        out = self._cli(["ls", CONNECTION, "--format", "json"])
        return list(json.loads(out).get("runs", [])) if out else []

    def online_nodes(self) -> int:
        out = self._cli(["supernode", "list", CONNECTION, "--format", "json"])
        nodes = json.loads(out).get("nodes", []) if out else []
        return sum(1 for n in nodes if n.get("status") == "online")

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(cmd, env={**self.env, "FLWR_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT,
                                cwd=home)
        log.close()
        self.processes.append(proc)

    def _cli_env(self) -> dict[str, str]:
        return {**self.env, "FLWR_HOME": str(self.workdir / "cli")}

    def _cli(self, args: list[str]) -> str:
        try:
            done = subprocess.run([str(self.bin_dir / "flwr"), *args], env=self._cli_env(), capture_output=True,
                                  text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout if done.returncode == 0 else ""

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}; see {self.workdir / 'logs'}")
            try:
                if ready():
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {self.start_timeout:.0f} s waiting for {what}; see {self.workdir}/logs")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedsrd.integrations.flower_loopback", description=__doc__.split(".")[0])
    p.add_argument("app", help="Flower app directory, e.g. examples/flower-app")
    p.add_argument("--workdir", required=True, help="Scratch directory for the daemons' homes and logs.")
    p.add_argument("--nodes", type=int, default=2, help="Number of SuperNodes (one per client).")
    p.add_argument("--node-config", action="append", default=None,
                   help="JSON object of one SuperNode's node config (repeat once per node); default partition-id=i.")
    p.add_argument("--run-config", action="append", default=[],
                   help="JSON object of run-config overrides for one run; repeat for runs one after another.")
    p.add_argument("--link-port", type=int, default=9092)
    p.add_argument("--node-port", type=int, default=9094)
    p.add_argument("--timeout", type=float, default=600, help="Seconds each run may take.")
    a = p.parse_args(argv)
    node_configs = [json.loads(c) for c in a.node_config] if a.node_config else None
    run_configs = [json.loads(c) for c in a.run_config] or [{}]
    start = time.monotonic()
    with LoopbackDeployment(a.workdir, a.nodes, node_configs, a.link_port, a.node_port) as deployment:
        print(json.dumps({"started_seconds": round(time.monotonic() - start, 1)}), flush=True)
        for run_config in run_configs:
            result = deployment.run(a.app, run_config, timeout=a.timeout)
            print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)
            if result["status"] != "finished:completed":
                print(result["log"], file=sys.stderr)
                raise SystemExit(1)


if __name__ == "__main__":
    main()
