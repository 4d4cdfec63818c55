"""The Flower coordinator's checkpoint after each round, in the one checkpoint format of every runtime
(`fedsrd.checkpoint`: atomic, digest-checked, falling back to the last complete round).

Its tensors are the server's global state (``global/<name>``) and the broadcasts clients may still need
(``broadcast/round_NNNN``, the encoded bytes as uint8); its ``meta.json`` adds what Flower's server keeps besides:
the federation id, what each client holds and each round's state digest (the `SyncLedger`), the clients' PEFT
adapter config, the run's settings and history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsrd import wire
from fedsrd.algorithms import State
from fedsrd.checkpoint import read_checkpoint, write_checkpoint
from fedsrd.federation.files import atomic_write_bytes
from fedsrd.integrations.catchup import SyncLedger

RUNTIME = "flower"  # meta.json "runtime": who wrote the checkpoint

__all__ = ["ServerCheckpoint", "atomic_write_bytes", "load_checkpoint", "save_checkpoint"]


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


def save_checkpoint(directory: str | Path, ckpt: ServerCheckpoint, keep: int = 2) -> Path:
    """Write `ckpt` as ``directory/round_NNNN`` in the shared format, point LATEST at it, keep the newest `keep`."""
    tensors = {f"global/{k}": v.detach().to("cpu").contiguous() for k, v in ckpt.state.items()}
    for r, data in ckpt.ledger.broadcasts.items():
        tensors[f"broadcast/round_{r:04d}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    meta = {
        "runtime": RUNTIME,
        "federation_id": ckpt.federation_id,
        "algorithm": ckpt.algorithm,
        "digest": wire.state_digest(ckpt.state),
        "digests": {str(r): d for r, d in sorted(ckpt.ledger.digests.items())},
        "held": {str(c): (list(h) if h is not None else None) for c, h in sorted(ckpt.ledger.held.items())},
        "fed_config": ckpt.fed_config,
        "adapter_config": ckpt.adapter_config,
        "history": ckpt.history,
    }
    return write_checkpoint(directory, ckpt.round, tensors, meta, keep=keep)


def load_checkpoint(directory: str | Path) -> ServerCheckpoint | None:
    """The newest complete checkpoint under `directory` (an older one if the newest is damaged), or None if there is
    none; ValueError if none is usable or it was not written by a Flower coordinator."""
    loaded = read_checkpoint(directory)
    if loaded is None:
        return None
    round, tensors, meta = loaded
    if meta.get("runtime") != RUNTIME:
        raise ValueError(
            f"the checkpoint in {directory} was written by the {meta.get('runtime', 'simulation')} runtime; a Flower "
            "coordinator resumes only its own checkpoints (a Flower run keeps which broadcasts each client holds)."
        )
    state = {k[len("global/") :]: v.to(torch.float32) for k, v in tensors.items() if k.startswith("global/")}
    if wire.state_digest(state) != meta["digest"]:
        raise ValueError(f"the checkpoint of round {round} in {directory}: the global state does not match its digest")
    digests = {int(r): str(d) for r, d in meta["digests"].items()}
    if digests.get(round) != meta["digest"]:
        raise ValueError(f"the checkpoint in {directory}: the recorded digest of round {round} is not the state's")
    broadcasts = {
        int(k.rsplit("_", 1)[1]): v.numpy().tobytes() for k, v in tensors.items() if k.startswith("broadcast/")
    }
    held = {int(c): (int(h[0]), str(h[1])) if h is not None else None for c, h in meta["held"].items()}
    return ServerCheckpoint(
        round=round,
        federation_id=str(meta["federation_id"]),
        algorithm=str(meta["algorithm"]),
        state=state,
        ledger=SyncLedger(digests, broadcasts, held),
        history=list(meta.get("history") or []),
        fed_config=dict(meta.get("fed_config") or {}),
        adapter_config=meta.get("adapter_config"),
    )
