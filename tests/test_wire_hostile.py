"""A hostile peer's array tables: every dimension bounded, and nothing but FrameError out of the decoder.

The decoder is fuzzed over *structured* mutations of the header (the array
table, the user header, the prefix fields), not only over random bytes; and a
real MPC party process is fed a zero-size array with a huge dimension by an
authenticated peer: it must fail at once, naming that peer, not hang.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect

from mpc.errors import FrameError
from mpc.net.auth import Membership, client_handshake
from mpc.net.wire import MAGIC, WIRE_DTYPES, WIRE_VERSION, Limits, StreamDecoder, decode_message

from .test_net import _free_ports, _write_config

ROOT = Path(__file__).resolve().parents[1]


def _raw(meta: object, body: bytes = b"", *, version: int = WIRE_VERSION, flags: int = 0, reserved: int = 0) -> bytes:
    packed = msgpack.packb(meta, use_bin_type=True)
    head = struct.pack("<4sBBHI", MAGIC, version, flags, reserved, len(packed)) + packed
    return head + bytes(-len(head) % 8) + body


def _meta(arrays: list, **over: object) -> dict:
    meta = {"kind": "mpc", "sender": 1, "session": "s", "header": {}, "arrays": arrays}
    meta.update(over)
    return meta


def _decode_both(data: bytes, limits: Limits = Limits()):
    """Decode whole and as two fragments; both must agree on success or raise FrameError."""
    results = []
    for decode in (lambda: decode_message(data, limits=limits, peer="p"), lambda: _stream(data, limits)):
        try:
            results.append(decode())
        except FrameError as exc:
            assert exc.peer == "p"
            results.append(None)
    return results


def _stream(data: bytes, limits: Limits):
    dec = StreamDecoder(limits=limits, peer="p")
    cut = min(len(data), 20)
    dec.feed(data[:cut])
    dec.feed(data[cut:])
    return dec.finish()


@pytest.mark.parametrize("shape", [[0, 2**62], [2**62, 0], [0, 2**40, 2**40], [0] + [2**31] * 31, [2**63 - 1, 0]])
def test_zero_size_array_with_huge_dimensions_is_a_frame_error(shape):
    data = _raw(_meta([["x", "int64", shape]]))
    with pytest.raises(FrameError, match="dimensions exceed the limit"):
        decode_message(data, peer="p")
    with pytest.raises(FrameError, match="dimensions exceed the limit"):
        _stream(data, Limits())


def test_zero_size_arrays_within_the_limit_still_decode():
    limits = Limits()
    msg = decode_message(_raw(_meta([["x", "int64", [0, 1000]], ["y", "uint8", [3, 0, 7]]])), limits=limits)
    assert msg.arrays["x"].shape == (0, 1000) and msg.arrays["y"].shape == (3, 0, 7)
    # the bound is the message limit over the item size, dimension by dimension
    edge = limits.max_message_bytes // 8
    assert decode_message(_raw(_meta([["x", "int64", [0, edge]]]))).arrays["x"].shape == (0, edge)
    with pytest.raises(FrameError):
        decode_message(_raw(_meta([["x", "int64", [0, edge + 1]]])))


# -- structured fuzzing ----------------------------------------------------------------------
_ints = st.one_of(
    st.integers(0, 8),
    st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]),
    st.integers(-(2**63), -1),
)
_scalar = st.one_of(_ints, st.booleans(), st.none(), st.floats(allow_nan=True), st.text(max_size=5),
                    st.binary(max_size=5))
_dim = st.one_of(_ints, _ints, _ints, st.booleans(), st.floats(), st.none(), st.text(max_size=3),
                 st.lists(_ints, max_size=2))
_shape = st.one_of(st.lists(_dim, max_size=6), st.lists(st.integers(0, 2**64 - 1), max_size=40), _scalar)
_dtype = st.one_of(st.sampled_from(sorted(WIRE_DTYPES)), st.sampled_from(["object", "V8", "<i8", "", "S3"]),
                   _scalar)
_name = st.one_of(st.text(max_size=6), st.sampled_from(["x", "x", "y"]), _scalar)
_entry = st.one_of(st.tuples(_name, _dtype, _shape).map(list), st.lists(_scalar, max_size=4), _scalar)
_user_header = st.one_of(st.dictionaries(st.text(max_size=4), _scalar, max_size=3),
                         st.dictionaries(_ints, _scalar, max_size=2), _scalar)


_small_dim = st.integers(0, 4)


@st.composite
def _table(draw):
    """A table of mostly valid entries, one part of which may be hostile."""
    entries = []
    for i in range(draw(st.integers(0, 4))):
        name = f"a{i}"
        dtype = draw(st.sampled_from(sorted(WIRE_DTYPES)))
        shape = draw(st.lists(_small_dim, max_size=4))
        spoil = draw(st.integers(0, 5))
        if spoil == 0:
            shape = draw(_shape)
        elif spoil == 1 and isinstance(shape, list) and shape:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(_dim)
        elif spoil == 2:
            shape = [0] + draw(st.lists(_ints, min_size=1, max_size=3))
        elif spoil == 3:
            dtype = draw(_dtype)
        elif spoil == 4:
            name = draw(_name)
        entries.append([name, dtype, shape])
    if draw(st.integers(0, 7)) == 0:
        entries.append(draw(_entry))
    return entries


def _body_bytes(entries) -> int | None:
    total = 0
    for entry in entries:
        try:
            if not all(type(d) is int for d in entry[2]):
                return None
            count = int(np.prod(entry[2], dtype=object)) if entry[2] else 1
            nbytes = count * WIRE_DTYPES[entry[1]].itemsize
        except Exception:  # noqa: BLE001 - a hostile entry: no size to match
            return None
        if not 0 <= nbytes <= 1 << 12:
            return None
        total += nbytes + (-nbytes % 8)
    return total


@st.composite
def _hostile_message(draw):
    arrays = draw(_table()) if draw(st.integers(0, 9)) else draw(_scalar)
    meta = _meta(arrays)
    if draw(st.integers(0, 3)) == 0:
        meta["header"] = draw(_user_header)
    if draw(st.integers(0, 3)) == 0:
        for key in draw(st.lists(st.sampled_from(["kind", "sender", "session"]), max_size=2, unique=True)):
            meta[key] = draw(_scalar)
    if draw(st.integers(0, 9)) == 0:
        meta.pop(draw(st.sampled_from(sorted(meta))))
    if draw(st.integers(0, 19)) == 0:
        meta = draw(st.one_of(_scalar, st.lists(_scalar, max_size=3)))
    size = _body_bytes(arrays) if isinstance(arrays, list) else None
    if size is not None and draw(st.integers(0, 3)):
        body = bytes(draw(st.binary(min_size=size, max_size=size)))  # the declared size: decoding reaches the arrays
    else:
        body = draw(st.binary(max_size=64))
    prefix = draw(st.sampled_from([{}] * 12 + [{"version": 2}, {"flags": 1}, {"reserved": 3}]))
    return _raw(meta, body, **prefix)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_hostile_message(), st.sampled_from([Limits(), Limits(max_message_bytes=4096, max_arrays=3)]))
def test_structured_header_mutations_raise_only_frame_error(data, limits):
    whole, streamed = _decode_both(data, limits)
    assert (whole is None) == (streamed is None)
    if whole is not None:
        for name, arr in whole.arrays.items():
            assert isinstance(arr, np.ndarray) and arr.nbytes <= limits.max_message_bytes
            np.testing.assert_array_equal(arr, streamed.arrays[name])


# -- a real party process and a hostile, authenticated peer -------------------------------------
SECRET_HEX = os.urandom(32).hex()


async def _hostile_peers(port: int, secret: bytes, session: str) -> tuple[int | None, int | None]:
    """Join party 0's mesh as party 1 and as the dealer; the 'dealer' sends a [0, 2**62] array."""
    sockets = []
    for pid in (1, 2):
        for _ in range(200):  # the party process is still starting
            try:
                ws = await ws_connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
                break
            except OSError:
                await asyncio.sleep(0.1)
        await client_handshake(ws, Membership(pid, secret, session), 0, timeout_s=10)
        sockets.append(ws)
    await sockets[1].send(_raw(_meta([["x", "uint8", [0, 2**62]]], sender=2, session=session)))
    codes = []
    for ws in sockets:
        try:
            await asyncio.wait_for(ws.wait_closed(), 60)
        except asyncio.TimeoutError:
            codes.append(None)
        else:
            codes.append(ws.close_code)
    return codes[0], codes[1]


def test_a_party_process_fed_a_huge_zero_size_array_fails_naming_the_peer(tmp_path):
    (tmp_path / "federation.key").write_text(SECRET_HEX)
    os.chmod(tmp_path / "federation.key", 0o600)
    port0, port1, port2 = _free_ports(3)
    config = _write_config(tmp_path / "parties.toml", [port0, port1, port2])
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "party", "--config", str(config), "--id", "0",
         "--program", "tests.net_programs:cli_program", "--args", "[1.0]"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        party1_code, dealer_code = asyncio.run(_hostile_peers(port0, SECRET_HEX.encode(), "cli-test"))
        _, err = proc.communicate(timeout=60)  # no hang: the party gives up at once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "protocol error with peer dealer" in err and "dimensions exceed the limit" in err, err[-3000:]
    assert dealer_code in (1007, 1009)  # the hostile peer's connection is closed as malformed
    assert party1_code is not None  # and the others are told, not left waiting
