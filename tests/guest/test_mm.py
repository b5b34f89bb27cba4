"""Memory manager under pressure, in one process: guest swap, reclaim, host double paging,
OOM, working-set shrink and the balloon list.

The "host" here is a few lines over real memfds: ``ensure_present`` backs pages (restoring
bytes it took away), and ``host_take`` revokes pages between quanta (a safe point)."""

from __future__ import annotations

import asyncio
import mmap
import os

import numpy as np
import pytest

from guest import kernels as K
from guest.mm import MemoryManager, OutOfPuff, RunError, SwapDevice
from guest.workloads import Workload, WorkloadSpec

PAGE = 4096


class MiniHost:
    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.fd = os.memfd_create("ram")
        os.ftruncate(self.fd, pages * PAGE)
        self.map = mmap.mmap(self.fd, pages * PAGE)
        self.ram = np.frombuffer(self.map, np.uint64)
        self.ept = np.zeros(pages, np.uint8)
        self.acc = np.zeros(pages, np.uint8)
        self.held: dict[int, bytes] = {}
        self.faulted = 0

    async def ensure_present(self, gpfns: np.ndarray) -> None:
        for g in np.asarray(gpfns).tolist():
            if self.ept[g]:
                continue
            data = self.held.pop(g, None)
            if data is not None:
                os.pwrite(self.fd, data, g * PAGE)
            self.ept[g] = 1
            self.faulted += 1

    def host_take(self, gpfns: np.ndarray) -> None:
        """Host swap-out at a safe point: copy the bytes away, then wipe the page."""
        for g in np.asarray(gpfns).tolist():
            if self.ept[g]:
                self.ept[g] = 0
                self.held[g] = os.pread(self.fd, PAGE, g * PAGE)
                os.pwrite(self.fd, b"\xee" * PAGE, g * PAGE)  # garbage: must never be read


def make_mm(tmp_path, pages: int, swap_pages: int, oom_notify=None):
    host = MiniHost(pages)
    swap = SwapDevice(str(tmp_path / "vm.guest-swap"), swap_pages * PAGE)
    mm = MemoryManager(host.ram, host.ept, host.acc, swap, ensure_present=host.ensure_present,
                       oom_notify=oom_notify)
    return host, mm


async def run(mm: MemoryManager, tasks, quanta: int, n: int = 2000, host=None, rng=None,
              t: float = 0.0):
    for _ in range(quanta):
        for tm, wl in tasks:
            vpns, writes = wl.quantum(n, t)
            res = await mm.run_quantum(tm, vpns, writes)
            assert not res.killed
        await mm.kswapd()
        if host is not None and rng is not None:
            host.host_take(rng.integers(0, host.pages, 50))
        mm.check_invariants()


def test_swap_and_reclaim_under_pressure_keep_data(tmp_path) -> None:
    host, mm = make_mm(tmp_path, pages=512, swap_pages=2048)
    spec = WorkloadSpec(workload="uniform", size=900 * PAGE, write_ratio=0.5)
    tm = mm.add_task(0, spec.pages)
    asyncio.run(run(mm, [(tm, Workload(spec, 1))], quanta=40))
    s = mm.stats
    assert s.corrupted_reads == 0
    assert s.ops == 40 * 2000
    assert s.swap_out > 0 and s.swap_in > 0 and s.major_faults > 0
    assert s.direct_reclaim + s.async_reclaim == s.swap_out // PAGE
    assert mm.buddy.free_pages >= mm.wmark_min


def test_double_paging_host_swapped_pages_survive(tmp_path) -> None:
    """The host takes random pages away between quanta; guest reclaim must fault them back
    before writing them to guest swap, and reads must still see the right stamps."""
    host, mm = make_mm(tmp_path, pages=512, swap_pages=2048)
    spec = WorkloadSpec(workload="zipf", size=800 * PAGE, skew=0.7, write_ratio=0.4)
    tm = mm.add_task(0, spec.pages)
    asyncio.run(run(mm, [(tm, Workload(spec, 2))], quanta=40, host=host,
                    rng=np.random.default_rng(0)))
    assert mm.stats.corrupted_reads == 0
    assert mm.stats.ept_exits > 0 and host.faulted > 0


def test_corruption_is_detected(tmp_path) -> None:
    host, mm = make_mm(tmp_path, pages=256, swap_pages=0)
    spec = WorkloadSpec(workload="scan", size=16 * PAGE, write_ratio=1.0)
    tm = mm.add_task(0, spec.pages)
    asyncio.run(run(mm, [(tm, Workload(spec, 1))], quanta=1, n=16))
    g = int(tm.pt[3])
    mm.ram[g * 512] ^= np.uint64(0xFF)  # someone scribbles over a guest page
    rd = WorkloadSpec(workload="scan", size=16 * PAGE, write_ratio=0.0)
    asyncio.run(run(mm, [(tm, Workload(rd, 1))], quanta=1, n=16))
    assert mm.stats.corrupted_reads == 1


def test_oom_kills_largest_task_when_swap_is_gone(tmp_path) -> None:
    host, mm = make_mm(tmp_path, pages=1024, swap_pages=0)
    big = mm.add_task(0, 700)
    small = mm.add_task(1, 500)

    async def go():
        wl_big = Workload(WorkloadSpec(workload="scan", size=700 * PAGE), 1)
        r = await mm.run_quantum(big, *wl_big.quantum(700, 0))
        assert not r.killed
        wl_small = Workload(WorkloadSpec(workload="scan", size=500 * PAGE), 1)
        return await mm.run_quantum(small, *wl_small.quantum(500, 0))

    res = asyncio.run(go())
    assert not res.killed
    assert mm.stats.oom_kills == 1
    assert big.resident == 0 and (big.pt == -1).all() and (big.wcount == 0).all()
    assert small.resident == 500
    assert mm.stats.alloc_stalls > 0
    assert mm.stats.corrupted_reads == 0
    mm.check_invariants()


def test_deflate_on_oom_is_asked_before_killing(tmp_path) -> None:
    calls = []

    async def oom_notify(pages: int) -> bool:
        calls.append(pages)
        runs = mm.balloon_list()
        mm.balloon_free(runs[:1])  # the driver deflates some balloon pages
        return True

    host, mm = make_mm(tmp_path, pages=1024, swap_pages=0, oom_notify=oom_notify)
    ballooned = mm.balloon_alloc(600, 10)
    assert int(ballooned[:, 1].sum()) == 600
    tm = mm.add_task(0, 600)
    wl = Workload(WorkloadSpec(workload="scan", size=600 * PAGE), 1)
    res = asyncio.run(mm.run_quantum(tm, *wl.quantum(600, 0)))
    assert not res.killed
    assert calls and mm.stats.oom_kills == 0
    assert tm.resident == 600
    mm.check_invariants()


def test_working_set_shrink_frees_memory(tmp_path) -> None:
    host, mm = make_mm(tmp_path, pages=1024, swap_pages=256)
    tm = mm.add_task(0, 600)
    wl = Workload(WorkloadSpec(workload="scan", size=600 * PAGE), 1)
    before = mm.buddy.free_pages
    asyncio.run(mm.run_quantum(tm, *wl.quantum(600, 0)))
    assert mm.buddy.free_pages == before - 600
    assert mm.unmap_range(tm, 100, 600) == 500
    assert mm.buddy.free_pages == before - 100
    mm.remove_task(0)
    assert mm.buddy.free_pages == before
    # complete merging: the free lists hold what they held before the task ran
    mm.check_invariants()


def test_balloon_alloc_respects_low_watermark_and_free_checks(tmp_path) -> None:
    host, mm = make_mm(tmp_path, pages=4096, swap_pages=0)
    runs = mm.balloon_alloc(10**6 if False else 4096, 10)
    got = int(runs[:, 1].sum())
    assert got == mm.npages - mm.kernel_pages - mm.wmark_low
    assert mm.buddy.free_pages == mm.wmark_low
    with pytest.raises(OutOfPuff):
        mm.balloon_alloc(1, 0)
    assert mm.stats.out_of_puff == 1
    state = mm.buddy.state.copy()
    bad = np.array([[int(runs[0, 0]), 1], [int(mm.kernel_runs[0, 0]), 1]])
    with pytest.raises(RunError) as e:
        mm.balloon_free(bad)
    assert e.value.gpfn == int(mm.kernel_runs[0, 0])
    assert np.array_equal(state, mm.buddy.state)
    assert mm.balloon_free(runs) == got
    assert mm.balloon_pages == 0


def test_reporting_cycle(tmp_path) -> None:
    host, mm = make_mm(tmp_path, pages=4096, swap_pages=0)
    iso = mm.report_isolate(9, 100)
    assert len(iso) and (iso[:, 1] >= 512).all()
    assert mm.buddy.isolated_pages == int(iso[:, 1].sum())
    assert mm.balloon_alloc(100, 10) is not None  # isolated pages are not handed out
    assert not np.isin(mm.buddy.state[iso[0, 0]:iso[0, 0] + iso[0, 1]], [K.PG_BALLOON]).any()
    assert mm.report_done(iso) == int(iso[:, 1].sum())
    assert mm.buddy.reported_pages > 0
    assert len(mm.report_isolate(9, 100)) == 0 or mm.buddy.reported_pages > 0
    with pytest.raises(RunError):
        mm.report_done(iso)  # not isolated any more
