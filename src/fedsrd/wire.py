"""The wire format: every message between client and server, as bytes.

A message is a safetensors container (never pickle) whose ``__metadata__`` holds one JSON header under
the key ``"fedsrd"``::

    {"format": "fedsrd-wire", "version": 1, "kind": "update"|"broadcast", "algorithm": str,
     "round": int, "meta": {...},
     "tensors": {name: {"layout": "dense", "shape": [...]}
                       | {"layout": "sparse", "shape": [...], "nnz": int, "positions": "bitmap"|"varint"}
                       | {"layout": "sparse", "shape": [...], "nnz": int, "positions": "seeded",
                          "seeds": [int, ...], "drop": float}}}

A dense tensor is stored under its own name. A sparse tensor is stored as ``name + "::values"`` (the
non-zero values, 1-D) and ``name + "::positions"`` (uint8 bytes): either a packed bitmap over the flat
(row-major) tensor (``numpy.packbits``, ``bitorder="little"``, ``ceil(numel / 8)`` bytes) or the LEB128
varints of the gaps between successive flat positions (the first gap counted from -1). A sparse tensor whose positions
are those of a seeded random mask (DARE: `fedsrd.ops.SeededMask`) can instead send the mask's seeds and drop
probability in the header (``"positions": "seeded"``, no ``::positions`` bytes); the receiver regenerates the
positions and checks their count against ``nnz``. ``positions="auto"`` uses this whenever it applies.

Communication is always ``len(encode(message))``. :func:`decode` treats its input as hostile: every
malformed or unexpected message raises :class:`WireError`, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.torch
import torch

from fedsrd.config import POSITION_ENCODINGS
from fedsrd.config import VALUE_DTYPES as VALUE_DTYPE_NAMES
from fedsrd.ops.aligned import aligned_state
from fedsrd.ops.sparse import MAX_MASK_SEEDS, SeededMask, SparseTensor

__all__ = [
    "Message",
    "SparseTensor",
    "TensorSpec",
    "WireError",
    "decode",
    "encode",
    "read_header",
    "state_digest",
]

WIRE_FORMAT = "fedsrd-wire"
WIRE_VERSION = 1
METADATA_KEY = "fedsrd"
KINDS = ("update", "broadcast")
MB = 1024 * 1024  # the MB of every communication figure (history.json, reports, model cards): 1024^2 encoded bytes
# The names are the config's (`FedSRDConfig.value_dtype` / `positions` accept exactly these); here, their torch dtypes.
VALUE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in VALUE_DTYPE_NAMES}

_VALUES_SUFFIX = "::values"
_POSITIONS_SUFFIX = "::positions"
_SEPARATOR = "::"
# safetensors dtype names -> bytes per element (the whole format, so sizes can be checked before loading).
_ST_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_ST_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DEFAULT_MAX_HEADER_BYTES = 16 * 1024 * 1024  # header budget of a message decoded without expected shapes
MAX_META_BYTES = 64 * 1024  # room for a message's meta in the header budget computed from expected shapes
_MAX_NUMEL = 2**62  # keeps every flat position inside int64 arithmetic
_MAX_SEEDED_DRAWS = 2**30  # random draws a receiver makes to regenerate one tensor's seeded positions
DEFAULT_SEEDED_DRAWS = 2**24  # per-message draw budget without expected shapes (~0.1 s, ~100 MB at worst)
_MAX_VARINT_BYTES = 9  # 9 * 7 = 63 bits: any gap that fits a non-negative int64
_HEADER_KEYS = frozenset({"format", "version", "kind", "algorithm", "round", "meta", "tensors"})


class WireError(ValueError):
    """A message could not be encoded or decoded; the text names the tensor or field at fault."""


@dataclass
class Message:
    """One client->server ``"update"`` or server->client ``"broadcast"``."""

    kind: str
    algorithm: str
    round: int
    tensors: dict[str, torch.Tensor | SparseTensor]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects for one tensor name."""

    shape: tuple[int, ...]
    sparse_ok: bool = True


# ----------------------------------------------------------------------------------------------
# Position encodings
# ----------------------------------------------------------------------------------------------


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes each non-negative integer takes as an LEB128 varint."""
    values = values.astype(np.uint64, copy=False)
    lengths = np.ones(values.shape, dtype=np.int64)
    for k in range(1, 10):
        lengths += values >= np.uint64(1 << (7 * k))
    return lengths


def _varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 varints of non-negative integers, as a uint8 array (vectorised over entries)."""
    values = np.asarray(values).astype(np.uint64, copy=False)
    lengths = _varint_lengths(values)
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for j in range(int(lengths.max(initial=0))):
        live = lengths > j
        chunk = (values[live] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[live] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[live] + j] = (chunk | more).astype(np.uint8)
    return out


def _varint_decode(buf: np.ndarray, what: str) -> np.ndarray:
    """Decode a stream of LEB128 varints; raises WireError if the stream is malformed."""
    buf = np.asarray(buf, dtype=np.uint8)
    if buf.size == 0:
        return np.zeros(0, dtype=np.int64)
    if buf[-1] & 0x80:
        raise WireError(f"{what}: varint stream ends inside a varint (trailing continuation byte)")
    ends = np.flatnonzero((buf & 0x80) == 0)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_BYTES:
        raise WireError(f"{what}: varint longer than {_MAX_VARINT_BYTES} bytes (value would overflow int64)")
    if np.any((lengths > 1) & (buf[ends] == 0)):
        raise WireError(f"{what}: non-minimal varint (trailing zero byte)")
    shift = (np.arange(buf.size) - np.repeat(starts, lengths)) * 7
    parts = (buf & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.add.reduceat(parts, starts).astype(np.int64)


def _bitmap_bytes(numel: int) -> int:
    return (numel + 7) // 8


def _positions_to_bitmap(positions: np.ndarray, numel: int) -> np.ndarray:
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    return np.packbits(mask, bitorder="little")


def _positions_to_varint(positions: np.ndarray) -> np.ndarray:
    return _varint_encode(np.diff(positions, prepend=-1))


def _bitmap_to_positions(bitmap: np.ndarray, numel: int, nnz: int, what: str) -> np.ndarray:
    if bitmap.size != _bitmap_bytes(numel):
        raise WireError(f"{what}: bitmap has {bitmap.size} bytes, expected ceil({numel}/8) = {_bitmap_bytes(numel)}")
    bits = np.unpackbits(bitmap, bitorder="little")
    if bits[numel:].any():
        raise WireError(f"{what}: bitmap has bits set beyond the {numel} entries of the tensor")
    positions = np.flatnonzero(bits[:numel]).astype(np.int64)
    if positions.size != nnz:
        raise WireError(f"{what}: bitmap popcount is {positions.size}, but the header declares nnz={nnz}")
    return positions


def _varint_to_positions(stream: np.ndarray, numel: int, nnz: int, what: str) -> np.ndarray:
    gaps = _varint_decode(stream, what)
    if gaps.size != nnz:
        raise WireError(f"{what}: varint stream holds {gaps.size} positions, but the header declares nnz={nnz}")
    if gaps.size == 0:
        return gaps
    if gaps.min() < 1:
        raise WireError(f"{what}: positions are not strictly increasing (a gap of 0)")
    if gaps.max() > numel:
        raise WireError(f"{what}: position out of range for a tensor of {numel} entries")
    positions = np.cumsum(gaps) - 1
    if positions[-1] >= numel or np.any(np.diff(positions) <= 0):
        raise WireError(f"{what}: position {int(positions.max())} out of range for a tensor of {numel} entries")
    return positions


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


def _check_message(msg: Message) -> None:
    if msg.kind not in KINDS:
        raise WireError(f"message kind must be one of {KINDS}, got {msg.kind!r}")
    if not isinstance(msg.algorithm, str) or not msg.algorithm:
        raise WireError(f"message algorithm must be a non-empty string, got {msg.algorithm!r}")
    if isinstance(msg.round, bool) or not isinstance(msg.round, int) or msg.round < 0:
        raise WireError(f"message round must be an int >= 0, got {msg.round!r}")
    if not isinstance(msg.meta, dict):
        raise WireError(f"message meta must be a dict, got {type(msg.meta).__name__}")
    if not isinstance(msg.tensors, dict):
        raise WireError(f"message tensors must be a dict, got {type(msg.tensors).__name__}")


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise WireError(f"tensor names must be non-empty strings, got {name!r}")
    if _SEPARATOR in name or name == "__metadata__":
        raise WireError(f"tensor name {name!r} is reserved (contains '::' or is '__metadata__')")


def _wire_values(values: torch.Tensor, wire_dtype: torch.dtype, name: str) -> torch.Tensor:
    if not values.is_floating_point():
        raise WireError(f"tensor {name!r}: expected a floating dtype, got {values.dtype}")
    out = values.detach().to(device="cpu", dtype=wire_dtype).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise WireError(f"tensor {name!r}: values are not finite in {wire_dtype} (NaN, Inf or overflow)")
    return out


def _encode_sparse(
    name: str, sparse: SparseTensor, wire_dtype: torch.dtype, positions: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    numel = sparse.numel
    idx = sparse.indices.detach().cpu()
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise WireError(f"tensor {name!r}: sparse indices must be integers, got {idx.dtype}")
    idx = idx.to(torch.int64).numpy()
    if idx.size and (idx[0] < 0 or idx[-1] >= numel):
        raise WireError(f"tensor {name!r}: sparse indices out of range for shape {list(sparse.shape)}")
    if idx.size > 1 and np.any(np.diff(idx) <= 0):
        raise WireError(f"tensor {name!r}: sparse indices must be strictly increasing")
    if positions == "auto" and sparse.mask is not None:
        seeded = _encode_seeded(name, sparse, idx, wire_dtype)
        if seeded is not None:
            return seeded
    values = _wire_values(sparse.values, wire_dtype, name)
    if positions == "auto":
        varint_size = int(_varint_lengths(np.diff(idx, prepend=-1)).sum())
        positions = "varint" if varint_size < _bitmap_bytes(numel) else "bitmap"
    packed = _positions_to_bitmap(idx, numel) if positions == "bitmap" else _positions_to_varint(idx)
    entry = {"layout": "sparse", "shape": list(sparse.shape), "nnz": int(idx.size), "positions": positions}
    stored = {name + _VALUES_SUFFIX: values, name + _POSITIONS_SUFFIX: torch.from_numpy(packed)}
    return entry, stored


def _encode_seeded(
    name: str, sparse: SparseTensor, idx: np.ndarray, wire_dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The tensor with its positions sent as the mask's seeds, or None if its positions are not within the mask."""
    mask_positions = sparse.mask.positions(sparse.shape).numpy()
    if np.array_equal(mask_positions, idx):
        values = sparse.values
    else:  # a subset of the mask (zeros dropped): send the mask's positions, with explicit zeros
        slots = np.searchsorted(mask_positions, idx)
        if slots.size and (slots[-1] >= mask_positions.size or not np.array_equal(mask_positions[slots], idx)):
            return None
        values = torch.zeros(mask_positions.size, dtype=sparse.values.dtype)
        values[torch.from_numpy(slots)] = sparse.values.detach().cpu()
    entry = {"layout": "sparse", "shape": list(sparse.shape), "nnz": int(mask_positions.size), "positions": "seeded",
             "seeds": [int(s) for s in sparse.mask.seeds], "drop": float(sparse.mask.drop)}  # fmt: skip
    return entry, {name + _VALUES_SUFFIX: _wire_values(values, wire_dtype, name)}


def encode(msg: Message, *, value_dtype: str = "float32", positions: str = "auto") -> bytes:
    """Encode ``msg`` as safetensors bytes.

    Args:
        msg: the message; its tensors are dense ``torch.Tensor`` or :class:`SparseTensor`.
        value_dtype: dtype of the values on the wire (dense tensors too): "float32", "float16" or "bfloat16".
        positions: sparse position encoding, "bitmap", "varint", or "auto": a seeded mask's seeds where the tensor
            carries one (`SparseTensor.mask`), else the smaller of bitmap and varint, per tensor.

    Raises:
        WireError: the message is invalid (bad kind/round/meta, non-floating or non-finite tensors,
            bad sparse indices, reserved names).
    """
    if value_dtype not in VALUE_DTYPES:
        raise WireError(f"value_dtype must be one of {tuple(VALUE_DTYPES)}, got {value_dtype!r}")
    if positions not in POSITION_ENCODINGS:
        raise WireError(f"positions must be one of {POSITION_ENCODINGS}, got {positions!r}")
    _check_message(msg)
    wire_dtype = VALUE_DTYPES[value_dtype]
    entries: dict[str, dict[str, Any]] = {}
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in msg.tensors.items():
        _check_name(name)
        if isinstance(tensor, SparseTensor):
            entries[name], parts = _encode_sparse(name, tensor, wire_dtype, positions)
            stored.update(parts)
        elif isinstance(tensor, torch.Tensor):
            entries[name] = {"layout": "dense", "shape": list(tensor.shape)}
            stored[name] = _wire_values(tensor, wire_dtype, name)
        else:
            raise WireError(f"tensor {name!r}: expected torch.Tensor or SparseTensor, got {type(tensor).__name__}")
    header = {
        "format": WIRE_FORMAT,
        "version": WIRE_VERSION,
        "kind": msg.kind,
        "algorithm": msg.algorithm,
        "round": msg.round,
        "meta": msg.meta,
        "tensors": entries,
    }
    try:
        header_json = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise WireError(f"message meta must be JSON-serialisable with finite numbers: {err}") from err
    return safetensors.torch.save(stored, metadata={METADATA_KEY: header_json})


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _reject_constant(token: str) -> None:
    raise WireError(f"header JSON contains the non-standard constant {token}")


def _parse_container(data: bytes, max_header_bytes: int = _MAX_HEADER_BYTES) -> tuple[dict[str, dict[str, Any]], str]:
    """Validate the safetensors framing; return its tensor entries and the fedsrd header string."""
    if len(data) < 8:
        raise WireError(f"message truncated: {len(data)} bytes, a safetensors container needs at least 8")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise WireError(
            f"safetensors header length {header_len} exceeds the {len(data) - 8} bytes after the length prefix"
        )
    if header_len > min(max_header_bytes, _MAX_HEADER_BYTES):
        raise WireError(
            f"safetensors header has {header_len} bytes, more than the {min(max_header_bytes, _MAX_HEADER_BYTES)} "
            "this message may have (its tensor entries and metadata); rejected before parsing"
        )
    try:
        st_header = json.loads(data[8 : 8 + header_len].decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise WireError(f"safetensors header is not valid JSON: {err}") from err
    if not isinstance(st_header, dict):
        raise WireError("safetensors header must be a JSON object")
    metadata = st_header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not isinstance(metadata.get(METADATA_KEY), str):
        raise WireError(f"safetensors __metadata__ lacks the {METADATA_KEY!r} header string")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise WireError("safetensors __metadata__ values must be strings")
    payload = len(data) - 8 - header_len
    spans = []
    for name, entry in st_header.items():
        if not isinstance(entry, dict):
            raise WireError(f"stored tensor {name!r}: entry must be an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_ITEMSIZE:
            raise WireError(f"stored tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise WireError(f"stored tensor {name!r}: shape must be a list of non-negative ints, got {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= payload
        ):
            raise WireError(f"stored tensor {name!r}: data_offsets {offsets!r} outside the {payload}-byte payload")
        if offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise WireError(f"stored tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise WireError("safetensors payload has overlapping tensors or gaps between them")
        end = stop
    if end != payload:
        raise WireError(f"safetensors payload has {payload} bytes, the tensors cover {end}")
    return st_header, metadata[METADATA_KEY]


def _check_shape(shape: object, what: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise WireError(f"{what}: shape must be a list of non-negative ints, got {shape!r}")
    if math.prod(shape) >= _MAX_NUMEL:
        raise WireError(f"{what}: shape {shape} has too many entries")
    return tuple(shape)


def _parse_header(text: str, max_mask_seeds: int = MAX_MASK_SEEDS, max_seeded_draws: int = _MAX_SEEDED_DRAWS) -> dict[
    str, Any
]:
    """Parse and schema-check the fedsrd JSON header; seeded positions within `max_mask_seeds` seeds per tensor and
    `max_seeded_draws` random draws for the whole message."""
    try:
        header = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, RecursionError) as err:
        raise WireError(f"fedsrd header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise WireError("fedsrd header must be a JSON object")
    if set(header) != _HEADER_KEYS:
        missing, extra = sorted(_HEADER_KEYS - set(header)), sorted(set(header) - _HEADER_KEYS)
        raise WireError(f"fedsrd header fields wrong: missing {missing}, unexpected {extra}")
    if header["format"] != WIRE_FORMAT:
        raise WireError(f"header format must be {WIRE_FORMAT!r}, got {header['format']!r}")
    if not _is_int(header["version"]) or header["version"] != WIRE_VERSION:
        raise WireError(f"header version must be {WIRE_VERSION}, got {header['version']!r}")
    if header["kind"] not in KINDS:
        raise WireError(f"header kind must be one of {KINDS}, got {header['kind']!r}")
    if not isinstance(header["algorithm"], str) or not header["algorithm"]:
        raise WireError(f"header algorithm must be a non-empty string, got {header['algorithm']!r}")
    if not _is_int(header["round"]) or header["round"] < 0:
        raise WireError(f"header round must be an int >= 0, got {header['round']!r}")
    if not isinstance(header["meta"], dict):
        raise WireError(f"header meta must be a JSON object, got {type(header['meta']).__name__}")
    if not isinstance(header["tensors"], dict):
        raise WireError("header tensors must be a JSON object")
    draws = 0
    for name, entry in header["tensors"].items():
        what = f"tensor {name!r}"
        if _SEPARATOR in name or not name:
            raise WireError(f"{what}: invalid name")
        if not isinstance(entry, dict):
            raise WireError(f"{what}: header entry must be an object")
        layout = entry.get("layout")
        keys = {"layout", "shape"} if layout == "dense" else {"layout", "shape", "nnz", "positions"}
        if layout == "sparse" and entry.get("positions") == "seeded":
            keys = keys | {"seeds", "drop"}
        if layout not in ("dense", "sparse"):
            raise WireError(f"{what}: layout must be 'dense' or 'sparse', got {layout!r}")
        if set(entry) != keys:
            raise WireError(f"{what}: header entry must have exactly the fields {sorted(keys)}, got {sorted(entry)}")
        numel = math.prod(_check_shape(entry["shape"], what))
        if layout == "sparse":
            nnz = entry["nnz"]
            if not _is_int(nnz) or not 0 <= nnz <= numel:
                raise WireError(f"{what}: nnz must be an int in [0, {numel}], got {nnz!r}")
            if entry["positions"] not in ("bitmap", "varint", "seeded"):
                raise WireError(
                    f"{what}: positions must be 'bitmap', 'varint' or 'seeded', got {entry['positions']!r}"
                )
            if entry["positions"] == "seeded":
                _check_seeded(entry, numel, what, max_mask_seeds)
                draws += len(entry["seeds"]) * numel
                if draws > max_seeded_draws:
                    raise WireError(
                        f"{what}: regenerating the seeded masks would take {draws} random draws so far, more than "
                        f"this message's budget of {max_seeded_draws} (decode's max_seeded_draws)"
                    )
    return header


def _check_seeded(entry: dict[str, Any], numel: int, what: str, max_seeds: int = MAX_MASK_SEEDS) -> None:
    seeds, drop = entry["seeds"], entry["drop"]
    max_seeds = min(max_seeds, MAX_MASK_SEEDS)
    if max_seeds < 1:
        raise WireError(f"{what}: seeded positions are not accepted in this message")
    if not isinstance(seeds, list) or not 1 <= len(seeds) <= max_seeds:
        raise WireError(f"{what}: seeds must be a list of 1 to {max_seeds} ints, got {str(seeds)[:80]}")
    if not all(_is_int(s) and 0 <= s < 2**63 for s in seeds):
        raise WireError(f"{what}: seeds must be ints in [0, 2**63), got {str(seeds)[:80]}")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        raise WireError(f"{what}: drop must be a probability in [0, 1), got {drop!r}")
    if len(seeds) * numel > _MAX_SEEDED_DRAWS:
        raise WireError(f"{what}: regenerating {len(seeds)} masks of {numel} entries is more work than allowed")


def _check_expected(header: dict[str, Any], expected: dict[str, TensorSpec], require_all: bool) -> None:
    entries = header["tensors"]
    unknown = sorted(set(entries) - set(expected))
    if unknown:
        raise WireError(f"unknown tensor {unknown[0]!r} (and {len(unknown) - 1} more); not among the expected names")
    if require_all:
        missing = sorted(set(expected) - set(entries))
        if missing:
            raise WireError(f"missing tensor {missing[0]!r} ({len(missing)} expected names missing in all)")
    for name, entry in entries.items():
        spec = expected[name]
        if tuple(entry["shape"]) != tuple(spec.shape):
            raise WireError(f"tensor {name!r}: shape {tuple(entry['shape'])}, expected {tuple(spec.shape)}")
        if entry["layout"] == "sparse" and not spec.sparse_ok:
            raise WireError(f"tensor {name!r}: arrived sparse, but the receiver expects it dense")


def _check_stored(header: dict[str, Any], stored: dict[str, dict[str, Any]]) -> None:
    """The container holds exactly the tensors the header describes, with matching dtypes and shapes."""
    wanted: dict[str, tuple[tuple[str, ...], list[int] | None]] = {}
    for name, entry in header["tensors"].items():
        if entry["layout"] == "dense":
            wanted[name] = (_ST_FLOAT_DTYPES, entry["shape"])
        else:
            wanted[name + _VALUES_SUFFIX] = (_ST_FLOAT_DTYPES, [entry["nnz"]])
            if entry["positions"] != "seeded":
                wanted[name + _POSITIONS_SUFFIX] = (("U8",), None)
    if set(stored) != set(wanted):
        extra, missing = sorted(set(stored) - set(wanted)), sorted(set(wanted) - set(stored))
        raise WireError(f"container tensors do not match the header: unexpected {extra}, missing {missing}")
    for key, (dtypes, shape) in wanted.items():
        entry = stored[key]
        if entry["dtype"] not in dtypes:
            raise WireError(f"stored tensor {key!r}: dtype {entry['dtype']}, expected one of {list(dtypes)}")
        if shape is None and len(entry["shape"]) != 1:
            raise WireError(f"stored tensor {key!r}: positions must be 1-D bytes, got shape {entry['shape']}")
        if shape is not None and entry["shape"] != shape:
            what = "values must have nnz entries" if key.endswith(_VALUES_SUFFIX) else "shape differs from header"
            raise WireError(f"stored tensor {key!r}: {what}: got shape {entry['shape']}, expected {shape}")


def _float32_values(tensor: torch.Tensor, key: str) -> torch.Tensor:
    values = tensor.to(torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise WireError(f"stored tensor {key!r}: values are not finite (NaN or Inf)")
    return values


def decode(
    data: bytes,
    *,
    expected: dict[str, TensorSpec] | None = None,
    kind: str | None = None,
    algorithm: str | None = None,
    max_bytes: int | None = None,
    require_all: bool = True,
    max_mask_seeds: int = MAX_MASK_SEEDS,
    max_seeded_draws: int | None = None,
    max_header_bytes: int | None = None,
) -> Message:
    """Decode and validate bytes from :func:`encode`; values come back as float32.

    Args:
        data: the received bytes.
        expected: names the receiver accepts and their specs; unknown names are rejected, and with
            ``require_all`` so are missing ones. ``None`` skips these checks.
        kind, algorithm: if given, the message must carry these.
        max_bytes: reject larger messages before parsing anything.
        max_mask_seeds: seeds one seeded-position tensor may carry (a client's update: 1; a broadcast: the round's
            clients); 0 accepts no seeded positions at all.
        max_seeded_draws: random draws the whole message may cost to regenerate its seeded positions; default: the
            expected shapes' entries x `max_mask_seeds`, or `DEFAULT_SEEDED_DRAWS` without expected shapes.
        max_header_bytes: size of the container's JSON header (tensor entries and metadata), checked before it is
            parsed; default: what the expected tensors need plus `MAX_META_BYTES`, or `DEFAULT_MAX_HEADER_BYTES`.

    Raises:
        WireError: on any malformed or unexpected input, and when decoding runs out of memory.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"message must be bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message has {len(data)} bytes, more than max_bytes={max_bytes}")
    if max_seeded_draws is None:
        max_seeded_draws = DEFAULT_SEEDED_DRAWS if expected is None else max_mask_seeds * _expected_numel(expected)
    if max_header_bytes is None:
        max_header_bytes = DEFAULT_MAX_HEADER_BYTES if expected is None else _header_budget(expected, max_mask_seeds)
    try:
        return _decode(bytes(data), expected, kind, algorithm, require_all, max_mask_seeds, max_seeded_draws,
                       max_header_bytes)
    except (MemoryError, RuntimeError) as err:  # allocation failures while rebuilding tensors: the message's fault
        raise WireError(f"message could not be decoded within the available memory: {type(err).__name__}: "
                        f"{str(err)[:200]}") from err


def read_header(data: bytes, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The checked fedsrd header of a message (kind, algorithm, round, meta, tensor entries) without loading or
    regenerating any tensor: cheap whatever the message claims. Raises WireError as `decode` does."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"message must be bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message has {len(data)} bytes, more than max_bytes={max_bytes}")
    _, header_text = _parse_container(bytes(data), DEFAULT_MAX_HEADER_BYTES)
    return _parse_header(header_text, MAX_MASK_SEEDS, 2**63)


def _expected_numel(expected: dict[str, TensorSpec]) -> int:
    return sum(math.prod(spec.shape) for spec in expected.values())


def _header_budget(expected: dict[str, TensorSpec], max_mask_seeds: int) -> int:
    """Bytes the JSON header of a message of the `expected` tensors can need: per tensor its stored entries (values,
    positions) and its fedsrd entry (seeds included), escaped once inside the metadata string, plus the meta."""
    seeds = min(max(max_mask_seeds, 0), MAX_MASK_SEEDS)
    per_tensor = sum(3 * len(name) + 512 + 24 * seeds for name in expected)
    return 2 * (per_tensor + MAX_META_BYTES) + 4096


def _decode(
    data: bytes,
    expected: dict[str, TensorSpec] | None,
    kind: str | None,
    algorithm: str | None,
    require_all: bool,
    max_mask_seeds: int,
    max_seeded_draws: int,
    max_header_bytes: int,
) -> Message:
    stored_entries, header_text = _parse_container(data, max_header_bytes)
    header = _parse_header(header_text, max_mask_seeds, max_seeded_draws)
    if kind is not None and header["kind"] != kind:
        raise WireError(f"message kind is {header['kind']!r}, expected {kind!r}")
    if algorithm is not None and header["algorithm"] != algorithm:
        raise WireError(f"message algorithm is {header['algorithm']!r}, expected {algorithm!r}")
    if expected is not None:
        _check_expected(header, expected, require_all)
    _check_stored(header, stored_entries)
    try:
        stored = aligned_state(safetensors.torch.load(data))  # same bits wherever `data` lies in memory
    except Exception as err:  # safetensors raises its own error types; callers see only WireError
        raise WireError(f"safetensors container could not be loaded: {err}") from err

    tensors: dict[str, torch.Tensor | SparseTensor] = {}
    for name, entry in header["tensors"].items():
        shape = tuple(entry["shape"])
        if entry["layout"] == "dense":
            tensors[name] = _float32_values(stored[name], name).reshape(shape)
            continue
        what = f"tensor {name!r}"
        values = _float32_values(stored[name + _VALUES_SUFFIX], name + _VALUES_SUFFIX)
        numel, nnz = math.prod(shape), entry["nnz"]
        if entry["positions"] == "seeded":
            mask = SeededMask(tuple(entry["seeds"]), float(entry["drop"]))
            indices = mask.positions(shape)
            if indices.numel() != nnz:
                raise WireError(f"{what}: the seeded mask keeps {indices.numel()} positions, the header declares {nnz}")
            tensors[name] = SparseTensor(shape=shape, indices=indices, values=values, mask=mask)
            continue
        packed = stored[name + _POSITIONS_SUFFIX].numpy()
        if entry["positions"] == "bitmap":
            positions = _bitmap_to_positions(packed, numel, nnz, what)
        else:
            positions = _varint_to_positions(packed, numel, nnz, what)
        tensors[name] = SparseTensor(shape=shape, indices=torch.from_numpy(positions), values=values)
    return Message(
        kind=header["kind"],
        algorithm=header["algorithm"],
        round=header["round"],
        tensors=tensors,
        meta=header["meta"],
    )


# ----------------------------------------------------------------------------------------------
# Digest
# ----------------------------------------------------------------------------------------------


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 hex of a named tensor state: sorted names, each with shape, dtype and raw bytes.

    Bit-identical states give identical digests on every process; any single changed bit changes it.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_digest: {name!r} is {type(tensor).__name__}, expected torch.Tensor")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        record = json.dumps([name, list(tensor.shape), str(tensor.dtype), len(raw)], separators=(",", ":"))
        h.update(record.encode("utf-8"))
        h.update(b"\n")
        h.update(raw)
    return h.hexdigest()
