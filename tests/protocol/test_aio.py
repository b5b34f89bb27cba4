"""protocol.aio.Channel over real sockets: a balloon negotiation, an inflate and its ack;
a peer that vanishes mid-frame gives PeerClosed / bad_frame, never a hang."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from protocol import messages as m
from protocol import pfn as P
from protocol.aio import Channel, PeerClosed
from protocol.balloon import BalloonDevice, BalloonDriver, Completed
from protocol.connection import ControlServer, State
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.features import Feature
from protocol.framing import encode_frame

pytestmark = pytest.mark.timeout(30)

FEATURES = Feature.MUST_TELL_HOST.mask | Feature.RANGES.mask | Feature.STATS_VQ.mask


async def _channel(sock: socket.socket, conn) -> Channel:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    return Channel(conn, reader, writer)


async def _exchange(dev_sock: socket.socket, drv_sock: socket.socket) -> None:
    dev = await _channel(dev_sock, BalloonDevice(vm="web", guest_pages=256))
    drv = await _channel(drv_sock, BalloonDriver(vm="web", features=FEATURES))

    async def device_side() -> list[str]:
        seen = []
        hello = await dev.recv()  # the welcome goes out on its own (flush in recv)
        seen.append(hello.TYPE)
        dev.conn.set_target(64)
        await dev.drain()
        for _ in range(2):
            batch = await dev.recv()
            seen.append(batch.TYPE)
            dev.conn.complete(batch.id)
            await dev.drain()
        actual = await dev.recv()
        seen.append(actual.TYPE)
        assert actual.actual == 64 == dev.conn.balloon_pages
        with pytest.raises(PeerClosed):
            await dev.recv()
        await dev.close()
        return seen

    async def driver_side() -> None:
        writer = drv.writer
        writer.write(drv.conn.hello())
        welcome = await drv.recv()
        assert welcome.TYPE == "welcome" and welcome.features == FEATURES
        config = await drv.recv()
        assert config.num_pages == 64
        await drv.send(m.Inflate(id=drv.conn.new_id(), pfns=P.pfns_to_wire(range(32))))
        await drv.send(m.Inflate(id=drv.conn.new_id(), runs=P.runs_to_wire([(100, 32)])))
        for _ in range(2):
            done = await drv.recv()
            assert isinstance(done, Completed) and done.ok
        assert drv.conn.balloon_pages == 64
        await drv.send(m.Actual(actual=drv.conn.balloon_pages))
        await drv.close()

    seen, _ = await asyncio.gather(device_side(), driver_side())
    assert seen == ["hello", "inflate", "inflate", "actual"]
    assert P.runs_of_set(dev.conn.ballooned).tolist() == [[0, 32], [100, 32]]


def test_balloon_exchange_over_socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    asyncio.run(_exchange(a, b))


def test_balloon_exchange_over_unix_socket(tmp_path):
    path = tmp_path / "web.balloon.sock"

    async def main() -> None:
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()

        async def on_conn(reader, writer):
            accepted.set_result(writer.get_extra_info("socket").dup())
            writer.close()

        srv = await asyncio.start_unix_server(on_conn, path=str(path))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, str(path))
        server_sock = await accepted
        srv.close()
        await srv.wait_closed()
        await _exchange(socket.socket(fileno=server_sock.detach()), client)

    asyncio.run(main())


def test_peer_vanishing_mid_frame_is_bad_frame_not_a_hang():
    async def main() -> None:
        a, b = socket.socketpair()
        ch = await _channel(a, ControlServer())
        frame = encode_frame(m.Call(id=1, method="host_info").to_wire())
        b.sendall(frame[: len(frame) // 2])
        b.close()
        with pytest.raises(RemoteProtocolError) as ei:
            await asyncio.wait_for(ch.recv(), 30)
        assert ei.value.code is ErrorCode.BAD_FRAME
        assert ch.conn.state is State.ERROR
        assert ch.writer.is_closing()

    asyncio.run(main())


def test_peer_closing_between_frames_is_peer_closed():
    async def main() -> None:
        a, b = socket.socketpair()
        ch = await _channel(a, ControlServer())
        b.sendall(encode_frame(m.Call(id=1, method="host_info").to_wire()))
        b.close()
        assert (await asyncio.wait_for(ch.recv(), 30)).method == "host_info"
        with pytest.raises(PeerClosed):
            await asyncio.wait_for(ch.recv(), 30)

    asyncio.run(main())


def test_peer_garbage_sends_error_frame_then_closes():
    async def main() -> None:
        a, b = socket.socketpair()
        ch = await _channel(a, ControlServer())
        b.sendall(struct.pack(">I", 1 << 30))  # oversize announcement
        with pytest.raises(RemoteProtocolError) as ei:
            await asyncio.wait_for(ch.recv(), 30)
        assert ei.value.code is ErrorCode.FRAME_TOO_LARGE
        b.settimeout(5)
        data = b""
        while chunk := b.recv(65536):  # the error frame, then EOF: we closed
            data += chunk
        assert b"frame_too_large" in data
        b.close()

    asyncio.run(main())
