"""The paravirtual balloon driver process: ``python -m guest.balloon_driver``.

It sits between the guest kernel (kernel channel, ``<vm>.kernel.sock``) and the hypervisor
(balloon channel, ``<vm>.balloon.sock``) and reads like Linux's
``drivers/virtio/virtio_balloon.c``:

* ``towards_target`` — the difference between the host's target and what is ballooned;
* ``fill_balloon`` — ``balloon_alloc`` pages from the guest's buddy allocator (highest orders
  first in RANGES mode, single pages in virtio mode), then ``tell_host`` (``inflate``);
* ``leak_balloon`` — ``deflate`` first and ``balloon_free`` only after the host's ``ack``
  ("we *have* to do it in this order" under MUST_TELL_HOST: a deflated page is not reused
  before the host knows);
* ``update_balloon_size`` — the ``actual`` message after every change;
* stats — ``stats_request`` answered from the kernel's ``meminfo``;
* deflate-on-OOM — ``oom_notify`` from the kernel deflates at least what it asks;
* free page reporting — Linux's cycle (idle → requested → active), about 2 s after pages
  are freed, blocks of order ≥ ``PAGE_REPORTING_MIN_ORDER``, at most
  ``PAGE_REPORTING_CAPACITY`` runs per report.

Units: pages of 4096 bytes. Two wire modes: ``ranges`` (run-encoded batches, RANGES
feature) and ``virtio`` (uint32 pfns, ``VIRTIO_PFNS_PER_MESSAGE`` per message, one message
in flight — the baseline the benchmarks compare against).

Restart safety: after a crash the hypervisor restarts the driver. On connect it asks the
kernel for its balloon list (K) and compares it with the host's ballooned set (H, from the
``welcome``'s ``balloon_runs`` extension, or probed). Because the kernel allocates before
``inflate`` and frees after the ``deflate`` ack, H ⊆ K always holds; pages in K \\ H
(allocated but never acknowledged, or deflated but not yet freed) go back to the kernel,
so no page is leaked or counted twice.

Why one module of this size: it is one driver (Linux's ``virtio_balloon.c`` vocabulary:
``fill_balloon``, ``leak_balloon``, ``tell_host``, ``towards_target``, reporting) with its
two channels; the protocol state machines it drives live in ``protocol/balloon.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

import numpy as np

from protocol import messages as m
from protocol import pfn as P
from protocol.aio import Channel, PeerClosed
from protocol.balloon import PG_BALLOONED, BalloonDriver, Completed
from protocol.connection import KernelClient
from protocol.errors import ErrorCode, PeerError, ProtocolError
from protocol.features import (
    FEATURE_NAMES,
    MAX_BATCH_RUNS,
    VIRTIO_PFNS_PER_MESSAGE,
    Feature,
    StatTag,
)
from protocol.lifeline import bind_to_host

log = logging.getLogger("balloon_driver")

#: Linux retries a fill that found no memory after 200 ms ("out of puff").
OUT_OF_PUFF_BACKOFF = 0.2
#: Pages asked from the kernel per ``balloon_alloc`` in RANGES mode: 128 MiB, a large
#: batch for the host (one punch per run), small enough to pipeline.
RANGES_CHUNK_PAGES = 32768
#: Unacknowledged inflates in RANGES mode: the guest allocates chunk n+1 while the host
#: releases chunk n (the two run in different processes, so on different cores).
RANGES_INFLIGHT = 2
#: Most pages one fill_balloon call moves (1 GiB) before re-reading the target.
RANGES_FILL_MAX_PAGES = 262144
#: Free page reporting (mm/page_reporting.c): pageblock order 9 (2 MiB), 32 runs a report,
#: about 2 s after pages were freed.
PAGE_REPORTING_MIN_ORDER = 9
PAGE_REPORTING_CAPACITY = 32
PAGE_REPORTING_DELAY = 2.0
#: How long a connect may retry while the peer's socket does not exist yet.
CONNECT_TIMEOUT = 30.0
#: After an OOM deflate, wait this long (or for a new target) before inflating again.
OOM_BACKOFF = 1.0


_KERNEL_TIMING = {"balloon_alloc": StatTag.DRIVER_ALLOC_NS, "balloon_free": StatTag.DRIVER_FREE_NS}
_HOST_TIMING = {"inflate": StatTag.DRIVER_INFLATE_NS, "deflate": StatTag.DRIVER_DEFLATE_NS}


class RequestLink:
    """Requests by id over one channel; replies resolve futures, anything else is handed
    to ``on_message``."""

    def __init__(self, chan: Channel, name: str) -> None:
        self.chan = chan
        self.name = name
        self.futures: dict[int, asyncio.Future[Any]] = {}

    def new_id(self) -> int:
        return self.chan.conn.new_id()

    async def request(self, msg: m.Message) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures[msg.id] = fut  # type: ignore[attr-defined]
        try:
            await self.chan.send(msg)
        except BaseException:
            self.futures.pop(msg.id, None)  # type: ignore[attr-defined]
            raise
        return await fut

    def resolve(self, mid: int, value: Any) -> bool:
        fut = self.futures.pop(mid, None)
        if fut is None or fut.done():
            return False
        fut.set_result(value)
        return True

    def fail_all(self, exc: BaseException) -> None:
        for fut in self.futures.values():
            if not fut.done():
                fut.set_exception(exc)
        self.futures.clear()


async def connect_retry(path: str, conn: Any, timeout: float = CONNECT_TIMEOUT) -> Channel:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            return await Channel.connect_unix(path, conn)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)


class Driver:
    """One balloon driver: both links, the worker and the reporting cycle."""

    def __init__(self, *, vm: str, balloon_sock: str, kernel_sock: str, features: int,
                 wire: str) -> None:
        if wire not in ("ranges", "virtio"):
            raise ValueError(f"wire must be 'ranges' or 'virtio', got {wire!r}")
        if wire == "virtio":
            features &= ~Feature.RANGES.mask
        self.vm = vm
        self.balloon_sock = balloon_sock
        self.kernel_sock = kernel_sock
        self.offered = features
        self.wire = wire
        self.conn = BalloonDriver(vm=vm, features=features)
        self.kernel: RequestLink | None = None
        self.device: RequestLink | None = None
        self.target_changed = asyncio.Event()
        self.out_of_puff = 0
        self.stalled = False
        self.oom_deflated = 0
        self.oom_until = 0.0
        self.inflated_pages = 0
        self.deflated_pages = 0
        self.reported_pages = 0
        #: Cumulative ns spent waiting, by kind (sent with the stats, tags 271-274).
        self.timing_ns = {StatTag.DRIVER_ALLOC_NS: 0, StatTag.DRIVER_INFLATE_NS: 0,
                          StatTag.DRIVER_DEFLATE_NS: 0, StatTag.DRIVER_FREE_NS: 0}
        self._lock = asyncio.Lock()  # one fill/leak at a time (worker vs OOM)
        #: The ``meminfo`` round trip answering the host's stats requests (at most one).
        self._stats_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ plumbing

    def has(self, f: Feature) -> bool:
        return self.conn.has(f)

    async def kernel_call(self, msg: m.Message) -> Any:
        assert self.kernel is not None
        t0 = time.perf_counter_ns()
        reply = await self.kernel.request(msg)
        tag = _KERNEL_TIMING.get(msg.TYPE)
        if tag is not None:
            self.timing_ns[tag] += time.perf_counter_ns() - t0
        return reply

    async def tell_host(self, msg: m.Message) -> Completed:
        assert self.device is not None
        t0 = time.perf_counter_ns()
        done: Completed = await self.device.request(msg)
        tag = _HOST_TIMING.get(msg.TYPE)
        if tag is not None:
            self.timing_ns[tag] += time.perf_counter_ns() - t0
        return done

    async def update_balloon_size(self) -> None:
        assert self.device is not None
        await self.device.chan.send(
            m.Actual(actual=self.conn.balloon_pages, stall=self.stalled)
        )

    @property
    def target(self) -> int:
        return self.conn.target

    # ------------------------------------------------------------------ start-up

    async def connect(self) -> None:
        kchan = await connect_retry(self.kernel_sock, KernelClient())
        self.kernel = RequestLink(kchan, "kernel")
        dchan = await connect_retry(self.balloon_sock, self.conn)
        self.device = RequestLink(dchan, "device")
        dchan.writer.write(self.conn.hello())
        await dchan.drain()
        welcome = await dchan.recv()
        if not isinstance(welcome, m.Welcome):
            raise ProtocolError(ErrorCode.BAD_STATE, f"expected welcome, got {welcome!r}")
        log.info(
            "negotiated features %s, target %d pages, host actual %d",
            Feature.to_names(self.conn.features), welcome.num_pages, welcome.actual,
        )
        self.welcome = welcome

    async def reconcile(self) -> None:
        """Make the driver's, the kernel's and the host's balloon agree (restart safety)."""
        reply = await self.kernel_call(m.BalloonList(id=self.kernel.new_id()))  # type: ignore[union-attr]
        kernel_runs = P.as_runs(reply.runs) if isinstance(reply, m.Pages) else P.as_runs(b"")
        k_pages = P.runs_total(kernel_runs)
        w = self.welcome
        if k_pages == 0 and w.actual == 0:
            return
        n = self.conn.guest_pages or (int((kernel_runs[:, 0] + kernel_runs[:, 1]).max())
                                      if kernel_runs.shape[0] else 0)
        in_k = np.zeros(max(n, 1), dtype=np.uint8)
        P.set_runs(in_k, kernel_runs, 1)
        if w.balloon_runs is not None or w.actual == 0:
            in_h = np.zeros_like(in_k)
            if w.balloon_runs:
                P.set_runs(in_h, P.as_runs(w.balloon_runs), 1)
        elif w.actual == k_pages:
            in_h = in_k.copy()  # H ⊆ K and |H| == |K|
        else:
            in_h = await self._probe_host_set(kernel_runs, n)
        both = in_k & in_h
        only_k = P.runs_of_set(in_k & (1 - in_h))
        only_h = P.runs_of_set(in_h & (1 - in_k))
        self.conn.mark_ballooned(P.runs_of_set(both))
        if only_h.shape[0]:
            # Should not happen (H ⊆ K); the host would count pages the guest may use.
            log.warning("host holds %d ballooned pages the kernel does not; deflating",
                        P.runs_total(only_h))
            self.conn.mark_ballooned(only_h)
            await self._deflate_runs(only_h, free_in_kernel=False)
        if only_k.shape[0]:
            log.info("returning %d pages the host never acknowledged to the kernel",
                     P.runs_total(only_k))
            await self._kernel_free(only_k)
        log.info("reconciled: %d pages in the balloon", self.conn.balloon_pages)
        await self.update_balloon_size()

    async def _probe_host_set(self, kernel_runs: np.ndarray, n: int) -> np.ndarray:
        """Find which kernel balloon pages the host holds by inflating them: a run the
        host already holds is refused (``already_ballooned``) and split until exact."""
        in_h = np.zeros(max(n, 1), dtype=np.uint8)
        todo = [tuple(r) for r in kernel_runs.tolist()]
        while todo:
            first, count = todo.pop()
            done = await self._send_inflate(np.array([[first, count]], dtype=np.uint64))
            if done.ok:
                in_h[first:first + count] = 1
                continue
            if done.ack.code != ErrorCode.ALREADY_BALLOONED:
                raise PeerError(done.ack.code or "", done.ack.message or "probe refused")
            if count == 1:
                in_h[first] = 1
            else:
                half = count // 2
                todo.append((first, half))
                todo.append((first + half, count - half))
        # The probe marked pages ballooned in the driver's view; reconcile() re-marks.
        return in_h

    # ------------------------------------------------------------------ inflate / deflate

    async def _send_inflate(self, runs: np.ndarray) -> Completed:
        assert self.device is not None
        if self.wire == "ranges":
            msg = m.Inflate(id=self.device.new_id(), runs=P.as_runs(runs).tobytes())
        else:
            msg = m.Inflate(id=self.device.new_id(), pfns=P.runs_to_pfns(runs).tobytes())
        return await self.tell_host(msg)

    async def _kernel_free(self, runs: np.ndarray) -> None:
        for chunk in P.split_runs(runs, 1 << 20):
            assert self.kernel is not None
            ack = await self.kernel_call(m.BalloonFree(id=self.kernel.new_id(),
                                                       runs=chunk.tobytes()))
            if not (isinstance(ack, m.Ack) and ack.ok):
                raise PeerError(getattr(ack, "code", "?") or "?",
                                f"kernel refused balloon_free: {getattr(ack, 'message', ack)}")

    def _batches(self, runs: np.ndarray) -> list[np.ndarray]:
        """Split a page set into wire batches: 256 pfns (virtio) or frame-sized runs."""
        if self.wire == "virtio":
            return P.split_runs(runs, VIRTIO_PFNS_PER_MESSAGE)
        r = P.as_runs(runs)
        return [r[i:i + MAX_BATCH_RUNS] for i in range(0, r.shape[0], MAX_BATCH_RUNS)]

    async def _alloc(self, num: int, max_order: int) -> np.ndarray | None:
        """``balloon_alloc``: runs the kernel gave, or None when it is out of puff."""
        assert self.kernel is not None
        reply = await self.kernel_call(
            m.BalloonAlloc(id=self.kernel.new_id(), count=num, max_order=max_order)
        )
        if isinstance(reply, m.Ack):
            if reply.code != ErrorCode.OUT_OF_PUFF:
                log.warning("kernel refused balloon_alloc: %s %s", reply.code, reply.message)
            return None
        runs = P.as_runs(reply.runs)
        return runs if runs.shape[0] else None

    async def _inflate_done(self, task: asyncio.Task[Completed], batch: np.ndarray) -> int:
        done = await task
        if done.ok:
            return P.runs_total(batch)
        log.warning("host refused inflate: %s %s", done.ack.code, done.ack.message)
        await self._kernel_free(batch)  # give the pages back to the guest
        return 0

    async def fill_balloon(self, num: int) -> int:
        """Take up to ``num`` pages from the guest and give them to the host.

        virtio wire: one 256-page allocation and one message, acknowledged before the
        next (Linux's fill_balloon/tell_host). RANGES wire: chunks of
        ``RANGES_CHUNK_PAGES`` at the highest buddy orders, pipelined: the next chunk is
        allocated while the host releases the previous one, at most
        ``RANGES_INFLIGHT`` inflates unacknowledged."""
        if self.wire == "virtio":
            runs = await self._alloc(min(num, VIRTIO_PFNS_PER_MESSAGE), 0)
            if runs is None:
                return 0
            got = await self._inflate_done(
                asyncio.ensure_future(self._send_inflate(runs)), runs)
            self.inflated_pages += got
            return got
        remaining = min(num, RANGES_FILL_MAX_PAGES)
        pending: list[tuple[asyncio.Task[Completed], np.ndarray]] = []
        inflated = 0
        try:
            while remaining > 0:
                runs = await self._alloc(min(remaining, RANGES_CHUNK_PAGES), m.MAX_ORDER)
                if runs is None:
                    break
                remaining -= P.runs_total(runs)
                for batch in self._batches(runs):
                    pending.append((asyncio.ensure_future(self._send_inflate(batch)), batch))
                while len(pending) >= RANGES_INFLIGHT:
                    inflated += await self._inflate_done(*pending.pop(0))
        finally:
            for task, batch in pending:
                inflated += await self._inflate_done(task, batch)
        self.inflated_pages += inflated
        return inflated

    def _pick_deflate(self, num: int) -> np.ndarray:
        """Up to ``num`` ballooned pages, highest pfns first (Linux leaks LIFO)."""
        states = self.conn._page
        idx = np.flatnonzero(states == PG_BALLOONED)
        if idx.shape[0] == 0:
            return np.empty((0, 2), dtype=np.uint64)
        take = idx[-num:]
        return P.pfns_to_runs(take.astype(np.uint32))

    async def _deflate_runs(self, runs: np.ndarray, *, free_in_kernel: bool = True) -> int:
        assert self.device is not None
        done_pages = 0
        for batch in self._batches(runs):
            if self.wire == "ranges":
                msg = m.Deflate(id=self.device.new_id(), runs=batch.tobytes())
            else:
                msg = m.Deflate(id=self.device.new_id(), pfns=P.runs_to_pfns(batch).tobytes())
            done = await self.tell_host(msg)
            if not done.ok:
                log.warning("host refused deflate: %s %s", done.ack.code, done.ack.message)
                continue
            # Only now, after the host's ack, may the guest reuse the pages.
            if free_in_kernel:
                await self._kernel_free(batch)
            done_pages += P.runs_total(batch)
        self.deflated_pages += done_pages
        return done_pages

    async def leak_balloon(self, num: int) -> int:
        if self.wire == "virtio":
            num = min(num, VIRTIO_PFNS_PER_MESSAGE)
        else:
            num = min(num, RANGES_FILL_MAX_PAGES)
        runs = self._pick_deflate(num)
        if runs.shape[0] == 0:
            return 0
        return await self._deflate_runs(runs)

    def towards_target(self) -> int:
        return self.target - self.conn.balloon_pages

    async def worker(self) -> None:
        """update_balloon_size_func: move toward the target until it is reached."""
        while True:
            diff = self.towards_target()
            if diff == 0 or (diff > 0 and time.monotonic() < self.oom_until):
                if self.stalled and diff == 0:
                    self.stalled = False
                    await self.update_balloon_size()
                self.target_changed.clear()
                timeout = None
                if diff > 0:
                    timeout = max(0.01, self.oom_until - time.monotonic())
                try:
                    await asyncio.wait_for(self.target_changed.wait(), timeout)
                except TimeoutError:
                    pass
                continue
            async with self._lock:
                if diff > 0:
                    got = await self.fill_balloon(diff)
                    if got == 0:
                        self.out_of_puff += 1
                        if not self.stalled:
                            # Tell the host once per stall, not on every retry.
                            self.stalled = True
                            log.info("out of puff at %d/%d pages; backing off",
                                     self.conn.balloon_pages, self.target)
                            await self.update_balloon_size()
                        self.target_changed.clear()
                        try:
                            await asyncio.wait_for(self.target_changed.wait(),
                                                   OUT_OF_PUFF_BACKOFF)
                        except TimeoutError:
                            pass
                        continue
                    self.stalled = False
                else:
                    self.stalled = False
                    await self.leak_balloon(-diff)
                await self.update_balloon_size()

    # ------------------------------------------------------------------ events

    async def on_device_message(self, msg: Any) -> None:
        if isinstance(msg, m.Config):
            self.oom_until = 0.0
            self.target_changed.set()
        elif isinstance(msg, m.StatsRequest):
            # One stats buffer, as in virtio: a request that arrives while the previous one
            # is still being answered is answered by it. The kernel serves its channel in
            # order, so one meminfo per request would pile up behind a busy kernel (one
            # swapping answers about once a second, polled five times a second) and the
            # balloon_free of a deflate would wait behind all of them.
            if self._stats_task is None or self._stats_task.done():
                self._stats_task = asyncio.get_running_loop().create_task(self.send_stats())
        elif isinstance(msg, (m.Bye, m.Error)):
            raise PeerClosed(f"device said {msg!r}")

    async def send_stats(self) -> None:
        assert self.kernel is not None and self.device is not None
        try:
            reply = await self.kernel_call(m.Meminfo(id=self.kernel.new_id()))
        except (PeerClosed, PeerError):
            return
        if not isinstance(reply, m.Stats):
            return
        stats = dict(reply.stats)
        stats[int(StatTag.OUT_OF_PUFF)] = self.out_of_puff
        for tag, ns in self.timing_ns.items():
            stats[int(tag)] = ns
        await self.tell_host(m.Stats(id=self.device.new_id(), stats=stats))

    async def on_kernel_message(self, msg: Any) -> None:
        if isinstance(msg, m.OomNotify):
            asyncio.get_running_loop().create_task(self.oom_notify(msg))
        elif isinstance(msg, (m.Bye, m.Error)):
            raise PeerClosed(f"kernel said {msg!r}")

    async def oom_notify(self, msg: m.OomNotify) -> None:
        """virtio_balloon_oom_notify: deflate at least ``pages`` and answer the kernel."""
        assert self.kernel is not None
        if not self.has(Feature.DEFLATE_ON_OOM):
            await self.kernel.chan.send(m.Ack(
                id=msg.id, ok=False, code=str(ErrorCode.FEATURE_NOT_NEGOTIATED),
                message="DEFLATE_ON_OOM was not negotiated with the host"))
            return
        freed = 0
        async with self._lock:
            while freed < msg.pages:
                got = await self.leak_balloon(msg.pages - freed)
                if got == 0:
                    break
                freed += got
            self.oom_deflated += freed
            self.oom_until = time.monotonic() + OOM_BACKOFF
            await self.update_balloon_size()
        log.info("deflate on OOM: %d pages (asked %d)", freed, msg.pages)
        if freed:
            await self.kernel.chan.send(m.Ack(id=msg.id, ok=True))
        else:
            await self.kernel.chan.send(m.Ack(id=msg.id, ok=False,
                                              code=str(ErrorCode.OUT_OF_PUFF),
                                              message="the balloon is empty"))

    async def reporting(self) -> None:
        """page_reporting_process: every PAGE_REPORTING_DELAY, isolate free high-order
        blocks, report them, and hand them back to the free lists."""
        assert self.kernel is not None
        while True:
            await asyncio.sleep(PAGE_REPORTING_DELAY)
            while True:
                reply = await self.kernel_call(m.ReportIsolate(
                    id=self.kernel.new_id(), min_order=PAGE_REPORTING_MIN_ORDER,
                    max_runs=PAGE_REPORTING_CAPACITY))
                if not isinstance(reply, m.Pages) or not reply.runs:
                    break
                runs = P.as_runs(reply.runs)
                done = await self.tell_host(m.Report(id=self.device.new_id(),  # type: ignore[union-attr]
                                                     runs=reply.runs))
                if done.ok:
                    self.reported_pages += P.runs_total(runs)
                await self.kernel_call(m.ReportDone(id=self.kernel.new_id(), runs=reply.runs))
                if P.runs_total(runs) < PAGE_REPORTING_CAPACITY:
                    break

    async def _reader(self, link: RequestLink, on_message: Any) -> None:
        while True:
            msg = await link.chan.recv()
            if isinstance(msg, Completed):
                link.resolve(msg.request.id, msg)  # type: ignore[attr-defined]
            elif isinstance(msg, (m.Pages, m.Stats)) or (
                isinstance(msg, m.Ack) and msg.id in link.futures and link is self.kernel
            ):
                link.resolve(msg.id, msg)
            else:
                await on_message(msg)

    async def run(self) -> int:
        await self.connect()
        assert self.kernel is not None and self.device is not None
        readers = [
            asyncio.create_task(self._reader(self.device, self.on_device_message)),
            asyncio.create_task(self._reader(self.kernel, self.on_kernel_message)),
        ]
        try:
            await self.reconcile()
            tasks = [asyncio.create_task(self.worker())]
            if self.has(Feature.PAGE_REPORTING):
                tasks.append(asyncio.create_task(self.reporting()))
            done, _ = await asyncio.wait(readers + tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None and not isinstance(exc, PeerClosed):
                    raise exc
            log.info("a peer closed; driver exiting")
            return 0
        finally:
            for link in (self.device, self.kernel):
                link.fail_all(PeerClosed("driver stopping"))
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
            for link in (self.device, self.kernel):
                await link.chan.close()


def parse_features(text: str) -> int:
    names = [n for n in text.split(",") if n.strip()]
    return Feature.from_names(names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest.balloon_driver",
                                 description="balloonlab's paravirtual balloon driver")
    ap.add_argument("--vm", required=True)
    ap.add_argument("--balloon-sock", required=True)
    ap.add_argument("--kernel-sock", required=True)
    ap.add_argument("--features", default="must_tell_host,stats,deflate_on_oom,reporting,ranges",
                    help="comma-separated: " + ", ".join(FEATURE_NAMES))
    ap.add_argument("--wire", choices=("ranges", "virtio"), default="ranges")
    ap.add_argument("--log-level", default=os.environ.get("BALLOONLAB_LOG", "INFO"))
    args = ap.parse_args(argv)
    bind_to_host(f"guest.balloon_driver[{args.vm}]")  # first: die with the hypervisor
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s driver[{args.vm}] %(levelname)s %(message)s")
    try:
        features = parse_features(args.features)
    except ValueError as e:
        ap.error(str(e))
    from protocol.warmup import warm_up

    warm_up()  # load the PFN kernels now, not in the middle of the first inflate
    drv = Driver(vm=args.vm, balloon_sock=args.balloon_sock, kernel_sock=args.kernel_sock,
                 features=features, wire=args.wire)

    async def _main() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: task.cancel() if task else None)
        try:
            return await drv.run()
        except asyncio.CancelledError:
            return 0

    try:
        return asyncio.run(_main())
    except (PeerClosed, ConnectionError, FileNotFoundError) as e:
        log.error("lost a peer: %s", e)
        return 1
    except ProtocolError as e:
        log.error("protocol error: %s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
