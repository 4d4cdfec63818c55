"""`make bench`: run the benchmarks, print their tables, and write them into docs/benchmarks.md.

    python benchmarks/run_all.py                          # everything (about 80 min on 2 CPU cores, plus about
                                                          # 35 min for many_clients by its own estimate)
    python benchmarks/run_all.py --only accuracy overhead  # some sections
    python benchmarks/run_all.py --quick                  # a smaller version of each (about 30 min), prints only
    python benchmarks/run_all.py --data data/             # where the real domains are (default: data/, written by
                                                          # python benchmarks/prepare_data.py --out data/)

Each section runs one script with ``--json``; its printed table (everything before the JSON line) goes into
docs/benchmarks.md between that section's ``<!-- bench:NAME:begin/end -->`` markers, with the command that
reproduces it, the date and the machine, plus a few lines checked from the JSON (the papers' claims and the targets).
Hand-written text outside the markers is kept. Sections that need the real data or Gemma-3-270M are skipped, and
say so, when the data directory is missing. ``--no-write`` only prints; so does ``--quick`` (its smaller settings:
FedAvg-LoRA and FedSRD only for 2 rounds, fewer repeats, sampled layers), unless ``--write`` is given. The accuracy
runs are kept under outputs/bench/ and reused while their settings are unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOC = REPO / "docs" / "benchmarks.md"
IMG = REPO / "docs" / "img"


def sections(data: str, quick: bool) -> dict[str, dict]:
    """name -> {cmd, needs_data}: the order of docs/benchmarks.md."""
    return {
        "accuracy": {
            "cmd": ["accuracy_vs_bytes.py", "--data", data, "--reuse", "--plot", "docs/img/accuracy_vs_bytes.png",
                    *(["--algorithms", "fedavg", "fedsrd", "--rounds", "2", "--out", "outputs/bench/accuracy_quick"]
                      if quick else [])],
            "needs_data": True,
        },
        "frontier": {
            # reads the committed sweep (benchmarks/results/frontier/); the sweep itself: benchmarks/frontier.py --data
            "cmd": ["frontier.py", "--report-only", "--plot-dir", "docs/img"],
            "needs_data": False,
        },
        # issue 19: clients of different LoRA ranks (benchmarks/results/frontier_hetrank/; the sweep: frontier.py
        # --data data/ --client-ranks 4 8 16 32); skipped until its results are committed
        "frontier_hetrank": {
            "cmd": ["frontier.py", "--report-only", "--results", "benchmarks/results/frontier_hetrank",
                    "--plot-dir", "docs/img"],
            "needs_data": False,
            "needs_results": "benchmarks/results/frontier_hetrank",
        },  # fmt: skip
        # issue 19: the 2025 methods on the frontier's settings, against FedAvg-LoRA and FedSRD (same stored sweep)
        "frontier_2025": {
            "cmd": ["frontier.py", "--report-only", "--plot-dir", "docs/img", "--plot-prefix", "frontier_2025",
                    "--methods", "fedavg", "fedsrd",
                    "fedsrd+decompose_ridge=0.1+download_drop=0.5+value_dtype=bfloat16",
                    "rolora", "fedsvd", "fed_sb+lora_r=64", "fed_sb+lora_r=32", "fedrpca"],
            "needs_data": False,
        },  # fmt: skip
        # issue 18: central DP on the frontier's settings, against the same methods without privacy (seed 1)
        "privacy": {
            "cmd": ["frontier.py", "--report-only", "--seeds", "1", "--plot-dir", "docs/img",
                    "--plot-prefix", "privacy", "--methods", "fedavg", "fedsrd",
                    "fedavg+dp_mode=central+dp_clip_norm=0.5+dp_target_epsilon=8",
                    "fedsrd+dp_mode=central+dp_clip_norm=0.5+dp_target_epsilon=8+upload_mask=random"],
            "needs_data": False,
        },  # fmt: skip
        "comm": {"cmd": ["comm_table.py", "--sample-layers", "1" if quick else "2", "--compact"], "needs_data": False},
        "comm_bitmap": {
            "cmd": ["comm_table.py", "--sample-layers", "1" if quick else "2", "--positions", "bitmap", "--compact",
                    "--algorithms", "fedavg", "ffa_lora", "flexlora", "fed_dare", "fedsrd"],
            "needs_data": False,
        },  # fmt: skip
        "server_step": {
            "cmd": ["server_step.py", *(["--repeats", "1", "--dense-max-numel", "1e7"] if quick else [])],
            "needs_data": False,
        },
        "overhead": {"cmd": ["client_overhead.py", "--data", data, *(["--rounds", "1"] if quick else [])],
                     "needs_data": True},
        "throughput": {"cmd": ["throughput.py", "--data", data, *(["--repeats", "1"] if quick else [])],
                       "needs_data": True},
        "full_parameter": {"cmd": ["full_parameter.py", "--preset", "roberta-base"], "needs_data": False},
        "reliability": {
            "cmd": ["reliability.py", *(["--rounds", "3", "--fuzz", "2000"] if quick else [])],
            "needs_data": False,
        },
        "parallel": {"cmd": ["parallel_clients.py", *(["--rounds", "3"] if quick else [])], "needs_data": False},
        # many clients per round (issue 20): the server step against m, exact and streamed, and a 256-client simulation
        "many_clients": {"cmd": ["many_clients.py", *(["--quick"] if quick else [])], "needs_data": False},
        "poisoning": {"cmd": ["poisoning.py", "--seeds", "1" if quick else "3"], "needs_data": False},
    }


# ---- what each section's JSON lets us check -----------------------------------------------------------------------
def check_accuracy(r: dict) -> list[str]:
    if "fedavg" not in r or "fedsrd" not in r:
        return []
    avg, lines = r["fedavg"], []
    avg_mb = avg["upload_mb"] + avg["download_mb"]
    for name in ("fedsrd", "fedsrd_e"):
        if name not in r:
            continue
        s = r[name]
        mb = s["upload_mb"] + s["download_mb"]
        diff = s["eval_loss"]["mean"] - avg["eval_loss"]["mean"]
        worse = [d for d in s["eval_loss"] if d != "mean" and s["eval_loss"][d] > avg["eval_loss"][d]]
        lines.append(
            f"- `{name}`: {mb:.3f} MB per client per round, {100 * mb / avg_mb:.1f}% of FedAvg-LoRA's {avg_mb:.3f} MB "
            f"({'within' if mb <= 0.11 * avg_mb else 'above'} the paper's ~10%); mean held-out loss "
            f"{s['eval_loss']['mean']:.4f} against FedAvg-LoRA's {avg['eval_loss']['mean']:.4f} ({diff:+.4f}: "
            f"{'no worse' if diff <= 0 else 'worse'}); worse than FedAvg-LoRA on: {', '.join(worse) or 'no domain'}."
        )
    return lines


def check_frontier(r: dict) -> list[str]:
    """The frontier's target: no worse than FedAvg-LoRA (paired difference <= 0, upper 95% end < +0.01) at <= 5% of
    its bytes per client per round."""
    lines = []
    for name, m in r.get("methods", {}).items():
        if name == "fedavg" or m.get("bytes_vs_fedavg") is None:
            continue
        ci = m.get("ci95")
        diff = m.get("diff_vs_fedavg")
        met = (m["bytes_vs_fedavg"] <= 0.05 and diff is not None and diff <= 0 and ci is not None and ci[1] < 0.01)
        interval = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "(no interval: fewer than 2 seeds)"
        diff_text = "n/a" if diff is None else f"{diff:+.4f}"
        lines.append(f"- `{name}`: {100 * m['bytes_vs_fedavg']:.1f}% of FedAvg-LoRA's bytes; held-out loss "
                     f"{diff_text} {interval} against FedAvg-LoRA after round {m['rounds_done']} over "
                     f"{len(m['seeds_done'])} seed(s): target (<= 5% bytes, diff <= 0, upper end < +0.01) "
                     f"{'met' if met else 'not met'}.")  # fmt: skip
    return lines


def check_overhead(r: dict) -> list[str]:
    ok = "meets" if r["encode_fraction"] < r["target"] else "misses"
    return [f"- Client encode step: median {100 * r['encode_fraction']:.2f}% of the local training time "
            f"({ok} the target of < {100 * r['target']:.0f}%)."]  # fmt: skip


def check_throughput(r: dict) -> list[str]:
    ok = "meets" if r["ratio_vs_plain"] >= r["target"] else "misses"
    return [f"- FederatedTrainer's local phase: {r['ratio_vs_plain']:.3f} of plain Trainer + PEFT's tokens/s with "
            f"the same loss computation ({ok} the target of >= {r['target']}); "
            f"{r['ratio_vs_plain_default']:.3f} with its default completion-only logits."]  # fmt: skip


def check_comm(r: dict) -> list[str]:
    rows = {row["algorithm"]: row for row in r.get("rows", [])}
    if "fedavg" not in rows or "fedsrd" not in rows:
        return []
    s, a = rows["fedsrd"], rows["fedavg"]
    return [f"- FedSRD: {s['total_mb']:.1f} MB against FedAvg-LoRA's {a['total_mb']:.1f} MB, "
            f"{100 * s['total_mb'] / a['total_mb']:.1f}% (paper: 74 of 742 MB, 10.0%)."]  # fmt: skip


CHECKS = {"frontier": check_frontier, "accuracy": check_accuracy, "overhead": check_overhead,
          "throughput": check_throughput, "comm": check_comm, "comm_bitmap": check_comm}  # fmt: skip


def server_step_plot(r: dict, path: Path) -> bool:
    """Factored against dense server step per module (log scale), from server_step.py's JSON rows."""
    rows = r.get("rows")
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['model']} {row['module']}\n{row['d_out']}x{row['d_in']}" for row in rows]
    keys = [(k, label) for k, label in (("factored_ms", "FedSRD factored"), ("fedsrd_e_ms", "FedSRD-e"),
                                        ("dense_ms", "dense (paper's code)")) if k in rows[0]]  # fmt: skip
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        xs = [j + i * width for j in range(len(rows))]
        ys = [row.get(key) if isinstance(row.get(key), (int, float)) else float("nan") for row in rows]
        ax.bar(xs, ys, width=width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("ms per module and round")
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))], labels, fontsize=6)
    ax.legend()
    ax.set_title("FedSRD server step, 4 clients, r = 64 (missing bars: dense not run)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def run_section(name: str, cmd: list[str]) -> tuple[str, dict | None, float, int]:
    """(table text, JSON object, seconds, exit code) of one script run with --json."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:], "--json"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    lines = proc.stdout.rstrip("\n").split("\n")
    result = None
    if lines and lines[-1].startswith("{"):
        try:
            result = json.loads(lines[-1])
            lines = lines[:-1]
        except json.JSONDecodeError:
            pass
    return "\n".join(lines).strip("\n"), result, seconds, proc.returncode


def render(name: str, cmd: list[str], text: str, result: dict | None, seconds: float, code: int) -> str:
    shown = "python benchmarks/" + " ".join(shlex.quote(c) for c in cmd) + " --json"
    out = [f"`{shown}` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, "
           f"{seconds / 60:.1f} min)", ""]  # fmt: skip
    if code != 0:
        out += [f"**The run failed (exit {code}).** Its output:", ""]
    if not text.strip() and result is not None:  # a script whose --json prints only the JSON object
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
        text = "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in scalars.items())
    out.append(text if "|---" in text else f"```text\n{text}\n```")  # plain-text tables as they print
    if result is not None and name in CHECKS:
        checks = CHECKS[name](result)
        if checks:
            out += ["", *checks]
    if name == "accuracy" and (IMG / "accuracy_vs_bytes.png").exists():
        out += ["", "![held-out loss against MB per client per round](img/accuracy_vs_bytes.png)"]
    if name in ("frontier", "frontier_hetrank", "frontier_2025") and (IMG / f"{name}_loss_vs_mb.png").exists():
        out += ["", f"![held-out loss against cumulative MB per client, 95% bands](img/{name}_loss_vs_mb.png)",
                "", f"![held-out loss against round, 95% bands](img/{name}_loss_vs_round.png)"]
    if name == "server_step" and result is not None and server_step_plot(result, IMG / "server_step.png"):
        out += ["", "![server step per module: factored against dense](img/server_step.png)"]
    return "\n".join(out)


def write_section(doc: str, name: str, body: str) -> str:
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc)
    return doc.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/", help="The real domains' directory (prepare_data.py --out data/).")
    p.add_argument("--only", nargs="+", default=None, help="Run only these sections.")
    p.add_argument("--quick", action="store_true", help="Smaller settings for the model-free benchmarks.")
    p.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md as it is.")
    p.add_argument("--write", action="store_true", help="With --quick: write docs/benchmarks.md all the same.")
    a = p.parse_args(argv)
    data = os.path.relpath(a.data, REPO) if Path(a.data).is_absolute() else a.data
    all_sections = sections(data, a.quick)
    unknown = sorted(set(a.only or []) - set(all_sections))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; expected some of {list(all_sections)}")
    failed = []
    for name, spec in all_sections.items():
        if a.only and name not in a.only:
            continue
        cmd = spec["cmd"]
        if spec["needs_data"] and not (REPO / data).is_dir():
            print(f"\n## {name}: skipped, no data directory {data} (make data, or pass --data)")
            continue
        if spec.get("needs_results") and not any((REPO / spec["needs_results"]).glob("*/seed*/history.json")):
            print(f"\n## {name}: skipped, no committed results under {spec['needs_results']}")
            continue
        print(f"\n## {name}: python benchmarks/{' '.join(cmd)} --json\n", flush=True)
        text, result, seconds, code = run_section(name, cmd)
        print(text, flush=True)
        if code != 0:
            failed.append(name)
        if not a.no_write and (a.write or not a.quick):
            doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
            DOC.write_text(write_section(doc, name, render(name, cmd, text, result, seconds, code)))
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
