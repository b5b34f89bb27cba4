"""Guest swap I/O failures (injected through protocol.syscalls): a failed write loses
nothing, a failed read never hands a task wrong bytes, a swap file that cannot be sized
leaves the guest without swap. The stamps prove it: corrupted_reads stays 0 throughout."""

from __future__ import annotations

import asyncio

import pytest
from test_mm import PAGE, make_mm

from guest.mm import SwapDevice
from guest.workloads import Workload, WorkloadSpec
from protocol import syscalls
from protocol.features import StatTag as T


@pytest.fixture(autouse=True)
def _no_injection():
    syscalls.clear()
    yield
    syscalls.clear()


async def _drive(mm, tm, wl, quanta: int, n: int = 2000) -> int:
    """Run quanta (kswapd between them); returns how many quanta ended in a kill."""
    kills = 0
    for _ in range(quanta):
        res = await mm.run_quantum(tm, *wl.quantum(n, 0.0))
        kills += res.killed
        await mm.kswapd()
        mm.check_invariants()
    return kills


def test_a_failed_swap_write_keeps_the_page_and_frees_the_slot(tmp_path) -> None:
    _host, mm = make_mm(tmp_path, pages=512, swap_pages=2048)
    spec = WorkloadSpec(workload="uniform", size=900 * PAGE, write_ratio=0.5)
    tm = mm.add_task(0, spec.pages)
    syscalls.install("guestswap.write@3=ENOSPC;guestswap.write@40=EIO")
    kills = asyncio.run(_drive(mm, tm, Workload(spec, 1), 40))
    s = mm.stats
    assert syscalls.fired() == ["guestswap.write@3=ENOSPC", "guestswap.write@40=EIO"]
    assert kills == 0 and s.swap_write_errors == 2
    # every successful write is a swapped-out page; the failed ones are not counted
    assert s.swap_out // PAGE == syscalls.counts()["guestswap.write"] - 2
    assert s.swap_in > 0 and s.corrupted_reads == 0
    st = mm.stats_map()
    assert st[T.GUEST_SWAP_WRITE_ERRORS] == 2 and st[T.CORRUPTED_READS] == 0
    assert "failed" in mm.last_swap_error and "stays resident" in mm.last_swap_error


def test_a_disk_that_stays_full_ends_in_the_oom_path_not_in_lost_pages(tmp_path) -> None:
    _host, mm = make_mm(tmp_path, pages=512, swap_pages=2048)
    logged: list[str] = []
    mm.log = logged.append
    spec = WorkloadSpec(workload="uniform", size=900 * PAGE, write_ratio=0.5)
    tm = mm.add_task(0, spec.pages)
    syscalls.install("guestswap.write@1+=ENOSPC")
    kills = asyncio.run(_drive(mm, tm, Workload(spec, 1), 20))
    s = mm.stats
    assert s.swap_out == 0 and s.swap_write_errors > 0 and mm.swap.free_slots == 2048
    assert kills > 0 and s.oom_kills == kills  # the guest OOM path, as with no swap at all
    assert s.corrupted_reads == 0
    # logged at the 1st, 2nd, 4th ... error only
    assert 1 <= len(logged) <= s.swap_write_errors.bit_length()


def test_a_failed_swap_read_kills_the_task_instead_of_handing_it_wrong_bytes(tmp_path) -> None:
    _host, mm = make_mm(tmp_path, pages=512, swap_pages=2048)
    spec = WorkloadSpec(workload="uniform", size=900 * PAGE, write_ratio=0.5)
    tm = mm.add_task(0, spec.pages)
    wl = Workload(spec, 1)
    asyncio.run(_drive(mm, tm, wl, 10))
    assert tm.swapped > 0
    syscalls.install("guestswap.read@2=EIO")

    async def until_killed():
        for _ in range(100):
            res = await mm.run_quantum(tm, *wl.quantum(2000, 0.0))
            mm.check_invariants()
            if res.killed:
                return res
        raise AssertionError("no swap-in happened")

    res = asyncio.run(until_killed())
    s = mm.stats
    assert res.sigbus is not None and "SIGBUS" in res.sigbus and "slot" in res.sigbus
    assert s.swap_read_errors == 1 and s.swap_read_kills == 1 and tm.sigbus == 1
    assert s.oom_kills == 0
    # the task starts over with a fresh address space; its slots all went back
    assert tm.resident == 0 and tm.swapped == 0 and (tm.wcount == 0).all()
    assert int(mm.swap.used.sum()) == 0
    st = mm.stats_map()
    assert st[T.GUEST_SWAP_READ_ERRORS] == 1 and st[T.SWAP_READ_KILLS] == 1
    # it runs again, swapping in and out, and reads only what it wrote
    kills = asyncio.run(_drive(mm, tm, wl, 20))
    assert kills == 0 and s.corrupted_reads == 0 and s.swap_in > 0


def test_a_swap_file_that_cannot_be_sized_leaves_the_guest_without_swap(tmp_path) -> None:
    syscalls.install("guestswap.truncate@1=ENOSPC")
    dev = SwapDevice(str(tmp_path / "s"), 64 * PAGE)
    try:
        assert dev.nslots == 0 and dev.free_slots == 0 and dev.alloc() == -1
        assert dev.error is not None and "No space left" in dev.error
    finally:
        dev.close()


@pytest.mark.slow
def test_guest_kernel_process_reports_swap_errors_and_stays_intact(tmp_path) -> None:
    from test_process import config, driver, guest_vm, wait_for

    pages = 2048
    cfg = config(pages, 4096, [{"workload": "zipf", "size": 2560 * PAGE, "skew": 0.6,
                                "write_ratio": 0.4}])
    plan = "guestswap.write@5=ENOSPC;guestswap.read@3=EIO"

    async def scenario():
        async with guest_vm(tmp_path, pages, cfg, env={syscalls.ENV_PLAN: plan}) as (
                peer, proc, run_dir):
            ch = await driver(run_dir)
            st = await wait_for(ch, lambda s: s[T.GUEST_SWAP_READ_ERRORS] >= 1
                                and s[T.GUEST_SWAP_WRITE_ERRORS] >= 1, "the injected errors")
            assert st[T.GUEST_SWAP_WRITE_ERRORS] == 1 and st[T.GUEST_SWAP_READ_ERRORS] == 1
            assert st[T.SWAP_READ_KILLS] == 1
            base = st[T.OPS]
            st = await wait_for(ch, lambda s: s[T.OPS] > base + 100_000, "more work")
            assert st[T.CORRUPTED_READS] == 0
            await ch.close()
            await peer.halt()
            rc = await asyncio.wait_for(proc.wait(), 60)
            err = (await proc.stderr.read()).decode()
            assert rc == 0, err
            assert "killed by SIGBUS" in err and "stays resident" in err
            assert "corrupted reads 0" in err

    asyncio.run(scenario())
