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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedsrd import wire

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
TENSORS = "tensors.safetensors"
META = "meta.json"
FORMAT = "fedsrd-checkpoint"
TENSORS_DIGEST = "tensors_digest"  # meta.json: SHA-256 (`wire.state_digest`) of every tensor in tensors.safetensors

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
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp / TENSORS))
    # Every tensor (global, personal/, base/...) under one digest, checked on load.
    _write_json(tmp / META, {"format": FORMAT, "version": 1, "round": int(round), **meta,
                             TENSORS_DIGEST: wire.state_digest(tensors)})
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
    """The newest complete checkpoint as (round, tensors, meta), or None if the run has none.

    The one LATEST names comes first; if it is unreadable, incomplete or fails its digest, the older ones are tried
    in turn, with a warning naming the file at fault. ValueError (naming every file and why) if none is usable.
    """
    root = Path(out_dir) / CHECKPOINTS
    latest = root / LATEST
    if not latest.is_file():
        return None
    candidates = [root / latest.read_text().strip()]
    candidates += [p for p in sorted(root.glob("round_*"), reverse=True) if p.is_dir() and p not in candidates]
    problems = []
    for path in candidates:
        try:
            loaded = _read_checkpoint(path)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            problems.append(f"{err}")
            logger.warning("checkpoint %s is unusable (%s); falling back to the previous complete checkpoint",
                           path, err)
            continue
        if path != candidates[0]:
            logger.warning("resuming from %s instead of %s (named by %s)", path, candidates[0], latest)
        return loaded
    raise ValueError(f"no usable checkpoint under {root}: " + "; ".join(problems))


def _read_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    meta_path, tensors_path = path / META, path / TENSORS
    if not meta_path.is_file() or not tensors_path.is_file():
        raise FileNotFoundError(f"{path} is incomplete (expected {META} and {TENSORS})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a fedsrd checkpoint")
    try:
        tensors = load_file(str(tensors_path))
    except SafetensorError as err:
        raise ValueError(f"{tensors_path} cannot be read ({err})") from err
    if TENSORS_DIGEST in meta and wire.state_digest(tensors) != meta[TENSORS_DIGEST]:
        raise ValueError(f"{tensors_path} does not match the digest recorded in {meta_path}")
    return int(meta["round"]), tensors, meta


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
