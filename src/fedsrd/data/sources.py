"""Loading instruction data from a local file or directory (JSON, JSONL, CSV, Parquet) or the Hugging Face Hub."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets

_BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _looks_like_path(source: str) -> bool:
    """True for text that can only mean a local path (so a missing one is an error, not a Hub id)."""
    return (source.startswith(("/", "./", "../", "~", "\\")) or Path(source).suffix.lower()
            in _BUILDER_BY_SUFFIX)


def _find_split_file(directory: Path, split: str) -> Path:
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    present = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"load_instruction_data: directory {str(directory)!r} has no {split}.jsonl, {split}.json, "
        f"{split}.csv or {split}.parquet; it contains {present}")


def load_instruction_data(source: str, *, split: str = "train", **kwargs: Any) -> datasets.Dataset:
    """Load an instruction dataset from a local file or directory, or from the Hugging Face Hub.

    Args:
        source: A ``.json``/``.jsonl``/``.csv``/``.parquet`` file; a directory holding
            ``{split}.jsonl|json|csv|parquet`` (first match in that order); otherwise a Hub
            dataset name.
        split: Split to load (names the file inside a directory, or the Hub split).
        **kwargs: Passed on to :func:`datasets.load_dataset` (e.g. ``cache_dir``, ``name``).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist, or a directory without
            the split's file.
        ValueError: a local file whose extension is not supported.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = _find_split_file(path, split)
    elif not path.exists():
        if _looks_like_path(source):
            raise FileNotFoundError(f"load_instruction_data: no such file or directory: {source!r}")
        return datasets.load_dataset(source, split=split, **kwargs)
    builder = _BUILDER_BY_SUFFIX.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"load_instruction_data: unsupported file type {path.suffix!r} for "
                         f"{str(path)!r}; expected one of {sorted(_BUILDER_BY_SUFFIX)}")
    if path.stat().st_size == 0:
        raise ValueError(f"load_instruction_data: {str(path)!r} is empty; expected {split} rows "
                         f"(instruction, output[, input]) as {path.suffix.lstrip('.').upper()}")
    # datasets' JSON reader logs its own parse error before raising; the ValueError below says it once
    json_logger = logging.getLogger("datasets.packaged_modules.json.json")
    level, json_logger.level = json_logger.level, logging.CRITICAL
    try:
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__ or error
        raise ValueError(f"load_instruction_data: cannot read {str(path)!r} as {path.suffix.lstrip('.').upper()}: "
                         f"{type(cause).__name__}: {cause}") from error
    finally:
        json_logger.setLevel(level)
