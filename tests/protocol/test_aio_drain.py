"""A reply sent with a write timeout must not cost its sender a trip through the event loop.

The guest kernel answers the balloon driver between vCPU quanta: it yields to its loop once
per round of quanta, which takes a second or more while the guest swaps. Each trip through
the loop a reply needs is one more round the driver waits, so a sender whose transport can
take the bytes at once goes on without yielding (bounded waits are for a full buffer).
"""

from __future__ import annotations

import asyncio
import socket

from protocol import messages as m
from protocol.aio import Channel
from protocol.connection import KernelServer


async def _loop_turns_during_sends(n: int) -> tuple[int, int]:
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    peer_reader, peer_writer = await asyncio.open_connection(sock=b)
    ch = Channel(KernelServer(), reader, writer)
    turns = 0
    stop = False

    def tick() -> None:
        nonlocal turns
        turns += 1
        if not stop:
            asyncio.get_running_loop().call_soon(tick)

    asyncio.get_running_loop().call_soon(tick)
    for i in range(n):
        await ch.send(m.Ack(id=i, ok=True), timeout=10.0)
    stop = True
    during = turns
    got = b""
    while got.count(b"\xa3ack") < n:
        chunk = await asyncio.wait_for(peer_reader.read(1 << 16), 60)
        assert chunk, "peer closed before every reply arrived"
        got += chunk
    await ch.close()
    peer_writer.close()
    return during, got.count(b"\xa3ack")


def test_send_with_timeout_on_a_free_transport_does_not_yield() -> None:
    during, received = asyncio.run(_loop_turns_during_sends(20))
    assert received == 20
    # tick() was scheduled before the sends: it runs only if a send yields to the loop.
    assert during == 0, f"20 sends took {during} trips through the event loop"
