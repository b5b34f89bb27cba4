"""The Host's memory paths with in-test guest and driver peers over the real sockets.

After every step: frames in use == Σ resident memfd pages (``Host.check_conservation``).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hv_peers import Lab, run, topo

from hypervisor import rundir
from hypervisor.host import Host
from hypervisor.topology import parse_topology

PAGE = 4096


def test_boot_hands_over_memfds_and_faults_back_pages():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            g = await lab.guest("a")
            assert g.pages == 32 and lab.host.vms["a"].state == "running"
            await lab.quiesce()
            await g.touch([0, 1, 2, 5, 6])
            assert g.ept[[0, 1, 2, 5, 6]].tolist() == [1] * 5
            assert lab.host.ledger.frames_used == 5
            # Runs, not pages: pages 0-2 and 5-6 are two fallocate calls.
            assert lab.host.vms["a"].mem.populate_calls == 2
            await lab.quiesce()
            # What the guest wrote is in the host's view of the memfd.
            assert lab.host.vms["a"].mem.read_pages(5, 1)[:16] == g.stamp(5)
    run(main())


def test_inflate_lowers_resident_by_exactly_the_inflated_pages():
    async def main():
        async with Lab(topo(256, 0, {"a": 128})) as lab:
            g = await lab.guest("a")
            d = await lab.driver("a")
            await g.touch(np.arange(100))
            await lab.quiesce()
            vm = lab.host.vms["a"]
            before = vm.mem.resident_pages()
            assert before == 100
            inflate = np.r_[np.arange(10, 40), np.arange(60, 70), [120, 121]]  # 2 never backed
            ack = await d.inflate(inflate)
            assert ack.ok
            assert vm.mem.resident_pages() == before - 40
            assert g.ept[inflate].sum() == 0
            assert vm.balloon.balloon_pages == inflate.size
            assert vm.balloon.metrics.inflated == inflate.size
            await lab.quiesce()
            # Deflate: pages become fault-in-able again and read as zeros (punched).
            ack = await d.deflate(np.arange(10, 20))
            assert ack.ok
            assert await g.read(12, 16) == b"\0" * 16
            await lab.quiesce()
            # Report: released, but not in the balloon and still usable.
            ack = await d.report(np.arange(80, 90))
            assert ack.ok and vm.balloon.balloon_pages == inflate.size - 10
            assert vm.mem.resident_pages() == before - 40 + 1 - 10
            await g.touch([85])
            await lab.quiesce()
    run(main())


def test_virtio_pfn_batches_work_too():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            g = await lab.guest("a")
            d = await lab.driver("a", features=["must_tell_host"])
            await g.touch(np.arange(20))
            ack = await d.inflate([3, 1, 2, 9], runs=False)
            assert ack.ok
            assert lab.host.vms["a"].mem.resident_pages() == 16
            # Three runs (1-3, 9) -> two punch calls.
            assert lab.host.vms["a"].mem.punch_calls == 2
            await lab.quiesce()
    run(main())


def test_cross_vm_isolation_after_frames_move():
    async def main():
        async with Lab(topo(40, 0, {"a": 40, "b": 40})) as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            da = await lab.driver("a")
            secret = b"A-secret" * 512
            for p in range(32):
                await a.write(p, secret)
            await lab.quiesce()
            assert await da.inflate(np.arange(32))
            # Every frame A gave up is now B's; B must see zeros only.
            await b.touch(np.arange(40), stamp=False)
            await lab.quiesce()
            for p in range(40):
                assert bytes(b.ram[p * PAGE:(p + 1) * PAGE]) == b"\0" * PAGE
    run(main())


def test_host_swap_shootdown_then_swap_in_keeps_last_write():
    async def main():
        async with Lab(topo(16, 64, {"a": 32, "b": 32})) as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            written: dict[int, bytes] = {}
            # A writes every page it has, and keeps writing its page 0 right up to the
            # shootdown: the revoke must not lose that last write.
            counter = [0]

            def write_on_shootdown():
                counter[0] += 1
                data = f"last-write-{counter[0]}".encode()
                if a.ept[0]:
                    a.ram[0:len(data)] = data
                    written[0] = data

            a.on_shootdown = write_on_shootdown
            for p in range(16):
                data = f"a-page-{p}".encode()
                await a.write(p, data)
                written[p] = data
            await lab.quiesce()
            assert lab.host.ledger.frames_free == 0
            await b.touch(np.arange(16))  # needs 16 frames: all of A's go to host swap
            await lab.quiesce()
            va = lab.host.vms["a"]
            assert va.led.swapped > 0 and a.shootdowns
            assert lab.host.ledger.slots_used == va.led.swapped + lab.host.vms["b"].led.swapped
            for p in range(16):
                got = await a.read(p, len(written[p]))
                assert got == written[p], f"page {p}"
            await lab.quiesce()
            assert va.host_swap_in > 0
            # Slots freed by swap-in no longer hold disk blocks: the swap file's resident
            # slots follow what is swapped out now (a few blocks of file-system slack).
            assert lab.host.swap is not None
            assert lab.host.swap.resident_slots() <= lab.host.ledger.slots_used + 4
    run(main())


def test_freed_host_swap_slots_give_their_disk_blocks_back():
    async def main():
        async with Lab(topo(16, 64, {"a": 32, "b": 32})) as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            await a.touch(np.arange(16))
            await lab.quiesce()
            await b.touch(np.arange(16))  # A's pages go to host swap
            await lab.quiesce()
            swap = lab.host.swap
            assert swap is not None
            used = lab.host.ledger.slots_used
            assert used >= 8 and swap.resident_slots() >= used
            # Inflating A's swapped-out pages frees their slots: the blocks go back too.
            va = lab.host.vms["a"]
            gone = np.nonzero(va.led.p2m <= -2)[0]
            await lab.host.release_pages(va, gone)
            assert lab.host.ledger.slots_used == used - gone.size
            assert swap.resident_slots() <= lab.host.ledger.slots_used + 4
    run(main())


def test_host_oom_kills_the_vm_with_most_frames_and_frees_everything():
    async def main():
        async with Lab(topo(24, 4, {"a": 28, "b": 28, "c": 28})) as lab:
            a, b, c = await lab.guest("a"), await lab.guest("b"), await lab.guest("c")
            await a.touch(np.arange(6))
            await b.touch(np.arange(14))
            await c.touch(np.arange(4))
            await lab.quiesce()
            # C needs 10 more frames; swap holds 4: host OOM must kill B (most frames).
            await c.touch(np.arange(4, 14))
            await lab.quiesce()
            kills = [e for e in lab.host.events if e["kind"] == "host_oom_kill"]
            assert [e["vm"] for e in kills] == ["b"]
            assert kills[0]["frames"] >= 10
            vb = lab.host.vms["b"]
            assert vb.state == "oom_killed" and vb.mem.resident_pages() == 0
            assert vb.led.index not in lab.host.ledger.vms
            assert not np.any(lab.host.ledger.owner_vm == vb.led.index)
            assert not np.any(lab.host.ledger.swap_owner_vm == vb.led.index)
            await asyncio.wait_for(b.closed.wait(), 30)
            # Other VMs keep running and their data is intact.
            for p in range(6):
                assert await a.read(p, 16) == a.stamp(p)
            await lab.quiesce()
    run(main())


def test_guest_disconnect_frees_all_its_frames_and_slots():
    async def main():
        async with Lab(topo(8, 16, {"a": 16, "b": 16})) as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            await a.touch(np.arange(8))
            await b.touch(np.arange(8))  # pushes A to host swap
            await lab.quiesce()
            assert lab.host.ledger.slots_used > 0
            await a.close()
            for _ in range(2500):  # bounds a hang only
                if lab.host.vms["a"].state == "crashed":
                    break
                await asyncio.sleep(0.02)
            await lab.quiesce()
            assert lab.host.vms["a"].state == "crashed"
            assert lab.host.ledger.frames_used == lab.host.vms["b"].led.backed
            assert lab.host.ledger.slots_used == lab.host.vms["b"].led.swapped
            assert any(e["kind"] == "vm_crashed" and e["vm"] == "a" for e in lab.host.events)
            # A new guest reboots the VM from zeroed memory.
            a2 = await lab.guest("a")
            assert await a2.read(3, 16) == b"\0" * 16
            await lab.quiesce()
            assert lab.host.vms["a"].state == "running"
    run(main())


def test_stats_are_polled_and_cached():
    async def main():
        async with Lab(topo(16, 0, {"a": 16})) as lab:
            d = await lab.driver("a")
            d.stats = {4: 12345 * PAGE, 6: 777 * PAGE, 256: 0}
            for _ in range(2500):  # bounds a hang only
                if lab.host.vms["a"].balloon.last_update is not None:
                    break
                await asyncio.sleep(0.02)
            b = lab.host.vms["a"].balloon
            assert b.stats[4] == 12345 * PAGE and b.last_update is not None
            d.stats = {10: 3}
            for _ in range(2500):  # bounds a hang only
                if b.stats.get(10):
                    break
                await asyncio.sleep(0.02)
            d.stats = {10: 5}
            for _ in range(2500):  # bounds a hang only
                if b.stats.get(10) == 5:
                    break
                await asyncio.sleep(0.02)
            kills = [e for e in lab.host.events if e["kind"] == "guest_oom_kill"]
            assert [(e["kills"], e["total"]) for e in kills] == [(2, 5)]
            lab.host.set_balloon_target(lab.host.vms["a"], 7)
            for _ in range(2500):  # bounds a hang only
                if d.targets:
                    break
                await asyncio.sleep(0.02)
            assert d.targets == [7]
    run(main())


@pytest.mark.parametrize("pages", [1, 3])
def test_refuses_to_start_over_a_live_host(pages):
    async def main():
        async with Lab(topo(8, 0, {"a": pages})) as lab:
            other = Host(parse_topology(topo(8, 0, {"a": pages})), launch_vm_processes=False,
                         run_dir=lab.run_dir)
            with pytest.raises(rundir.HostAlreadyRunning):
                await other.start()
            assert (lab.run_dir / "control.sock").exists()
    run(main())


def test_pages_revoked_while_their_vm_keeps_writing_keep_every_last_write():
    """A vCPU keeps writing its pages (EPT checked before each access, as the real loop
    does) while another VM's faults make the host reclaim them again and again."""
    async def main():
        async with Lab(topo(24, 64, {"a": 32, "b": 32})) as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            last: dict[int, int] = {}
            stop = asyncio.Event()
            errors: list[str] = []

            async def vcpu_a():
                n = 0
                while not stop.is_set():
                    p = n % 20
                    if not a.ept[p]:
                        await a.fault([p])
                        continue
                    got = int.from_bytes(a.ram[p * PAGE:p * PAGE + 8], "little")
                    if got != last.get(p, 0):
                        errors.append(f"page {p}: read {got}, last wrote {last.get(p, 0)}")
                    n += 1
                    a.accessed[p] = 1
                    a.ram[p * PAGE:p * PAGE + 8] = n.to_bytes(8, "little")
                    last[p] = n
                    if n % 7 == 0:
                        await asyncio.sleep(0)

            task = asyncio.create_task(vcpu_a())
            for rnd in range(8):
                # B sweeps 12 pages at a time; A's 20 + B's 12 > 24 frames, so A keeps
                # losing pages to host swap while it writes.
                lo = (rnd % 2) * 12
                await b.touch(np.arange(lo, lo + 12))
                await asyncio.sleep(0.01)
            stop.set()
            await task
            await lab.quiesce()
            assert not errors, errors[:5]
            assert lab.host.vms["a"].host_swap_out > 0 and lab.host.vms["a"].host_swap_in > 0
            assert len(a.shootdowns) > 0
            for p, n in last.items():
                assert int.from_bytes(await a.read(p, 8), "little") == n
            await lab.quiesce()
    run(main())
