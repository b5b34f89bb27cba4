"""The pathologies of host swapping, provoked one by one in the guest's memory manager, and
the same memory pressure applied through the balloon instead, which avoids them.

The "host" is a few lines over a real memfd: it takes pages to its "swap" (keeping their
bytes, wiping the page), gives them back on ``ensure_present`` and says which it read back
(``resume``'s ``swapped``), and releases ballooned pages as the real host does (no copy).
"""

from __future__ import annotations

import asyncio
import os

import numpy as np

from guest.mm import MemoryManager, SwapDevice
from guest.workloads import Workload, WorkloadSpec
from hypervisor.pathologies import crossed, guest_events
from protocol.features import StatTag
from tests.guest.test_mm import MiniHost

PAGE = 4096


class SwappingHost(MiniHost):
    """:class:`MiniHost` that zeroes what it backs fresh, says which pages it read back from
    its "swap" and releases ballooned pages."""

    def __init__(self, pages: int) -> None:
        super().__init__(pages)
        self.reads = 0  # pages read back from "host swap"

    async def ensure_present(self, gpfns: np.ndarray) -> np.ndarray:
        read = []
        for g in np.asarray(gpfns).tolist():
            if self.ept[g]:
                continue
            data = self.held.pop(g, None)
            if data is not None:
                os.pwrite(self.fd, data, g * PAGE)
                read.append(g)
            else:
                os.pwrite(self.fd, bytes(PAGE), g * PAGE)
            self.ept[g] = 1
        self.reads += len(read)
        return np.array(read, np.int64)

    def swap_out(self, gpfns: np.ndarray) -> int:
        """Host swap-out at a safe point (:meth:`MiniHost.host_take`); the pages taken."""
        before = int(self.ept.sum())
        self.host_take(gpfns)
        return before - int(self.ept.sum())

    def release(self, gpfns: np.ndarray) -> None:
        """A balloon inflate: the pages are dropped, nothing is kept."""
        for g in np.asarray(gpfns).tolist():
            self.ept[g] = 0
            self.held.pop(g, None)
            os.pwrite(self.fd, b"\xee" * PAGE, g * PAGE)


def make(tmp_path, pages: int = 512, swap_pages: int = 2048):
    host = SwappingHost(pages)
    swap = SwapDevice(str(tmp_path / "vm.guest-swap"), swap_pages * PAGE)
    mm = MemoryManager(host.ram, host.ept, host.acc, swap, ensure_present=host.ensure_present)
    return host, mm


async def write_all(mm: MemoryManager, tid: int, pages: int, seed: int = 1):
    """A task that writes each of its ``pages`` pages once."""
    t = mm.add_task(tid, pages)
    spec = WorkloadSpec(workload="scan", size=pages * PAGE, write_ratio=1.0)
    res = await mm.run_quantum(t, *Workload(spec, seed).quantum(pages, 0.0))
    assert not res.killed and res.corrupted == 0
    return t


def balloon_inflate(host: SwappingHost, mm: MemoryManager, pages: int) -> np.ndarray:
    """What the driver and the host do for an inflate: reclaim once, take free pages into
    the balloon, the host drops them."""
    runs = mm.balloon_alloc(pages, 9)
    g = np.concatenate([np.arange(s, s + n) for s, n in runs.tolist()])
    host.release(g)
    return runs


# -------------------------------------------------------------------------- double paging


def test_double_paging_counts_host_swapped_pages_the_guest_swaps_out(tmp_path) -> None:
    host, mm = make(tmp_path)

    async def main():
        t = await write_all(mm, 0, 300)
        mine = t.pt[t.pt >= 0]
        assert host.swap_out(mine[:100]) == 100  # the host swaps a third of them
        reads = host.reads
        # The guest, short of memory, swaps out all of the task's pages.
        done = await mm.reclaim(300, direct=False)
        assert done == 300
        return host.reads - reads

    read_for_reclaim = asyncio.run(main())
    # Exactly the pages the host had swapped were read back only to be written again.
    assert read_for_reclaim == 100
    assert mm.stats.double_paging == 100
    assert mm.stats.false_swap_reads == 0
    assert mm.stats_map()[StatTag.DOUBLE_PAGING] == 100
    mm.check_invariants()


def test_double_paging_under_load_and_none_when_the_balloon_takes_the_memory(tmp_path) -> None:
    """The same pressure twice: 150 pages of a 512-page guest go to the host, by host swap
    and by the balloon; then a second task needs more than is left, so the guest reclaims."""

    async def scenario(by_balloon: bool, path) -> MemoryManager:
        host, mm = make(path)
        t = await write_all(mm, 0, 250)
        if by_balloon:
            await mm.balloon_reclaim(150)
            balloon_inflate(host, mm, 150)
        else:
            host.swap_out(t.pt[t.pt >= 0][:150])
        b = mm.add_task(1, 240)
        spec = WorkloadSpec(workload="uniform", size=240 * PAGE, write_ratio=0.5)
        wl = Workload(spec, 3)
        for q in range(10):
            res = await mm.run_quantum(b, *wl.quantum(2000, float(q)))
            assert not res.killed and res.corrupted == 0
            await mm.kswapd()
        mm.check_invariants()
        return mm

    os.makedirs(tmp_path / "h")
    os.makedirs(tmp_path / "b")
    swapped = asyncio.run(scenario(False, tmp_path / "h"))
    ballooned = asyncio.run(scenario(True, tmp_path / "b"))
    assert swapped.stats.swap_out > 0 and ballooned.stats.swap_out > 0  # both under pressure
    assert swapped.stats.double_paging > 0
    assert ballooned.stats.double_paging == 0
    assert ballooned.stats.false_swap_reads == 0
    assert ballooned.balloon_pages == 150


# -------------------------------------------------------------------------- false reads


def test_false_reads_when_freed_host_swapped_pages_are_reused(tmp_path) -> None:
    host, mm = make(tmp_path)

    async def main():
        a = await write_all(mm, 0, 200)
        taken = a.pt[a.pt >= 0].copy()
        assert host.swap_out(taken) == 200
        mm.remove_task(0)  # the guest frees them; the host still holds their old bytes
        b = await write_all(mm, 1, 200, seed=2)  # zeroes each new page before using it
        return taken, b.pt[b.pt >= 0].copy()

    taken, reused = asyncio.run(main())
    overlap = int(np.isin(reused, taken).sum())
    assert overlap > 0  # the allocator handed the freed pages out again
    # Every one was read back from host swap and then zeroed whole: a false read each.
    assert mm.stats.false_swap_reads == overlap == host.reads
    assert mm.stats.double_paging == 0
    mm.check_invariants()


def test_false_read_into_a_guest_swap_in_target(tmp_path) -> None:
    """A guest swap-in overwrites its target page whole: when that free page's frame was
    host-swapped, reading it back was for nothing."""
    host, mm = make(tmp_path)

    async def main():
        a = await write_all(mm, 0, 50)
        assert await mm.reclaim(50, direct=False) == 50  # all of A to guest swap
        free_backed = np.flatnonzero((mm.buddy.state == 0) & (host.ept == 1))
        host.swap_out(free_backed)  # the host takes the guest's free (but backed) pages
        before = host.reads
        spec = WorkloadSpec(workload="scan", size=50 * PAGE, write_ratio=0.0)
        res = await mm.run_quantum(a, *Workload(spec, 1).quantum(50, 0.0))
        assert not res.killed and res.corrupted == 0
        return host.reads - before

    reads = asyncio.run(main())
    assert mm.stats.major_faults == 50
    assert reads > 0 and mm.stats.false_swap_reads == reads


def test_no_false_reads_when_the_balloon_took_the_freed_pages(tmp_path) -> None:
    host, mm = make(tmp_path)

    async def main():
        await write_all(mm, 0, 200)
        mm.remove_task(0)
        runs = balloon_inflate(host, mm, 200)  # the same 200 pages' worth, by the balloon
        mm.balloon_free(runs)  # deflate: the guest may use them again
        await write_all(mm, 1, 200, seed=2)

    asyncio.run(main())
    assert host.reads == 0
    assert mm.stats.false_swap_reads == 0 and mm.stats.double_paging == 0
    mm.check_invariants()


def test_modelled_time_charges_the_host_swap_reads_the_host_reports(tmp_path) -> None:
    """A false read costs a host swap read, not a zeroing: the host's word decides."""
    host, mm = make(tmp_path)
    c = mm.cost

    async def main():
        a = await write_all(mm, 0, 64)
        host.swap_out(a.pt[a.pt >= 0])
        mm.remove_task(0)
        return await write_all(mm, 1, 64, seed=2)

    b = asyncio.run(main())
    n = mm.stats.false_swap_reads
    assert n > 0
    fresh = 64 - n
    want = (c.accesses(64) + c.minor_faults(64) + c.ept_exit_cost(fresh, n))
    assert b.modelled_ns == want


def test_host_swap_writes_an_exit_waited_for_are_charged_to_its_task(tmp_path) -> None:
    """``resume``'s ``evicted``: the host wrote victims to its swap before it could back
    the exit; the task whose exit it was pays those writes, once."""
    host, mm = make(tmp_path)
    c = mm.cost
    dev = c.host_swap
    # The formula: one latency per write, the pages at the device's bandwidth.
    assert c.host_swap_writes(0, 0) == 0
    assert c.host_swap_writes(16, 1) == dev.io_ns(16)
    assert c.host_swap_writes(16, 3) == dev.io_ns(16) + 2 * dev.latency_ns
    assert c.host_swap_writes(16, 0) == dev.io_ns(16)  # a host that says no count: one

    plain = asyncio.run(write_all(mm, 0, 32)).modelled_ns

    async def waited():
        mm.note_host_evicted(40, 2)  # as the kernel does on such a resume
        return await write_all(mm, 1, 32, seed=2)

    t = asyncio.run(waited())
    assert t.modelled_ns == plain + c.host_swap_writes(40, 2)
    assert mm.stats.host_evicted_waited == 40 and mm.host_evicted == [0, 0]
    again = asyncio.run(write_all(mm, 2, 32, seed=3))  # charged once, not again
    assert again.modelled_ns == plain


# -------------------------------------------------------------------------- page-cache hooks


def test_stale_reads_hook_counts_host_swap_reads_a_disk_read_overwrites(tmp_path) -> None:
    host, mm = make(tmp_path)

    async def main():
        a = await write_all(mm, 0, 40)
        g = a.pt[a.pt >= 0].copy()
        host.swap_out(g[:25])
        mm.remove_task(0)
        # The page cache reads disk blocks into these (free, now its) pages.
        await mm.back_for_overwrite(None, g, stale=True)
        return g

    g = asyncio.run(main())
    assert np.all(host.ept[g] == 1)
    assert mm.stats.stale_swap_reads == 25 and mm.stats.false_swap_reads == 0
    assert mm.stats_map()[StatTag.STALE_SWAP_READS] == 25


def test_silent_writes_hook_counts_clean_cache_pages_the_host_revokes(tmp_path) -> None:
    host, mm = make(tmp_path)
    assert mm.stats.silent_swap_writes == 0 and mm.stats_map()[StatTag.SILENT_SWAP_WRITES] == 0
    mm.clean_cache[10:20] = 1  # the page cache: these hold unmodified disk blocks
    assert mm.host_revoked(np.arange(0, 15)) == 5
    mm.clean_cache[12] = 0  # dirtied
    assert mm.host_revoked(np.array([11, 12, 13, 600])) == 2  # beyond RAM: ignored
    assert mm.stats.silent_swap_writes == 7


# -------------------------------------------------------------------------- events


def test_pathology_events_at_powers_of_two_only() -> None:
    assert [n for n in range(1, 40) if crossed(n - 1, n)] == [1, 2, 4, 8, 16, 32]
    assert crossed(0, 1000) and not crossed(1000, 1000) and crossed(5, 8)
    assert crossed(1000, 3)  # a restarted guest counts again from 0
    got: list[tuple] = []
    guest_events("a", {}, {int(StatTag.DOUBLE_PAGING): 3}, lambda *a, **k: got.append((a, k)))
    guest_events("a", {int(StatTag.DOUBLE_PAGING): 3}, {int(StatTag.DOUBLE_PAGING): 3,
                                                        int(StatTag.FALSE_SWAP_READS): 0},
                 lambda *a, **k: got.append((a, k)))
    assert got == [(("pathology", "a"), {"counter": "double_paging", "pages": 3,
                                         "source": "guest"})]
