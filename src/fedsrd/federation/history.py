"""The one schema of a round's record in ``history.json``, the same in every runtime (simulation, Accelerate, Flower).

``history.json`` is a JSON list with one record per finished round (and a round-0 record where the runtime has one:
the initial evaluation in the simulation, the initial adapter's upload on Flower). Every record has exactly the keys
in `HISTORY_KEYS`, plus ``eval_*`` scores where the runtime evaluated that round, plus whatever round callbacks
added (e.g. ``lm_eval/*``, ``hub_commit``). What only one transport knows (Flower's catch-up plans and final sync)
lives inside the record's ``transport`` mapping, never at the top level.

Per-client MB has one definition (MB = 1024 ** 2 bytes of encoded messages):

- ``upload_mb_per_client``: the round's upload bytes divided by the number of updates that reached the server step
  (accepted or rejected there), i.e. the mean size of one client's upload; 0 when none arrived;
- ``download_mb_per_client``: the size of the round's broadcast, i.e. what one client receives to move from the
  previous global state to this round's (however the transport schedules it: the simulation hands every client the
  broadcast at once, Flower sends it, or the full state if smaller, before the client next trains).

``upload_bytes`` / ``download_bytes`` / ``cumulative_mb`` count what the transport really moved (the simulation:
every client receives every broadcast; Flower: the catch-up messages it sent, the final sync included).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedsrd.wire import MB  # bytes in the MB that every communication figure reports

SCHEMA_VERSION = 3  # 1: before fedsrd.federation (keys differed per runtime); 2: before per_client

HISTORY_KEYS = frozenset(
    {
        "schema_version",
        "round",
        "clients",  # the sampled client ids (the last attempt's, if the round was retried)
        "accepted",  # client ids whose updates the server step aggregated
        "rejected",  # {client id: reason}: an update or reply that arrived but was refused
        "dropped",  # {client id: reason}: a sampled client whose update never arrived (failed, timed out, no node)
        "train_loss",  # mean over the accepted updates; null when there is none (round 0)
        "learning_rate",
        "upload_bytes",
        "download_bytes",
        "broadcast_bytes",
        "upload_mb_per_client",
        "download_mb_per_client",
        "cumulative_mb",
        "robust",  # what bounded the clients' influence in the server step (norms, bound, clipped, trimmed shares)
        "should_training_stop",  # a round callback asked to end the federation after this round
        "seconds",
        "transport",  # what only this runtime's transport knows (Flower: catch-up plans, final sync)
        # differential privacy (docs/privacy.md); null when dp_mode is "off" (and in round 0)
        "dp_epsilon",  # epsilon spent after this round, at dp_delta (the accountant's, over rounds 1..this)
        "dp_delta",
        "dp_budget_exhausted",  # true on the last round run when dp_stop_at_epsilon ended the federation
        "dp_accounting",  # how dp_epsilon is accounted: {accountant, sampling, neighboring} (ops.privacy)
        "per_client",  # {client id: rank, upload_bytes, download_bytes, trainable_param_bytes}: `per_client_costs`
    }
)


def round_record(
    *,
    round: int,
    clients: Sequence[int],
    accepted: Sequence[int],
    rejected: Mapping[str, str],
    dropped: Mapping[str, str],
    train_loss: float | None,
    learning_rate: float | None,
    upload_bytes: int,
    download_bytes: int,
    broadcast_bytes: int,
    num_uploads: int,
    cumulative_mb: float,
    transport: Mapping[str, Any] | None = None,
    robust: Mapping[str, Any] | None = None,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    dp_accounting: Mapping[str, str] | None = None,
    per_client: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A round's record with every key of `HISTORY_KEYS` (``seconds`` and ``should_training_stop`` are filled in when
    the round ends)."""
    if train_loss is not None and not math.isfinite(train_loss):
        train_loss = None
    return {
        "schema_version": SCHEMA_VERSION,
        "round": int(round),
        "clients": [int(c) for c in clients],
        "accepted": [int(c) for c in accepted],
        "rejected": dict(rejected),
        "dropped": dict(dropped),
        "train_loss": train_loss,
        "learning_rate": learning_rate,
        "upload_bytes": int(upload_bytes),
        "download_bytes": int(download_bytes),
        "broadcast_bytes": int(broadcast_bytes),
        "upload_mb_per_client": upload_bytes / MB / num_uploads if num_uploads else 0.0,
        "download_mb_per_client": broadcast_bytes / MB,
        "cumulative_mb": float(cumulative_mb),
        "robust": dict(robust or {}),
        "should_training_stop": False,
        "seconds": 0.0,
        "transport": dict(transport or {}),
        "dp_epsilon": dp_epsilon,
        "dp_delta": dp_delta,
        "dp_budget_exhausted": None if dp_delta is None else False,
        "dp_accounting": None if dp_accounting is None else dict(dp_accounting),
        "per_client": dict(per_client or {}),
    }


def per_client_costs(
    senders: Sequence[int],
    updates: Sequence[bytes | None],
    ranks: Mapping[int, int | None],
    download_bytes_by_rank: Mapping[str, int],
    trainable_bytes_by_rank: Mapping[str, int | None],
) -> dict[str, dict[str, Any]]:
    """The record's ``per_client``: for every client whose update reached the server step, its LoRA rank (null when
    every client trains the global adapter's), the bytes of its encoded upload (null under secure aggregation, where
    the server holds no single upload), the encoded bytes of what it needs of the round's broadcast (its rank's part,
    `Algorithm.client_download`; the whole broadcast at the global rank), and the float32 bytes of the parameters it
    trains (null for full-parameter algorithms)."""
    out: dict[str, dict[str, Any]] = {}
    for cid, update in zip(senders, updates, strict=True):
        rank = ranks.get(cid)
        key = "global" if rank is None else str(rank)
        out[str(cid)] = {
            "rank": rank,
            "upload_bytes": None if update is None else len(update),  # None: secure aggregation hides it
            "download_bytes": download_bytes_by_rank.get(key),
            "trainable_param_bytes": trainable_bytes_by_rank.get(key),
        }
    return out


def start_record(*, upload_bytes: int = 0, transport: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Round 0: the starting point (no training; the simulation moves no bytes, Flower the initial adapter)."""
    return round_record(
        round=0, clients=[], accepted=[], rejected={}, dropped={}, train_loss=None, learning_rate=None,
        upload_bytes=upload_bytes, download_bytes=0, broadcast_bytes=0, num_uploads=0,
        cumulative_mb=upload_bytes / MB, transport=transport,
    )  # fmt: skip


def total_mb(history: Iterable[Mapping[str, Any]]) -> float:
    """Upload plus download MB over every record so far."""
    return sum(r.get("upload_bytes", 0) + r.get("download_bytes", 0) for r in history) / MB


def history_json(history: Sequence[Mapping[str, Any]]) -> str:
    """``history.json``'s text (strict JSON: a non-finite number is written as null)."""
    return json.dumps(_finite(list(history)), indent=2)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def round_mb(record: Mapping[str, Any]) -> float:
    return (record["upload_bytes"] + record["download_bytes"]) / MB


class RoundTable:
    """Prints one row per round: train loss, held-out loss per domain, upload and download MB, and with differential
    privacy the epsilon spent so far ('-' where a value is missing, e.g. round 0's train loss)."""

    def __init__(self, enabled: bool, epsilon: bool = False) -> None:
        self.enabled = enabled
        self.epsilon = epsilon  # a column with each round's dp_epsilon (differential privacy on)
        self.columns: list[str] | None = None

    def add(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        evals = [k for k in record if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss"]
        if self.columns is None:
            self.columns = ["round", "train_loss", *evals, "eval_loss", "up_MB", "down_MB"]
            if self.epsilon:
                self.columns.append("epsilon")
            tqdm.write(" | ".join(f"{c:>12}" for c in self.columns))
        values = {**record, "up_MB": record["upload_bytes"] / MB, "down_MB": record["download_bytes"] / MB,
                  "epsilon": record.get("dp_epsilon")}
        tqdm.write(" | ".join(_cell(values.get(c)) for c in self.columns))


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"{'-':>12}"
    if isinstance(value, int):
        return f"{value:>12}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:>12.4f}"
    return f"{'-':>12}"


def write_history(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Write ``history.json`` atomically (a reader never sees half a file)."""
    from fedsrd.federation.files import atomic_write_bytes

    atomic_write_bytes(path, history_json(history).encode())
