"""Failed system calls on the host's memory path, injected (protocol.syscalls) or real (a
swap file on a full tmpfs), with in-test peers over the real sockets.

Whatever fails, no guest ever reads a byte it did not write, the frame ledger equals what is
resident, no frame or swap slot leaks, and an event names the failed call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hv_peers import Lab, check_stamps, run, topo

from protocol import syscalls
from protocol.aio import PeerClosed
from protocol.errors import ProtocolError


@pytest.fixture(autouse=True)
def _no_plan():
    syscalls.clear()
    yield
    syscalls.clear()


def assert_no_leak(lab: Lab) -> None:
    """Frames and slots in use are exactly what the running VMs hold."""
    host = lab.host
    live = [vm for vm in host.vms.values() if vm.led.index in host.ledger.vms]
    assert host.ledger.frames_used == sum(vm.led.backed for vm in live)
    assert host.ledger.slots_used == sum(vm.led.swapped for vm in live)
    for vm in host.vms.values():
        if vm.led.index not in host.ledger.vms:
            assert vm.mem.resident_pages() == 0, vm.name


async def touch_or_die(g, pages) -> bool:
    """Touch pages; False when the VM was stopped under the touch."""
    try:
        await g.touch(pages)
        return True
    except PeerClosed:
        return False


def test_a_swap_write_failing_with_enospc_never_corrupts_another_vm():
    """Reclaim of b's pages hits ENOSPC: b keeps its bytes, the ledger its truth."""
    async def main():
        async with Lab(topo(16, 64, {"a": 32, "b": 32})) as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            await b.touch(np.arange(6))
            await a.touch(np.arange(10))
            await lab.quiesce()
            syscalls.install("hostswap.write@1+=ENOSPC")  # the disk is full from now on
            alive = await touch_or_die(a, np.arange(10, 14))
            await lab.quiesce()
            assert syscalls.counts().get("hostswap.write", 0) >= 1
            errors = [e for e in lab.host.events if e["kind"] == "host_swap_error"]
            assert errors and errors[0]["error"] == "ENOSPC" \
                and errors[0]["point"] == "hostswap.write", errors
            # Nothing went to swap: no slot is used, every page is where it was.
            assert lab.host.ledger.slots_used == 0
            # The host fell back to OOM: a (most frames) is gone, b untouched.
            kills = [e["vm"] for e in lab.host.events if e["kind"] == "host_oom_kill"]
            assert kills == ["a"] and not alive
            assert lab.host.vms["b"].state == "running"
            assert_no_leak(lab)
            await check_stamps(lab, {"b": list(range(6))})
            await lab.quiesce()
    run(main())


def test_a_swap_write_failing_once_with_eio_leaves_the_pages_resident_and_retries():
    async def main():
        async with Lab(topo(16, 64, {"a": 32, "b": 32})) as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            await b.touch(np.arange(8))
            await a.touch(np.arange(8))
            await lab.quiesce()
            syscalls.install("hostswap.write@1=EIO")
            await a.touch(np.arange(8, 16))
            await lab.quiesce()
            assert syscalls.fired() == ["hostswap.write@1=EIO"]
            assert any(e["kind"] == "host_swap_error" and e["error"] == "EIO"
                       for e in lab.host.events)
            # One failure is not a full disk: the next reclaim went to swap, nobody died.
            assert {vm.state for vm in lab.host.vms.values()} == {"running"}
            assert lab.host.ledger.slots_used > 0
            assert_no_leak(lab)
            await check_stamps(lab, {"a": list(range(16)), "b": list(range(8))})
            await lab.quiesce()
    run(main())


def test_a_swap_in_read_failure_crashes_only_the_faulting_vm():
    async def main():
        async with Lab(topo(16, 64, {"a": 32, "b": 32})) as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            await a.touch(np.arange(8))
            await b.touch(np.arange(8))
            await lab.quiesce()
            await b.touch(np.arange(8, 16))  # a's pages go to host swap
            await lab.quiesce()
            va = lab.host.vms["a"]
            gone = np.nonzero(va.led.p2m <= -2)[0]
            assert gone.size
            syscalls.install("hostswap.read@1=EIO")
            assert not await touch_or_die(a, gone[:1])  # never resumed with wrong bytes
            await lab.quiesce()
            ev = [e for e in lab.host.events if e["kind"] == "host_swap_error"]
            assert ev and ev[0]["vm"] == "a" and ev[0]["error"] == "EIO"
            crash = [e for e in lab.host.events if e["kind"] == "vm_crashed"]
            assert ([e["vm"] for e in crash] == ["a"] and "EIO" in crash[0]["reason"]) or \
                "Input/output" in crash[0]["reason"]
            assert va.state == "crashed" and lab.host.vms["b"].state == "running"
            assert_no_leak(lab)
            await check_stamps(lab, {"b": list(range(16))})
            await lab.quiesce()
    run(main())


def test_a_failed_punch_on_release_keeps_the_ledger_equal_to_what_is_resident():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            a = await lab.guest("a")
            d = await lab.driver("a")
            await a.touch(np.arange(20))
            await lab.quiesce()
            syscalls.install("memfd.punch@2=EIO")
            inflate = np.r_[np.arange(0, 4), np.arange(8, 12), np.arange(16, 18)]  # 3 runs
            ack = await d.inflate(inflate)
            assert not ack.ok
            await lab.quiesce()  # frames used == resident pages
            ev = [e for e in lab.host.events if e["kind"] == "host_memory_error"]
            assert ev and ev[0]["point"] == "memfd.punch" and ev[0]["error"] == "EIO"
            vm = lab.host.vms["a"]
            assert vm.mem.resident_pages() == 16  # the first run went, the rest stayed
            assert a.ept[8:12].all() and a.ept[16:18].all() and not a.ept[0:4].any()
            keep = [p for p in range(20) if not 0 <= p < 4]
            await check_stamps(lab, {"a": keep})
            syscalls.clear()
            assert (await d.inflate(np.arange(8, 12))).ok  # the device is still usable
            await lab.quiesce()
    run(main())


def _mount_tmpfs(size: str) -> Path | None:
    d = Path(tempfile.mkdtemp(prefix="bl-tmpfs-", dir="/tmp"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        d.rmdir()
        return None
    return d


def test_a_swap_file_on_a_full_tmpfs_never_corrupts_a_vm():
    """The users' reproduction, scaled down: the swap file (64 slots) sits on a 64 KiB
    tmpfs, so the disk fills part-way through a reclaim."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = _mount_tmpfs("64k")
    if mnt is None:
        pytest.skip("mount -t tmpfs was refused here")

    async def main():
        async with Lab(topo(16, 64, {"a": 32, "b": 32}), run_dir=mnt / "run") as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            await b.touch(np.arange(14))
            await a.touch(np.arange(2))
            await lab.quiesce()
            alive = True
            for start in range(2, 32, 2):  # a grows; b's cold pages go to swap, then ENOSPC
                alive = await touch_or_die(a, np.arange(start, start + 2))
                if not alive:
                    break
            await lab.quiesce()
            ev = [e for e in lab.host.events if e["kind"] == "host_swap_error"]
            assert ev and ev[0]["error"] == "ENOSPC", ev
            assert any(e["kind"] == "host_oom_kill" for e in lab.host.events)
            assert_no_leak(lab)
            assert lab.host.swap is not None
            touched = {"b": list(range(14))}
            if alive:
                touched["a"] = list(range(32))
            await check_stamps(lab, touched)
            await lab.quiesce()
    try:
        run(main())
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


# ------------------------------------------------------------------ the fault walk
#
# SQLite style: run one multi-VM scenario once to count each injection point's calls, then
# once per (point, call N, errno) with that call failing, and check the host after each.

#: The memory path's points and the errors each call can really give.
WALK_ERRNOS: dict[str, tuple[str, ...]] = {
    "hostswap.open": ("EMFILE", "ENOSPC"),
    "hostswap.truncate": ("EFBIG", "EIO"),
    "hostswap.write": ("ENOSPC", "EIO"),
    "hostswap.read": ("EIO",),
    "hostswap.punch": ("EIO",),
    "memfd.create": ("EMFILE", "ENOMEM"),
    "memfd.populate": ("ENOMEM", "ENOSPC"),
    "memfd.write": ("ENOMEM", "EIO"),
    "memfd.read": ("EIO",),
    "memfd.punch": ("EIO", "ENOMEM"),
}
#: Points whose calls happen while the host starts: a failure there is a failed start.
START_POINTS = {"hostswap.open", "hostswap.truncate", "memfd.create"}
WALK_TOPOLOGY = topo(24, 64, {"a": 32, "b": 32})


async def _scenario(lab: Lab) -> dict[str, set[int]]:
    """Faults, reclaim to host swap and back, inflate, deflate and report over two VMs.
    Returns the pages whose stamps each VM must still read back. A step of a VM the host
    stopped on the way raises PeerClosed (or ConnectionError) and that VM's steps end."""
    a, b = await lab.guest("a"), await lab.guest("b")
    d = await lab.driver("a")
    tracked: dict[str, set[int]] = {"a": set(), "b": set()}
    stopped: set[str] = set()

    async def step(vm: str, coro) -> object:
        if vm in stopped:
            coro.close()
            return None
        try:
            return await coro
        except (ConnectionError, ProtocolError):  # PeerClosed is a ConnectionError
            stopped.add(vm)
            return None

    async def touch(vm: str, g, pages) -> None:
        pages = list(pages)
        if await step(vm, g.touch(pages)) is None and vm not in stopped:
            tracked[vm].update(pages)

    await touch("a", a, range(16))
    await touch("b", b, range(16))       # 32 pages on 24 frames: a's go to host swap
    await touch("a", a, range(16))       # and come back (swap-in), b's go out
    for p in range(12, 16):              # inflated pages are the balloon's, not a's data
        tracked["a"].discard(p)
    ack = await step("a", d.inflate(list(range(12, 16))))
    if ack is not None and ack.ok:
        await step("a", d.deflate(list(range(12, 14))))
    await touch("a", a, range(20, 24))
    for p in range(20, 24):
        tracked["a"].discard(p)          # reported pages are free pages: no data kept
    await step("a", d.report(list(range(20, 24))))
    await touch("b", b, range(16, 24))
    await touch("a", a, range(24, 28))
    return {vm: pages for vm, pages in tracked.items() if vm not in stopped}


async def _check_after(lab: Lab, tracked: dict[str, set[int]], fired: list[str],
                       case: str) -> None:
    host = lab.host
    await lab.quiesce()  # frames used == Σ resident pages, ledger invariants
    assert_no_leak(lab)
    # 0 corrupted bytes in every VM still running.
    await check_stamps(lab, {vm: sorted(p) for vm, p in tracked.items()})
    kinds = {e["kind"] for e in host.events}
    for inj in fired:
        point, rest = inj.split("@", 1)
        err = rest.split("=", 1)[1]
        if err == "EINTR":  # retried: nothing to see
            continue
        assert any(e.get("point") == point and e.get("error") == err for e in host.events), \
            f"{case}: no event names {inj} (events: {sorted(kinds)})"
    for vm in host.vms.values():
        if vm.state == "running":
            # Still making progress: a new page faults in and keeps its bytes.
            g = lab.guests[vm.name]
            await g.touch([30])
            assert await g.read(30, 16) == g.stamp(30), f"{case}: {vm.name} stuck"
        elif vm.state == "crashed":
            # on_crash = "restart": a guest that connects again boots it on zeroed memory.
            assert vm.mem.resident_pages() == 0
            g = await lab.guest(vm.name)
            assert await g.read(1, 16) == b"\0" * 16, f"{case}: {vm.name} not zeroed"
            await g.touch([2])
            assert host.vms[vm.name].state == "running"
        else:
            assert vm.state == "oom_killed", f"{case}: {vm.name} is {vm.state}"
            assert any(e["kind"] == "host_oom_kill" and e["vm"] == vm.name
                       for e in host.events)
            assert vm.mem.resident_pages() == 0
    if not fired or all(f.endswith("=EINTR") for f in fired):
        # Nothing failed (or a retry hid it): nobody may have been harmed.
        assert {vm.state for vm in host.vms.values()} == {"running"}, case
    await lab.quiesce()


def _walk_case(point: str, nth: int, err: str) -> tuple[bool, list[str]]:
    """Run the scenario with call ``nth`` of ``point`` failing with ``err``; returns
    (whether it fired, what fired)."""
    case = f"{point}@{nth}={err}"

    async def main() -> list[str]:
        syscalls.install(case)
        lab = Lab(WALK_TOPOLOGY)
        if point in START_POINTS:
            try:
                await lab.__aenter__()
            except OSError as e:
                fired = syscalls.fired()
                assert fired == [case] and os.strerror(e.errno) in str(e), (case, e)
                assert not lab.run_dir.exists(), f"{case}: run dir left behind"
                shutil.rmtree(lab.base, ignore_errors=True)
                return fired
            # The call was not reached at start (fewer calls this time): run as usual.
        else:
            await lab.__aenter__()
        try:
            tracked = await _scenario(lab)
            fired = syscalls.fired()
            syscalls.clear()
            await _check_after(lab, tracked, fired, case)
            return fired
        finally:
            await lab.__aexit__(None, None, None)

    fired = run(main())
    return bool(fired), fired


def _count_calls() -> dict[str, int]:
    async def main() -> dict[str, int]:
        syscalls.clear()
        async with Lab(WALK_TOPOLOGY) as lab:
            tracked = await _scenario(lab)
            counts = dict(syscalls.counts())
            await _check_after(lab, tracked, [], "no fault")
            return counts
    return run(main())


def _walk(pick) -> None:
    counts = _count_calls()
    missing = sorted(p for p in WALK_ERRNOS if not counts.get(p))
    assert not missing, f"the scenario never reaches {missing}: the walk would not test them"
    cases = [(point, n, err) for point, errs in WALK_ERRNOS.items()
             for n in pick(counts[point]) for err in (*errs, "EINTR")
             if err != "EINTR" or n == 1]
    not_fired = []
    for point, n, err in cases:
        did, _ = _walk_case(point, n, err)
        if not did:
            not_fired.append(f"{point}@{n}={err}")
    # Call counts vary a little from run to run (reclaim batches follow the acks); most
    # injections must still land.
    assert len(not_fired) <= len(cases) // 10, f"never fired: {not_fired}"


def test_fault_walk_first_second_and_last_call_of_every_memory_point():
    _walk(lambda c: sorted({1, min(2, c), c}))


@pytest.mark.slow
def test_fault_walk_every_call_of_every_memory_point():
    _walk(lambda c: range(1, c + 1))


# ------------------------------------------------------------------ ledger: write-then-commit


def test_reserved_slots_are_nobodys_until_committed_and_cancel_changes_nothing():
    from hypervisor.ledger import FrameLedger, LedgerError, OutOfSwap

    led = FrameLedger(8, 4)
    vm = led.add_vm("a", 8)
    frames, _ = led.back(vm.index, np.arange(4))
    led.unlock(frames)
    victims = led.pick_victims(2)
    slots = led.reserve_slots(2)
    assert led.slots_used == 2 and np.all(vm.p2m[:4] >= 0)  # no page points at a slot yet
    with pytest.raises(AssertionError, match="reserved"):
        led.check()  # a reservation left behind is a leak
    with pytest.raises(OutOfSwap):
        led.reserve_slots(3)
    with pytest.raises(OutOfSwap):
        led.reserve_slots(1, limit=2)  # a full disk caps the slots below the file's size
    led.cancel_slots(slots[1:])
    with pytest.raises(LedgerError):
        led.cancel_slots(slots[1:])  # already free
    (so,) = led.swap_out(victims[:1], slots[:1])  # commit the one whose copy landed
    assert vm.swapped == 1 and vm.p2m[so.gpfns[0]] == -(int(so.slots[0]) + 2)
    led.unlock(victims[1:])
    led.check()
    assert led.slots_used == 1 and led.frames_used == 3


def test_victims_are_never_picked_from_an_excluded_vm():
    from hypervisor.ledger import FrameLedger

    led = FrameLedger(8, 8)
    a, b = led.add_vm("a", 4), led.add_vm("b", 4)
    for v in (a, b):
        f, _ = led.back(v.index, np.arange(4))
        led.unlock(f)
    state = led.state.copy()
    victims = led.pick_victims(8, exclude=[a.index])
    assert victims.size == 4 and set(led.owner_vm[victims].tolist()) == {b.index}
    assert np.array_equal(led.state[led.owner_vm == a.index], state[led.owner_vm == a.index])
