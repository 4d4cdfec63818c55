"""Seeds derived from (run seed, round, party), identical in every process and on every machine."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and any labels (round, client id, ...), stable across processes.

    Python's `hash()` is salted per process, so a hash of the parts' text is used instead.
    """
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, *parts: object) -> torch.Generator:
    """A CPU `torch.Generator` seeded by `derive_seed(seed, *parts)` (device-independent draws)."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))
