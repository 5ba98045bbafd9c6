"""Plain aggregation (``aggregation.secure = false``): each node's update reaches the hub in the clear.

The hub sums w_i u_i in float64 as updates arrive; nothing else is exchanged.
Use it only where the hub may see every hospital's update.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from mpc.errors import ProtocolError

from .aggregation import WeightedSum
from .errors import RoundFailed
from .messages import Message
from .strategy import Aggregator, Masker, RoundStart, RoundSum, SendTo

__all__ = ["PlainAggregator", "PlainMasker"]


class PlainAggregator(Aggregator):
    label = "plain"

    def __init__(self) -> None:
        self._start: RoundStart | None = None
        self._sum = WeightedSum()
        self._waiting: set[str] = set()
        self._uploaded: list[str] = []
        self._dropped: list[str] = []

    def open_round(self, start: RoundStart) -> list[SendTo]:
        self._start = start
        self._sum = WeightedSum()
        self._waiting = set(start.nodes)
        self._uploaded, self._dropped = [], []
        return []

    def receive(self, peer: str, msg: Message) -> list[SendTo]:
        raise ProtocolError(peer, f"sent {msg.kind!r}, which plain aggregation does not use")

    def add_update(self, node: str, update: np.ndarray) -> list[SendTo]:
        start = self._start
        assert start is not None
        if node not in self._waiting:
            raise ProtocolError(node, "sent an update it does not owe")
        if update.dtype != np.float32 or update.shape != (start.size,):
            raise ProtocolError(node, f"update must be float32 of shape ({start.size},), got {update.dtype} "
                                      f"{update.shape}")
        if not np.isfinite(update).all():
            raise ProtocolError(node, "update contains NaN or infinity (did training diverge? lower training.lr)")
        self._sum.add(update, start.weight(node))
        self._waiting.discard(node)
        self._uploaded.append(node)
        return []

    def lost(self, peer: str, reason: str) -> list[SendTo]:
        if peer in self._waiting:
            self._waiting.discard(peer)
            self._dropped.append(peer)
        return []

    def waiting_for(self) -> set[str]:
        return set(self._waiting)

    @property
    def stage(self) -> str:
        return "train"

    @property
    def training(self) -> bool:
        return True

    def complete(self) -> bool:
        return self._start is not None and not self._waiting

    def result(self) -> RoundSum:
        start = self._start
        assert start is not None
        if not self._uploaded:
            raise RoundFailed(start.number, "train", "no node delivered an update")
        assert self._sum.total is not None
        return RoundSum(self._sum.total, self._sum.weight, sorted(self._uploaded), sorted(self._dropped),
                        {n: start.weight(n) for n in start.nodes})


class PlainMasker(Masker):
    """Uploads the update as it is (the hub applies the weight)."""

    def start_round(self, number: int) -> None:
        pass

    def receive(self, msg: Message) -> tuple[list[Message], Callable[[], Any] | None]:
        raise ProtocolError("hub", f"sent {msg.kind!r}, which plain aggregation does not use")

    def ready(self) -> bool:
        return True

    def mask(self, update: np.ndarray, fields: Mapping[str, Any]) -> np.ndarray:
        return np.ascontiguousarray(update, dtype=np.float32).reshape(-1)
