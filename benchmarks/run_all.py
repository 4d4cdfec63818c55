"""`make bench`: run the benchmarks that fit on a 2-core CPU in reasonable time and print their tables.

    python benchmarks/run_all.py            # each script's table, in turn
    python benchmarks/run_all.py --quick    # smaller settings (minutes)

Each script also runs on its own with `--json` (one JSON object as its last line); docs/benchmarks.md lists the
commands and the figures measured with them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = [
    ["server_step.py"],
    ["comm_table.py", "--sample-layers", "2"],
    ["reliability.py"],
    ["parallel_clients.py"],
]
QUICK = [
    ["server_step.py", "--repeats", "1", "--dense-max-numel", "1e7"],
    ["comm_table.py", "--preset", "tiny"],
    ["reliability.py", "--rounds", "3", "--fuzz", "2000"],
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    failed = []
    for cmd in QUICK if a.quick else FULL:
        script = HERE / cmd[0]
        if not script.exists():
            print(f"\n## {cmd[0]}: not present, skipped")
            continue
        print(f"\n## python benchmarks/{' '.join(cmd)}\n", flush=True)
        if subprocess.run([sys.executable, str(script), *cmd[1:]]).returncode != 0:
            failed.append(cmd[0])
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
