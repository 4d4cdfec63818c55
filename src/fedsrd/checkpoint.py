"""Pickle-free, atomic run checkpoints: tensors in safetensors, everything else in JSON.

Layout under a run's output directory::

    checkpoints/
      round_0007/           one complete round: tensors.safetensors + meta.json
      LATEST                the name of the newest complete checkpoint, replaced atomically

A checkpoint directory is written under a temporary name and renamed into place, and LATEST is replaced only after
that, so a crash at any instant leaves the previous complete checkpoint readable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
TENSORS = "tensors.safetensors"
META = "meta.json"
FORMAT = "fedsrd-checkpoint"


def save_checkpoint(out_dir: str | Path, round: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write the state after `round` (tensors by name, JSON-serialisable `meta`) and point LATEST at it."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"round_{round:04d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    _write_json(tmp / META, {"format": FORMAT, "version": 1, "round": int(round), **meta})
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, name)
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("round_*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir: str | Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint as (round, tensors, meta), or None if the run has none."""
    root = Path(out_dir) / CHECKPOINTS
    latest = root / LATEST
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    meta_path, tensors_path = path / META, path / TENSORS
    if not meta_path.is_file() or not tensors_path.is_file():
        raise FileNotFoundError(f"checkpoint {path} named by {latest} is incomplete (expected {META} and {TENSORS}).")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a fedsrd checkpoint (format {meta.get('format')!r}).")
    return int(meta["round"]), load_file(str(tensors_path)), meta


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
