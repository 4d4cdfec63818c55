"""The one checkpoint format of every runtime: pickle-free, atomic, digest-checked; tensors in safetensors,
everything else in JSON.

Layout of a checkpoint directory (the simulation and Accelerate teams: ``<output_dir>/checkpoints``; Flower: the
run config's ``checkpoint-dir``, by default the same)::

    checkpoints/
      round_0007/           one complete round: tensors.safetensors + meta.json
      LATEST                the name of the newest complete checkpoint, replaced atomically

What the tensors are is the runtime's: the simulation keeps ``global/``, ``personal/<cid>/``, ``memory/<cid>/``
(error-feedback residuals), ``server_memory/`` and ``base/`` tensors; a Flower coordinator ``global/`` and the
broadcasts clients may still need (``broadcast/round_NNNN``, uint8). ``meta.json`` carries the round, the run's
``fed_config``, ``history`` and a SHA-256 of every tensor, checked on load.

A checkpoint directory is written under a temporary name and renamed into place, and LATEST is replaced only after
that, so a crash at any instant leaves the previous complete checkpoint readable; a damaged newest checkpoint falls
back to the previous complete one. Resuming a run whose settings differ from the checkpoint's in any of
`RESUME_KEYS` is refused, naming every differing setting (`check_resume`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedsrd import wire
from fedsrd.federation.files import atomic_write_bytes
from fedsrd.ops.aligned import aligned_state

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
TENSORS = "tensors.safetensors"
META = "meta.json"
FORMAT = "fedsrd-checkpoint"
TENSORS_DIGEST = "tensors_digest"  # meta.json: SHA-256 (`wire.state_digest`) of every tensor in tensors.safetensors
OLD_FLOWER_LATEST = "latest.json"  # the Flower coordinator's own format before this module served every runtime

# Settings a resumed run must share with its checkpoint (the same federation: clients, sampling, adapter shape).
RESUME_KEYS = (
    "algorithm",
    "num_clients",
    "clients_per_round",
    "fed_seed",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
)

logger = logging.getLogger(__name__)


def save_checkpoint(out_dir: str | Path, round: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int = 2, add_files: Callable[[Path], dict[str, Any]] | None = None) -> Path:
    """Write the state after `round` under ``<out_dir>/checkpoints`` (`write_checkpoint`)."""
    return write_checkpoint(Path(out_dir) / CHECKPOINTS, round, tensors, meta, keep=keep, add_files=add_files)


def write_checkpoint(root: str | Path, round: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     keep: int = 2, add_files: Callable[[Path], dict[str, Any]] | None = None) -> Path:
    """Write the state after `round` (tensors by name, JSON-serialisable `meta`) as ``root/round_NNNN`` and point
    LATEST at it; keep the newest `keep` checkpoints.

    `add_files(directory)`: writes further files into the checkpoint before it is renamed into place (the simulation's
    on-disk client states, `fedsrd.federation.client_store`) and returns what to add to ``meta.json`` (their digests).
    The reader finds the directory as ``meta["checkpoint_dir"]``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"round_{round:04d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp / TENSORS))
    if add_files is not None:
        meta = {**meta, **add_files(tmp)}
    # Every tensor (global, personal/, base/...) under one digest, checked on load.
    _write_json(tmp / META, {"format": FORMAT, "version": 1, "round": int(round), **meta,
                             TENSORS_DIGEST: wire.state_digest(tensors)})
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_bytes(root / LATEST, name.encode())
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
    """The newest complete checkpoint under ``<out_dir>/checkpoints`` (`read_checkpoint`)."""
    return read_checkpoint(Path(out_dir) / CHECKPOINTS)


def read_checkpoint(root: str | Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint in `root` as (round, tensors, meta), or None if there is none.

    The one LATEST names comes first; if it is unreadable, incomplete or fails its digest, the older ones are tried
    in turn, with a warning naming the file at fault. ValueError (naming every file and why) if none is usable, or
    if `root` holds a checkpoint of the older Flower-only format.
    """
    root = Path(root)
    latest = root / LATEST
    if not latest.is_file():
        if (root / OLD_FLOWER_LATEST).is_file():
            raise ValueError(
                f"{root} holds a checkpoint in the Flower coordinator's former format ({OLD_FLOWER_LATEST}), which "
                "this version no longer reads: finish that run with the fedsrd version that wrote it, or start a new "
                "run (without resume) in another output directory."
            )
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
        tensors = aligned_state(load_file(str(tensors_path)))  # same bits as the run that wrote them
    except SafetensorError as err:
        raise ValueError(f"{tensors_path} cannot be read ({err})") from err
    if TENSORS_DIGEST in meta and wire.state_digest(tensors) != meta[TENSORS_DIGEST]:
        raise ValueError(f"{tensors_path} does not match the digest recorded in {meta_path}")
    meta["checkpoint_dir"] = str(path)  # where files written by `add_files` are (not stored)
    return int(meta["round"]), tensors, meta


def check_resume(saved: dict[str, Any], current: dict[str, Any], where: str | Path) -> None:
    """Raise ValueError naming every `RESUME_KEYS` setting in which this run (`current`, `FedSRDConfig.to_dict()`)
    differs from the run that wrote the checkpoint in `where` (`saved`)."""
    settings = _differing_settings(saved, current, RESUME_KEYS)
    if settings:
        raise ValueError(
            f"resume: the checkpoint in {where} was written by a run with different settings ({settings}); resume "
            "with the same settings, or start a new run in another output directory."
        )
    _check_resume_dp_accounting(saved, current, where)
    _check_resume_dp_settings(saved, current, where)


# ---- differential privacy: the epsilon curve of a resumed run is accounted one way (docs/privacy.md) ----
def _check_resume_dp_accounting(saved: dict[str, Any], current: dict[str, Any], where: str | Path) -> None:
    """A private run that samples fewer than all clients resumes only with the sampling accounting it started with:
    its epsilon after round t (and, with dp_target_epsilon, its noise multiplier) depends on it. A checkpoint written
    before ``dp_sampling_accounting`` existed was accounted as Poisson."""
    from fedsrd.ops.privacy import STORED_RUN_SAMPLING_ACCOUNTING

    def subsampled_dp(cfg: dict[str, Any]) -> bool:
        clients = cfg.get("num_clients") or 0
        return (cfg.get("dp_mode") or "off") != "off" and 0 < (cfg.get("clients_per_round") or clients) < clients

    if not (subsampled_dp(saved) and subsampled_dp(current)):
        return
    before = saved.get("dp_sampling_accounting", STORED_RUN_SAMPLING_ACCOUNTING)
    now = current.get("dp_sampling_accounting")
    if before != now:
        raise ValueError(
            f"resume: the checkpoint in {where} was written by a run whose epsilon was accounted with "
            f"dp_sampling_accounting {before!r}"
            + (" (runs from before that option existed were)" if "dp_sampling_accounting" not in saved else "")
            + f", this run has {now!r}; resume with --dp_sampling_accounting {before} so that its epsilon curve and "
            "noise stay one analysis, or start a new run in another output directory."
        )


# The settings a private run's noise and epsilon curve are computed from: the accountant composes every round with one
# noise multiplier and clip bound, so a resumed run must keep them (and, when z is derived from dp_target_epsilon over
# num_rounds, keep num_rounds too).
DP_RESUME_KEYS = ("dp_mode", "dp_clip_norm", "dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_accountant")


def _check_resume_dp_settings(saved: dict[str, Any], current: dict[str, Any], where: str | Path) -> None:
    """Refuse a resume that changes the differential-privacy settings of a private run (either side private)."""
    if (saved.get("dp_mode") or "off") == "off" and (current.get("dp_mode") or "off") == "off":
        return
    keys = DP_RESUME_KEYS + (("num_rounds",) if current.get("dp_target_epsilon") is not None else ())
    settings = _differing_settings(saved, current, keys)
    if settings:
        raise ValueError(
            f"resume: the checkpoint in {where} was written by a private run with other privacy settings ({settings}); "
            "its noise and its epsilon after each round are one analysis over the whole run (with dp_target_epsilon, "
            "the noise multiplier is computed for num_rounds), so resume with the same settings, or start a new run "
            "in another output directory."
        )


def _differing_settings(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> str:
    """"key: checkpoint X, this run Y" for each of `keys` the checkpoint has and this run changes ("" when none)."""
    differing = [k for k in keys if k in saved and saved.get(k) != current.get(k)]
    return "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in differing)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
