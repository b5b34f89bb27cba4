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
from hv_peers import Lab, run, topo

from protocol import syscalls
from protocol.aio import PeerClosed


@pytest.fixture(autouse=True)
def _no_plan():
    syscalls.clear()
    yield
    syscalls.clear()


async def check_stamps(lab: Lab, touched: dict[str, list[int]]) -> None:
    """Every page of every running VM still holds the stamp its guest wrote."""
    for name, pages in touched.items():
        if lab.host.vms[name].state != "running":
            continue
        g = lab.guests[name]
        bad = [p for p in pages if await g.read(p, 16) != g.stamp(p)]
        assert not bad, f"VM {name}: {len(bad)} pages read back wrong, first {bad[:5]}"


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
