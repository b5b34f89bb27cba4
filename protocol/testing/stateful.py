"""A reusable hypothesis state machine for the balloon protocol (zarr's testing/stateful.py).

:class:`BalloonProtocolMachine` connects a balloon driver and a balloon device through
in-memory byte pipes (one queue of frames each way, so that acks can be held in flight)
and runs them against a plain Python model: the set of ballooned pages. Every frame the
device processes is first judged by the model (accept, or reject with which code), and the
device must agree. Other implementations reuse it by overriding the factory hooks
:meth:`~BalloonProtocolMachine.make_device` and :meth:`~BalloonProtocolMachine.make_driver`
(they must keep the public API of :class:`~protocol.balloon.BalloonDevice` /
:class:`~protocol.balloon.BalloonDriver`), then ``TestX = Subclass.TestCase``.

Units: pages (4096 bytes). Invariants checked after every step:

* the device's balloon set == the model's set, and ``balloon_pages`` == its popcount;
* the device's ``actual`` ≤ guest pages, its ``target`` ≤ guest pages;
* a rejected batch changes nothing (checked around each rejected frame);
* once every frame and ack is delivered, the driver's view (pages it holds as ballooned,
  nothing in flight) equals the device's.

Needs hypothesis (a test dependency), which is why it lives under ``protocol.testing``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from .. import messages as m
from .. import pfn as P
from ..balloon import PG_BALLOONED, PG_NONE, BalloonDevice, BalloonDriver, BatchRejected, Completed
from ..connection import CLOSED, NEED_DATA, State
from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ..features import DEVICE_FEATURES, Feature
from ..framing import FrameBuffer, decode_payload, encode_frame

VM = "vm-under-test"


@dataclass
class _Frame:
    """One frame on its way to the device: its bytes and who sent it."""

    data: bytes
    raw: bool  # True: forged straight onto the wire, not through the driver


def model_check(kind: str, pages: list[int] | None, runs: list[tuple[int, int]] | None,
                ballooned: set[int], guest_pages: int, features: int) -> ErrorCode | None:
    """The model's verdict on one batch, in the device's documented checking order:
    feature, empty, range (whole batch), then per page in order duplicate / state."""
    if kind == "report" and not features & Feature.PAGE_REPORTING.mask:
        return ErrorCode.FEATURE_NOT_NEGOTIATED
    if runs is not None and kind != "report" and not features & Feature.RANGES.mask:
        return ErrorCode.FEATURE_NOT_NEGOTIATED
    if (pages if pages is not None else runs) == []:
        return ErrorCode.EMPTY_BATCH
    if runs is not None:
        for first, count in runs:
            if count == 0:
                return ErrorCode.BAD_FIELD
            if first >= guest_pages or first + count > guest_pages:
                return ErrorCode.PFN_OUT_OF_RANGE
        pages = [f + j for f, c in runs for j in range(c)]
    assert pages is not None
    if any(p >= guest_pages for p in pages):
        return ErrorCode.PFN_OUT_OF_RANGE
    want_in = kind == "deflate"
    seen: set[int] = set()
    for p in pages:
        if p in seen:
            return ErrorCode.DUPLICATE_PFN
        seen.add(p)
        if (p in ballooned) != want_in:
            return ErrorCode.NOT_BALLOONED if want_in else ErrorCode.ALREADY_BALLOONED
    return None


def _pages_of(msg: Any) -> tuple[list[int] | None, list[tuple[int, int]] | None]:
    if getattr(msg, "pfns", None) is not None:
        return msg.pfn_array.tolist(), None
    return None, [(int(f), int(c)) for f, c in msg.run_array.tolist()]


class BalloonProtocolMachine(RuleBasedStateMachine):
    """Driver ↔ device over in-memory pipes, against a set-of-pages model."""

    # ------------------------------------------------------------------ factory hooks

    def make_device(self, *, vm: str, guest_pages: int) -> BalloonDevice:
        """The device under test (override to test another implementation)."""
        return BalloonDevice(vm=vm, guest_pages=guest_pages)

    def make_driver(self, *, vm: str, features: int) -> BalloonDriver:
        """The driver under test (override to test another implementation)."""
        return BalloonDriver(vm=vm, features=features)

    # ------------------------------------------------------------------ set-up

    def __init__(self) -> None:
        super().__init__()
        self.model: set[int] = set()
        self.to_device: deque[_Frame] = deque()
        self.to_driver = bytearray()
        self.expect_ack: dict[int, bool] = {}  # driver request id → ok, set by the device
        self.model_target = 0
        self.model_stats: dict[int, int] = {}
        self.stats_requested = 0

    @initialize(guest_pages=st.integers(8, 200),
                offered=st.sets(st.sampled_from([Feature.MUST_TELL_HOST, Feature.STATS_VQ,
                                                 Feature.PAGE_REPORTING, Feature.RANGES,
                                                 Feature.FREE_PAGE_HINT])))
    def connect(self, guest_pages: int, offered: set[Feature]) -> None:
        self.guest_pages = guest_pages
        self.offered = sum(f.mask for f in offered)
        self.device = self.make_device(vm=VM, guest_pages=guest_pages)
        self.driver = self.make_driver(vm=VM, features=self.offered)
        self.device.receive_data(self.driver.hello())
        hello = self.device.next_event()
        assert hello.TYPE == "hello"
        self.driver.receive_data(self.device.data_to_send())
        welcome = self.driver.next_event()
        assert isinstance(welcome, m.Welcome)
        self.features = self.offered & DEVICE_FEATURES
        assert self.device.features == self.driver.features == self.features
        assert welcome.guest_pages == guest_pages and welcome.actual == 0

    def has(self, f: Feature) -> bool:
        return bool(self.features & f.mask)

    # ------------------------------------------------------------------ helpers

    def _driver_send(self, msg: m.Message) -> None:
        self.to_device.append(_Frame(self.driver.send(msg), raw=False))

    def _pages_in_state(self, state: int) -> list[int]:
        return [p for p in range(self.guest_pages) if self.driver.page_state(p) == state]

    def _encode(self, pages: list[int], use_runs: bool) -> dict[str, bytes]:
        if use_runs:
            return {"runs": P.pfns_to_runs(np.array(pages, dtype=np.uint32)).tobytes()}
        return {"pfns": P.pfns_to_wire(pages)}

    def _deliver_one_to_device(self, refuse: bool = False) -> None:
        """Feed one frame to the device; judge it with the model; act as the backend."""
        frame = self.to_device.popleft()
        before = self.device.ballooned.copy()
        before_pages = self.device.balloon_pages
        self.device.receive_data(frame.data)
        ev = self.device.next_event()
        assert ev is not NEED_DATA and ev is not CLOSED
        req: Any = ev.request if isinstance(ev, BatchRejected) else ev  # a message of the channel
        kind = req.TYPE
        if kind in ("inflate", "deflate", "report"):
            pages, runs = _pages_of(req)
            verdict = model_check(kind, pages, runs, self.model, self.guest_pages,
                                  self.features)
            if verdict is None:
                assert not isinstance(ev, BatchRejected), f"device rejected a valid {kind}: {ev}"
                rid: int = req.id  # a page batch
                assert self.device.in_progress is req
                ok = not refuse
                if refuse:  # the backend may refuse a valid batch (e.g. host out of frames)
                    self.device.complete(rid, code=ErrorCode.INTERNAL, message="backend")
                else:
                    self.device.complete(rid)
                    flat = pages if pages is not None else [f + j for f, c in runs or []
                                                            for j in range(c)]
                    if kind == "inflate":
                        self.model.update(flat)
                    elif kind == "deflate":
                        self.model.difference_update(flat)
            else:
                assert isinstance(ev, BatchRejected), f"device accepted {kind}; model: {verdict}"
                assert ev.code == verdict, (ev.code, verdict)
                ok = False
            if not ok:
                # A rejected batch changes nothing.
                assert np.array_equal(self.device.ballooned, before)
                assert self.device.balloon_pages == before_pages
        elif kind == "stats":
            if isinstance(ev, BatchRejected):
                assert not self.has(Feature.STATS_VQ)
                ok = False
            else:
                self.model_stats = dict(req.stats)
                assert self.device.last_stats == self.model_stats
                ok = True
        elif kind == "actual":
            assert self.device.actual == req.actual
            ok = True
        else:  # pragma: no cover - the machine sends nothing else
            raise AssertionError(f"unexpected {kind}")
        out = self.device.data_to_send()
        if frame.raw:
            self._check_raw_reply(out, req, ok)
        else:
            if getattr(req, "id", None) is not None and kind != "actual":
                self.expect_ack[req.id] = ok
            self.to_driver += out

    def _check_raw_reply(self, out: bytes, req: Any, ok: bool) -> None:
        """A forged frame's ack goes nowhere near the driver; check it here."""
        fb = FrameBuffer()
        fb.feed(out)
        body = fb.next_frame()
        assert body is not None and fb.next_frame() is None
        ack = m.decode_message(m.BALLOON_TO_DRIVER, decode_payload(body))
        assert isinstance(ack, m.Ack) and ack.id == req.id and ack.ok == ok
        if not ok:
            assert ack.code and ack.message

    def _deliver_to_driver(self) -> None:
        self.driver.receive_data(bytes(self.to_driver))
        self.to_driver.clear()
        while (ev := self.driver.next_event()) is not NEED_DATA:
            if isinstance(ev, Completed):
                want = self.expect_ack.pop(ev.request.id)  # type: ignore[attr-defined]
                assert ev.ok == want
            elif isinstance(ev, m.Config):
                assert self.driver.target == ev.num_pages
            elif ev.TYPE == "stats_request":
                assert self.has(Feature.STATS_VQ)
                self.stats_requested -= 1
            else:  # pragma: no cover
                raise AssertionError(f"unexpected event {ev!r}")

    # ------------------------------------------------------------------ driver rules

    @rule(data=st.data(), use_runs=st.booleans())
    def inflate(self, data: st.DataObject, use_runs: bool) -> None:
        free = self._pages_in_state(PG_NONE)
        if not free:
            return
        pages = data.draw(st.lists(st.sampled_from(free), min_size=1, max_size=40, unique=True))
        use_runs = use_runs and self.has(Feature.RANGES)
        self._driver_send(m.Inflate(id=self.driver.new_id(), **self._encode(pages, use_runs)))

    @rule(data=st.data(), use_runs=st.booleans())
    def deflate(self, data: st.DataObject, use_runs: bool) -> None:
        held = self._pages_in_state(PG_BALLOONED)
        if not held:
            return
        pages = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=40, unique=True))
        use_runs = use_runs and self.has(Feature.RANGES)
        self._driver_send(m.Deflate(id=self.driver.new_id(), **self._encode(pages, use_runs)))

    @precondition(lambda self: self.has(Feature.PAGE_REPORTING))
    @rule(data=st.data())
    def report(self, data: st.DataObject) -> None:
        free = self._pages_in_state(PG_NONE)
        if not free:
            return
        pages = data.draw(st.lists(st.sampled_from(free), min_size=1, max_size=20, unique=True))
        self._driver_send(m.Report(id=self.driver.new_id(), **self._encode(pages, True)))

    @rule()
    def send_actual(self) -> None:
        self._driver_send(m.Actual(actual=self.driver.balloon_pages))

    @rule(stats=st.dictionaries(st.sampled_from([0, 1, 4, 5, 6, 10, 261, 300]),
                                st.integers(0, 2**64 - 1), max_size=6))
    def send_stats(self, stats: dict[int, int]) -> None:
        self._driver_send(m.Stats(id=self.driver.new_id(), stats=stats))

    @rule(data=st.data())
    def driver_refuses_invalid_sends(self, data: st.DataObject) -> None:
        """The driver's own ordering rules: nothing invalid leaves it, nothing changes."""
        snapshot = [self.driver.page_state(p) for p in range(self.guest_pages)]
        outstanding = self.driver.outstanding
        held = self._pages_in_state(PG_BALLOONED)
        not_none = [p for p, s in enumerate(snapshot) if s != PG_NONE]
        choices = [("inflate", [self.guest_pages]), ("inflate", [0, 0]), ("deflate", [])]
        if not_none:
            choices.append(("inflate", [data.draw(st.sampled_from(not_none))]))
        not_held = [p for p, s in enumerate(snapshot) if s != PG_BALLOONED]
        if not_held:
            choices.append(("deflate", [data.draw(st.sampled_from(not_held))]))
        if held and not self.has(Feature.RANGES):
            choices.append(("deflate-runs", held[:1]))
        kind, pages = data.draw(st.sampled_from(choices))
        if kind == "deflate-runs":
            msg: m.Message = m.Deflate(id=self.driver.new_id(),
                                       runs=P.runs_to_wire([(pages[0], 1)]))
        else:
            cls = m.Inflate if kind == "inflate" else m.Deflate
            msg = cls(id=self.driver.new_id(), pfns=P.pfns_to_wire(pages))
        try:
            self.driver.send(msg)
        except LocalProtocolError as err:
            assert err.message
        else:  # pragma: no cover
            raise AssertionError(f"driver sent an invalid {kind} {pages}")
        assert [self.driver.page_state(p) for p in range(self.guest_pages)] == snapshot
        assert self.driver.outstanding == outstanding

    # ------------------------------------------------------------------ forged frames

    @rule(data=st.data(), what=st.sampled_from(
        ["duplicate", "out_of_range", "already_ballooned", "not_ballooned", "runs_no_ranges",
         "empty_pfns", "empty_runs", "zero_run", "report_no_reporting", "run_out_of_range"]))
    def forged_batch(self, data: st.DataObject, what: str) -> None:
        """An invalid batch straight onto the wire (a buggy or hostile driver)."""
        while self.to_device:  # judged against the current state: deliver what is queued
            self._deliver_one_to_device()
        n = self.guest_pages
        free = [p for p in range(n) if p not in self.model]
        rid = data.draw(st.integers(10**9, 2**64 - 1))  # never collides with the driver's ids
        msg: m.Message
        if what == "duplicate":
            p = data.draw(st.sampled_from(free)) if free else None
            if p is None:
                return
            msg = m.Inflate(id=rid, pfns=P.pfns_to_wire([p, p]))
        elif what == "out_of_range":
            msg = m.Inflate(id=rid, pfns=P.pfns_to_wire([0, data.draw(st.integers(n, 2**32 - 1))]))
        elif what == "already_ballooned":
            if not self.model:
                return
            pfn = data.draw(st.sampled_from(sorted(self.model)))
            msg = m.Inflate(id=rid, pfns=P.pfns_to_wire([pfn]))
        elif what == "not_ballooned":
            if not free:
                return
            msg = m.Deflate(id=rid, pfns=P.pfns_to_wire([data.draw(st.sampled_from(free))]))
        elif what == "runs_no_ranges":
            if self.has(Feature.RANGES) or not free:
                return
            msg = m.Inflate(id=rid, runs=P.runs_to_wire([(free[0], 1)]))
        elif what == "empty_pfns":
            msg = data.draw(st.sampled_from([m.Inflate, m.Deflate]))(id=rid, pfns=b"")
        elif what == "empty_runs":
            msg = m.Inflate(id=rid, runs=b"")
        elif what == "zero_run":
            msg = m.Inflate(id=rid, runs=P.runs_to_wire([(0, 0)]))
        elif what == "report_no_reporting":
            if self.has(Feature.PAGE_REPORTING) or not free:
                return
            msg = m.Report(id=rid, runs=P.runs_to_wire([(free[0], 1)]))
        else:
            first = data.draw(st.integers(0, n - 1))
            msg = m.Deflate(id=rid, runs=P.runs_to_wire([(first, n - first + 1)]))
        pages, runs = _pages_of(msg)
        assert model_check(msg.TYPE, pages, runs, self.model, n, self.features) is not None
        self.to_device.append(_Frame(encode_frame(msg.to_wire()), raw=True))
        self._deliver_one_to_device()

    # ------------------------------------------------------------------ host rules

    @rule(pages=st.integers(0, 250))
    def set_target(self, pages: int) -> None:
        if pages > self.guest_pages:
            queued = len(self.to_driver)
            try:
                self.device.set_target(pages)
            except LocalProtocolError as err:
                assert err.code is ErrorCode.BAD_FIELD
            else:  # pragma: no cover
                raise AssertionError("target beyond guest RAM accepted")
            assert self.device.target == self.model_target
            assert self.device.data_to_send() == b"" and len(self.to_driver) == queued
            return
        self.device.set_target(pages)
        self.model_target = pages
        self.to_driver += self.device.data_to_send()

    @rule()
    def request_stats(self) -> None:
        sent = self.device.request_stats()
        assert sent == self.has(Feature.STATS_VQ)
        if sent:
            self.stats_requested += 1
        self.to_driver += self.device.data_to_send()

    # ------------------------------------------------------------------ delivery

    @precondition(lambda self: bool(self.to_device))
    @rule(refuse=st.integers(0, 7))
    def deliver_to_device(self, refuse: int) -> None:
        self._deliver_one_to_device(refuse=refuse == 0)

    @precondition(lambda self: bool(self.to_driver))
    @rule()
    def deliver_to_driver(self) -> None:
        self._deliver_to_driver()

    @rule()
    def settle(self) -> None:
        """Deliver everything both ways; then both ends must agree exactly."""
        while self.to_device or self.to_driver:
            while self.to_device:
                self._deliver_one_to_device()
            if self.to_driver:
                self._deliver_to_driver()
        assert not self.expect_ack and not self.driver.outstanding
        assert self.driver.target == self.model_target
        assert self.stats_requested == 0

    # ------------------------------------------------------------------ garbage

    @rule(garbage=st.binary(min_size=1, max_size=64), prefix=st.booleans())
    def garbage_on_fresh_pair(self, garbage: bytes, prefix: bool) -> None:
        """Garbage on a fresh connection pair: a protocol error there, no harm here."""
        dev = self.make_device(vm=VM, guest_pages=self.guest_pages)
        drv = self.make_driver(vm=VM, features=self.offered)
        before = self.device.ballooned.copy()
        if prefix:  # after a good handshake
            dev.receive_data(drv.hello())
            dev.next_event()
            drv.receive_data(dev.data_to_send())
            drv.next_event()
        dev.receive_data(garbage)
        dev.receive_data(b"")
        for _ in range(100):
            try:
                ev = dev.next_event()
            except RemoteProtocolError:
                assert dev.state is State.ERROR
                err = dev.data_to_send()
                if err:  # the error frame reaches the driver as a clean 'error' event
                    drv.receive_data(err)
                    try:
                        assert drv.next_event().TYPE == "error"
                        assert drv.state is State.CLOSED
                    except RemoteProtocolError:  # a driver still in START refuses it
                        assert drv.state is State.ERROR
                break
            if ev is NEED_DATA or ev is CLOSED:
                break
            if dev.in_progress is not None:
                dev.complete(dev.in_progress.id)  # type: ignore[attr-defined]
        assert np.array_equal(self.device.ballooned, before)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def device_matches_model(self) -> None:
        if not hasattr(self, "device"):
            return
        got = np.flatnonzero(self.device.ballooned).tolist()
        assert got == sorted(self.model)
        assert self.device.balloon_pages == len(self.model) == P.count_set(self.device.ballooned)

    @invariant()
    def bounds(self) -> None:
        if not hasattr(self, "device"):
            return
        assert self.device.actual <= self.guest_pages
        assert self.device.target <= self.guest_pages
        assert self.device.state is State.OPEN and self.driver.state is State.OPEN

    @invariant()
    def views_agree_when_quiescent(self) -> None:
        if not hasattr(self, "device") or self.to_device or self.to_driver:
            return
        assert not self.driver.outstanding
        assert self._pages_in_state(PG_BALLOONED) == sorted(self.model)
        assert self.driver.balloon_pages == self.device.balloon_pages
        assert self._pages_in_state(PG_NONE) == [p for p in range(self.guest_pages)
                                                 if p not in self.model]
