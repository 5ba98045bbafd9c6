"""The wire format: round trips, zero-copy, alignment, and rejection of every malformed input."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpc.errors import FrameError
from mpc.net.wire import (
    MAGIC,
    WIRE_DTYPES,
    WIRE_VERSION,
    Limits,
    StreamDecoder,
    decode_message,
    encode_message,
    message_nbytes,
)

SMALL = Limits(chunk_bytes=64, max_frame_bytes=1 << 20, max_header_bytes=4096)


def _join(chunks) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def _stream(chunks, limits=Limits(), peer="peer"):
    dec = StreamDecoder(limits=limits, peer=peer)
    for c in chunks:
        dec.feed(c)
    return dec.finish()


def _raw_message(meta: dict, body: bytes = b"", *, magic=MAGIC, version=WIRE_VERSION, flags=0) -> bytes:
    packed = msgpack.packb(meta, use_bin_type=True)
    head = struct.pack("<4sBBHI", magic, version, flags, 0, len(packed)) + packed
    head += bytes(-len(head) % 8)
    return head + body


def _meta(arrays=(), **over):
    meta = {"kind": "t", "sender": 1, "session": "s", "header": {}, "arrays": [list(a) for a in arrays]}
    meta.update(over)
    return meta


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 5), (7, 3, 2)])
def test_round_trip_every_dtype_and_shape(dtype, shape, rng):
    arr = (rng.normal(size=shape) * 100).astype(dtype)
    chunks = encode_message("k", {"step": 3, "name": "w"}, {"a": arr, "b": arr.T.copy()}, sender=2, session="s1",
                            chunk_bytes=64)
    for msg in (decode_message(_join(chunks)), _stream(chunks)):
        assert msg.kind == "k" and msg.sender == 2 and msg.session == "s1"
        assert msg.nbytes == message_nbytes(chunks)
        assert msg.header == {"step": 3, "name": "w"}
        assert list(msg.arrays) == ["a", "b"]
        for got, want in zip(msg.arrays.values(), (arr, arr.T)):
            assert got.dtype == arr.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_large_array_is_sent_as_memoryview_slices_without_copying():
    arr = np.arange(10_000, dtype=np.int64)
    chunks = encode_message("k", None, {"x": arr}, chunk_bytes=4096)
    assert len(chunks) == 1 + 20  # header, then 80,000 bytes in 4 KiB slices
    for c in chunks[1:]:
        assert isinstance(c, memoryview) and c.nbytes <= 4096
        assert np.shares_memory(np.frombuffer(c, dtype=np.uint8), arr)
    assert message_nbytes(chunks) == len(_join(chunks))


def test_small_message_is_one_frame():
    chunks = encode_message("k", None, {"x": np.arange(3)})
    assert len(chunks) == 1 and isinstance(chunks[0], bytes)


def test_decode_is_zero_copy_and_aligned():
    data = bytearray(_join(encode_message("k", None, {"a": np.arange(5, dtype=np.uint8), "b": np.arange(4.0)})))
    msg = decode_message(data)
    for arr in msg.arrays.values():
        assert np.shares_memory(arr, np.frombuffer(data, np.uint8))
        assert arr.ctypes.data % 8 == np.frombuffer(data, np.uint8).ctypes.data % 8
    data[-8:] = np.float64(42.0).tobytes()
    assert msg.arrays["b"][-1] == 42.0  # a view of the received bytes, not a copy


def test_stream_decoder_accepts_any_fragmentation(rng):
    arrays = {"w": rng.normal(size=(17, 9)), "i": np.arange(33, dtype=np.int32)}
    whole = _join(encode_message("k", {"a": [1, 2]}, arrays, session="z"))
    for _ in range(20):
        cuts = np.sort(rng.integers(0, len(whole), size=rng.integers(1, 12)))
        pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
        msg = _stream(pieces)
        for name, arr in arrays.items():
            np.testing.assert_array_equal(msg.arrays[name], arr)


def test_big_endian_and_non_contiguous_arrays_are_sent_correctly():
    big = np.arange(12, dtype=">i4").reshape(3, 4)
    strided = np.arange(40.0).reshape(5, 8)[:, ::3]
    msg = decode_message(_join(encode_message("k", None, {"b": big, "s": strided})))
    np.testing.assert_array_equal(msg.arrays["b"], big)
    np.testing.assert_array_equal(msg.arrays["s"], strided)
    assert msg.arrays["b"].dtype == np.dtype("int32")


@pytest.mark.parametrize("bad", [np.array(["a"]), np.array([object()]), np.zeros(2, dtype="datetime64[s]"),
                                 np.zeros(2, dtype=[("a", "i4")])])
def test_sender_refuses_dtypes_off_the_allow_list(bad):
    with pytest.raises(TypeError, match="cannot be sent"):
        encode_message("k", None, {"x": bad})


def test_sender_refuses_bad_kind_and_names():
    with pytest.raises(ValueError, match="kind"):
        encode_message("", None, {})
    with pytest.raises(ValueError, match="names"):
        encode_message("k", None, {1: np.zeros(1)})


# -- rejection ---------------------------------------------------------------------------
def _reject(data: bytes, match: str, limits=Limits()):
    with pytest.raises(FrameError, match=match) as info:
        decode_message(data, limits=limits, peer="party 7")
    assert "party 7" in str(info.value) and info.value.peer == "party 7"
    pieces = [data[i : i + 5] for i in range(0, len(data), 5)] or [b""]
    with pytest.raises(FrameError, match=match):
        _stream(pieces, limits, "party 7")


def test_rejects_wrong_magic():
    _reject(_raw_message(_meta(), magic=b"HTTP"), "not a primia message")


def test_rejects_other_versions_with_advice():
    _reject(_raw_message(_meta(), version=WIRE_VERSION + 1), f"wire version {WIRE_VERSION + 1} is not supported")


def test_rejects_reserved_bits():
    _reject(_raw_message(_meta(), flags=1), "reserved")


def test_rejects_truncated_and_oversized_bodies():
    good = _raw_message(_meta([["x", "int64", [4]]]), bytes(32))
    assert decode_message(good).arrays["x"].shape == (4,)
    _reject(good[:-8], "truncated")
    _reject(good + bytes(8), "oversized")
    _reject(good[:10], "truncated")


def test_rejects_header_over_the_limit():
    meta = _meta(header={"pad": "x" * 5000})
    _reject(_raw_message(meta), "exceeds the limit", limits=SMALL)


def test_rejects_declared_sizes_over_the_message_limit_before_allocating():
    meta = _meta([["x", "float64", [1 << 40, 1 << 20]]])
    _reject(_raw_message(meta), "max_message_bytes")


@pytest.mark.parametrize(
    "arrays, match",
    [
        ([["x", "object", [1]]], "not on the allow-list"),
        ([["x", "<i8", [1]]], "not on the allow-list"),
        ([["x", 7, [1]]], "not on the allow-list"),
        ([["x", "int64", [-1]]], "invalid shape"),
        ([["x", "int64", [True]]], "invalid shape"),
        ([["x", "int64", [1] * 33]], "invalid shape"),
        ([["x", "int64", "3"]], "invalid shape"),
        ([["x", "int8", [1]], ["x", "int8", [1]]], "unique"),
        ([["x", "int8"]], "not \\[name, dtype, shape\\]"),
    ],
)
def test_rejects_bad_array_tables(arrays, match):
    _reject(_raw_message(_meta(arrays), bytes(64)), match)


@pytest.mark.parametrize(
    "meta, match",
    [
        ([1, 2, 3], "header must be a map"),
        ({"kind": "k"}, "header must be a map"),
        (_meta(extra=1), "header must be a map"),
        (_meta(kind=""), "kind"),
        (_meta(kind=5), "kind"),
        (_meta(sender=None), "sender"),
        (_meta(sender=True), "sender"),
        (_meta(session=b"s"), "session"),
        (_meta(header=[1]), "user header"),
        ({**_meta(), "arrays": {}}, "array table"),
    ],
)
def test_rejects_malformed_headers(meta, match):
    _reject(_raw_message(meta), match)


def test_rejects_msgpack_extension_types_in_the_header():
    meta = _meta(header={"x": msgpack.ExtType(1, b"pickle?")})
    _reject(_raw_message(meta), "undecodable header")


def test_too_many_arrays():
    arrays = [[f"a{i}", "int8", [0]] for i in range(5)]
    _reject(_raw_message(_meta(arrays)), "at most 4 entries", limits=Limits(max_arrays=4))


def test_limits_validate_themselves():
    with pytest.raises(ValueError, match="chunk_bytes"):
        Limits(chunk_bytes=8 << 20, max_frame_bytes=4 << 20)
    with pytest.raises(ValueError, match="positive"):
        Limits(max_message_bytes=0)


# -- garbage -----------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_garbage_bytes_raise_frame_error_only(data):
    for attempt in (data, MAGIC + data, _raw_message(_meta())[:12] + data):
        try:
            decode_message(attempt, peer="p")
        except FrameError:
            pass
        try:
            _stream([attempt[:7], attempt[7:]], peer="p")
        except FrameError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_messages_decode_or_raise_frame_error(data):
    arrays = {"x": np.arange(6, dtype=np.int64).reshape(2, 3), "y": np.ones(3, np.float32)}
    whole = bytearray(_join(encode_message("kind", {"h": [1, "a"]}, arrays, sender="n", session="s")))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(whole) - 1))
        whole[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(whole)))
    candidates = [bytes(whole), bytes(whole[:cut]), bytes(whole) + data.draw(st.binary(max_size=16))]
    for candidate in candidates:
        for decode in (lambda b: decode_message(b, peer="p"), lambda b: _stream([b[:cut], b[cut:]], peer="p")):
            try:
                msg = decode(candidate)
            except FrameError as exc:
                assert exc.peer == "p"
            else:
                assert all(isinstance(a, np.ndarray) for a in msg.arrays.values())
