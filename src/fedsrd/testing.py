"""Helpers for testing a deployment's robustness: message mutators for fuzzing the decoder and the server step."""

from __future__ import annotations

import json
import struct

import numpy as np


def mutate(blob: bytes, rng: np.random.Generator) -> bytes:
    """A corrupted copy of an encoded message: bit flips, truncation, junk, lies in the header or payload."""
    data = bytearray(blob)
    kind = rng.integers(0, 8)
    if kind == 0:  # flip bits anywhere
        for _ in range(rng.integers(1, 8)):
            i = rng.integers(0, len(data))
            data[i] ^= 1 << rng.integers(0, 8)
    elif kind == 1:  # truncate
        data = data[: rng.integers(0, len(data))]
    elif kind == 2:  # insert junk
        i = rng.integers(0, len(data))
        data[i:i] = rng.bytes(int(rng.integers(1, 64)))
    elif kind == 3:  # random bytes of plausible length
        data = bytearray(rng.bytes(int(rng.integers(0, 2 * len(blob)))))
    elif kind == 4:  # lie about the header length
        data[:8] = struct.pack("<Q", int(rng.integers(0, 2**40)))
    elif kind == 5:  # overwrite a run inside the header
        n = struct.unpack("<Q", bytes(data[:8]))[0]
        i = 8 + rng.integers(0, max(1, n))
        data[i : i + 4] = rng.bytes(4)
    elif kind == 6:  # rewrite the fedsrd header: shapes, nnz, names, round, kind
        return rewrite_header(blob, rng)
    else:  # overwrite tensor payload bytes (values or positions)
        n = struct.unpack("<Q", bytes(data[:8]))[0]
        start = 8 + n
        if start < len(data):
            i = rng.integers(start, len(data))
            data[i : i + 8] = rng.bytes(8)
    return bytes(data)


def rewrite_header(blob: bytes, rng: np.random.Generator) -> bytes:
    """The message with one field of its fedsrd header changed: a shape, an nnz, a name, the round, kind, layout."""
    n = struct.unpack("<Q", blob[:8])[0]
    outer = json.loads(blob[8 : 8 + n])
    header = json.loads(outer["__metadata__"]["fedsrd"])
    names = list(header["tensors"])
    name = names[rng.integers(0, len(names))]
    entry = header["tensors"][name]
    choice = rng.integers(0, 6)
    if choice == 0:
        entry["shape"] = [int(rng.integers(0, 50)) for _ in range(int(rng.integers(0, 4)))]
    elif choice == 1 and "nnz" in entry:
        entry["nnz"] = int(rng.integers(-5, 500))
    elif choice == 2:
        header["tensors"]["not." + name] = header["tensors"].pop(name)
    elif choice == 3:
        header["round"] = int(rng.integers(-3, 5))
    elif choice == 4:
        header["kind"] = "broadcast"
    else:
        entry["layout"] = "sparse" if entry.get("layout") == "dense" else "dense"
    outer["__metadata__"]["fedsrd"] = json.dumps(header)
    text = json.dumps(outer).encode()
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]
