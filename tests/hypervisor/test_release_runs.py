"""The balloon release path stays in runs: a batch the device accepted reaches the host as
runs, is punched once per contiguous run (whether its pages are backed, swapped or never
touched) and costs the batch, not the VM (real host, real sockets, in-test peers)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import tracemalloc

import numpy as np
from hv_peers import Lab, check_stamps, run, topo

from hypervisor.memory import OFFLOAD_PAGES
from protocol import messages as m
from protocol import pfn as P
from protocol import syscalls


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


# ------------------------------------------------------------------ several VMs at once

BIG = OFFLOAD_PAGES + 512  # a batch punched on a worker thread


async def _queued(lab: Lab, n: int) -> None:
    """Wait until ``n`` batches wait for their release round (the test holds the lock)."""
    while lab.host.memory.releases_queued < n:
        await asyncio.sleep(0.005)


def _spy_threads(vm) -> list[int]:
    """Record the thread each punch of ``vm`` runs on (the real punch runs)."""
    seen: list[int] = []
    punch = vm.mem.punch_runs

    def spy(runs):
        seen.append(threading.get_ident())
        return punch(runs)
    vm.mem.punch_runs = spy
    return seen


def test_batches_of_several_vms_are_released_in_one_round_on_worker_threads():
    """Three VMs' inflates waiting at once are released together, in one hold of the
    memory lock; batches this large are punched off the event loop's thread."""
    names = ("a", "b", "c")

    async def main():
        async with Lab(topo(3 * BIG, 0, {n: BIG for n in names})) as lab:
            guests = {n: await lab.guest(n) for n in names}
            drivers = {n: await lab.driver(n) for n in names}
            for g in guests.values():
                await g.touch(np.arange(BIG), stamp=False)
            await lab.quiesce()
            threads = {n: _spy_threads(lab.host.vms[n]) for n in names}
            rounds, batches = lab.host.releases
            async with lab.host.mm_lock:  # nothing is released until all three wait
                tasks = [asyncio.create_task(drivers[n].inflate(np.arange(BIG))) for n in names]
                await _queued(lab, 3)
            acks = await asyncio.gather(*tasks)
            assert all(a.ok for a in acks), acks
            assert lab.host.releases == (rounds + 1, batches + 3)
            loop_thread = threading.get_ident()
            for n in names:
                vm = lab.host.vms[n]
                assert len(threads[n]) == 1 and threads[n][0] != loop_thread
                assert vm.mem.resident_pages() == 0 and vm.led.backed == 0
                assert not guests[n].ept.any()
            assert lab.host.ledger.frames_free == lab.host.ledger.frames_total
            await lab.quiesce()
    run(main())


def test_a_cancelled_caller_never_stops_a_release_half_way():
    """The caller of a release is cancelled while its batch waits for the lock: the batch is
    still released whole, and frames, EPT and memfd agree."""
    async def main():
        async with Lab(topo(BIG, 0, {"a": BIG})) as lab:
            g = await lab.guest("a")
            await g.touch(np.arange(BIG), stamp=False)
            await lab.quiesce()
            vm = lab.host.vms["a"]
            async with lab.host.mm_lock:
                task = asyncio.create_task(
                    lab.host.release_pages(vm, np.array([[0, BIG]], dtype=np.int64)))
                await _queued(lab, 1)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await lab.quiesce()  # conservation: frames in use == resident pages
            assert vm.led.backed == 0 and vm.mem.resident_pages() == 0
            assert not g.ept.any()
    run(main())


def test_a_failed_punch_in_a_shared_round_refuses_only_its_batch():
    """Two VMs' batches in one round, the first punch call fails (whichever VM's it is):
    that batch is refused with its pages kept, the other is released, nothing is lost."""
    async def main():
        async with Lab(topo(2 * BIG, 0, {"a": BIG, "b": BIG})) as lab:
            guests = {n: await lab.guest(n) for n in "ab"}
            drivers = {n: await lab.driver(n) for n in "ab"}
            for g in guests.values():
                await g.touch(np.arange(BIG))
            await lab.quiesce()
            syscalls.install("memfd.punch@1=EIO")
            try:
                async with lab.host.mm_lock:
                    tasks = [asyncio.create_task(drivers[n].inflate(np.arange(BIG)))
                             for n in "ab"]
                    await _queued(lab, 2)
                acks = dict(zip("ab", await asyncio.gather(*tasks)))
            finally:
                syscalls.clear()
            failed = [n for n, a in acks.items() if not a.ok]
            assert len(failed) == 1, acks
            bad, good = failed[0], "b" if failed[0] == "a" else "a"
            assert lab.host.vms[good].mem.resident_pages() == 0
            assert lab.host.vms[bad].mem.resident_pages() == BIG
            assert guests[bad].ept.all()
            await lab.quiesce()
            await check_stamps(lab, {bad: list(range(BIG))})
    run(main())
