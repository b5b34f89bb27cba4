"""Balloon device backend (``<vm>.balloon.sock``): the host side of the balloon channel.

Logic, dispatch and metrics are kept apart, as in firecracker's balloon device:

- :class:`protocol.balloon.BalloonDevice` (sans-IO) negotiates, validates every batch and keeps
  the balloon byte map (shared with the frame ledger's per-VM ``balloon`` array);
- this module is the dispatch: it reads events, performs the side effect of an accepted batch
  through the host's ``release`` callback (EPT NOT_PRESENT, punch runs, free frames) and only
  then calls ``device.complete(id)`` so the ``ack`` never precedes the release;
- :class:`BalloonMetrics` holds the named counters, and every rejected batch goes through
  :meth:`BalloonMetrics.reject` (one place, like ``report_balloon_event_fail``).

Units: pages of 4096 bytes. Stats are cached with ``last_update`` (UNIX seconds) and polled
every ``stats_interval`` seconds when STATS_VQ was negotiated.

Deflate needs no host work: a deflated page is simply fault-in-able again (the next access
exits to the host, which backs it with a zeroed frame); the ``ack`` tells a MUST_TELL_HOST
driver that it may reuse the page.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hypervisor.pathologies import guest_events
from protocol import messages as m
from protocol import pfn as P
from protocol.aio import Channel, PeerClosed, PeerStalled
from protocol.balloon import BalloonDevice, BatchRejected
from protocol.connection import State
from protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocol.features import StatTag

log = logging.getLogger(__name__)

#: A driver that leaves this many seconds of our output unread is disconnected: a peer that
#: stops reading must not make the host buffer without bound.
WRITE_TIMEOUT = 10.0
#: A connection must send ``hello`` within this many seconds: until it does it holds the
#: VM's one driver slot, so a peer that connects and says nothing would lock the driver out.
HELLO_TIMEOUT = 10.0
#: Seconds a driver may leave a started frame unfinished.
FRAME_TIMEOUT = 10.0


@dataclass
class BalloonMetrics:
    """Named counters of one VM's balloon device (cumulative over driver reconnects)."""

    inflated: int = 0  # pages
    deflated: int = 0  # pages
    reported: int = 0  # pages
    inflate_batches: int = 0
    deflate_batches: int = 0
    report_batches: int = 0
    released_frames: int = 0  # frames actually returned to the host by inflate/report
    punch_calls: int = 0
    out_of_puff: int = 0  # `actual` messages with stall set
    stats_received: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by error code
    protocol_errors: int = 0
    connects: int = 0

    def reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rejected"] = dict(self.rejected)
        return d


#: release(runs) -> (frames released, punch calls). ``runs`` is an accepted batch as
#: ascending, disjoint, maximal int64 (k, 2) runs (the device has validated its pages);
#: raises LedgerError-like to refuse it.
ReleaseFn = Callable[[np.ndarray], Awaitable[tuple[int, int]]]


class BalloonBackend:
    """The balloon device of one VM; one driver connection at a time."""

    def __init__(self, vm: str, pages: int, *, supported: int, ballooned: np.ndarray,
                 stats_interval: float, release: ReleaseFn,
                 emit: Callable[..., object], target: int = 0) -> None:
        self.vm = vm
        self.pages = pages
        self.supported = supported
        self.ballooned = ballooned
        self.stats_interval = stats_interval
        self.release = release
        self.emit = emit
        self.target = target
        self.metrics = BalloonMetrics()
        self.device: BalloonDevice | None = None
        self.channel: Channel | None = None
        self.actual = int(P.count_set(ballooned))
        self.stall_since_sample = False
        self.stats: dict[int, int] = {}
        self.last_update: float | None = None
        #: Seconds spent in release (EPT + punch + ledger), for the inflate rate.
        self.release_seconds = 0.0

    @property
    def connected(self) -> bool:
        return self.channel is not None and self.device is not None \
            and self.device.state is State.OPEN

    @property
    def balloon_pages(self) -> int:
        return int(P.count_set(self.ballooned))

    def set_target(self, pages: int) -> None:
        """New balloon target; pushed as ``config`` when a driver is connected."""
        if not 0 <= pages <= self.pages:
            raise ValueError(f"balloon target {pages} is outside 0..{self.pages} pages")
        changed = pages != self.target
        self.target = pages
        dev, ch = self.device, self.channel
        if changed and dev is not None and ch is not None and dev.state is State.OPEN:
            dev.set_target(pages)
            ch.flush()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run one driver connection to its end."""
        if self.channel is not None:
            dev = BalloonDevice(vm=self.vm, guest_pages=self.pages)
            ch = Channel(dev, reader, writer)
            ch.send_nowait(m.Error(code=str(ErrorCode.BAD_STATE),
                                   message=f"a balloon driver for {self.vm!r} is already "
                                           "connected"))
            await ch.close()
            return
        dev = BalloonDevice(vm=self.vm, guest_pages=self.pages, supported=self.supported,
                            target=self.target, ballooned=self.ballooned,
                            stats_interval_ms=int(self.stats_interval * 1000))
        ch = Channel(dev, reader, writer, idle_timeout=HELLO_TIMEOUT, frame_timeout=FRAME_TIMEOUT)
        self.device, self.channel = dev, ch
        poller: asyncio.Task[None] | None = None
        reason = "driver closed the balloon channel"
        try:
            while True:
                ev = await ch.recv()
                if isinstance(ev, BatchRejected):
                    self.metrics.reject(str(ev.code))
                    self.emit("balloon_rejected", self.vm, code=str(ev.code),
                              message=ev.message, type=ev.request.TYPE)
                elif isinstance(ev, m.Hello):
                    ch.idle_timeout = None  # a negotiated driver may stay quiet
                    self.metrics.connects += 1
                    self.emit("driver_connected", self.vm, features=dev.features)
                    if poller is None:
                        poller = asyncio.create_task(self._poll_stats(dev, ch))
                elif isinstance(ev, (m.Inflate, m.Report)):
                    await self._release_batch(dev, ev)
                elif isinstance(ev, m.Deflate):
                    n = ev.page_count
                    dev.complete(ev.id)
                    self.metrics.deflated += n
                    self.metrics.deflate_batches += 1
                elif isinstance(ev, m.Stats):
                    kills = ev.stats.get(int(StatTag.OOM_KILL))
                    seen = self.stats.get(int(StatTag.OOM_KILL))
                    if kills is not None and seen is not None and kills > seen:
                        self.emit("guest_oom_kill", self.vm, kills=kills - seen, total=kills)
                    guest_events(self.vm, self.stats, ev.stats, self.emit)
                    self.stats = dict(ev.stats)
                    self.last_update = time.time()
                    self.metrics.stats_received += 1
                elif isinstance(ev, m.Actual):
                    self.actual = ev.actual
                    if ev.stall:
                        self.metrics.out_of_puff += 1
                        self.stall_since_sample = True
                        self.emit("balloon_stall", self.vm, actual=ev.actual,
                                  target=self.target)
                elif isinstance(ev, (m.Bye, m.Error)):
                    reason = f"driver said {ev.TYPE}"
                    break
                await ch.drain(timeout=WRITE_TIMEOUT)
        except RemoteProtocolError as e:
            self.metrics.protocol_errors += 1
            reason = f"protocol error from driver: {e}"
            log.warning("%s: %s", self.vm, reason)
        except TimeoutError:
            reason = "driver stopped reading"
        except PeerStalled as e:
            reason = f"driver stalled: {e}"
            log.warning("%s: %s", self.vm, reason)
        except PeerClosed:
            pass
        finally:
            if poller is not None:
                poller.cancel()
            self.device = self.channel = None
            await ch.close()
            self.emit("driver_exited", self.vm, reason=reason)

    async def _release_batch(self, dev: BalloonDevice, ev: m.Inflate | m.Report) -> None:
        # The device validated the batch once (range, repeats, page states): the host gets
        # it as runs, never expanded into pages (pfns are coalesced: one punch per run).
        if getattr(ev, "pfns", None) is not None:
            runs = P.coalesce_runs(P.pfns_to_runs(ev.pfn_array))
        else:
            runs = P.coalesce_runs(ev.run_array)
        pages = P.runs_total(runs)
        t0 = time.perf_counter()
        try:
            freed, calls = await self.release(runs)
        except Exception as e:
            code = str(getattr(e, "code", ErrorCode.IN_FLIGHT))
            dev.complete(ev.id, code=code, message=str(e))
            self.metrics.reject(code)
            self.emit("balloon_rejected", self.vm, code=code, message=str(e), type=ev.TYPE)
            return
        self.release_seconds += time.perf_counter() - t0
        dev.complete(ev.id)
        met = self.metrics
        met.released_frames += freed
        met.punch_calls += calls
        if isinstance(ev, m.Inflate):
            met.inflated += pages
            met.inflate_batches += 1
        else:
            met.reported += pages
            met.report_batches += 1

    async def _poll_stats(self, dev: BalloonDevice, ch: Channel) -> None:
        while self.device is dev:
            if self.stats_interval > 0 and dev.request_stats():
                ch.flush()
            # 0 turns polling off (it can be turned on again, e.g. by QMP's qom-set).
            await asyncio.sleep(self.stats_interval if self.stats_interval > 0 else 1.0)

    async def disconnect(self, reason: str = "host shutting down") -> None:
        ch = self.channel
        if ch is not None:
            try:
                await ch.close(reason)
            except ProtocolError:
                pass
