"""The aggregation dealer: a crypto provider that lets the hub remove the nodes' masks from the sum.

With ``aggregation.masking = 'dealer'`` (PriMIA's design, where a crypto
provider took part in every secure aggregation) each node masks its update
with one stream PRG(s_i) whose seed it shares with the dealer through X25519,
and the dealer sends the hub Σ_{i in U} PRG(s_i) for the included nodes U, once
per round (:class:`fl.secagg.DealerSecAgg`).  The dealer never receives an
update, masked or not, and no image; the hub never learns a single node's mask.
The price is a third party that must not collude with the hub; in return a node
expands one mask instead of one per partner, and a node lost after uploading
costs nothing.

``run_dealer(...)`` (what ``primia dealer`` calls) listens on ``host:port`` and
serves one hub at a time (a new connection replaces the old one, as for nodes).
:class:`DealerSession` is the protocol, free of I/O: messages in, replies and
work for the worker thread out.  Hub -> dealer: ``dealer_keys`` (a fresh key
for a round), ``dealer_roster`` (the nodes' keys: start expanding), ``unmask``
(U and D: send the mask sum), ``bye``.  Dealer -> hub: ``dealer_key``,
``mask_sum``, ``error``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mpc.errors import FrameError, PeerFailure, PrimiaError, ProtocolError
from mpc.net.channel import Channel
from mpc.net.tls import server_context

from .messages import PROTOCOL_VERSION, Kind, Message, check
from .secagg import DealerSecAgg
from .transport import DEALER_ID, limits_for, listen_for_hub, membership, port_file_writer, recv, send

__all__ = ["DealerSession", "DealerServer", "run_dealer"]

log = logging.getLogger("primia.dealer")

#: bytes of a mask-sum message besides the array (header, padding), with room to spare
_HEADROOM = 4096


@dataclass(frozen=True)
class Reply:
    message: Message


@dataclass(frozen=True)
class Compute:
    """Run ``call`` on the worker thread (in order); send ``then(result)``'s messages."""

    call: Callable[[], Any]
    then: Callable[[Any], list[Message]]


@dataclass(frozen=True)
class Close:
    reason: str


Action = Reply | Compute | Close


class DealerSession:
    """One hub connection's dealer protocol (see the module docstring).

    Every round starts with ``dealer_keys`` and a fresh :class:`DealerSecAgg`;
    a new round abandons an unfinished one (its keys are dropped, nothing was
    revealed).  A bad message raises :class:`mpc.errors.ProtocolError`.
    """

    def __init__(self, peer: str = "hub", *, max_message_bytes: int = 1 << 30):
        self.peer = peer
        self.max_message_bytes = max_message_bytes
        self.round: DealerSecAgg | None = None

    def receive(self, msg: Message) -> list[Action]:
        if msg.kind == Kind.BYE:
            return [Close("the hub said goodbye")]
        if msg.kind == Kind.ERROR:
            reason = msg.header.get("reason")
            return [Close(f"the hub reported: {reason if isinstance(reason, str) else 'an error'}")]
        handler = {
            Kind.DEALER_KEYS: self._on_keys,
            Kind.DEALER_ROSTER: self._on_roster,
            Kind.UNMASK: self._on_unmask,
        }.get(msg.kind)
        if handler is None:
            raise ProtocolError(self.peer, f"sent {msg.kind!r}, which a dealer does not handle")
        return handler(msg)

    def _on_keys(self, msg: Message) -> list[Action]:
        check(msg, self.peer, Kind.DEALER_KEYS,
              {"protocol": int, "round": int, "context": bytes, "size": int, "ring_bits": int})
        h = msg.header
        if h["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError(self.peer, f"speaks protocol {h['protocol']}, this dealer {PROTOCOL_VERSION}; "
                                           "run the same primia version on the hub and the dealer")
        if h["ring_bits"] in (32, 64) and h["size"] * h["ring_bits"] // 8 > self.max_message_bytes - _HEADROOM:
            need = (h["size"] * h["ring_bits"] // 8 + _HEADROOM) / 2**20
            raise ProtocolError(self.peer, f"asks for mask sums of {h['size']:,} values, {need:,.0f} MiB per message, "
                                           f"above this dealer's limit; restart it with --max-message-mib {need:.0f} "
                                           "or more (as the hub's federation.max_message_mib)")
        self.round = DealerSecAgg(h["round"], h["context"], h["size"], h["ring_bits"])
        return [Reply(Message(Kind.DEALER_KEY, {"round": h["round"], "key": self.round.public_key()}))]

    def _current(self, msg: Message) -> DealerSecAgg:
        if self.round is None or msg.header["round"] != self.round.round:
            raise ProtocolError(self.peer, f"sent {msg.kind} for round {msg.header['round']}, which has no keys here")
        return self.round

    def _on_roster(self, msg: Message) -> list[Action]:
        check(msg, self.peer, Kind.DEALER_ROSTER, {"round": int, "keys": dict})
        state = self._current(msg)
        state.set_roster(msg.header["keys"])
        return [Compute(state.expand, lambda _: [])]

    def _on_unmask(self, msg: Message) -> list[Action]:
        check(msg, self.peer, Kind.UNMASK, {"round": int, "included": list, "dropped": list})
        state = self._current(msg)
        h = msg.header
        if not all(isinstance(n, str) for n in [*h["included"], *h["dropped"]]):
            raise ProtocolError(self.peer, "unmask: node names must be strings")
        included, dropped, number = list(h["included"]), list(h["dropped"]), state.round
        self.round = None  # one answer per round
        log.info("round %d: mask sum over %d nodes (%d dropped)", number, len(included), len(dropped))

        def answer(total: Any) -> list[Message]:
            return [Message(Kind.MASK_SUM, {"round": number}, {"sum": total})]

        return [Compute(lambda: state.mask_sum(included, dropped), answer)]


class DealerServer:
    """Serves the dealer protocol to whichever authenticated hub connects."""

    def __init__(self, *, token: str, max_message_mib: int = 1024, once: bool = False,
                 tls: ssl.SSLContext | None = None):
        self.membership = membership(DEALER_ID, token, what="dealer token")
        self.limits = limits_for(max_message_mib)
        self.once = once
        self.tls = tls
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="primia-dealer")
        self.stopped = asyncio.Event()
        self._current: Channel | None = None

    async def serve(self, host: str, port: int, on_ready: Callable[[int], None] = lambda port: None) -> None:
        server, bound = await listen_for_hub(self._handle, host, port, who="the dealer", membership=self.membership,
                                             limits=self.limits, tls=self.tls)
        log.info("dealer on %s://%s:%d", "wss" if self.tls else "ws", host, bound)
        on_ready(bound)
        try:
            await self.stopped.wait()
        finally:
            server.close()
            await server.wait_closed()
            self.worker.shutdown(wait=False, cancel_futures=True)

    async def _handle(self, channel: Channel) -> None:
        previous, self._current = self._current, channel
        if previous is not None:
            log.info("a new hub connection replaces the previous one")
            await previous.abort("replaced by a new hub connection")
        session = DealerSession(peer=channel.peer_label, max_message_bytes=self.limits.max_message_bytes)
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    msg, _ = await recv(channel)
                    actions = session.receive(msg)
                except (PeerFailure, FrameError) as exc:
                    log.info("hub connection ended: %s", getattr(exc, "reason", exc))
                    return
                except PrimiaError as exc:
                    await _refuse(channel, exc)
                    return
                for action in actions:
                    if isinstance(action, Reply):
                        await send(channel, action.message)
                    elif isinstance(action, Compute):
                        try:
                            result = await loop.run_in_executor(self.worker, action.call)
                        except PrimiaError as exc:
                            await _refuse(channel, exc)
                            return
                        for message in action.then(result):
                            await send(channel, message)
                    else:
                        log.info("closing the hub connection: %s", action.reason)
                        await channel.close(action.reason)
                        return
        except PeerFailure as exc:
            log.info("hub connection ended: %s", getattr(exc, "reason", exc))
        finally:
            if self._current is channel:
                self._current = None
                if self.once:
                    self.stopped.set()


async def _refuse(channel: Channel, exc: PrimiaError) -> None:
    """A bad request: tell the hub why (its run fails with the reason) and drop the connection."""
    log.warning("%s", exc)
    try:
        await send(channel, Message(Kind.ERROR, {"reason": str(exc)[:2000]}))
    except PeerFailure:
        pass
    await channel.abort("protocol error")


def run_dealer(*, token: str, host: str = "127.0.0.1", port: int = 8790, port_file: str | Path | None = None,
               max_message_mib: int = 1024, once: bool = False, tls_cert: str | None = None,
               tls_key: str | None = None) -> None:
    """Serve as a federation's aggregation dealer until stopped (blocking).

    Raises:
        ConfigError: the token is too short, the TLS files cannot be loaded, or the port cannot be used.
    """
    tls = server_context(tls_cert, tls_key) if tls_cert or tls_key else None
    server = DealerServer(token=token, max_message_mib=max_message_mib, once=once, tls=tls)
    asyncio.run(server.serve(host, port, port_file_writer(port_file)))
