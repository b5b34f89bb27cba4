"""The host's side of the pathologies: its swap reads and their sequentiality, the pages it
names in ``resume`` and ``shootdown``, and the counters in dommemstat, host_info, events and
/metrics. A running Host with in-test peers over the real sockets."""

from __future__ import annotations

import asyncio

import numpy as np
from hv_peers import Lab, run, topo
from test_metrics import dom, scrape, with_metrics

from hypervisor.hostswap import noncontiguous
from protocol.features import StatTag

PAGE = 4096
WAIT = 20.0  # bounds a hang only


def test_noncontiguous_counts_slots_that_do_not_follow_the_previous_one():
    assert noncontiguous(np.array([], np.int64)) == 0
    assert noncontiguous(np.array([7])) == 0
    assert noncontiguous(np.arange(10, 20)) == 0
    assert noncontiguous(np.array([3, 4, 9, 10, 2])) == 2
    assert noncontiguous(np.array([0, 2, 4, 6])) == 3


def test_host_swap_reads_sequential_then_decayed_and_what_the_guest_is_told():
    async def main():
        async with Lab(with_metrics(topo(16, 64, {"a": 32, "b": 32}))) as lab:
            host = lab.host
            a, b = await lab.guest("a"), await lab.guest("b")
            await a.touch(np.arange(16))
            await lab.quiesce()
            await b.touch(np.arange(16))  # all of A's 16 frames go to host swap, in order
            await lab.quiesce()
            va = host.vms["a"]
            assert va.led.swapped == 16
            # B's faults waited for the host to write A's 16 pages to its swap, and their
            # resumes say so (pages, writes): the guest charges those writes to the task.
            assert a.resumed_evicted and all(e == (None, None) for e in a.resumed_evicted)
            ev_pages = sum(p or 0 for p, _ in b.resumed_evicted)
            ev_ios = sum(n or 0 for _, n in b.resumed_evicted)
            assert ev_pages == va.host_swap_out == 16
            assert 1 <= ev_ios <= ev_pages
            assert all((p is None) == (n is None) for p, n in b.resumed_evicted)
            # The shootdown named the pages it revoked (for the guest's page cache).
            named = np.concatenate([p for p in a.shootdown_pfns if p is not None])
            assert sorted(named.tolist()) == list(range(16))
            # One fault of every other page: 8 reads, each a seek past the one before.
            a.resumed_swapped.clear()
            await a.fault(np.arange(0, 16, 2))
            await lab.quiesce()
            assert va.host_swap_in == 8 and va.host_swap_reads_noncontig == 7
            assert a.resumed_swapped[-1] is not None
            assert a.resumed_swapped[-1].tolist() == list(range(0, 16, 2))
            # The other eight in one fault: their slots are not consecutive either (every
            # other slot was read and freed), so 7 more.
            await a.fault(np.arange(1, 16, 2))
            await lab.quiesce()
            assert va.host_swap_in == 16 and va.host_swap_reads_noncontig == 14
            # A fault of pages never swapped: the host says it read nothing.
            await a.fault([20, 21])
            assert a.resumed_swapped[-1] is not None and a.resumed_swapped[-1].size == 0

            st = host.control.dommemstat({"vm": "a"})
            assert st["host_swap_reads"] == 16 and st["host_swap_reads_noncontig"] == 14
            assert st["host_swap_noncontig_ratio"] == 14 / 16
            assert st["double_paging"] is None  # the guest reported nothing yet
            info = host.control.host_info({})
            assert info["host_swap_reads"] == host.memory.swap_reads >= 16
            assert info["host_swap_reads_noncontig"] == host.memory.swap_reads_noncontig >= 14
            # Threshold events, not one per page: at 1+ (first fault: 7), then 8 and 14
            # cross 8 only.
            ev = [e for e in host.events if e["kind"] == "pathology" and e["vm"] == "a"]
            assert [e["pages"] for e in ev] == [7, 14]
            assert all(e["counter"] == "host_swap_reads_noncontig" for e in ev)
            m = await asyncio.to_thread(scrape, host.metrics_server.url)
            assert m[("balloonlab_host_swap_reads_pages_total", dom("a"))] == 16
            assert m[("balloonlab_host_swap_reads_noncontig_pages_total", dom("a"))] == 14
            assert m[("balloonlab_host_swap_reads_all_pages_total", ())] == \
                host.memory.swap_reads
            assert 0 < m[("balloonlab_host_swap_noncontig_ratio", ())] <= 1
    run(main())


def test_guest_pathology_counters_reach_dommemstat_events_and_metrics():
    async def main():
        async with Lab(with_metrics(topo(64, 16, {"a": 32}))) as lab:
            host = lab.host
            await lab.guest("a")
            d = await lab.driver("a")
            vm = host.vms["a"]
            d.stats = {int(StatTag.DOUBLE_PAGING): 5, int(StatTag.FALSE_SWAP_READS): 1,
                       int(StatTag.SILENT_SWAP_WRITES): 0, int(StatTag.STALE_SWAP_READS): 0}
            async with asyncio.timeout(WAIT):
                while vm.balloon.stats.get(int(StatTag.DOUBLE_PAGING)) != 5:
                    await asyncio.sleep(0.02)
            d.stats[int(StatTag.DOUBLE_PAGING)] = 6  # no power of two crossed: no event
            async with asyncio.timeout(WAIT):
                while vm.balloon.stats.get(int(StatTag.DOUBLE_PAGING)) != 6:
                    await asyncio.sleep(0.02)
            st = host.control.dommemstat({"vm": "a"})
            assert (st["double_paging"], st["false_swap_reads"], st["silent_swap_writes"],
                    st["stale_swap_reads"]) == (6, 1, 0, 0)
            assert st["host_swap_noncontig_ratio"] is None  # no host swap read yet
            info = host.control.host_info({})
            assert info["double_paging"] == 6 and info["false_swap_reads"] == 1
            ev = [(e["counter"], e["pages"]) for e in host.events if e["kind"] == "pathology"]
            assert ev == [("double_paging", 5), ("false_swap_reads", 1)]
            m = await asyncio.to_thread(scrape, host.metrics_server.url)
            assert m[("balloonlab_double_paging_pages_total", dom("a"))] == 6
            assert m[("balloonlab_false_swap_reads_pages_total", dom("a"))] == 1
            assert m[("balloonlab_silent_swap_writes_pages_total", dom("a"))] == 0
            assert m[("balloonlab_stale_swap_reads_pages_total", dom("a"))] == 0
    run(main())
