"""A readable transcript of the balloon protocol over a real socket pair (the fallback demo).

``run_transcript(out)`` runs a balloon device (hypervisor end) and a balloon driver (guest
end) as two asyncio tasks on the two ends of a real ``socket.socketpair()``, each driven by
its sans-IO state machine through :class:`protocol.aio.Channel`, and prints every message
as it is *received*: direction, type and the key fields. The script covers negotiation, a
target change, inflate batches (pfns and runs), a stats exchange, a deflate, and a
driver restart that forgets to reconcile and has its batch rejected (``already_ballooned``).
Units: pages of 4096 bytes. No hypervisor memory is touched: the device's backend here
simply acknowledges (the real backend releases frames before it calls ``complete``).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any, TextIO

import numpy as np

from protocol import messages as m
from protocol import pfn as P
from protocol.aio import Channel, PeerClosed
from protocol.balloon import BalloonDevice, BalloonDriver, BatchRejected, Completed
from protocol.features import Feature, StatTag

VM = "demo"
GUEST_PAGES = 1024  # 4 MiB of guest RAM
FEATURES = (Feature.MUST_TELL_HOST.mask | Feature.STATS_VQ.mask | Feature.RANGES.mask
            | Feature.DEFLATE_ON_OOM.mask)


def _pageset(msg: Any) -> str:
    if getattr(msg, "pfns", None) is not None:
        pfns = msg.pfn_array.tolist()
        shown = ",".join(map(str, pfns[:6])) + (",…" if len(pfns) > 6 else "")
        return f"pfns=[{shown}] ({len(pfns)} pages)"
    runs = [(int(f), int(c)) for f, c in msg.run_array.tolist()]
    shown = ",".join(f"{f}+{c}" for f, c in runs[:4]) + (",…" if len(runs) > 4 else "")
    return f"runs=[{shown}] ({sum(c for _, c in runs)} pages in {len(runs)} runs)"


def describe(msg: Any) -> str:
    """Type and key fields of one message (or a state machine event), on one line."""
    if isinstance(msg, BatchRejected):
        return f"{describe(msg.request)}  ->  REJECTED code={msg.code} ({msg.message})"
    if isinstance(msg, Completed):
        return describe(msg.ack)
    t = msg.TYPE
    if t == "hello":
        return (f"hello version={msg.version} vm={msg.vm!r} page_size={msg.page_size} "
                f"features={Feature.to_names(msg.features)}")
    if t == "welcome":
        return (f"welcome features={Feature.to_names(msg.features)} num_pages={msg.num_pages} "
                f"actual={msg.actual} guest_pages={msg.guest_pages}")
    if t in ("inflate", "deflate", "report"):
        return f"{t} id={msg.id} {_pageset(msg)}"
    if t == "ack":
        extra = "" if msg.ok else f" code={msg.code} message={msg.message!r}"
        return f"ack id={msg.id} ok={str(msg.ok).lower()}{extra}"
    if t == "config":
        return f"config num_pages={msg.num_pages} (balloon target)"
    if t == "stats":
        named = ", ".join(f"{_tag(k)}={v}" for k, v in sorted(msg.stats.items()))
        return f"stats id={msg.id} {{{named}}}"
    if t == "actual":
        return f"actual actual={msg.actual}" + (" stall" if msg.stall else "")
    if t == "bye":
        return f"bye reason={msg.reason!r}"
    if t == "error":
        return f"error code={msg.code} message={msg.message!r}"
    return t


def _tag(k: int) -> str:
    try:
        return StatTag(k).name
    except ValueError:
        return str(k)


class _Log:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.n = 0

    def step(self, title: str) -> None:
        print(f"\n== {title}", file=self.out)

    def line(self, direction: str, what: Any) -> None:
        self.n += 1
        print(f"{self.n:3d}  {direction:16}  {describe(what)}", file=self.out)


async def _pair(dev_conn: BalloonDevice, drv_conn: BalloonDriver) -> tuple[Channel, Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ra, wa = await asyncio.open_unix_connection(sock=a)
    rb, wb = await asyncio.open_unix_connection(sock=b)
    return Channel(dev_conn, ra, wa), Channel(drv_conn, rb, wb)


async def _device_loop(dev: Channel, log: _Log,
                       script: asyncio.Queue[tuple[str, Any] | None]) -> None:
    """The hypervisor end: answer batches (the backend acks them) and run host actions."""
    conn = dev.conn
    assert isinstance(conn, BalloonDevice)
    async def host_actions() -> None:
        while True:
            action = await script.get()
            if action is None:
                return
            kind, arg = action
            if kind == "target":
                conn.set_target(arg)
            elif kind == "stats":
                conn.request_stats()
            await dev.drain()

    actions = asyncio.create_task(host_actions())
    try:
        while True:
            try:
                ev = await dev.recv()
            except PeerClosed:
                return
            log.line("driver -> device", ev)
            if isinstance(ev, (m.Inflate, m.Deflate, m.Report)):
                conn.complete(ev.id)  # the real backend releases frames first
            await dev.drain()
            if isinstance(ev, m.Bye):
                return
    finally:
        await script.put(None)
        await actions
        await dev.close()


async def _driver_recv(drv: Channel, log: _Log) -> Any:
    ev = await drv.recv()
    log.line("device -> driver", ev)
    return ev


async def _transcript(out: TextIO) -> int:
    log = _Log(out)
    ballooned = np.zeros(GUEST_PAGES, dtype=np.uint8)  # the host's view survives a restart
    dev_conn = BalloonDevice(vm=VM, guest_pages=GUEST_PAGES, ballooned=ballooned)
    drv_conn = BalloonDriver(vm=VM, features=FEATURES)
    dev, drv = await _pair(dev_conn, drv_conn)
    script: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()
    device = asyncio.create_task(_device_loop(dev, log, script))

    log.step("1. negotiation")
    drv.writer.write(drv_conn.hello())
    await _driver_recv(drv, log)  # welcome

    log.step("2. the host sets a balloon target of 96 pages")
    await script.put(("target", 96))
    await _driver_recv(drv, log)  # config

    log.step("3. the driver inflates towards the target: pfns (virtio style), then runs")
    await drv.send(m.Inflate(id=drv.conn.new_id(), pfns=P.pfns_to_wire(list(range(0, 64, 2)))))
    await _driver_recv(drv, log)
    await drv.send(m.Inflate(id=drv.conn.new_id(),
                             runs=P.runs_to_wire([(128, 32), (512, 32)])))
    await _driver_recv(drv, log)

    log.step("4. the driver reports its balloon size; stats exchange")
    await drv.send(m.Actual(actual=drv_conn.balloon_pages))
    await script.put(("stats", None))
    await _driver_recv(drv, log)  # stats_request
    stats = {StatTag.MEMTOT: GUEST_PAGES * 4096, StatTag.MEMFREE: 600 * 4096,
             StatTag.AVAIL: 700 * 4096, StatTag.SWAP_IN: 0, StatTag.OOM_KILL: 0,
             StatTag.BALLOON_PAGES: drv_conn.balloon_pages}
    await drv.send(m.Stats(id=drv.conn.new_id(), stats={int(k): v for k, v in stats.items()}))
    await _driver_recv(drv, log)

    log.step("5. the host lowers the target to 64: the driver deflates 32 pages")
    await script.put(("target", 64))
    await _driver_recv(drv, log)
    await drv.send(m.Deflate(id=drv.conn.new_id(), runs=P.runs_to_wire([(512, 32)])))
    await _driver_recv(drv, log)  # MUST_TELL_HOST: pages reused only after this ack
    await drv.send(m.Actual(actual=drv_conn.balloon_pages))
    await drv.close("driver restart")
    await device

    log.step("6. driver restart without reconciling: a bad batch is rejected")
    dev_conn2 = BalloonDevice(vm=VM, guest_pages=GUEST_PAGES, ballooned=ballooned,
                              target=64)
    drv_conn = BalloonDriver(vm=VM, features=FEATURES)
    dev, drv = await _pair(dev_conn2, drv_conn)
    script = asyncio.Queue()
    device = asyncio.create_task(_device_loop(dev, log, script))
    drv.writer.write(drv_conn.hello())
    await _driver_recv(drv, log)  # welcome: actual=64
    # The restarted driver ignores welcome.actual / balloon_runs (it should reconcile with
    # the kernel's balloon list) and reuses pages that are still in the balloon.
    await drv.send(m.Inflate(id=drv.conn.new_id(), pfns=P.pfns_to_wire([0, 1, 2, 3])))
    rejected = await _driver_recv(drv, log)
    assert isinstance(rejected, Completed) and not rejected.ok
    await drv.close("done")
    await device
    print(f"\nballooned pages on the host: {P.count_set(ballooned)} "
          f"(runs {P.runs_of_set(ballooned).tolist()[:4]}…)", file=out)
    return log.n


def run_transcript(out: TextIO = sys.stdout) -> int:
    """Print the transcript to ``out``; returns the number of message lines."""
    return asyncio.run(_transcript(out))


if __name__ == "__main__":
    run_transcript()
