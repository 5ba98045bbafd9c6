"""A hub that sends what no hub should: the node and the dealer name the protocol error and drop the
connection at once (then dial again), never a dead task or a hang."""

from __future__ import annotations

import asyncio
import time

import pytest

from fl.transport import hub_identity
from mpc.net.channel import serve

from .fl_helpers import DealerProcess, NodeProcesses, digits_folders, private_key, public_key
from .test_wire_hostile import _meta, _raw


def _impossible_array(session: str) -> bytes:
    """A message whose array table declares shape [0, 2**62]."""
    meta = _meta([["x", "float32", [0, 2**62]]], kind="hello", sender="hub", session=session,
                 header={"protocol": 4, "run_id": "r", "node": "alpha"})
    return _raw(meta)


async def _hostile_hub(names: list[str], connections: int) -> list[str]:
    """A hub with the real keys that greets everyone who connects with the impossible array; returns how each
    connection ended."""
    identity = hub_identity(private_key("hub"), {n: public_key(n) for n in names})
    ended: list[str] = []
    done = asyncio.Event()

    async def handler(channel):
        await channel.ws.send(_impossible_array(identity.session))
        try:
            await asyncio.wait_for(channel.ws.wait_closed(), 30)
            ended.append(f"closed {channel.ws.close_code}")
        except TimeoutError:
            ended.append("still open")
        if len(ended) >= connections:
            done.set()

    server = await serve(handler, "127.0.0.1", 0, membership=identity, context="run-hostile")
    port = server.sockets[0].getsockname()[1]
    return server, port, ended, done


@pytest.mark.timeout(180)
@pytest.mark.parametrize("who", ["node", "dealer"])
def test_a_hostile_hub_is_named_and_dropped_at_once(tmp_path, who):
    data = digits_folders(tmp_path / "data", ("alpha",), limit=60) if who == "node" else None

    async def main():
        server, port, ended, done = await _hostile_hub(["alpha", "dealer"], connections=2)
        uri = f"ws://127.0.0.1:{port}"
        loop = asyncio.get_running_loop()
        if who == "node":
            party = NodeProcesses(tmp_path, data, ("alpha",))
            await loop.run_in_executor(None, lambda: party.start(uri, ("alpha",), once=False,
                                                                 extra=["--reconnect-max-s", "0.5"]))
            log = lambda: party.output("alpha")  # noqa: E731
        else:
            party = DealerProcess(tmp_path, uri, once=False)
            log = party.output
        started = time.monotonic()
        try:
            await asyncio.wait_for(done.wait(), 120)  # two connections: it dialed again after the first
        finally:
            party.stop()
            server.close()
            await server.wait_closed()
        return ended, log(), time.monotonic() - started

    ended, said, seconds = asyncio.run(main())
    assert all(e in ("closed 1007", "closed 1009") for e in ended[:2]), ended  # closed by the party, named
    assert "the hub connection ended" in said and "dimension" in said and "Traceback" not in said
    assert seconds < 60  # it dialed again at once (backoff 0.5 s), not after a reply timeout
