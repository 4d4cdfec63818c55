"""`fedsrd report RUN_DIR [RUN_DIR ...]`: a Markdown report with plots comparing federated runs.

Each run directory is a `fedsrd train` output (`history.json`, `fed_config.json`). The report has, one line per
run: lm-eval scores and held-out loss against cumulative MB, per-round upload and download MB per client, and tables
of the final scores and the bytes each run moved. MB = 1024^2 bytes of encoded messages (what `history.json` counts).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsrd.wire import MB

SCORE_PREFIX = "lm_eval/"
UNAVAILABLE_KEY = "lm_eval_unavailable"
MAX_SCORE_PANELS = 12


@dataclass
class Run:
    """One training run: its label, directory, `history.json` records and `fed_config.json`."""

    name: str
    path: Path
    history: list[dict[str, Any]]
    fed_config: dict[str, Any] = field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        return str(self.fed_config.get("algorithm", "?"))


# An absolute or home-relative local path inside a string: "/home/me/models/gemma", "~/data/x.jsonl",
# "jsonl:/srv/x.jsonl". Not URLs ("https://...": the "//" is skipped, and "/org/name" follows a word character) and
# not Hub names ("org/name").
_LOCAL_PATH = re.compile(r"(?<![A-Za-z0-9/.~-])~?/(?!/)[^\s\"'`,;|()\[\]{}<>]+")


def public_name(text: str) -> str:
    """`text` with every local absolute path replaced by its last component (``/home/me/models/gemma`` ->
    ``gemma``), so nothing published names a directory of the machine that trained (relative and Hub names stay)."""
    return _LOCAL_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or ".", text)


def without_local_paths(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings, numbers) with `public_name` applied to every string, keys too."""
    if isinstance(value, str):
        return public_name(value)
    if isinstance(value, dict):
        return {without_local_paths(k): without_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_local_paths(v) for v in value]
    return value


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    path = Path(run_dir)
    history_path = path / "history.json"
    if not history_path.is_file():
        raise FileNotFoundError(f"{history_path} not found: expected the output_dir of a `fedsrd train` run.")
    history = json.loads(history_path.read_text())
    if not isinstance(history, list) or not all(isinstance(r, dict) and "round" in r for r in history):
        raise ValueError(f"{history_path}: expected a list of round records with a 'round' key.")
    config_path = path / "fed_config.json"
    fed_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return Run(name=name or path.resolve().name, path=path, history=history, fed_config=fed_config)


# ---- summaries (also used by the Hub model card) --------------------------------------------------------------------
def comm_summary(history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Bytes moved, in MB: means per client per round, and totals over the rounds (all clients, and per client)."""
    rounds = [r for r in history if r.get("round", 0) >= 1 and "upload_bytes" in r]
    n = len(rounds)
    up = [r.get("upload_mb_per_client", math.nan) for r in rounds]
    down = [r.get("download_mb_per_client", math.nan) for r in rounds]
    total_up = sum(r["upload_bytes"] for r in rounds) / MB
    total_down = sum(r.get("download_bytes", 0) for r in rounds) / MB
    return {
        "rounds": n,
        "upload_mb_per_client_per_round": sum(up) / n if n else math.nan,
        "download_mb_per_client_per_round": sum(down) / n if n else math.nan,
        "per_client_cumulative_mb": sum(up) + sum(down) if n else 0.0,
        "total_upload_mb": total_up,
        "total_download_mb": total_down,
        "cumulative_mb": rounds[-1].get("cumulative_mb", total_up + total_down) if n else 0.0,
    }


def privacy_summary(history: Sequence[dict[str, Any]], fed_config: dict[str, Any]) -> dict[str, Any] | None:
    """What a run with differential privacy can claim (docs/privacy.md), None without: the placement, epsilon after
    the last round at delta, the clip bound, the noise multiplier, the sampling rate, the accountant, how epsilon was
    accounted (`fedsrd.ops.privacy.accounting_summary`; a run from before ``dp_sampling_accounting`` existed was
    accounted as Poisson), and whether the budget ended the run."""
    from fedsrd.ops.privacy import STORED_RUN_SAMPLING_ACCOUNTING, accounting_summary

    mode = fed_config.get("dp_mode") or "off"
    if mode == "off":
        return None
    spent = [r for r in history if isinstance(r.get("dp_epsilon"), (int, float))]
    last = spent[-1] if spent else {}
    clients = fed_config.get("num_clients") or 1
    sampling = fed_config.get("dp_sampling_accounting", STORED_RUN_SAMPLING_ACCOUNTING)
    rate = (fed_config.get("clients_per_round") or clients) / clients
    accounting = last.get("dp_accounting") or accounting_summary(rate, sampling, fed_config.get("dp_accountant", "rdp"))
    return {
        "mode": mode,
        "epsilon": last.get("dp_epsilon"),
        "delta": fed_config.get("dp_delta"),
        "rounds": last.get("round", 0),
        "clip_norm": fed_config.get("dp_clip_norm"),
        "noise_multiplier": (last.get("robust") or {}).get("dp_noise_multiplier")
        or fed_config.get("dp_noise_multiplier"),
        "target_epsilon": fed_config.get("dp_target_epsilon"),
        "sampling_rate": rate,
        "accountant": fed_config.get("dp_accountant", "rdp"),
        "accounting": accounting,
        "budget_exhausted": bool(last.get("dp_budget_exhausted")),
    }


def adjacency_label(accounting: dict[str, Any]) -> str:
    """What an epsilon means, in a few words: the adjacency it is for, and whether it is the Poisson approximation."""
    if accounting.get("sampling") == "poisson":
        return "add/remove, Poisson approx."
    return "replace-one" if accounting.get("neighboring") == "replace_one" else "add/remove"


def final_scores(history: Sequence[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Each lm-eval score and held-out loss at the last round that has it: key -> (value, round)."""
    latest: dict[str, tuple[float, int]] = {}
    for record in history:
        for key, value in record.items():
            if _is_score_key(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                latest[key] = (float(value), int(record["round"]))
    return dict(sorted(latest.items(), key=lambda kv: _score_order(kv[0])))


def unavailable_benchmarks(history: Sequence[dict[str, Any]]) -> dict[str, str]:
    for record in reversed(history):
        if record.get(UNAVAILABLE_KEY):
            return dict(record[UNAVAILABLE_KEY])
    return {}


def headline_score_keys(keys: Sequence[str]) -> list[str]:
    """The lm-eval keys to plot: per-suite averages and benchmark scores when present, else every task score."""
    scores = [k for k in keys if k.startswith(SCORE_PREFIX)]
    suite_keys = [k for k in scores if _is_suite_key(k)]
    suite_keys.sort(key=lambda k: (k.split("/")[1], not k.split("/")[2].startswith("avg")))  # averages first
    return suite_keys or scores


# ---- the report ------------------------------------------------------------------------------------------------------
def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    title: str = "Federated fine-tuning report",
) -> Path:
    """Write `report.md` and its PNG plots to `out_dir`; returns the path of `report.md`."""
    if not run_dirs:
        raise ValueError("write_report: no run directories given.")
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"--names: {len(names)} names for {len(run_dirs)} runs.")
    runs = [load_run(d, names[i] if names else None) for i, d in enumerate(run_dirs)]
    _dedupe_names(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_keys = list(dict.fromkeys(k for run in runs for r in run.history for k in r if k.startswith(SCORE_PREFIX)))
    plotted = headline_score_keys(all_keys)[:MAX_SCORE_PANELS]
    figures = {
        "scores_vs_mb.png": _plot_scores(runs, plotted, out / "scores_vs_mb.png"),
        "eval_loss_vs_mb.png": _plot_metric(runs, "eval_loss", "held-out loss (mean over eval sets)",
                                            out / "eval_loss_vs_mb.png"),
        "comm_per_round.png": _plot_comm(runs, out / "comm_per_round.png"),
    }
    lines = [f"# {title}", "", "Runs: " + ", ".join(f"`{r.name}` ({r.algorithm}, {r.path})" for r in runs), ""]
    lines += ["## Summary", "", *_summary_table(runs), ""]
    lines += ["MB = 1024² bytes of encoded messages. *Cumulative* counts every client's upload and download; "
              "*per client per round* is the mean over rounds.", ""]
    captions = {
        "scores_vs_mb.png": "lm-eval scores against cumulative communication",
        "eval_loss_vs_mb.png": "Held-out loss against cumulative communication",
        "comm_per_round.png": "Upload and download per client, per round",
    }
    for file, made in figures.items():
        if made:
            lines += [f"## {captions[file]}", "", f"![{captions[file]}]({file})", ""]
    lines += ["## Final scores", "", *_scores_table(runs), ""]
    missing = {k: v for run in runs for k, v in unavailable_benchmarks(run.history).items()}
    if missing:
        lines += ["Benchmarks not run:", ""] + [f"- **{k}**: {v}" for k, v in missing.items()] + [""]
    lines += ["## Settings", "", *_settings_table(runs), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _summary_table(runs: Sequence[Run]) -> list[str]:
    head = ("run", "algorithm", "rounds", "clients", "up MB / client / round", "down MB / client / round",
            "total up MB", "total down MB", "cumulative MB (all clients)", "final held-out loss")
    privacy = [privacy_summary(run.history, run.fed_config) for run in runs]
    if any(privacy):
        head = (*head, "DP epsilon (delta)")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, dp in zip(runs, privacy, strict=True):
        comm = comm_summary(run.history)
        loss = final_scores(run.history).get("eval_loss")
        cells = (run.name, run.algorithm, comm["rounds"], run.fed_config.get("num_clients", "?"),
                 _fmt_mb(comm["upload_mb_per_client_per_round"]), _fmt_mb(comm["download_mb_per_client_per_round"]),
                 _fmt_mb(comm["total_upload_mb"]), _fmt_mb(comm["total_download_mb"]), _fmt_mb(comm["cumulative_mb"]),
                 _fmt(loss[0]) if loss else "-")
        if any(privacy):
            how = f"{dp['delta']:g}, {dp['mode']}, {adjacency_label(dp['accounting'])}" if dp else ""
            cells = (*cells, f"{_fmt(dp['epsilon'])} ({how})" if dp else "no DP")
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def _scores_table(runs: Sequence[Run]) -> list[str]:
    finals = [final_scores(run.history) for run in runs]
    keys = sorted({k for f in finals for k in f}, key=_score_order)
    if not keys:
        return ["(no scores in history.json: train with eval_dataset or lm_eval_tasks)"]
    rows = ["| metric | " + " | ".join(run.name for run in runs) + " |", "|---|" + "---|" * len(runs)]
    for key in keys:
        cells = [f"{_fmt(f[key][0])} (round {f[key][1]})" if key in f else "-" for f in finals]
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return rows


def _settings_table(runs: Sequence[Run]) -> list[str]:
    keys = sorted({k for run in runs for k in run.fed_config})
    differing = [k for k in keys if len({json.dumps(run.fed_config.get(k)) for run in runs}) > 1]
    shown = differing or ["algorithm", "num_rounds", "num_clients", "local_steps", "lora_r", "lora_alpha"]
    rows = ["| setting | " + " | ".join(run.name for run in runs) + " |", "|---|" + "---|" * len(runs)]
    for key in shown:
        rows.append(f"| {key} | " + " | ".join(str(run.fed_config.get(key, "-")) for run in runs) + " |")
    return rows


# ---- plots -----------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(run: Run, key: str, x: str = "cumulative_mb") -> tuple[list[float], list[float]]:
    points = [(r[x], r[key]) for r in run.history if key in r and x in r and isinstance(r[key], (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _plot_scores(runs: Sequence[Run], keys: Sequence[str], path: Path) -> bool:
    if not keys:
        return False
    plt = _pyplot()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run in runs:
            xs, ys = _series(run, key)
            if xs:
                ax.plot(xs, ys, marker="o", label=run.name)
        ax.set_title(key[len(SCORE_PREFIX):], fontsize=9)
        ax.set_xlabel("cumulative MB (up + down)")
        ax.grid(True, alpha=0.3)
        values = [y for run in runs for y in _series(run, key)[1]]
        if values and 0 <= min(values) and max(values) <= 1:
            ax.set_ylim(-0.02, 1.02)  # accuracies and exact-match rates: the whole scale
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_metric(runs: Sequence[Run], key: str, label: str, path: Path) -> bool:
    if not any(_series(run, key)[0] for run in runs):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for run in runs:
        xs, ys = _series(run, key)
        if xs:
            ax.plot(xs, ys, marker="o", label=run.name)
    ax.set_xlabel("cumulative communication (MB, up + down, all clients)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_comm(runs: Sequence[Run], path: Path) -> bool:
    keys = (("upload_mb_per_client", "upload MB per client"), ("download_mb_per_client", "download MB per client"))
    if not any(_series(run, keys[0][0], "round")[0] for run in runs):
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, label) in zip(axes, keys):
        values = []
        for run in runs:
            xs, ys = _series(run, key, "round")
            values += [y for y in ys if y > 0]
            if xs:
                ax.plot(xs, ys, marker="o", label=run.name)
        if values and max(values) / min(values) > 20:
            ax.set_yscale("log")  # FedAvg and a sparse method differ by 10x or more
        else:
            ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _is_score_key(key: str) -> bool:
    return key.startswith(SCORE_PREFIX) or (key.startswith("eval_") and key.endswith("loss"))


def _score_order(key: str) -> tuple[int, str]:
    # held-out loss first, then suite headline scores, then per-task metrics
    if key == "eval_loss":
        return (0, key)
    if key.startswith("eval_"):
        return (1, key)
    return (2 if _is_suite_key(key) else 3, key)


def _is_suite_key(key: str) -> bool:
    from fedsrd.eval.suites import SUITES

    parts = key.split("/")
    return len(parts) == 3 and parts[0] + "/" == SCORE_PREFIX and parts[1] in SUITES


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _fmt_mb(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.4f}" if value < 1 else f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"


def _dedupe_names(runs: Sequence[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            seen[run.name] += 1
            run.name = f"{run.name}-{seen[run.name]}"
        else:
            seen[run.name] = 1


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="fedsrd report",
        description="Markdown report with plots comparing fedsrd runs (scores and loss vs MB, MB per round).",
    )
    parser.add_argument("runs", nargs="+", help="Run directories (output_dir of `fedsrd train`).")
    parser.add_argument("--out", default=None, help="Output directory (default: RUN_DIR/report for one run, "
                        "else ./fedsrd_report).")
    parser.add_argument("--names", nargs="+", default=None, help="A label per run (default: directory names).")
    parser.add_argument("--title", default="Federated fine-tuning report", help="Report title.")
    args = parser.parse_args(argv)
    out = args.out or (str(Path(args.runs[0]) / "report") if len(args.runs) == 1 else "fedsrd_report")
    report = write_report(args.runs, out, names=args.names, title=args.title)
    print(report)
    return report
