"""The messages between hub and nodes, and the checks every received message goes through.

A :class:`Message` is a kind, a header (a msgpack map of plain values) and
named numpy arrays (sent as raw bytes).  Nothing is ever unpickled.

Hub -> node: ``hello``, ``configure``, ``train``, ``evaluate``, ``bye``.
Node -> hub: ``hello_ack``, ``configured``, ``update`` (the node's upload:
plain, or masked), ``evaluation``.  Either way: ``error``.  The aggregation
mode adds its own kinds (``sa_*`` between hub and nodes, ``dealer_*``,
``unmask`` and ``mask_sum`` with the dealer), declared in its module
(:mod:`fl.pairwise`, :mod:`fl.dealer_masking`).

:func:`check` validates a message against the schema for its kind: every
header field present with the right type, no unknown fields, every array
present with the expected dtype and shape.  Anything else is a
:class:`mpc.errors.ProtocolError` naming the peer and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from mpc.errors import ProtocolError

__all__ = ["PROTOCOL_VERSION", "Kind", "Message", "check", "check_map", "Any_", "TRAIN_FIGURES", "DATA_SUMMARY"]

# 2: aggregation.neighbours (sparse mask graphs); reveals name dropped partners only
# 3: aggregation.masking = 'dealer' (rosters may carry the dealer's key; the dealer's messages)
# 4: nodes dial the hub; signed round keys, Shamir-shared seeds and a consistency round (sa_* kinds)
PROTOCOL_VERSION = 4


class Kind:
    """Message kinds (wire names)."""

    HELLO = "hello"
    HELLO_ACK = "hello_ack"
    CONFIGURE = "configure"
    CONFIGURED = "configured"
    TRAIN = "train"
    UPDATE = "update"
    EVALUATE = "evaluate"
    EVALUATION = "evaluation"
    BYE = "bye"
    ERROR = "error"


@dataclass
class Message:
    kind: str
    header: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Array payload bytes (the bulk of any message)."""
        return sum(a.nbytes for a in self.arrays.values())


class Any_:
    """Schema marker: any plain value (checked further by the receiver)."""


#: what a node reports about its local training (in ``update`` and ``masked_update``)
TRAIN_FIGURES = {"loss": float, "accuracy": float, "samples": int, "steps": int}
#: what a node reports about its data folder (in ``hello_ack``)
DATA_SUMMARY = {"classes": list, "counts": list, "channels": list, "min_size": list, "max_size": list}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", bytes: "bytes", list: "a list", dict: "a map"}


def _type_ok(value: Any, expected: Any) -> bool:
    if expected is Any_:
        return True
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, expected)


def check(
    msg: Message,
    peer: str,
    kind: str,
    header: Mapping[str, Any],
    arrays: Mapping[str, tuple[np.dtype | type, tuple[int, ...] | None]] | None = None,
) -> None:
    """Validate ``msg`` against a schema.

    Args:
        header: field name -> expected Python type (int, float, str, bool, bytes, list, dict or Any_).
        arrays: array name -> (dtype, shape); shape None accepts any shape.

    Raises:
        ProtocolError: wrong kind, a missing/unknown/mistyped field, or a bad array.
    """
    if msg.kind != kind:
        raise ProtocolError(peer, f"expected a {kind!r} message, got {msg.kind!r}")
    check_map(msg.header, peer, kind, header)
    expected = arrays or {}
    for name in msg.arrays:
        if name not in expected:
            raise ProtocolError(peer, f"{kind}: unexpected array {name!r}")
    for name, (dtype, shape) in expected.items():
        arr = msg.arrays.get(name)
        if arr is None:
            raise ProtocolError(peer, f"{kind}: missing array {name!r}")
        if arr.dtype != np.dtype(dtype):
            raise ProtocolError(peer, f"{kind}: array {name!r} must be {np.dtype(dtype)}, got {arr.dtype}")
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ProtocolError(peer, f"{kind}: array {name!r} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def check_map(values: Any, peer: str, where: str, schema: Mapping[str, Any]) -> None:
    """Check a map has exactly the schema's keys, each of the expected type."""
    if not isinstance(values, Mapping):
        raise ProtocolError(peer, f"{where}: expected a map, got {type(values).__name__}")
    for key in values:
        if key not in schema:
            raise ProtocolError(peer, f"{where}: unexpected field {key!r}")
    for key, expected in schema.items():
        if key not in values:
            raise ProtocolError(peer, f"{where}: missing field {key!r}")
        if not _type_ok(values[key], expected):
            wanted = _TYPE_NAMES.get(expected, getattr(expected, "__name__", str(expected)))
            raise ProtocolError(peer, f"{where}: field {key!r} must be {wanted}, got {type(values[key]).__name__}")
