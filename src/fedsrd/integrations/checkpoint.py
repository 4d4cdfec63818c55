"""The server's checkpoint after each round, so a run can resume from its last complete round.

A checkpoint is one directory, written under a temporary name and renamed into place, then named in
``latest.json`` (itself replaced atomically), so a crash leaves either the previous or the new checkpoint, never half
of one. No pickle: tensors in safetensors, everything else in JSON.

    <checkpoint_dir>/latest.json                  {"name": "round_0003-1a2b3c4d", "round": 3}
    <checkpoint_dir>/round_0003-1a2b3c4d/
        global_state.safetensors                  the server's global state after the round
        broadcasts.safetensors                    the broadcasts clients may still need, uint8, "round_NNNN"
        checkpoint.json                           round, federation id, digests, what each client holds, history
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from fedsrd import wire
from fedsrd.algorithms import State
from fedsrd.integrations.catchup import SyncLedger

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedsrd-server-checkpoint"
CHECKPOINT_VERSION = 1
LATEST = "latest.json"
STATE_FILE = "global_state.safetensors"
BROADCASTS_FILE = "broadcasts.safetensors"
META_FILE = "checkpoint.json"


@dataclass
class ServerCheckpoint:
    """What the server needs to continue a run after `round`."""

    round: int
    federation_id: str
    algorithm: str
    state: State
    ledger: SyncLedger
    history: list[dict[str, Any]] = field(default_factory=list)
    fed_config: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] | None = None  # the clients' PEFT adapter_config.json


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, ckpt: ServerCheckpoint, keep: int = 2) -> Path:
    """Write `ckpt` as a new checkpoint directory, point ``latest.json`` at it, keep the newest `keep`."""
    from safetensors.torch import save

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"round_{ckpt.round:04d}-{uuid.uuid4().hex[:8]}"
    staging = root / f".{name}.tmp"
    staging.mkdir()
    state = {k: v.detach().to("cpu").contiguous() for k, v in ckpt.state.items()}
    (staging / STATE_FILE).write_bytes(save(state, metadata={"format": "pt"}))
    blobs = {
        f"round_{r:04d}": torch.frombuffer(bytearray(b), dtype=torch.uint8) for r, b in ckpt.ledger.broadcasts.items()
    }
    (staging / BROADCASTS_FILE).write_bytes(save(blobs) if blobs else b"")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "round": ckpt.round,
        "federation_id": ckpt.federation_id,
        "algorithm": ckpt.algorithm,
        "state_digest": wire.state_digest(state),
        "digests": {str(r): d for r, d in sorted(ckpt.ledger.digests.items())},
        "held": {str(c): (list(h) if h is not None else None) for c, h in sorted(ckpt.ledger.held.items())},
        "fed_config": ckpt.fed_config,
        "adapter_config": ckpt.adapter_config,
        "history": ckpt.history,
    }
    (staging / META_FILE).write_text(json.dumps(meta, indent=1))
    _fsync_dir(staging)
    os.replace(staging, root / name)
    atomic_write_bytes(root / LATEST, json.dumps({"name": name, "round": ckpt.round}).encode())
    for old in _checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_checkpoint(directory: str | Path) -> ServerCheckpoint | None:
    """The newest complete checkpoint under `directory`, or None if there is none."""
    root = Path(directory)
    candidates = []
    try:
        latest = json.loads((root / LATEST).read_text())
        candidates.append(root / str(latest["name"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    candidates += reversed(_checkpoint_dirs(root))
    for path in candidates:
        try:
            return _read(path)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            logger.warning("skipping checkpoint %s: %s", path, err)
    return None


def _read(path: Path) -> ServerCheckpoint:
    from safetensors.torch import load

    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
    state = {k: v.to(torch.float32) for k, v in load((path / STATE_FILE).read_bytes()).items()}
    if wire.state_digest(state) != meta["state_digest"]:
        raise ValueError("the global state does not match its recorded digest")
    raw = (path / BROADCASTS_FILE).read_bytes()
    broadcasts = {int(k.split("_")[1]): v.numpy().tobytes() for k, v in (load(raw) if raw else {}).items()}
    digests = {int(r): str(d) for r, d in meta["digests"].items()}
    if digests.get(int(meta["round"])) != meta["state_digest"]:
        raise ValueError(f"the recorded digest of round {meta['round']} is not the global state's")
    held = {int(c): (int(h[0]), str(h[1])) if h is not None else None for c, h in meta["held"].items()}
    return ServerCheckpoint(
        round=int(meta["round"]),
        federation_id=str(meta["federation_id"]),
        algorithm=str(meta["algorithm"]),
        state=state,
        ledger=SyncLedger(digests, broadcasts, held),
        history=list(meta.get("history") or []),
        fed_config=dict(meta.get("fed_config") or {}),
        adapter_config=meta.get("adapter_config"),
    )


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (by round, then modification time)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.glob("round_*") if p.is_dir() and (p / META_FILE).is_file()]
    return sorted(dirs, key=lambda p: (p.name.split("-")[0], p.stat().st_mtime))


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
