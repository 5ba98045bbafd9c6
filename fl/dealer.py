"""The aggregation dealer: a crypto provider that lets the hub remove the nodes' masks from the sum.

With ``aggregation.masking = 'dealer'`` (PriMIA's design, where a crypto
provider took part in every secure aggregation) each node masks its update
with one stream PRG(s_i) whose seed it shares with the dealer through X25519,
and the dealer sends the hub Σ_{i in U} PRG(s_i) for the survivors U, once per
round (:class:`fl.dealer_masking.DealerRound`).  The dealer never receives an
update, masked or not, and no image; the hub never learns a single node's mask.

``run_dealer(...)`` (what ``primia dealer`` calls) dials the hub, like a node,
and reconnects after a fault.  It signs its key for each round with its
long-term key (which the nodes pin), and accepts a round's roster only of the
federation's nodes (the ``.pub`` files it was given), each key signed by its
owner; it answers one mask sum per round, only for a survivor set that enough
of its members signed.

:class:`DealerSession` is the protocol, free of I/O: messages in, replies and
work for the worker thread out.  Hub -> dealer: ``dealer_keys`` (a fresh key
for a round), ``dealer_roster`` (the nodes' signed keys: start expanding),
``unmask`` (U, D and the survivors' signatures: send the mask sum), ``bye``.
Dealer -> hub: ``dealer_key``, ``mask_sum``, ``error``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
from dataclasses import dataclass
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mpc.errors import FrameError, PeerFailure, PrimiaError, ProtocolError
from mpc.net.channel import Channel

from .dealer_masking import DealerRound, Kind
from .identity import Directory, sign_statement
from .messages import PROTOCOL_VERSION, Message, check
from .messages import Kind as Common
from .transport import Backoff, limits_for, recv, run_token, send, stay_connected

__all__ = ["DealerSession", "DealerClient", "run_dealer"]

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

    Every round starts with ``dealer_keys`` and a fresh :class:`DealerRound`; a
    new round abandons an unfinished one (its key is dropped, nothing was
    revealed).  ``answered`` is shared by every session of one dealer: a round
    of a run is answered once, whichever connection asks.  A bad message raises
    :class:`mpc.errors.ProtocolError`.
    """

    def __init__(self, *, run_token: str | None, key: Ed25519PrivateKey, directory: Directory, peer: str = "hub",
                 max_message_bytes: int = 1 << 30, answered: dict[tuple[str, int], list[str]] | None = None):
        self.run_token = run_token
        self.run_id: str | None = None
        self.key = key
        self.directory = directory
        self.peer = peer
        self.max_message_bytes = max_message_bytes
        self.answered = answered if answered is not None else {}
        self.round: DealerRound | None = None

    def receive(self, msg: Message) -> list[Action]:
        if msg.kind == Common.BYE:
            return [Close("the hub said goodbye")]
        if msg.kind == Common.ERROR:
            reason = msg.header.get("reason")
            return [Close(f"the hub reported: {reason[:2000] if isinstance(reason, str) else 'an error'}")]
        handler = {
            Kind.DEALER_KEYS: self._on_keys,
            Kind.DEALER_ROSTER: self._on_roster,
            Kind.UNMASK: self._on_unmask,
        }.get(msg.kind)
        if handler is None:
            raise ProtocolError(self.peer, f"sent {msg.kind!r}, which a dealer does not handle")
        return handler(msg)

    def _on_keys(self, msg: Message) -> list[Action]:
        check(msg, self.peer, Kind.DEALER_KEYS, {"protocol": int, "run_id": str, "round": int, "context": bytes,
                                                 "size": int, "ring_bits": int, "min_nodes": int})
        h = msg.header
        if h["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError(self.peer, f"speaks protocol {h['protocol']}, this dealer {PROTOCOL_VERSION}; "
                                           "run the same primia version on the hub and the dealer")
        if self.run_id is None and self.run_token is not None and run_token(h["run_id"]) != self.run_token:
            raise ProtocolError(self.peer, f"names run {h['run_id']!r:.80}, but its handshake was for another run")
        if self.run_id is not None and h["run_id"] != self.run_id:
            raise ProtocolError(self.peer, f"names run {h['run_id']!r:.80} after run {self.run_id!r:.80}")
        self.run_id = h["run_id"]
        if (self.run_id, h["round"]) in self.answered:
            raise ProtocolError(self.peer, f"asks again for round {h['round']} of run {self.run_id}, which this "
                                           "dealer has answered already: a second sum could expose an update")
        if h["ring_bits"] in (32, 64) and h["size"] * h["ring_bits"] // 8 > self.max_message_bytes - _HEADROOM:
            need = (h["size"] * h["ring_bits"] // 8 + _HEADROOM) / 2**20
            raise ProtocolError(self.peer, f"asks for mask sums of {h['size']:,} values, {need:,.0f} MiB per message, "
                                           f"above this dealer's limit; restart it with --max-message-mib {need:.0f} "
                                           "or more (as the hub's federation.max_message_mib)")
        self.round = state = DealerRound(self.run_id, h["round"], h["context"], h["size"], h["ring_bits"],
                                         h["min_nodes"], self.directory)
        signature = sign_statement(self.key, *state.statement())
        return [Reply(Message(Kind.DEALER_KEY, {"round": h["round"], "key": state.public_key(),
                                                "signature": signature}))]

    def _current(self, msg: Message) -> DealerRound:
        if self.round is None or msg.header["round"] != self.round.round:
            raise ProtocolError(self.peer, f"sent {msg.kind} for round {msg.header['round']}, which has no key here")
        return self.round

    def _on_roster(self, msg: Message) -> list[Action]:
        check(msg, self.peer, Kind.DEALER_ROSTER, {"round": int, "keys": dict})
        state = self._current(msg)
        state.set_roster(msg.header["keys"])
        return [Compute(state.expand, lambda _: [])]

    def _on_unmask(self, msg: Message) -> list[Action]:
        check(msg, self.peer, Kind.UNMASK, {"round": int, "included": list, "dropped": list, "signatures": dict})
        state = self._current(msg)
        h = msg.header
        if not all(isinstance(n, str) for n in [*h["included"], *h["dropped"]]):
            raise ProtocolError(self.peer, "unmask: node names must be strings")
        included, dropped, signatures, number = list(h["included"]), list(h["dropped"]), h["signatures"], state.round
        state.check_unmask(included, dropped, signatures)  # refused here, before anything is computed
        self.round = None  # one answer per round
        assert self.run_id is not None
        self.answered[(self.run_id, number)] = sorted(included)
        log.info("round %d: mask sum over %d nodes (%d dropped), %d signatures", number, len(included), len(dropped),
                 len(signatures))

        def answer(total: Any) -> list[Message]:
            return [Message(Kind.MASK_SUM, {"round": number}, {"sum": total})]

        return [Compute(lambda: state.mask_sum(included, dropped, signatures), answer)]


class DealerClient:
    """Dials the hub and serves the dealer protocol, reconnecting until the run ends (``once``) or forever."""

    def __init__(self, *, identity: Any, directory: Directory, hub: str, tls: ssl.SSLContext | None = None,
                 max_message_mib: int = 1024, once: bool = False, reconnect_max_s: float = 30.0):
        self.identity = identity
        self.directory = directory
        self.hub = hub
        self.tls = tls
        self.limits = limits_for(max_message_mib)
        self.once = once
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="primia-dealer")
        self.answered: dict[tuple[str, int], list[str]] = {}
        self.backoff = Backoff(cap=reconnect_max_s)

    async def run(self) -> str:
        log.info("dealer for %d node(s) (%s); connecting to the hub at %s", len(self.directory.names()),
                 ", ".join(self.directory.names()), self.hub)
        try:
            return await stay_connected(self.hub, self.identity, self._serve, tls=self.tls, limits=self.limits,
                                        backoff=self.backoff, once=self.once)
        finally:
            self.worker.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, channel: Channel) -> str | None:
        session = DealerSession(run_token=channel.context, key=self.identity.private_key, directory=self.directory,
                                peer=channel.peer_label, max_message_bytes=self.limits.max_message_bytes,
                                answered=self.answered)
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    msg, _ = await recv(channel)
                    actions = session.receive(msg)
                except (PeerFailure, FrameError) as exc:
                    log.warning("the hub connection ended: %s", getattr(exc, "reason", exc))
                    return None
                except PrimiaError as exc:
                    await _refuse(channel, exc)
                    return None
                except Exception as exc:  # noqa: BLE001 - a malformed value no check anticipated: the hub's fault
                    await _refuse(channel, ProtocolError(session.peer, f"malformed {getattr(msg, 'kind', '?')!r} "
                                                                       f"({type(exc).__name__}: {exc})"))
                    return None
                for action in actions:
                    if isinstance(action, Reply):
                        await send(channel, action.message)
                    elif isinstance(action, Compute):
                        try:
                            result = await loop.run_in_executor(self.worker, action.call)
                        except PrimiaError as exc:
                            await _refuse(channel, exc)
                            return None
                        for message in action.then(result):
                            await send(channel, message)
                    else:
                        log.info("closing the hub connection: %s", action.reason)
                        await channel.close(action.reason[:100])
                        return action.reason
        except PeerFailure as exc:
            log.warning("the hub connection ended: %s", getattr(exc, "reason", exc))
            return None


async def _refuse(channel: Channel, exc: PrimiaError) -> None:
    """A bad request: tell the hub why (its round fails with the reason) and drop the connection."""
    log.warning("%s", exc)
    try:
        await send(channel, Message(Common.ERROR, {"reason": str(exc)[:2000]}))
    except PeerFailure:
        pass
    await channel.abort("protocol error")


def run_dealer(*, hub: str, identity: Any, directory: Directory, tls: ssl.SSLContext | None = None,
               max_message_mib: int = 1024, once: bool = False, reconnect_max_s: float = 30.0) -> str:
    """Serve as a federation's aggregation dealer until stopped, or until the run ends with ``once`` (blocking)."""
    client = DealerClient(identity=identity, directory=directory, hub=hub, tls=tls, max_message_mib=max_message_mib,
                          once=once, reconnect_max_s=reconnect_max_s)
    return asyncio.run(client.run())
