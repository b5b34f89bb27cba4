"""A stateful property test of the whole host path against a plain model.

Two VMs overcommit a small host (host swap in play); random rules write pages through the
guest's vCPU view, inflate, deflate, report and send invalid batches over the real sockets.
The model is, per VM, the last bytes written to each page and the balloon set. After every
step: frames in use == Σ resident memfd pages, the ledger's invariants hold, and every page
reads back what the model says (zeros after inflate/deflate or report).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from hv_peers import Lab, topo
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

PAGES = 24
VMS = ("a", "b")
pages_st = st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=10, unique=True)


class HostModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lab = Lab(topo(32, 48, {v: PAGES for v in VMS}))
        self.call(self.lab.__aenter__())
        self.g = {v: self.call(self.lab.guest(v)) for v in VMS}
        self.d = {v: self.call(self.lab.driver(v)) for v in VMS}
        self.data = {v: {} for v in VMS}  # page -> last 8 bytes written
        self.balloon: dict[str, set[int]] = {v: set() for v in VMS}
        self.counter = 0

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def teardown(self) -> None:
        try:
            self.call(self.lab.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    @rule(vm=st.sampled_from(VMS), pages=pages_st)
    def write(self, vm, pages):
        pages = [p for p in pages if p not in self.balloon[vm]]

        async def go():
            for p in pages:
                self.counter += 1
                val = self.counter.to_bytes(8, "little")
                await self.g[vm].write(p, val)
                self.data[vm][p] = val
        self.call(go())

    @rule(vm=st.sampled_from(VMS), pages=pages_st)
    def inflate(self, vm, pages):
        pages = [p for p in pages if p not in self.balloon[vm]]
        if not pages:
            return
        res = self.lab.host.vms[vm].mem.resident_pages()
        backed = sum(1 for p in pages if self.lab.host.vms[vm].led.p2m[p] >= 0)
        ack = self.call(self.d[vm].inflate(pages))
        assert ack.ok, ack
        assert self.lab.host.vms[vm].mem.resident_pages() == res - backed
        self.balloon[vm] |= set(pages)
        for p in pages:
            self.data[vm].pop(p, None)

    @precondition(lambda self: any(self.balloon.values()))
    @rule(data=st.data())
    def deflate(self, data):
        vm = data.draw(st.sampled_from([v for v in VMS if self.balloon[v]]))
        pages = data.draw(st.lists(st.sampled_from(sorted(self.balloon[vm])), min_size=1,
                                   unique=True))
        assert self.call(self.d[vm].deflate(pages)).ok
        self.balloon[vm] -= set(pages)

    @rule(vm=st.sampled_from(VMS), pages=pages_st)
    def report(self, vm, pages):
        pages = [p for p in pages if p not in self.balloon[vm]]
        if not pages:
            return
        assert self.call(self.d[vm].report(pages)).ok
        for p in pages:
            self.data[vm].pop(p, None)

    @rule(vm=st.sampled_from(VMS), pages=pages_st)
    def invalid_deflate_changes_nothing(self, vm, pages):
        bad = [p for p in pages if p not in self.balloon[vm]]
        if not bad:
            return
        before = self.lab.host.vms[vm].led.p2m.copy()
        # Bypass the driver's own checks: write the frame and read the raw ack.
        from protocol import messages as m
        from protocol import pfn as P

        async def go():
            d = self.d[vm]
            mid = 10_000 + self.counter
            self.counter += 1
            fut = asyncio.get_running_loop().create_future()
            d._acks[mid] = fut
            d.conn._requests[mid] = (m.Deflate(id=mid, pfns=P.pfns_to_wire(bad)),
                                     np.asarray(bad, dtype=np.int64))
            d.conn._pending[mid] = "deflate"
            d.ch.writer.write(_frame(
                {"t": "deflate", "id": mid, "pfns": P.pfns_to_wire(bad)}))
            return await fut
        ack = self.call(go())
        # The driver state machine marks a refused deflate's pages "ballooned" (its own
        # model of a legal refusal); these pages never were, so put its view back.
        self.d[vm].conn._page[np.asarray(bad)] = 0
        assert not ack.ok and ack.code == "not_ballooned"
        assert np.array_equal(before, self.lab.host.vms[vm].led.p2m)

    @rule(wa=pages_st, wb=pages_st, inflate=pages_st,
          delay=st.sampled_from([0.0, 0.002, 0.02]))
    def concurrent_burst(self, wa, wb, inflate, delay):
        """Both guests write while A's driver inflates, shootdowns answered ``delay`` s
        late: the host's reclaims wait for acks without its lock, so these interleave."""
        wa = [p for p in wa if p not in self.balloon["a"]]
        wb = [p for p in wb if p not in self.balloon["b"]]
        inflate = [p for p in inflate if p not in self.balloon["a"] and p not in wa]
        vals = {}
        for vm, pages in (("a", wa), ("b", wb)):
            for p in pages:
                self.counter += 1
                vals[vm, p] = self.counter.to_bytes(8, "little")

        async def writes(vm, pages):
            for p in pages:
                await self.g[vm].write(p, vals[vm, p])

        async def go():
            jobs = [writes("a", wa), writes("b", wb)]
            if inflate:
                jobs.append(self.d["a"].inflate(inflate))
            return await asyncio.gather(*jobs)

        for g in self.g.values():
            g.ack_delay = delay
        try:
            out = self.call(go())
        finally:
            for g in self.g.values():
                g.ack_delay = 0.0
        if inflate:
            assert out[2].ok, out[2]
            self.balloon["a"] |= set(inflate)
            for p in inflate:
                self.data["a"].pop(p, None)
        for (vm, p), val in vals.items():
            self.data[vm][p] = val

    @rule(vm=st.sampled_from(VMS))
    def verify_all(self, vm):
        async def go():
            g = self.g[vm]
            for p in range(PAGES):
                if p in self.balloon[vm]:
                    continue
                got = await g.read(p, 8)
                assert got == self.data[vm].get(p, b"\0" * 8), (vm, p)
        self.call(go())

    @invariant()
    def conserved(self):
        async def go():
            async with self.lab.host.mm_lock:
                self.lab.host.check_conservation()
                for v in VMS:
                    vm = self.lab.host.vms[v]
                    assert set(np.nonzero(vm.led.balloon)[0].tolist()) == self.balloon[v]
                    # What is present reads back as the model says (no fault needed).
                    g = self.g[v]
                    for p, val in self.data[v].items():
                        if g.ept[p]:
                            assert bytes(g.ram[p * 4096:p * 4096 + 8]) == val, (v, p)
        self.call(go())


def _frame(payload):
    from protocol.framing import encode_frame
    return encode_frame(payload)


TestHostModel = HostModel.TestCase
TestHostModel.settings = settings(max_examples=50, stateful_step_count=25, deadline=None)
