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
import logging
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

logger = logging.getLogger(__name__)


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


# What a run writes into its output directory; another run must not mix its own files with these.
RUN_FILES = ("history.json", "fed_config.json", "eval_loss_vs_mb.png")
RUN_DIRS = (CHECKPOINTS, "final")


def previous_run_files(out_dir: str | Path) -> list[Path]:
    """The files and folders a previous run left in `out_dir` (checkpoints, round_NNNN/, final/, history.json...)."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    found = [root / n for n in (*RUN_DIRS, *RUN_FILES) if (root / n).exists()]
    found += sorted(p for p in root.glob("round_[0-9]*") if p.is_dir())
    return found


def prepare_output_dir(out_dir: str | Path, *, resume: bool, extra: list[Path] = ()) -> list[Path]:
    """Make `out_dir` ready for a new run: remove the files a previous run left there; returns what was removed.

    Resuming keeps everything. A new run must not mix with an old one: the old run's higher-numbered checkpoints
    would outrank the new run's (its own pruned at once, LATEST naming a deleted folder, --resume failing) and its
    round adapters would sit beside the new final/. So its checkpoints, round_NNNN/, final/ and history files (and
    `extra` paths, e.g. a checkpoint dir elsewhere) are removed, with a warning that names them; nothing else in
    `out_dir` is touched.
    """
    if resume:
        return []
    found = previous_run_files(out_dir)
    found += [p for p in extra if p.exists() and p not in found]
    if found:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:8]) + (", ..." if len(found) > 8 else "")
        logger.warning("output_dir %s holds a previous run; removing its files (%s) before this run starts. "
                       "Pass --resume true to continue that run instead.", out_dir, names)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


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
