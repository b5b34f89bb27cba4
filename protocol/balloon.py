"""Balloon channel state machines: the device (hypervisor end) and the driver.

Units: pages of 4096 bytes; ``num_pages`` is the balloon *target*, ``actual`` the pages the
driver says are in the balloon, ``guest_pages`` the size of guest RAM.

**Device.** Answers ``hello`` with ``welcome`` (negotiating ``offered & supported``),
keeps the set of ballooned pages (a uint8 map over guest pages that the hypervisor may
share with its own memory bookkeeping) and validates every batch before anyone acts on it:
range, duplicates, state (inflate of a ballooned page, deflate of one that is not), empty
and oversize batches, and features (``runs`` needs RANGES, ``report`` needs
PAGE_REPORTING). An invalid batch is answered ``ack ok=false`` with a code and changes
nothing; ``next_event`` reports it as :class:`BatchRejected` so the backend can count it.
A valid batch is returned to the backend as the message itself; the backend performs
the side effect (releasing frames) and then calls ``complete(id)`` (or ``complete(id,
code=…)`` to refuse it), which updates the set and queues the ``ack``. Only one batch is
in progress at a time: batches are atomic, all pages or none.

**Driver.** Sends ``hello``, tracks the negotiated features and target, and enforces
virtio's ordering rules on what it sends: a page is never in two unacknowledged requests,
a page is deflated only after its inflate was acknowledged, and pages being deflated are
reported back (:class:`Completed`) only when the host's ``ack`` arrives, so that under
MUST_TELL_HOST the guest never reuses a deflated page before the host knows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import messages as m
from . import pfn as P
from .connection import Connection, Role, State
from .errors import ErrorCode, LocalProtocolError
from .features import (
    DEVICE_FEATURES,
    MAX_BATCH_PFNS,
    MAX_GUEST_PAGES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Feature,
)

#: Largest ballooned set (in runs) the welcome describes: 4 MiB of the 8 MiB frame.
WELCOME_MAX_RUNS = 256 * 1024

# Per-page states in the driver's view.
PG_NONE = 0
PG_INFLATING = 1
PG_BALLOONED = 2
PG_DEFLATING = 3
PG_REPORTING = 4


@dataclass(frozen=True)
class BatchRejected:
    """A batch the device refused (already answered ``ack ok=false``; nothing changed)."""

    request: m.Message
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Completed:
    """Driver side: one of our requests was answered."""

    request: m.Message
    ack: m.Ack

    @property
    def ok(self) -> bool:
        return self.ack.ok


def _ready_table(receives: m.Registry, first: str) -> dict[tuple[State, str], State]:
    t: dict[tuple[State, str], State] = {}
    for typ in receives:
        if typ in ("bye", "error"):
            continue
        if typ != first:
            t[(State.OPEN, typ)] = State.OPEN
    t[(State.START, first)] = State.OPEN
    t[(State.HANDSHAKE, first)] = State.OPEN
    for st in (State.START, State.HANDSHAKE, State.OPEN):
        t[(st, "bye")] = State.CLOSED
        t[(st, "error")] = State.CLOSED
    return t


class BalloonDevice(Connection):
    """Hypervisor end of ``<vm>.balloon.sock``."""

    ROLE = Role("balloon/device", m.BALLOON_TO_DEVICE, initial=State.START)
    TRANSITIONS: ClassVar[Mapping[tuple[State, str], State]] = {
        k: v for k, v in _ready_table(m.BALLOON_TO_DEVICE, "hello").items()
        if k[0] is not State.HANDSHAKE}

    def __init__(
        self,
        *,
        vm: str,
        guest_pages: int,
        supported: int = DEVICE_FEATURES,
        target: int = 0,
        ballooned: np.ndarray | None = None,
        stats_interval_ms: int = 1000,
    ) -> None:
        super().__init__()
        if not 0 < guest_pages <= MAX_GUEST_PAGES:
            raise ValueError(f"guest_pages must be in 1..{MAX_GUEST_PAGES}, got {guest_pages}")
        self.vm = vm
        self.guest_pages = guest_pages
        self.supported = supported
        self.features = 0
        self.target = self._check_target(target)
        if ballooned is None:
            ballooned = np.zeros(guest_pages, dtype=np.uint8)
        elif ballooned.shape != (guest_pages,) or ballooned.dtype != np.uint8:
            raise ValueError("ballooned must be a uint8 array with one entry per guest page")
        #: 1 for every page in the balloon (shared with the host's bookkeeping).
        self.ballooned = ballooned
        self.balloon_pages = P.count_set(ballooned)
        self._scratch = np.zeros(guest_pages, dtype=np.uint8)
        #: The driver's last ``actual`` (pages it says it has in the balloon).
        self.actual = self.balloon_pages
        self.stall = False
        self.stats_interval_ms = stats_interval_ms
        self.last_stats: dict[int, int] = {}
        self.stats_seq = 0
        self._in_progress: m.Message | None = None

    # ---------------------------------------------------------------- host-side API

    def _check_target(self, pages: int) -> int:
        if not isinstance(pages, int) or not 0 <= pages <= self.guest_pages:
            raise LocalProtocolError(
                ErrorCode.BAD_FIELD,
                f"balloon target {pages} pages is outside 0..{self.guest_pages} (guest RAM)",
            )
        return pages

    def has(self, feature: Feature) -> bool:
        return bool(self.features & feature.mask)

    def set_target(self, pages: int) -> None:
        """Change the balloon target; queues ``config`` once the driver is connected."""
        self.target = self._check_target(pages)
        if self.state is State.OPEN:
            self._queue(m.Config(num_pages=pages))

    def request_stats(self) -> bool:
        """Queue a ``stats_request`` when STATS_VQ was negotiated; returns whether sent."""
        if self.state is State.OPEN and self.has(Feature.STATS_VQ):
            self._queue(m.StatsRequest())
            return True
        return False

    @property
    def in_progress(self) -> m.Message | None:
        return self._in_progress

    def complete(self, request_id: int, *, code: ErrorCode | str | None = None,
                 message: str = "") -> None:
        """Finish the batch in progress: apply it (no ``code``) or refuse it, and ack."""
        req = self._in_progress
        if req is None or req.id != request_id:  # type: ignore[attr-defined]
            raise LocalProtocolError(
                ErrorCode.UNKNOWN_ID, f"no batch with id {request_id} is in progress"
            )
        self._in_progress = None
        if code is None:
            value = 1 if req.TYPE == "inflate" else 0
            if req.TYPE != "report":
                self._apply(req, value)
            self._queue(m.Ack(id=request_id, ok=True))
        else:
            self._queue(m.Ack(id=request_id, ok=False, code=str(code), message=message))

    def _apply(self, req: m.Message, value: int) -> None:
        if getattr(req, "pfns", None) is not None:
            arr = req.pfn_array  # type: ignore[attr-defined]
            P.set_pfns(self.ballooned, arr, value)
            n = arr.shape[0]
        else:
            runs = req.run_array  # type: ignore[attr-defined]
            P.set_runs(self.ballooned, runs, value)
            n = P.runs_total(runs)
        self.balloon_pages += n if value else -n

    # ---------------------------------------------------------------- receive handlers

    def next_event(self) -> Any:
        if self._in_progress is not None:
            raise LocalProtocolError(
                ErrorCode.BAD_STATE,
                f"complete() batch {self._in_progress.id} before reading the next event",  # type: ignore[attr-defined]
            )
        return super().next_event()

    def _on_hello(self, msg: m.Hello) -> m.Hello:
        if msg.version != PROTOCOL_VERSION:
            raise LocalProtocolError(
                ErrorCode.VERSION,
                f"protocol version {msg.version} is not supported (this device speaks "
                f"{PROTOCOL_VERSION})",
            )
        if msg.page_size != PAGE_SIZE:
            raise LocalProtocolError(
                ErrorCode.PAGE_SIZE, f"page size {msg.page_size} is not {PAGE_SIZE}"
            )
        if msg.vm != self.vm:
            raise LocalProtocolError(
                ErrorCode.BAD_FIELD, f"driver says it serves VM {msg.vm!r}; this is {self.vm!r}"
            )
        self.features = msg.features & self.supported
        self.state = State.OPEN  # so that _queue accepts the welcome
        runs = P.runs_of_set(self.ballooned) if self.balloon_pages else None
        self._queue(
            m.Welcome(
                version=PROTOCOL_VERSION,
                features=self.features,
                num_pages=self.target,
                actual=self.balloon_pages,
                stats_interval_ms=self.stats_interval_ms,
                guest_pages=self.guest_pages,
                balloon_runs=(
                    runs.tobytes()
                    if runs is not None and runs.shape[0] <= WELCOME_MAX_RUNS
                    else None
                ),
            )
        )
        return msg

    def _reject(self, msg: m.Message, code: ErrorCode, text: str) -> BatchRejected:
        self._queue(m.Ack(id=msg.id, ok=False, code=str(code), message=text))  # type: ignore[attr-defined]
        return BatchRejected(msg, code, text)

    def _check_batch(self, msg: m.Message, *, want_clear: bool) -> BatchRejected | None:
        pfns = getattr(msg, "pfns", None)
        # Reports are always run-encoded (virtio's reporting passes address ranges too).
        if pfns is None and msg.TYPE != "report" and not self.has(Feature.RANGES):
            return self._reject(
                msg, ErrorCode.FEATURE_NOT_NEGOTIATED, "'runs' needs the RANGES feature (bit 40)"
            )
        empty = len(pfns) == 0 if pfns is not None else len(msg.runs) == 0  # type: ignore[attr-defined]
        if empty:
            return self._reject(msg, ErrorCode.EMPTY_BATCH, f"{msg.TYPE} names no pages")
        if pfns is not None:
            if len(pfns) // 4 > MAX_BATCH_PFNS:
                return self._reject(msg, ErrorCode.BATCH_TOO_LARGE, "too many pfns")
            res = P.check_pfns(msg.pfn_array, self.guest_pages, self.ballooned, self._scratch,  # type: ignore[attr-defined]
                               want_clear=want_clear)
        else:
            res = P.check_runs(msg.run_array, self.guest_pages, self.ballooned, self._scratch,  # type: ignore[attr-defined]
                               want_clear=want_clear)
        if not res.ok:
            assert res.code is not None
            return self._reject(msg, res.code, f"{msg.TYPE}: {res.message}")
        return None

    def _on_inflate(self, msg: m.Inflate) -> Any:
        bad = self._check_batch(msg, want_clear=False)
        if bad is not None:
            return bad
        self._in_progress = msg
        return msg

    def _on_deflate(self, msg: m.Deflate) -> Any:
        bad = self._check_batch(msg, want_clear=True)
        if bad is not None:
            return bad
        self._in_progress = msg
        return msg

    def _on_report(self, msg: m.Report) -> Any:
        if not self.has(Feature.PAGE_REPORTING):
            return self._reject(
                msg, ErrorCode.FEATURE_NOT_NEGOTIATED, "'report' needs PAGE_REPORTING (bit 5)"
            )
        # Reported pages are free guest pages: never pages in the balloon.
        bad = self._check_batch(msg, want_clear=False)
        if bad is not None:
            return bad
        self._in_progress = msg
        return msg

    def _on_stats(self, msg: m.Stats) -> m.Stats:
        if not self.has(Feature.STATS_VQ):
            return self._reject(  # type: ignore[return-value]
                msg, ErrorCode.FEATURE_NOT_NEGOTIATED, "'stats' needs STATS_VQ (bit 1)"
            )
        self.last_stats = dict(msg.stats)
        self.stats_seq += 1
        self._queue(m.Ack(id=msg.id, ok=True))
        return msg

    def _on_actual(self, msg: m.Actual) -> m.Actual:
        if msg.actual > self.guest_pages:
            raise LocalProtocolError(
                ErrorCode.BAD_FIELD,
                f"actual {msg.actual} exceeds guest RAM of {self.guest_pages} pages",
            )
        self.actual = msg.actual
        self.stall = bool(msg.stall)
        return msg


class BalloonDriver(Connection):
    """Guest end of ``<vm>.balloon.sock``."""

    ROLE = Role(
        "balloon/driver",
        m.BALLOON_TO_DRIVER,
        requests=frozenset({"inflate", "deflate", "report", "stats"}),
        replies=frozenset({"ack"}),
        initial=State.START,
    )
    TRANSITIONS: ClassVar[Mapping[tuple[State, str], State]] = {
        k: v for k, v in _ready_table(m.BALLOON_TO_DRIVER, "welcome").items()
        if k[0] is not State.START or k[1] in ("bye", "error")}

    def __init__(self, *, vm: str, features: int) -> None:
        super().__init__()
        self.vm = vm
        self.offered = features
        self.features = 0
        self.target = 0
        self.host_actual = 0
        self.guest_pages = 0
        self.stats_interval_ms = 0
        self._page: np.ndarray = np.zeros(0, dtype=np.uint8)
        self._requests: dict[int, tuple[m.Message, np.ndarray]] = {}

    def has(self, feature: Feature) -> bool:
        return bool(self.features & feature.mask)

    def hello(self) -> bytes:
        """The first frame the driver sends."""
        if self.state is not State.START:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "hello is sent once, first")
        out = self.send(
            m.Hello(version=PROTOCOL_VERSION, features=self.offered, page_size=PAGE_SIZE,
                    vm=self.vm)
        )
        self.state = State.HANDSHAKE
        return out

    # ---------------------------------------------------------------- page states

    def page_state(self, pfn: int) -> int:
        return int(self._page[pfn]) if pfn < self._page.shape[0] else PG_NONE

    def pages_in(self, state: int) -> int:
        return int(np.count_nonzero(self._page == state))

    def _grow(self, need: int) -> None:
        if need > self._page.shape[0]:
            if self.guest_pages and need > self.guest_pages:
                raise LocalProtocolError(
                    ErrorCode.PFN_OUT_OF_RANGE,
                    f"pfn {need - 1} lies beyond guest RAM ({self.guest_pages} pages)",
                )
            grown = np.zeros(max(need, 2 * self._page.shape[0]), dtype=np.uint8)
            grown[: self._page.shape[0]] = self._page
            self._page = grown

    def mark_ballooned(self, runs: np.ndarray) -> None:
        """Reconcile on reconnect: these pages are already in the balloon (host-acked)."""
        r = P.as_runs(runs)
        if r.shape[0]:
            self._grow(int((r[:, 0] + r[:, 1]).max()))
            P.set_runs(self._page, r, PG_BALLOONED)

    def _claim(self, msg: m.Message, expect: int, new: int, what: str) -> None:
        """Check that every page of ``msg`` is in state ``expect`` and named once, then
        move them all to ``new``. Costs the batch, never guest RAM (no expansion of runs
        into pages, no map over RAM): this is on the inflate hot path."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(ErrorCode.BAD_STATE, f"{msg.TYPE} before welcome")
        pfns = getattr(msg, "pfns", None)
        if pfns is None and msg.TYPE != "report" and not self.has(Feature.RANGES):
            raise LocalProtocolError(
                ErrorCode.FEATURE_NOT_NEGOTIATED, "'runs' needs the RANGES feature"
            )
        if pfns is not None:
            arr = msg.pfn_array  # type: ignore[attr-defined]
            if arr.shape[0] == 0:
                raise LocalProtocolError(ErrorCode.EMPTY_BATCH, f"{msg.TYPE} names no pages")
            self._grow(int(arr.max()) + 1)
            # a repeat makes the batch's runs hold fewer pages than it names (one pass when
            # the pfns are sorted)
            if P.runs_total(P.pfns_to_runs(arr)) != arr.shape[0]:
                raise LocalProtocolError(ErrorCode.DUPLICATE_PFN, f"{msg.TYPE} repeats a page")
        else:
            arr = msg.run_array  # type: ignore[attr-defined]
            if arr.shape[0] == 0:
                raise LocalProtocolError(ErrorCode.EMPTY_BATCH, f"{msg.TYPE} names no pages")
            # Bounded before anything indexes with them: a bad run costs nothing.
            try:
                P.validate_runs(arr, self.guest_pages or MAX_GUEST_PAGES)
            except P.RunError as e:
                raise P.RunError(ErrorCode(e.code), f"{msg.TYPE}: {e.message}", index=e.index,
                                 pfn=e.pfn) from None
            self._grow(int((arr[:, 0] + arr[:, 1]).max()))
        # Every page in the expected state: one pass over the batch's pages, never over
        # guest RAM.
        bad = P.first_page_not_in(arr, self._page, expect)
        if bad >= 0:
            code = {PG_NONE: ErrorCode.ALREADY_BALLOONED,
                    PG_BALLOONED: ErrorCode.NOT_BALLOONED}.get(expect, ErrorCode.IN_FLIGHT)
            if self._page[bad] in (PG_INFLATING, PG_DEFLATING, PG_REPORTING):
                code = ErrorCode.IN_FLIGHT
            raise LocalProtocolError(code, f"{msg.TYPE}: page {bad} {what}", pfn=bad)
        if pfns is not None:
            P.set_pfns(self._page, arr, new)
        else:
            P.set_runs(self._page, arr, new)
        self._requests[msg.id] = (msg, arr)  # type: ignore[attr-defined]

    def _send_inflate(self, msg: m.Inflate) -> None:
        self._claim(msg, PG_NONE, PG_INFLATING, "is ballooned or in flight")

    def _send_deflate(self, msg: m.Deflate) -> None:
        self._claim(msg, PG_BALLOONED, PG_DEFLATING,
                    "is not in the balloon, or its inflate is not acknowledged")

    def _send_report(self, msg: m.Report) -> None:
        if not self.has(Feature.PAGE_REPORTING):
            raise LocalProtocolError(ErrorCode.FEATURE_NOT_NEGOTIATED, "report needs REPORTING")
        self._claim(msg, PG_NONE, PG_REPORTING, "is ballooned or in flight")

    def _send_stats(self, msg: m.Stats) -> None:
        if self.state is not State.OPEN:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "stats before welcome")
        self._requests[msg.id] = (msg, np.empty(0, dtype=np.int64))

    # ---------------------------------------------------------------- receive handlers

    def _on_welcome(self, msg: m.Welcome) -> m.Welcome:
        if msg.version != PROTOCOL_VERSION:
            raise LocalProtocolError(ErrorCode.VERSION, f"device speaks version {msg.version}")
        if msg.features & ~self.offered:
            raise LocalProtocolError(
                ErrorCode.BAD_FIELD,
                f"device negotiated features {msg.features:#x} beyond those offered "
                f"{self.offered:#x}",
            )
        if msg.guest_pages is not None and msg.guest_pages > MAX_GUEST_PAGES:
            # Checked before _grow() sizes the page-state map from it.
            raise LocalProtocolError(
                ErrorCode.BAD_FIELD,
                f"welcome.guest_pages {msg.guest_pages} exceeds the {MAX_GUEST_PAGES}-page "
                f"limit of uint32 pfns",
            )
        self.features = msg.features
        self.target = msg.num_pages
        self.host_actual = msg.actual
        self.stats_interval_ms = msg.stats_interval_ms
        if msg.guest_pages:
            self.guest_pages = msg.guest_pages
            self._grow(msg.guest_pages)
        return msg

    def _on_config(self, msg: m.Config) -> m.Config:
        if self.guest_pages and msg.num_pages > self.guest_pages:
            raise LocalProtocolError(
                ErrorCode.BAD_FIELD,
                f"target {msg.num_pages} exceeds guest RAM of {self.guest_pages} pages",
            )
        self.target = msg.num_pages
        return msg

    def _on_stats_request(self, msg: m.StatsRequest) -> m.StatsRequest:
        if not self.has(Feature.STATS_VQ):
            raise LocalProtocolError(
                ErrorCode.FEATURE_NOT_NEGOTIATED, "stats_request without STATS_VQ negotiated"
            )
        return msg

    def _on_ack(self, msg: m.Ack) -> Completed:
        req, pages = self._requests.pop(msg.id)
        t = req.TYPE
        value = None
        if t == "inflate":
            value = PG_BALLOONED if msg.ok else PG_NONE
        elif t == "deflate":
            value = PG_NONE if msg.ok else PG_BALLOONED
        elif t == "report":
            value = PG_NONE
        if value is not None and pages.shape[0]:
            # pages is the batch as sent: uint32 pfns, or (k, 2) runs
            if pages.ndim == 1:
                P.set_pfns(self._page, pages, value)
            else:
                P.set_runs(self._page, pages, value)
        return Completed(req, msg)

    # ---------------------------------------------------------------- accounting

    @property
    def balloon_pages(self) -> int:
        """Pages acknowledged as ballooned (what ``actual`` should report)."""
        return self.pages_in(PG_BALLOONED)
