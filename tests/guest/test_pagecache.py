"""The guest page cache over a virtual disk, in one process: hits and misses, clean drops
without I/O, dirty writeback, reclaim's preference for cold file pages, stamps across
cache -> disk -> cache (with the host taking frames away), disk errors, the fileio
workload and the ``--config`` checks; the two page-cache kernels against their twins.

The disk is a real file; the "host" is tests/guest/test_mm.py's MiniHost over a memfd."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest import kernels as K
from guest.cost import CostModel
from guest.disk import DiskDevice, DiskError, contiguous_runs
from guest.kernel import ConfigError, parse_config
from guest.testing.naive import naive_cache_run, naive_cache_scan, naive_stamp
from guest.workloads import FILEIO_RUN, Workload, WorkloadSpec
from protocol import syscalls
from tests.guest.test_mm import make_mm

PAGE = 4096


def with_disk(tmp_path, pages: int, swap_pages: int, disk_blocks: int):
    host, mm = make_mm(tmp_path, pages, swap_pages)
    path = tmp_path / "vm.disk"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, disk_blocks * PAGE)
    os.close(fd)
    disk = DiskDevice(str(path), disk_blocks * PAGE)
    mm.attach_disk(disk)
    return host, mm, disk


def blocks(*b: int) -> np.ndarray:
    return np.array(b, np.int64)


def ones(n: int, v: int = 1) -> np.ndarray:
    return np.full(n, v, np.uint8)


def run(coro):
    return asyncio.run(coro)


def test_miss_reads_the_disk_then_hits_stay_in_the_cache(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 256, 64, 64)
    t = mm.add_task(0, 1)
    res = run(mm.run_file_quantum(t, blocks(5), ones(1, 0)))
    assert (res.ops, res.corrupted) == (1, 0)
    assert disk.read_calls == 1 and mm.cstats.misses == 1 and mm.cache_count == 1
    assert mm.stats.major_faults == 1
    res = run(mm.run_file_quantum(t, blocks(5, 5, 5), ones(3, 0)))
    assert res.ops == 3 and disk.read_calls == 1 and mm.cstats.misses == 1  # all hits
    mm.check_invariants()


def test_a_miss_reads_around_in_runs_of_contiguous_blocks(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 512, 64, 64)
    t = mm.add_task(0, 1)
    # blocks 10..17 and 30..33: two runs, so two preads for 12 blocks
    b = np.concatenate((np.arange(10, 18), np.arange(30, 34))).astype(np.int64)
    res = run(mm.run_file_quantum(t, b, ones(b.size, 0)))
    assert res.corrupted == 0 and mm.cstats.misses == 1 and mm.cstats.readahead == 11
    assert (disk.read_calls, mm.cstats.disk_read_pages) == (2, 12)
    cost = CostModel.from_table({})
    assert t.modelled_ns >= cost.disk.io_ns(8) + cost.disk.io_ns(4)


def test_clean_cache_marks_unmodified_copies_of_disk_blocks(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 256, 64, 64)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, blocks(1, 2), ones(2, 0)))  # read in: clean copies
    g1, g2 = int(mm.bmap[1]), int(mm.bmap[2])
    assert mm.clean_cache[g1] == mm.clean_cache[g2] == 1
    run(mm.run_file_quantum(t, blocks(2, 3), ones(2)))  # written (2), write-allocated (3)
    assert mm.clean_cache[g2] == 0 and mm.clean_cache[int(mm.bmap[3])] == 0
    mm.check_invariants()
    run(mm.cache_sync())  # written back: copies of the disk again
    assert mm.clean_cache[g2] == 1 and mm.clean_cache[int(mm.bmap[3])] == 1
    mm.guest_acc[:] = 0
    run(mm.reclaim_cache(8, direct=False))
    assert not mm.clean_cache.any()
    mm.check_invariants()


def test_cold_clean_pages_are_dropped_without_io(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 256, 64, 64)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, np.arange(32, dtype=np.int64), ones(32, 0)))
    assert mm.cache_count == 32
    mm.guest_acc[:] = 0  # nothing accessed since: all inactive
    got = run(mm.reclaim_cache(16, direct=False))
    assert got == 16 and mm.cache_count == 16 and mm.cstats.dropped_clean == 16
    assert disk.write_calls == 0 and mm.cstats.written_back == 0
    mm.check_invariants()


def test_dirty_pages_are_written_back_coalesced_then_dropped(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 256, 64, 64)
    t = mm.add_task(0, 1)
    b = np.arange(8, 24, dtype=np.int64)  # 16 contiguous blocks, all written
    run(mm.run_file_quantum(t, b, ones(16)))
    assert mm.dirty_pages() == 16 and mm.cstats.write_allocs >= 1
    mm.guest_acc[:] = 0
    got = run(mm.reclaim_cache(16, direct=True, task=t))
    assert got == 16 and mm.cache_count == 0 and mm.cstats.written_back == 16
    assert disk.write_calls == 1 and mm.cstats.disk_write_pages == 16  # one pwrite
    # the data is on the disk: reading it back checks every stamp
    res = run(mm.run_file_quantum(t, b, ones(16, 0)))
    assert res.corrupted == 0 and mm.stats.corrupted_reads == 0
    first = np.frombuffer(os.pread(disk.fd, PAGE, 8 * PAGE), np.uint64)[0]
    assert int(first) == naive_stamp(K.FILE_STAMP_TASK, 8, 1)


def _anon_100_and_file_40(tmp_path):
    """A guest whose anon task wrote 100 pages and whose file task read 40 clean blocks."""
    _host, mm, _disk = with_disk(tmp_path, 512, 256, 64)
    anon = mm.add_task(0, 100)
    f = mm.add_task(1, 1)
    run(mm.run_quantum(anon, np.arange(100, dtype=np.int64), ones(100)))
    run(mm.run_file_quantum(f, np.arange(40, dtype=np.int64), ones(40, 0)))
    return mm


def test_reclaim_takes_inactive_file_pages_before_anon(tmp_path) -> None:
    mm = _anon_100_and_file_40(tmp_path)
    mm.guest_acc[:] = 0  # everything cold: file pages must still go first
    got = run(mm.reclaim(32, direct=False))
    assert got == 32 and mm.stats.swap_out == 0 and mm.cstats.dropped_clean == 32
    got = run(mm.reclaim(32, direct=False))  # 8 file pages left, then anon to swap
    assert got == 32 and mm.cache_count == 0 and mm.stats.swap_out == 24 * PAGE
    mm.check_invariants()


def test_hot_file_pages_survive_a_pass_and_anon_goes_instead(tmp_path) -> None:
    mm = _anon_100_and_file_40(tmp_path)
    mm.guest_acc[:] = 0
    mm.guest_acc[mm.bmap[:40]] = 1  # the file pages were just used: they are active
    got = run(mm.reclaim(16, direct=False))
    assert got == 16 and mm.cache_count == 40 and mm.stats.swap_out == 16 * PAGE


def test_stamps_survive_cache_disk_cache_with_the_host_taking_frames(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 300, 64, 2048)
    spec = WorkloadSpec.from_dict({"workload": "fileio", "files": 64, "file_size": 32 * PAGE,
                                   "write_ratio": 0.5, "skew": 0.5})
    wl = Workload(spec, 3)
    t = mm.add_task(0, 1)
    rng = np.random.default_rng(0)
    for _ in range(60):
        b, w = wl.quantum(3000, 0.0)
        res = run(mm.run_file_quantum(t, b, w))
        assert not res.killed
        run(mm.kswapd())
        # the host swaps random frames out (cache pages among them) between quanta
        host.host_take(rng.integers(0, host.pages, 40))
        mm.check_invariants()
    c = mm.cstats
    assert mm.stats.corrupted_reads == 0
    assert c.written_back > 0 and c.dropped_clean > 0 and c.disk_read_pages > 0
    assert c.disk_write_ios < c.disk_write_pages  # contiguous blocks went out together
    run(mm.cache_sync())
    assert mm.dirty_pages() == 0
    # every block on the disk now holds its last write
    data = np.frombuffer(os.pread(disk.fd, 2048 * PAGE, 0), np.uint64).reshape(2048, -1)
    for blk in np.flatnonzero(mm.bcount).tolist():
        assert int(data[blk, 0]) == naive_stamp(K.FILE_STAMP_TASK, blk, int(mm.bcount[blk]))


def test_corrupted_file_block_is_counted(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 256, 64, 64)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, blocks(3), ones(1)))
    run(mm.cache_sync())
    os.pwrite(disk.fd, b"\x01" * 8, 3 * PAGE)  # the disk loses the write
    mm._cache_free(np.array([mm.bmap[3]], np.int64))
    res = run(mm.run_file_quantum(t, blocks(3), ones(1, 0)))
    assert res.corrupted == 1 and mm.stats.corrupted_reads == 1


def test_balloon_reclaim_drops_clean_cache_pages_without_swap(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 512, 0, 512)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, np.arange(400, dtype=np.int64), ones(400, 0)))
    mm.guest_acc[:] = 0
    free0 = mm.buddy.free_pages
    got = run(mm.balloon_reclaim(300))
    assert got > 0 and mm.buddy.free_pages == free0 + got and disk.write_calls == 0
    runs = mm.balloon_alloc(200, 0)
    assert int(runs[:, 1].sum()) == 200
    mm.check_invariants()


def test_direct_reclaim_charges_writeback_to_the_task_kswapd_does_not(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 256, 64, 64)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, np.arange(16, dtype=np.int64), ones(16)))
    mm.guest_acc[:] = 0
    before = t.modelled_ns
    run(mm.reclaim_cache(8, direct=False))
    assert t.modelled_ns == before and mm.cstats.written_back == 8
    mm.guest_acc[:] = 0
    run(mm.reclaim_cache(8, direct=True, task=t))
    assert t.modelled_ns - before >= mm.cost.disk.io_ns(8)


def test_disk_write_error_keeps_pages_dirty_and_cached(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 256, 64, 64)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, np.arange(8, dtype=np.int64), ones(8)))
    mm.guest_acc[:] = 0
    syscalls.install("disk.write@1+=ENOSPC")
    try:
        got = run(mm.reclaim_cache(8, direct=False))
    finally:
        syscalls.clear()
    assert got == 0 and mm.cache_count == 8 and mm.dirty_pages() == 8
    assert mm.cstats.disk_write_errors == 1
    res = run(mm.run_file_quantum(t, np.arange(8, dtype=np.int64), ones(8, 0)))
    assert res.corrupted == 0


def test_disk_read_error_kills_the_task_and_frees_its_pages(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 256, 64, 64)
    t = mm.add_task(0, 1)
    free0 = mm.buddy.free_pages
    syscalls.install("disk.read@1=EIO")
    try:
        res = run(mm.run_file_quantum(t, blocks(1, 2), ones(2, 0)))
    finally:
        syscalls.clear()
    assert res.killed and res.sigbus is not None and "disk read" in res.sigbus
    assert mm.cstats.disk_read_errors == 1 and mm.cache_count == 0
    assert mm.buddy.free_pages == free0
    mm.check_invariants()


def test_blocks_outside_the_disk_are_refused(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 256, 64, 16)
    t = mm.add_task(0, 1)
    with pytest.raises(IndexError):
        run(mm.run_file_quantum(t, blocks(16), ones(1, 0)))
    assert mm.cache_count == 0
    with pytest.raises(IndexError):
        disk.read(15, 2)


def test_file_quantum_without_a_disk_is_refused(tmp_path) -> None:
    host, mm = make_mm(tmp_path, 64, 0)
    t = mm.add_task(0, 1)
    with pytest.raises(RuntimeError, match="no disk"):
        run(mm.run_file_quantum(t, blocks(0), ones(1, 0)))


def test_disk_file_must_exist_and_be_large_enough(tmp_path) -> None:
    with pytest.raises(DiskError, match="cannot open"):
        DiskDevice(str(tmp_path / "missing.disk"), 16 * PAGE)
    p = tmp_path / "small.disk"
    p.write_bytes(b"\0" * PAGE)
    with pytest.raises(DiskError, match="not a regular file of"):
        DiskDevice(str(p), 16 * PAGE)
    os.symlink(p, tmp_path / "link.disk")
    with pytest.raises(DiskError):
        DiskDevice(str(tmp_path / "link.disk"), PAGE)


def test_contiguous_runs() -> None:
    assert contiguous_runs(np.array([1, 2, 3, 7, 9, 10], np.int64)) == [
        (0, 1, 3), (3, 7, 1), (4, 9, 2)]
    assert contiguous_runs(np.empty(0, np.int64)) == []


def test_fileio_stream_stays_in_its_files_and_writes_whole_operations() -> None:
    spec = WorkloadSpec.from_dict({"workload": "fileio", "files": 5, "file_size": 20 * PAGE,
                                   "write_ratio": 0.5})
    assert (spec.pages, spec.disk_pages, spec.file_pages) == (1, 100, 20)
    b, w = Workload(spec, 1).quantum(4000, 0.0)
    assert len(b) == len(w) == 4000 and b.min() >= 0 and b.max() < 100
    ops_b = b.reshape(-1, FILEIO_RUN)
    assert np.all(np.diff(ops_b, axis=1) == 1)  # runs of consecutive blocks
    assert np.all(ops_b[:, 0] // 20 == ops_b[:, -1] // 20)  # inside one file
    assert np.all(w.reshape(-1, FILEIO_RUN) == w.reshape(-1, FILEIO_RUN)[:, :1])
    assert 0.3 < w.mean() < 0.7


def test_fileio_spec_checks_name_the_field() -> None:
    from guest.workloads import SpecError
    with pytest.raises(SpecError, match=r"task\.files"):
        WorkloadSpec.from_dict({"workload": "fileio", "file_size": PAGE})
    with pytest.raises(SpecError, match=r"task\.file_size"):
        WorkloadSpec.from_dict({"workload": "fileio", "files": 2, "file_size": 1000})


def _cfg(**kw) -> str:
    base = {"memory": 64 << 20, "tasks": [
        {"workload": "uniform", "size": 1 << 20},
        {"workload": "fileio", "files": 4, "file_size": 1 << 20}]}
    return json.dumps({**base, **kw})


def test_config_disk_checks() -> None:
    cfg = parse_config(_cfg(disk=8 << 20, disk_path="/x/vm.disk"))
    assert cfg["_disk_bases"] == [0, 0]
    with pytest.raises(ConfigError, match=r"config\.tasks\[1\]\.workload: a fileio task needs"):
        parse_config(_cfg())
    with pytest.raises(ConfigError, match=r"config\.tasks\[1\]\.files: 4 files"):
        parse_config(_cfg(disk=2 << 20, disk_path="/x/vm.disk"))
    with pytest.raises(ConfigError, match=r"config\.disk:"):
        parse_config(_cfg(disk=1000, disk_path="/x/vm.disk"))
    with pytest.raises(ConfigError, match=r"config\.disk_path"):
        parse_config(_cfg(disk=8 << 20))


# ------------------------------------------------------------------ kernels vs twins


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_cache_scan_matches_twin(data) -> None:
    n = data.draw(st.integers(1, 40))
    state = data.draw(st.lists(st.sampled_from([K.PG_FREE, K.PG_ANON, K.PG_CACHE]),
                               min_size=n, max_size=n))
    acc = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    dirty = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    cblock = data.draw(st.lists(st.integers(-1, 3), min_size=n, max_size=n))
    hand = data.draw(st.integers(0, n - 1))
    steps = data.draw(st.integers(0, 3 * n))
    maxv = data.draw(st.integers(1, 10))
    capd = data.draw(st.integers(0, 6))
    a_acc = np.array(acc, np.uint8)
    oc = np.empty(maxv, np.int64)
    od = np.empty(capd, np.int64)
    nc, nd, h, sc = K.cache_scan(np.array(state, np.uint8), a_acc, np.array(dirty, np.uint8),
                                 np.array(cblock, np.int64), hand, steps, maxv, oc, od)
    r_acc = list(acc)
    clean, dirt, rh, rs = naive_cache_scan(state, r_acc, dirty, cblock, hand, steps, maxv, capd)
    assert (oc[:nc].tolist(), od[:nd].tolist(), int(h), int(sc)) == (clean, dirt, rh, rs)
    assert a_acc.tolist() == r_acc


@st.composite
def cache_case(draw):
    npages = draw(st.integers(1, 10))
    nblocks = draw(st.integers(1, 14))
    gp = draw(st.permutations(range(npages)))
    bmap = [gp[b] if b < npages and draw(st.booleans()) else -1 for b in range(nblocks)]
    ept = draw(st.lists(st.integers(0, 1), min_size=npages, max_size=npages))
    needs_zero = draw(st.lists(st.integers(0, 1), min_size=npages, max_size=npages))
    dirty = draw(st.lists(st.integers(0, 1), min_size=npages, max_size=npages))
    n = draw(st.integers(0, 40))
    bl = draw(st.lists(st.integers(0, nblocks - 1), min_size=n, max_size=n))
    writes = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    bcount = draw(st.lists(st.integers(0, 3), min_size=nblocks, max_size=nblocks))
    ram = [[draw(st.integers(0, 3))] + [5] * 511 for _ in range(npages)]
    for b, g in enumerate(bmap):
        if g >= 0 and draw(st.booleans()):
            ram[g][0] = naive_stamp(K.FILE_STAMP_TASK, b, bcount[b]) if bcount[b] else 0
    start = draw(st.integers(0, n))
    return bmap, ept, needs_zero, dirty, bl, writes, bcount, ram, start


@settings(max_examples=300, deadline=None)
@given(cache_case())
def test_cache_run_matches_twin(case) -> None:
    bmap, ept, needs_zero, dirty, bl, writes, bcount, ram, start = case
    npages = len(ram)
    clean = [1 - d for d in dirty]
    a = dict(ram=np.array(ram, np.uint64).reshape(-1), bmap=np.array(bmap, np.int64),
             bcount=np.array(bcount, np.int64), dirty=np.array(dirty, np.uint8),
             clean=np.array(clean, np.uint8),
             ept=np.array(ept, np.uint8), host_acc=np.zeros(npages, np.uint8),
             guest_acc=np.zeros(npages, np.uint8), needs_zero=np.array(needs_zero, np.uint8))
    got = K.cache_run(a["ram"], a["bmap"], a["bcount"], a["dirty"], a["clean"],
                      np.array(bl, np.int64),
                      np.array(writes, np.uint8), start, len(bl), a["ept"], a["host_acc"],
                      a["guest_acc"], a["needs_zero"])
    r_ram = [list(p) for p in ram]
    r_bc, r_d, r_ha, r_ga, r_nz = (list(bcount), list(dirty), [0] * npages, [0] * npages,
                                   list(needs_zero))
    r_cl = list(clean)
    want = naive_cache_run(r_ram, bmap, r_bc, r_d, r_cl, bl, writes, start, len(bl), ept, r_ha,
                           r_ga, r_nz)
    assert tuple(int(x) for x in got) == want
    assert a["ram"].reshape(npages, 512).tolist() == r_ram
    assert (a["bcount"].tolist(), a["dirty"].tolist(), a["guest_acc"].tolist(),
            a["host_acc"].tolist(), a["needs_zero"].tolist(),
            a["clean"].tolist()) == (r_bc, r_d, r_ga, r_ha, r_nz, r_cl)



def test_flusher_writes_back_in_the_background_above_the_background_ratio(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 1024, 64, 512)
    t = mm.add_task(0, 1)
    b = np.arange(100, dtype=np.int64)
    run(mm.run_file_quantum(t, b, ones(100)))  # 100 dirty of ~900 dirtyable: > 10 %, < 20 %
    assert mm.dirty_pages() == 100 and mm.cstats.throttled == 0
    clock = t.modelled_ns
    bg, _ = mm._dirty_thresholds()
    got = run(mm.flush_dirty())
    assert got == 100 - bg and mm.dirty_pages() == bg and mm.cache_count == 100
    assert disk.write_calls == 1  # one run of contiguous blocks
    assert t.modelled_ns == clock  # background: no task waits
    assert run(mm.flush_dirty()) == 0  # at the limit: nothing more to do


def test_a_writer_over_the_dirty_limit_writes_back_itself(tmp_path) -> None:
    host, mm, disk = with_disk(tmp_path, 1024, 64, 512)
    t = mm.add_task(0, 1)
    b = np.arange(400, dtype=np.int64)
    res = run(mm.run_file_quantum(t, b, ones(400)))
    bg, hard = mm._dirty_thresholds()
    assert mm.cstats.throttled > 0 and mm.dirty_pages() <= bg
    assert res.modelled_ns >= mm.cost.disk.io_ns(mm.cstats.throttled)
    res = run(mm.run_file_quantum(t, b, ones(400, 0)))
    assert res.corrupted == 0


# ------------------------------------------------------------------ host-swap pathologies


def _swapping(tmp_path, pages: int, disk_blocks: int):
    from guest.mm import MemoryManager, SwapDevice
    from tests.guest.test_pathologies import SwappingHost

    host = SwappingHost(pages)
    swap = SwapDevice(str(tmp_path / "vm.guest-swap"), 64 * PAGE)
    mm = MemoryManager(host.ram, host.ept, host.acc, swap, ensure_present=host.ensure_present)
    path = tmp_path / "vm.disk"
    with open(path, "wb") as f:
        f.truncate(disk_blocks * PAGE)
    mm.attach_disk(DiskDevice(str(path), disk_blocks * PAGE))
    return host, mm


def test_silent_swap_writes_count_the_clean_cache_pages_the_host_takes(tmp_path) -> None:
    host, mm = _swapping(tmp_path, 512, 64)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, np.arange(32, dtype=np.int64), ones(32, 0)))  # 32 clean
    run(mm.run_file_quantum(t, np.arange(8, dtype=np.int64), ones(8)))  # 8 of them dirtied
    g = mm.bmap[:32].copy()
    # what the kernel does on a shootdown naming the pages, then the host takes them
    assert mm.host_revoked(g) == 24
    host.swap_out(g)
    assert mm.stats.silent_swap_writes == 24
    res = run(mm.run_file_quantum(t, np.arange(32, dtype=np.int64), ones(32, 0)))
    assert res.corrupted == 0


def test_stale_swap_reads_count_host_swap_reads_a_disk_read_overwrites(tmp_path) -> None:
    host, mm = _swapping(tmp_path, 512, 256)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, np.arange(64, dtype=np.int64), ones(64, 0)))
    frames = mm.bmap[:64].copy()
    host.swap_out(frames)  # the host swaps the cache's frames out
    mm.guest_acc[:] = 0
    assert run(mm.reclaim_cache(64, direct=False)) == 64  # the guest drops them, clean
    # new blocks are read into the same (free) frames: the host reads them back for nothing
    res = run(mm.run_file_quantum(t, np.arange(100, 164, dtype=np.int64), ones(64, 0)))
    reused = np.intersect1d(mm.bmap[100:164], frames).size
    assert res.corrupted == 0 and reused > 0
    assert mm.stats.stale_swap_reads == reused and mm.stats.false_swap_reads == 0


def test_the_balloon_takes_the_same_cache_without_silent_writes_or_stale_reads(
        tmp_path) -> None:
    # The pressure of the two tests above, applied through the balloon: the guest drops its
    # clean cache pages itself (no I/O), the balloon takes the frames and the host releases
    # them without keeping anything; new blocks read later land in fresh frames.
    from tests.guest.test_pathologies import balloon_inflate

    host, mm = _swapping(tmp_path, 512, 256)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, np.arange(64, dtype=np.int64), ones(64, 0)))  # 64 clean
    run(mm.run_file_quantum(t, np.arange(8, dtype=np.int64), ones(8)))  # 8 dirtied
    mm.guest_acc[:] = 0
    assert run(mm.balloon_reclaim(mm.buddy.free_pages + 64)) > 0
    runs = balloon_inflate(host, mm, mm.buddy.free_pages)
    assert mm.cache_count < 64  # the balloon's memory came out of the cache
    mm.balloon_free(runs)  # deflate: the frames come back empty
    res = run(mm.run_file_quantum(t, np.arange(100, 164, dtype=np.int64), ones(64, 0)))
    again = run(mm.run_file_quantum(t, np.arange(64, dtype=np.int64), ones(64, 0)))
    assert res.corrupted == 0 and again.corrupted == 0  # the 8 written blocks read back
    assert host.reads == 0
    assert mm.stats.silent_swap_writes == 0 and mm.stats.stale_swap_reads == 0
    assert mm.stats.false_swap_reads == 0 and mm.stats.double_paging == 0
    mm.check_invariants()


def test_file_writeback_of_host_swapped_dirty_pages_is_double_paging(tmp_path) -> None:
    host, mm = _swapping(tmp_path, 512, 64)
    t = mm.add_task(0, 1)
    run(mm.run_file_quantum(t, np.arange(16, dtype=np.int64), ones(16)))
    host.swap_out(mm.bmap[:10])
    mm.guest_acc[:] = 0
    assert run(mm.reclaim_cache(16, direct=False)) == 16
    assert mm.stats.double_paging == 10 and mm.cstats.written_back == 16
    res = run(mm.run_file_quantum(t, np.arange(16, dtype=np.int64), ones(16, 0)))
    assert res.corrupted == 0
