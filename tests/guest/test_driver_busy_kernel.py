"""The balloon driver against a guest kernel whose loop is too busy to keep up.

The real driver process (``python -m guest.balloon_driver``) runs against the host's real
balloon backend (:class:`hypervisor.balloon.BalloonBackend`) and a kernel end that speaks the
kernel channel over a real socket. That kernel answers its requests one at a time in arrival
order, like the guest kernel's driver loop, and holds ``meminfo`` replies until the test lets
them go: a guest kernel busy swapping answers one request every second or so while the host
asks for stats five times a second.

A driver that sent one ``meminfo`` per ``stats_request`` queued them without bound in the
kernel channel, and the ``balloon_free`` of a deflate waited behind all of them: the host had
acknowledged the deflate, but the guest never got the memory back.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hypervisor.balloon import BalloonBackend
from protocol import messages as m
from protocol import pfn as P
from protocol.aio import Channel, PeerClosed
from protocol.connection import KernelServer
from protocol.features import DEVICE_FEATURES

GUEST_PAGES = 4096
BALLOON_RUN = (1024, 64)  # the pages the kernel gives the balloon
STATS_REQUESTS = 40
HANG = 120.0  # bounds a hang only; every wait below is on a condition


class BusyKernel:
    """Kernel end of ``<vm>.kernel.sock``: serves requests in order; ``meminfo`` waits for
    :attr:`gate`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.received: list[str] = []  # request types in arrival order
        self.meminfo_unanswered = 0
        self.max_meminfo_unanswered = 0
        self.balloon = np.zeros(GUEST_PAGES, dtype=np.uint8)
        self.queue: asyncio.Queue[m.Message] = asyncio.Queue()
        self.changed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ch = Channel(KernelServer(), reader, writer)
        answering = asyncio.create_task(self._answer(ch))
        try:
            while True:
                msg = await ch.recv()
                self.received.append(msg.TYPE)
                if isinstance(msg, m.Meminfo):
                    self.meminfo_unanswered += 1
                    self.max_meminfo_unanswered = max(self.max_meminfo_unanswered,
                                                      self.meminfo_unanswered)
                self.changed.set()
                await self.queue.put(msg)
        except PeerClosed:
            pass
        finally:
            answering.cancel()
            await ch.close()

    async def _answer(self, ch: Channel) -> None:
        while True:
            msg = await self.queue.get()
            reply: Any
            if isinstance(msg, m.Meminfo):
                await self.gate.wait()
                self.meminfo_unanswered -= 1
                reply = m.Stats(id=msg.id, stats={0: 0})
            elif isinstance(msg, m.BalloonList):
                reply = m.Pages(id=msg.id, runs=P.runs_to_wire(P.runs_of_set(self.balloon)))
            elif isinstance(msg, m.BalloonAlloc):
                first, count = BALLOON_RUN
                self.balloon[first:first + count] = 1
                reply = m.Pages(id=msg.id, runs=P.runs_to_wire([BALLOON_RUN]))
            elif isinstance(msg, m.BalloonFree):
                P.set_runs(self.balloon, P.as_runs(msg.runs), 0)
                reply = m.Ack(id=msg.id, ok=True)
            else:
                continue
            await ch.send(reply)
            self.changed.set()

    @property
    def balloon_pages(self) -> int:
        return int(np.count_nonzero(self.balloon))


async def _until(cond: Any, what: str, *events: asyncio.Event) -> None:
    """Wait for ``cond()``; ``HANG`` seconds only bound a hang."""
    async def poll() -> None:
        while not cond():
            for ev in events:
                ev.clear()
            if cond():
                return
            waits = [asyncio.create_task(ev.wait()) for ev in events]
            waits.append(asyncio.create_task(asyncio.sleep(0.05)))
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
    try:
        await asyncio.wait_for(poll(), HANG)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _deflate_behind_busy_kernel(tmp: Path) -> tuple[BusyKernel, BalloonBackend]:
    kernel = BusyKernel()
    backend = BalloonBackend(
        "a", GUEST_PAGES, supported=DEVICE_FEATURES,
        ballooned=np.zeros(GUEST_PAGES, dtype=np.uint8), stats_interval=0,  # polled by hand
        release=lambda runs: _released(), emit=lambda *a, **k: None)
    ksrv = await asyncio.start_unix_server(kernel.serve, path=str(tmp / "a.kernel.sock"))
    bsrv = await asyncio.start_unix_server(backend.serve, path=str(tmp / "a.balloon.sock"))
    driver = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "guest.balloon_driver", "--vm", "a",
        "--balloon-sock", str(tmp / "a.balloon.sock"), "--kernel-sock", str(tmp / "a.kernel.sock"),
        "--features", "must_tell_host,stats,ranges", "--wire", "ranges")
    try:
        await _until(lambda: backend.connected, "the driver to connect")
        backend.set_target(BALLOON_RUN[1])
        await _until(lambda: backend.actual == BALLOON_RUN[1], "the inflate", kernel.changed)
        # The kernel gets busy: meminfo waits. The host keeps polling stats meanwhile.
        for _ in range(STATS_REQUESTS):
            assert backend.device is not None and backend.channel is not None
            assert backend.device.request_stats()
            backend.channel.flush()
        backend.set_target(0)
        await _until(lambda: backend.balloon_pages == 0, "the host to take the deflate",
                     kernel.changed)
        await _until(lambda: "balloon_free" in kernel.received, "balloon_free to reach the kernel",
                     kernel.changed)
        # The kernel catches up.
        kernel.gate.set()
        await _until(lambda: kernel.balloon_pages == 0 and backend.actual == 0
                     and backend.metrics.stats_received >= 1,
                     "the guest to get its memory back", kernel.changed)
        return kernel, backend
    finally:
        if driver.returncode is None:
            driver.terminate()
        await driver.wait()
        ksrv.close()
        bsrv.close()


async def _released() -> tuple[int, int]:
    return 0, 1


def test_balloon_free_does_not_queue_behind_stats_on_a_busy_kernel() -> None:
    with tempfile.TemporaryDirectory(prefix="bl-busy-") as d:
        kernel, backend = asyncio.run(_deflate_behind_busy_kernel(Path(d)))
    ahead = kernel.received[:kernel.received.index("balloon_free")].count("meminfo")
    # One stats reply may be in the works when the deflate starts; the other requests of
    # the host are answered by it, not queued in the kernel ahead of the deflate.
    assert ahead <= 1, f"{ahead} meminfo requests were queued ahead of balloon_free"
    assert kernel.max_meminfo_unanswered <= 1, kernel.max_meminfo_unanswered
    assert backend.metrics.deflated == BALLOON_RUN[1]
    assert backend.metrics.stats_received >= 1
