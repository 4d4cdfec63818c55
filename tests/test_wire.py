"""Tests for fedsrd.wire: round trips, exact byte counts, and rejection of every malformed message."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch

from fedsrd.wire import (
    Message,
    SparseTensor,
    TensorSpec,
    WireError,
    _varint_decode,
    _varint_encode,
    decode,
    encode,
    state_digest,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover - hypothesis is optional
    HAVE_HYPOTHESIS = False

VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def sparse_tensor(shape: tuple[int, ...], density: float, seed: int = 0) -> SparseTensor:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(shape, generator=gen)
    dense[torch.rand(shape, generator=gen) >= density] = 0.0
    return SparseTensor.from_dense(dense)


def message(tensors: dict, kind: str = "update", algorithm: str = "fedavg", round: int = 3, meta=None) -> Message:
    return Message(kind=kind, algorithm=algorithm, round=round, tensors=tensors, meta=meta or {})


def read_container(data: bytes) -> tuple[dict, dict]:
    """(safetensors header without __metadata__, fedsrd header) read directly from the bytes."""
    n = int.from_bytes(data[:8], "little")
    st_header = json.loads(data[8 : 8 + n])
    meta = st_header.pop("__metadata__")
    return st_header, json.loads(meta["fedsrd"])


def stored_nbytes(data: bytes, key: str) -> int:
    begin, end = read_container(data)[0][key]["data_offsets"]
    return end - begin


def rebuild(data: bytes, header_fn=None, tensors_fn=None) -> bytes:
    """Re-pack a valid message after tampering with its fedsrd header and/or stored tensors."""
    stored = safetensors.torch.load(data)
    header = read_container(data)[1]
    if header_fn is not None:
        header_fn(header)
    if tensors_fn is not None:
        tensors_fn(stored)
    return safetensors.torch.save(stored, metadata={"fedsrd": json.dumps(header)})


def assert_same_sparse(got: SparseTensor, want: SparseTensor, dtype: torch.dtype = torch.float32) -> None:
    assert isinstance(got, SparseTensor)
    assert got.shape == want.shape
    assert got.indices.dtype == torch.int64
    assert torch.equal(got.indices, want.indices)
    assert got.values.dtype == torch.float32
    assert torch.equal(got.values, want.values.to(dtype).to(torch.float32))


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_dtype", list(VALUE_DTYPES))
def test_dense_round_trip(value_dtype):
    tensors = {
        "layer.lora_A.weight": torch.randn(4, 16),
        "layer.lora_B.weight": torch.randn(16, 4),
        "scalar": torch.randn(()),
    }
    msg = message(tensors, kind="broadcast", algorithm="fedsrd", round=7, meta={"client_id": 2, "loss": 0.5})
    out = decode(encode(msg, value_dtype=value_dtype))
    assert (out.kind, out.algorithm, out.round, out.meta) == ("broadcast", "fedsrd", 7, {"client_id": 2, "loss": 0.5})
    assert set(out.tensors) == set(tensors)
    for name, tensor in tensors.items():
        got = out.tensors[name]
        assert got.dtype == torch.float32 and got.shape == tensor.shape
        assert torch.equal(got, tensor.to(VALUE_DTYPES[value_dtype]).float())


@pytest.mark.parametrize("value_dtype", list(VALUE_DTYPES))
@pytest.mark.parametrize("positions", ["bitmap", "varint", "auto"])
def test_sparse_round_trip(value_dtype, positions):
    tensors = {"a": sparse_tensor((13, 7), 0.3, seed=1), "b": sparse_tensor((1000,), 0.01, seed=2), "d": torch.randn(5)}
    out = decode(encode(message(tensors), value_dtype=value_dtype, positions=positions))
    for name in ("a", "b"):
        assert_same_sparse(out.tensors[name], tensors[name], VALUE_DTYPES[value_dtype])
    assert torch.equal(out.tensors["d"], tensors["d"].to(VALUE_DTYPES[value_dtype]).float())


def test_fp32_sparse_round_trip_is_exact_dense():
    dense = torch.randn(32, 9)
    dense[dense.abs() < 1.0] = 0.0
    out = decode(encode(message({"w": SparseTensor.from_dense(dense)})))
    assert torch.equal(out.tensors["w"].to_dense(), dense)


@pytest.mark.parametrize("positions", ["bitmap", "varint", "auto"])
@pytest.mark.parametrize("shape", [(0,), (13,), (3, 5), (4, 0)])
def test_empty_sparse_round_trip(positions, shape):
    empty = SparseTensor(shape=shape, indices=torch.zeros(0, dtype=torch.int64), values=torch.zeros(0))
    data = encode(message({"e": empty}), positions=positions)
    out = decode(data, expected={"e": TensorSpec(shape)})
    assert out.tensors["e"].nnz == 0 and out.tensors["e"].shape == shape
    assert torch.equal(out.tensors["e"].to_dense(), torch.zeros(shape))


def test_message_without_tensors_round_trips():
    out = decode(encode(message({}, round=0, meta={"digest": "ab", "nested": {"x": [1, 2]}})))
    assert out.tensors == {} and out.round == 0 and out.meta == {"digest": "ab", "nested": {"x": [1, 2]}}


def test_sparse_tensor_helpers():
    dense = torch.tensor([[0.0, 1.5, 0.0], [-2.0, 0.0, 0.0]])
    sparse = SparseTensor.from_dense(dense)
    assert sparse.nnz == 2 and sparse.shape == (2, 3)
    assert sparse.indices.tolist() == [1, 3]
    assert torch.equal(sparse.to_dense(), dense)
    assert sparse.to_dense(torch.float64).dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# byte counts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_dtype", list(VALUE_DTYPES))
def test_container_size_is_header_plus_tensor_bytes(value_dtype):
    sparse = sparse_tensor((50, 40), 0.1, seed=3)
    dense = torch.randn(8, 6)
    data = encode(message({"s": sparse, "d": dense}), value_dtype=value_dtype, positions="bitmap")
    header_len = int.from_bytes(data[:8], "little")
    itemsize = ITEMSIZE[value_dtype]
    expected_tensor_bytes = dense.numel() * itemsize + sparse.nnz * itemsize + math.ceil(2000 / 8)
    assert len(data) == 8 + header_len + expected_tensor_bytes
    assert stored_nbytes(data, "s::positions") == math.ceil(2000 / 8)
    assert stored_nbytes(data, "s::values") == itemsize * sparse.nnz
    assert stored_nbytes(data, "d") == itemsize * dense.numel()


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1001])
def test_bitmap_is_ceil_numel_over_8_and_fp32_values_4_nnz(numel):
    sparse = sparse_tensor((numel,), 0.5, seed=numel)
    data = encode(message({"w": sparse}), positions="bitmap")
    assert stored_nbytes(data, "w::positions") == math.ceil(numel / 8)
    assert stored_nbytes(data, "w::values") == 4 * sparse.nnz
    assert len(data) == 8 + int.from_bytes(data[:8], "little") + math.ceil(numel / 8) + 4 * sparse.nnz


def test_varint_size_matches_gap_lengths():
    indices = torch.tensor([0, 1, 127, 128, 300, 20_000, 3_000_000])
    sparse = SparseTensor((4_000_000,), indices, torch.ones(7))
    data = encode(message({"w": sparse}), positions="varint")
    # gaps 1, 1, 126, 1, 172, 19700, 2980000 take 1, 1, 1, 1, 2, 3, 4 bytes (7 bits per byte)
    assert stored_nbytes(data, "w::positions") == 13


def test_auto_picks_the_smaller_encoding():
    very_sparse = sparse_tensor((100_000,), 0.001, seed=4)
    fairly_dense = sparse_tensor((100_000,), 0.4, seed=5)
    data = encode(message({"vs": very_sparse, "fd": fairly_dense}), positions="auto")
    entries = read_container(data)[1]["tensors"]
    assert entries["vs"]["positions"] == "varint" and entries["fd"]["positions"] == "bitmap"
    for name, sparse in (("vs", very_sparse), ("fd", fairly_dense)):
        sizes = [
            stored_nbytes(encode(message({name: sparse}), positions=p), f"{name}::positions")
            for p in ("bitmap", "varint")
        ]
        assert stored_nbytes(data, f"{name}::positions") == min(sizes)
    auto_len = len(data)
    for forced in ("bitmap", "varint"):
        assert auto_len <= len(encode(message({"vs": very_sparse, "fd": fairly_dense}), positions=forced))


def test_varint_one_million_positions_round_trip():
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(20_000_000, 1_000_000, replace=False))
    sparse = SparseTensor((20_000_000,), torch.from_numpy(positions), torch.ones(positions.size))
    out = decode(encode(message({"w": sparse}), positions="varint"))
    assert np.array_equal(out.tensors["w"].indices.numpy(), positions)


def test_varint_primitives():
    values = np.array([0, 1, 127, 128, 255, 16383, 16384, 2**62, 2**63 - 1], dtype=np.uint64)
    stream = _varint_encode(values)
    assert stream[:4].tolist() == [0, 1, 127, 0x80]
    assert np.array_equal(_varint_decode(stream, "x"), values.astype(np.int64))
    assert _varint_decode(np.zeros(0, dtype=np.uint8), "x").size == 0


# ----------------------------------------------------------------------------------------------
# rejection
# ----------------------------------------------------------------------------------------------

SPEC = {"a": TensorSpec((13, 7)), "b": TensorSpec((1000,)), "d": TensorSpec((5,))}


def valid_message(positions: str = "bitmap") -> bytes:
    tensors = {"a": sparse_tensor((13, 7), 0.3, seed=1), "b": sparse_tensor((1000,), 0.01, seed=2), "d": torch.randn(5)}
    return encode(message(tensors), positions=positions)


def test_valid_message_passes_all_checks():
    for positions in ("bitmap", "varint"):
        out = decode(valid_message(positions), expected=SPEC, kind="update", algorithm="fedavg", max_bytes=10_000)
        assert set(out.tensors) == set(SPEC)


def set_positions(key: str, values: list[int]):
    def fn(stored):
        stored[key] = torch.tensor(values, dtype=torch.uint8)

    return fn


def set_header(path: tuple, value):
    def fn(header):
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return fn


def _pickle_payload() -> bytes:
    return pickle.dumps({"a": torch.randn(3)})


def _bitmap_extra_bit(stored):
    bits = stored["a::positions"].clone()
    bits[0] = bits[0] ^ 0xFF  # changes the popcount
    stored["a::positions"] = bits


def _bitmap_padding_bit(stored):
    bits = stored["a::positions"].clone()  # 91 entries -> 12 bytes, last 5 bits of byte 11 are padding
    bits[-1] = bits[-1] | 0x80
    stored["a::positions"] = bits


def _bitmap_extra_byte(stored):
    stored["a::positions"] = torch.cat([stored["a::positions"], torch.zeros(1, dtype=torch.uint8)])


def _bump_nnz(header):
    header["tensors"]["a"]["nnz"] += 1


def _nan_in(key):
    def fn(stored):
        t = stored[key].clone()
        t[0] = float("nan")
        stored[key] = t

    return fn


def _inf_in(key):
    def fn(stored):
        t = stored[key].clone()
        t[-1] = float("inf")
        stored[key] = t

    return fn


MALFORMED = {
    "empty bytes": lambda: b"",
    "truncated prefix": lambda: valid_message()[:5],
    "truncated header": lambda: valid_message()[:40],
    "truncated payload": lambda: valid_message()[:-3],
    "random bytes": lambda: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "pickle payload": _pickle_payload,
    "header length beyond payload": lambda: (10**6).to_bytes(8, "little") + valid_message()[8:],
    "header not json": lambda: (9).to_bytes(8, "little") + b"not json!",
    "header not utf8": lambda: (4).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc",
    "header json array": lambda: (2).to_bytes(8, "little") + b"[]",
    "no fedsrd metadata": lambda: safetensors.torch.save({"a": torch.ones(2)}),
    "fedsrd header not json": lambda: safetensors.torch.save({"a": torch.ones(2)}, metadata={"fedsrd": "{oops"}),
    "extra stored tensor": lambda: rebuild(valid_message(), tensors_fn=lambda s: s.update(x=torch.ones(1))),
    "missing stored tensor": lambda: rebuild(valid_message(), tensors_fn=lambda s: s.pop("d")),
    "wrong format": lambda: rebuild(valid_message(), set_header(("format",), "other")),
    "wrong version": lambda: rebuild(valid_message(), set_header(("version",), 2)),
    "unknown kind": lambda: rebuild(valid_message(), set_header(("kind",), "gossip")),
    "negative round": lambda: rebuild(valid_message(), set_header(("round",), -1)),
    "bool round": lambda: rebuild(valid_message(), set_header(("round",), True)),
    "float round": lambda: rebuild(valid_message(), set_header(("round",), 1.5)),
    "meta not object": lambda: rebuild(valid_message(), set_header(("meta",), [1, 2])),
    "missing header field": lambda: rebuild(valid_message(), lambda h: h.pop("algorithm")),
    "extra header field": lambda: rebuild(valid_message(), set_header(("extra",), 1)),
    "bad layout": lambda: rebuild(valid_message(), set_header(("tensors", "d", "layout"), "csr")),
    "bad position encoding": lambda: rebuild(valid_message(), set_header(("tensors", "a", "positions"), "rle")),
    "header shape differs from stored": lambda: rebuild(valid_message(), set_header(("tensors", "d", "shape"), [6])),
    "declared nnz mismatch": lambda: rebuild(valid_message(), _bump_nnz),
    "nnz beyond numel": lambda: rebuild(valid_message(), set_header(("tensors", "a", "nnz"), 10**6)),
    "NaN dense": lambda: rebuild(valid_message(), tensors_fn=_nan_in("d")),
    "Inf sparse values": lambda: rebuild(valid_message(), tensors_fn=_inf_in("a::values")),
    "integer dtype tensor": lambda: rebuild(valid_message(), tensors_fn=lambda s: s.update(d=torch.arange(5))),
    "positions not uint8": lambda: rebuild(
        valid_message(), tensors_fn=lambda s: s.update({"a::positions": s["a::positions"].float()})
    ),
    "bitmap popcount mismatch": lambda: rebuild(valid_message(), tensors_fn=_bitmap_extra_bit),
    "bitmap padding bit set": lambda: rebuild(valid_message(), tensors_fn=_bitmap_padding_bit),
    "bitmap wrong length": lambda: rebuild(valid_message(), tensors_fn=_bitmap_extra_byte),
    "varint out-of-range position": lambda: rebuild(
        encode(message({"v": SparseTensor((10,), torch.tensor([2, 5]), torch.ones(2))}), positions="varint"),
        tensors_fn=set_positions("v::positions", [3, 8]),  # gaps 3, 8 -> positions 2, 10 in a 10-entry tensor
    ),
    "varint non-increasing positions": lambda: rebuild(
        encode(message({"v": SparseTensor((10,), torch.tensor([2, 5]), torch.ones(2))}), positions="varint"),
        tensors_fn=set_positions("v::positions", [3, 0]),
    ),
    "varint trailing partial": lambda: rebuild(
        encode(message({"v": SparseTensor((1000,), torch.tensor([2, 500]), torch.ones(2))}), positions="varint"),
        tensors_fn=set_positions("v::positions", [3, 0x81]),
    ),
    "varint overflow": lambda: rebuild(
        encode(message({"v": SparseTensor((1000,), torch.tensor([2, 500]), torch.ones(2))}), positions="varint"),
        tensors_fn=set_positions("v::positions", [3] + [0xFF] * 10 + [0x01]),
    ),
    "varint count mismatch": lambda: rebuild(
        encode(message({"v": SparseTensor((10,), torch.tensor([2, 5]), torch.ones(2))}), positions="varint"),
        tensors_fn=set_positions("v::positions", [3, 1, 1]),
    ),
    "varint non-minimal": lambda: rebuild(
        encode(message({"v": SparseTensor((10,), torch.tensor([2, 5]), torch.ones(2))}), positions="varint"),
        tensors_fn=set_positions("v::positions", [3, 0x83, 0x00]),
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_raises_wire_error(case):
    data = MALFORMED[case]()
    with pytest.raises(WireError):
        decode(data)


def test_varint_position_past_the_end_is_out_of_range():
    data = rebuild(
        encode(message({"v": SparseTensor((10,), torch.tensor([2, 5]), torch.ones(2))}), positions="varint"),
        tensors_fn=set_positions("v::positions", [3, 8]),  # positions 2 and 10 in a 10-entry tensor
    )
    with pytest.raises(WireError, match="out of range"):
        decode(data)


def test_varint_repeated_position_is_not_strictly_increasing():
    data = rebuild(
        encode(message({"v": SparseTensor((10,), torch.tensor([2, 5]), torch.ones(2))}), positions="varint"),
        tensors_fn=set_positions("v::positions", [3, 0]),
    )
    with pytest.raises(WireError, match="strictly increasing"):
        decode(data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "broadcast"}, "kind"),
        ({"algorithm": "fedsrd"}, "algorithm"),
        ({"expected": {**SPEC, "extra": TensorSpec((2,))}}, "missing tensor 'extra'"),
        ({"expected": {k: v for k, v in SPEC.items() if k != "d"}}, "unknown tensor 'd'"),
        ({"expected": {**SPEC, "d": TensorSpec((6,))}}, "shape"),
        ({"expected": {**SPEC, "a": TensorSpec((13, 7), sparse_ok=False)}}, "sparse"),
        ({"max_bytes": 100}, "max_bytes"),
    ],
)
def test_receiver_expectations_are_enforced(kwargs, match):
    with pytest.raises(WireError, match=match):
        decode(valid_message(), **kwargs)


def test_require_all_false_allows_missing_names():
    expected = {**SPEC, "extra": TensorSpec((2,))}
    out = decode(valid_message(), expected=expected, require_all=False)
    assert set(out.tensors) == set(SPEC)


def test_error_messages_name_the_tensor():
    with pytest.raises(WireError, match="'d'"):
        decode(rebuild(valid_message(), tensors_fn=_nan_in("d")))
    with pytest.raises(WireError, match="'a'.*popcount"):
        decode(rebuild(valid_message(), tensors_fn=_bitmap_extra_bit))
    with pytest.raises(WireError, match="nnz"):
        decode(rebuild(valid_message(), set_header(("tensors", "b", "nnz"), 0)))


def test_non_bytes_input_raises_wire_error():
    with pytest.raises(WireError):
        decode("not bytes")  # type: ignore[arg-type]


def test_random_corruption_only_ever_raises_wire_error():
    rng = np.random.default_rng(1)
    original = bytearray(valid_message("varint"))
    for _ in range(300):
        data = bytearray(original)
        for pos in rng.integers(0, len(data), rng.integers(1, 4)):
            data[pos] = int(rng.integers(0, 256))
        try:
            decode(bytes(data), expected=SPEC)
        except WireError:
            pass


# ----------------------------------------------------------------------------------------------
# encoder input validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "kwargs"),
    [
        (message({"w": torch.tensor([1.0, float("nan")])}), {}),
        (message({"w": torch.tensor([1.0, float("inf")])}), {}),
        (message({"w": torch.tensor([1e6])}), {"value_dtype": "float16"}),  # overflows fp16
        (message({"w": torch.arange(3)}), {}),
        (message({"w": torch.ones(2)}), {"value_dtype": "float64"}),
        (message({"w": torch.ones(2)}), {"positions": "rle"}),
        (message({"w": torch.ones(2)}, kind="gossip"), {}),
        (message({"w": torch.ones(2)}, round=-1), {}),
        (message({"w": torch.ones(2)}, meta={"loss": float("nan")}), {}),
        (message({"w": torch.ones(2)}, meta={"obj": object()}), {}),
        (message({"w::values": torch.ones(2)}), {}),
        (message({"w": SparseTensor((4,), torch.tensor([1, 1]), torch.ones(2))}), {}),
        (message({"w": SparseTensor((4,), torch.tensor([1, 4]), torch.ones(2))}), {}),
        (message({"w": SparseTensor((4,), torch.tensor([-1, 2]), torch.ones(2))}), {}),
        (message({"w": np.ones(3)}), {}),
    ],
)
def test_encode_rejects_invalid_messages(msg, kwargs):
    with pytest.raises(WireError):
        encode(msg, **kwargs)


# ----------------------------------------------------------------------------------------------
# digest
# ----------------------------------------------------------------------------------------------


def test_state_digest_is_stable_and_order_independent():
    state = {"b": torch.randn(3, 4), "a": torch.randn(5, dtype=torch.bfloat16), "c": torch.randn(2, 2).t()}
    copy = {name: state[name].clone() for name in reversed(list(state))}
    digest = state_digest(state)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert state_digest(copy) == digest


def test_state_digest_is_sensitive_to_every_part():
    state = {"a": torch.randn(4, 3), "b": torch.randn(6)}
    digest = state_digest(state)
    changed = {k: v.clone() for k, v in state.items()}
    changed["a"][2, 1] = torch.nextafter(changed["a"][2, 1], torch.tensor(float("inf")))
    assert state_digest(changed) != digest
    assert state_digest({"a": state["a"].reshape(3, 4), "b": state["b"]}) != digest
    assert state_digest({"a": state["a"].double(), "b": state["b"]}) != digest
    assert state_digest({"A": state["a"], "b": state["b"]}) != digest


def test_digest_survives_fp32_wire_round_trip():
    state = {"x.lora_A.weight": torch.randn(4, 8), "x.lora_B.weight": torch.randn(8, 4)}
    out = decode(encode(message(state, meta={"digest": state_digest(state)})))
    assert state_digest(out.tensors) == out.meta["digest"]


# ----------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------

if HAVE_HYPOTHESIS:

    @st.composite
    def sparse_cases(draw):
        shape = tuple(draw(st.lists(st.integers(0, 12), min_size=1, max_size=3)))
        numel = math.prod(shape)
        positions = sorted(draw(st.sets(st.integers(0, max(numel - 1, 0)), max_size=numel)) if numel else [])
        values = draw(
            st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=len(positions), max_size=len(positions))
        )
        indices = torch.tensor(positions, dtype=torch.int64)
        return SparseTensor(shape, indices, torch.tensor(values, dtype=torch.float32))

    @settings(max_examples=200, deadline=None)
    @given(
        case=sparse_cases(),
        value_dtype=st.sampled_from(list(VALUE_DTYPES)),
        positions=st.sampled_from(["bitmap", "varint", "auto"]),
    )
    def test_property_sparse_round_trip(case, value_dtype, positions):
        data = encode(message({"w": case}), value_dtype=value_dtype, positions=positions)
        out = decode(data, expected={"w": TensorSpec(case.shape)})
        assert_same_sparse(out.tensors["w"], case, VALUE_DTYPES[value_dtype])

    @settings(max_examples=200, deadline=None)
    @given(values=st.lists(st.integers(0, 2**63 - 1), max_size=50))
    def test_property_varint_round_trip(values):
        array = np.array(values, dtype=np.uint64)
        assert _varint_decode(_varint_encode(array), "x").tolist() == values


# ----------------------------------------------------------------------------------------------
# seeded positions: a DARE mask travels as its seed
# ----------------------------------------------------------------------------------------------


def _metadata(data: bytes) -> str:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]["fedsrd"]


def _rewrite_header(data: bytes, edit) -> bytes:
    """The same container with its fedsrd header changed by `edit` (a hostile sender's message)."""
    stored = safetensors.torch.load(data)
    header = json.loads(_metadata(data))
    edit(header)
    return safetensors.torch.save(stored, metadata={"fedsrd": json.dumps(header)})


def _dare_message(drop: float = 0.8, seed: int = 3) -> tuple[Message, torch.Tensor]:
    from fedsrd.ops.sparsify import dare_drop

    dense = torch.randn(48, 32, generator=torch.Generator().manual_seed(seed))
    sparse = dare_drop(dense, drop, torch.Generator().manual_seed(seed))
    return Message(kind="broadcast", algorithm="fedsrd", round=1, tensors={"w": sparse}), sparse.to_dense()


def test_seeded_positions_round_trip_and_cost_no_position_bytes():
    msg, dense = _dare_message()
    seeded = encode(msg)
    header = json.loads(_metadata(seeded))["tensors"]["w"]
    assert header["positions"] == "seeded" and header["drop"] == 0.8 and len(header["seeds"]) == 1
    decoded = decode(seeded, expected={"w": TensorSpec((48, 32), sparse_ok=True)})
    assert torch.equal(decoded.tensors["w"].to_dense(), dense)
    assert decoded.tensors["w"].mask == msg.tensors["w"].mask  # a receiver can pass the mask on (unions)
    bitmap = encode(msg, positions="bitmap")  # the paper's accounting
    assert len(bitmap) - len(seeded) >= math.ceil(48 * 32 / 8) - 64  # the bitmap, less a few header bytes


def test_seeded_positions_cover_a_subset_with_explicit_zeros():
    msg, dense = _dare_message()
    sparse = msg.tensors["w"]
    keep = torch.ones(sparse.nnz, dtype=torch.bool)
    keep[::3] = False  # some kept entries became exact zeros and were dropped from the positions
    subset = SparseTensor(sparse.shape, sparse.indices[keep], sparse.values[keep], mask=sparse.mask)
    data = encode(Message(kind="broadcast", algorithm="fedsrd", round=1, tensors={"w": subset}))
    assert json.loads(_metadata(data))["tensors"]["w"]["positions"] == "seeded"
    assert torch.equal(decode(data).tensors["w"].to_dense(), subset.to_dense())
    # Positions outside the mask cannot be sent as its seed: the encoder falls back to explicit positions.
    outside = SparseTensor(sparse.shape, torch.tensor([0, 1, 2, 3, 4, 5]), torch.ones(6), mask=sparse.mask)
    data = encode(Message(kind="broadcast", algorithm="fedsrd", round=1, tensors={"w": outside}))
    assert json.loads(_metadata(data))["tensors"]["w"]["positions"] in ("bitmap", "varint")
    assert torch.equal(decode(data).tensors["w"].to_dense(), outside.to_dense())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["tensors"]["w"].update(nnz=h["tensors"]["w"]["nnz"] - 1), "nnz entries"),
        (lambda h: h["tensors"]["w"].update(seeds=[h["tensors"]["w"]["seeds"][0] + 1]), "declares"),
        (lambda h: h["tensors"]["w"].update(seeds=[]), "seeds must be a list"),
        (lambda h: h["tensors"]["w"].update(seeds=list(range(257))), "seeds must be a list"),
        (lambda h: h["tensors"]["w"].update(seeds=["1"]), "seeds must be ints"),
        (lambda h: h["tensors"]["w"].update(seeds=[-1]), "seeds must be ints"),
        (lambda h: h["tensors"]["w"].update(seeds=[2**64]), "seeds must be ints"),
        (lambda h: h["tensors"]["w"].update(drop=1.0), "drop must be"),
        (lambda h: h["tensors"]["w"].update(drop=True), "drop must be"),
        (lambda h: h["tensors"]["w"].update(drop="0.8"), "drop must be"),
        (lambda h: h["tensors"]["w"].pop("seeds"), "exactly the fields"),
        (lambda h: h["tensors"]["w"].update(positions="bitmap"), "exactly the fields"),
        (lambda h: h["tensors"]["w"].update(shape=[2**20, 2**20]), "more work than allowed"),
    ],
)
def test_hostile_seeded_headers_are_rejected(edit, message):
    msg, _ = _dare_message()
    with pytest.raises(WireError, match=message):
        decode(_rewrite_header(encode(msg), edit))


def test_fed_dare_broadcast_sends_the_union_of_the_clients_seeds():
    from fedsrd import FedSRDConfig, get_algorithm
    from fedsrd.ops.sparse import SeededMask

    algo = get_algorithm("fed_dare", FedSRDConfig(algorithm="fed_dare", num_clients=3))
    state = {"m.lora_A.weight": torch.zeros(4, 64), "m.lora_B.weight": torch.zeros(64, 4)}
    updates = []
    for cid in range(3):
        local = {k: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(cid)) for k, v in state.items()}
        payload = algo.client_update(state, local, 1, torch.Generator().manual_seed(100 + cid))
        updates.append(decode(encode(Message(kind="update", algorithm="fed_dare", round=1, tensors=payload))).tensors)
    broadcast = algo.server_step(state, updates, [1 / 3] * 3, 1, torch.Generator().manual_seed(0))
    for name, sparse in broadcast.items():
        seeds = tuple(s for u in updates for s in u[name].mask.seeds)
        assert sparse.mask == SeededMask(seeds, 0.9)
        expected = sum(u[name].to_dense() for u in updates) / 3
        data = encode(Message(kind="broadcast", algorithm="fed_dare", round=1, tensors={name: sparse}))
        assert json.loads(_metadata(data))["tensors"][name]["positions"] == "seeded"
        torch.testing.assert_close(decode(data).tensors[name].to_dense(), expected)


def _seeded_bomb(shape: list[int], seeds: int) -> bytes:
    """A tiny message whose header asks the receiver to regenerate `seeds` masks over `shape`: no values at all."""
    header = {"format": "fedsrd-wire", "version": 1, "kind": "update", "algorithm": "fedsrd", "round": 1, "meta": {},
              "tensors": {"w": {"layout": "sparse", "shape": shape, "nnz": 0, "positions": "seeded",
                                "seeds": list(range(1, seeds + 1)), "drop": 0.999999}}}
    return safetensors.torch.save({"w::values": torch.zeros(0)}, metadata={"fedsrd": json.dumps(header)})


def test_a_seeded_header_cannot_make_decoding_expensive():
    """The 421-byte bomb: 2**30 draws without expected shapes (53 s and 6.4 GB before), refused in milliseconds."""
    import time

    bomb = _seeded_bomb([2**15, 2**15], 1)
    assert len(bomb) < 600
    start = time.perf_counter()
    with pytest.raises(WireError, match="budget"):
        decode(bomb)
    with pytest.raises(WireError, match="budget"):
        decode(_seeded_bomb([2**12, 2**12], 2), max_seeded_draws=2**24)
    assert time.perf_counter() - start < 1.0
    # With expected shapes: the work is bounded by them and by the seeds a tensor may carry (an update: one).
    msg, _ = _dare_message()
    many = _rewrite_header(encode(msg), lambda h: h["tensors"]["w"].update(seeds=list(range(1, 257))))
    expected = {"w": TensorSpec((48, 32))}
    with pytest.raises(WireError, match="1 to 1 ints"):
        decode(many, expected=expected, max_mask_seeds=1)
    with pytest.raises(WireError, match="budget"):
        decode(many, expected=expected, max_mask_seeds=256, max_seeded_draws=48 * 32 * 8)
    assert decode(encode(msg), expected=expected, max_mask_seeds=1).tensors["w"].nnz > 0  # honest: one seed
    with pytest.raises(WireError, match="not accepted"):  # full-state messages: no seeded positions at all
        decode(encode(msg), max_mask_seeds=0)


def test_metadata_size_is_bounded_before_parsing():
    import time

    msg, _ = _dare_message()
    padded = Message(kind="update", algorithm="fedsrd", round=1, tensors=msg.tensors, meta={"pad": [[]] * 600_000})
    data = encode(padded)  # 2.4 MB of empty lists in the header
    start = time.perf_counter()
    with pytest.raises(WireError, match="rejected before parsing"):
        decode(data, expected={"w": TensorSpec((48, 32))})
    assert time.perf_counter() - start < 0.5
    with pytest.raises(WireError, match="rejected before parsing"):
        decode(data, max_header_bytes=1_000_000)
    assert decode(encode(msg), expected={"w": TensorSpec((48, 32))}).tensors["w"].nnz > 0


@pytest.mark.parametrize("error", [MemoryError, RuntimeError])
def test_running_out_of_memory_while_decoding_is_a_wire_error(error, monkeypatch):
    from fedsrd.ops.sparse import SeededMask

    def out_of_memory(self, shape):
        raise error("DefaultCPUAllocator: can't allocate memory")

    msg, _ = _dare_message()
    data = encode(msg)
    monkeypatch.setattr(SeededMask, "keep", out_of_memory)
    with pytest.raises(WireError, match="memory"):
        decode(data)
