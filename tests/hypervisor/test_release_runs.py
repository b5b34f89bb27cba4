"""The balloon release path stays in runs: a batch the device accepted reaches the host as
runs, is punched once per contiguous run (whether its pages are backed, swapped or never
touched) and costs the batch, not the VM (real host, real sockets, in-test peers)."""

from __future__ import annotations

import tracemalloc

import numpy as np
from hv_peers import Lab, run, topo

from protocol import messages as m
from protocol import pfn as P


def test_one_punch_per_contiguous_run_of_the_batch_backed_or_not():
    async def main():
        async with Lab(topo(256, 0, {"a": 128})) as lab:
            g = await lab.guest("a")
            d = await lab.driver("a")
            # Backed: 0-9 and 20-29; 10-19 never touched. The batch is one run of 30 pages,
            # sent as three runs out of order: one punch, 20 frames released.
            await g.touch(np.r_[np.arange(10), np.arange(20, 30)])
            await lab.quiesce()
            vm = lab.host.vms["a"]
            calls = vm.mem.punch_calls
            ack = await d._request(_inflate(d, [[20, 10], [0, 10], [10, 10]]))
            assert ack.ok, ack
            assert vm.mem.punch_calls - calls == 1
            assert vm.balloon.metrics.released_frames == 20
            assert vm.balloon.metrics.inflated == 30 and vm.balloon.balloon_pages == 30
            assert vm.mem.resident_pages() == 0 and not g.ept[:30].any()
            # pfns in any order (the virtio wire) coalesce the same way: 2 runs, 2 punches.
            await g.touch(np.arange(40, 50))
            await lab.quiesce()
            calls = vm.mem.punch_calls
            ack = await d.inflate(np.array([45, 40, 41, 49, 42, 43, 44, 48]), runs=False)
            assert ack.ok, ack
            assert vm.mem.punch_calls - calls == 2
            assert vm.mem.resident_pages() == 2  # 46 and 47 stay
            await lab.quiesce()
    run(main())


def _inflate(d, runs):
    return m.Inflate(id=d.conn.new_id(), runs=P.runs_to_wire(np.array(runs, dtype=np.uint64)))


def test_a_batch_costs_the_batch_not_the_vm():
    """An 8 GiB guest (sparse): inflating a few runs allocates far less than one byte per
    guest page (2 MiB), from the socket to the ack, in the host's own process."""
    pages = 1 << 21

    async def main():
        async with Lab(topo(pages, 0, {"a": pages})) as lab:
            g = await lab.guest("a")
            d = await lab.driver("a")
            vm = lab.host.vms["a"]
            await g.touch(np.r_[np.arange(64), np.arange(pages - 64, pages)])
            await lab.quiesce()
            assert (await d.inflate(np.arange(0, 8))).ok  # warm: kernels loaded
            tracemalloc.start()
            try:
                ack = await d.inflate(np.r_[np.arange(8, 64), np.arange(pages - 64, pages)])
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert ack.ok, ack
            assert vm.mem.resident_pages() == 0
            assert peak < 512 * 1024, f"{peak} bytes allocated to inflate 120 pages"
            await lab.quiesce()
    run(main())
