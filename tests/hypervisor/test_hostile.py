"""Hostile peers on every socket: each gets a clear error, changes nothing, disturbs no one."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import numpy as np
import pytest
from hv_peers import GuestPeer, Lab, frame, raw_connect, read_frame, read_until_eof, run, topo

from protocol import pfn as P

PAGE = 4096

GARBAGE = {
    "zero_length": struct.pack(">I", 0),
    "oversize": struct.pack(">I", 64 * 1024 * 1024) + b"x" * 16,
    "not_msgpack": struct.pack(">I", 3) + b"\xc1\xc1\xc1",
    "not_a_map": struct.pack(">I", 2) + msgpack.packb([1]),
    "unknown_type": frame({"t": "teleport", "id": 1}),
    "missing_field": frame({"t": "inflate"}),
    "ill_typed": frame({"t": "hello", "version": "one", "features": 0, "page_size": 4096,
                        "vm": "a"}),
}


async def _expect_error_and_close(path, payload: bytes) -> dict:
    r, w = await raw_connect(path)
    w.write(payload)
    await w.drain()
    frames = await read_until_eof(r)
    w.close()
    errors = [f for f in frames if f.get("t") == "error"]
    assert errors, f"no error frame, got {frames}"
    assert errors[-1]["code"] and errors[-1]["message"]
    return errors[-1]


@pytest.mark.parametrize("what", sorted(GARBAGE))
def test_garbage_on_every_socket_is_refused_and_harmless(what):
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 32})) as lab:
            # B is a well-behaved VM with data; it must not notice anything.
            b = await lab.guest("b")
            await b.touch(np.arange(8))
            await lab.quiesce()
            before = lab.host.ledger.state.copy()
            for sock in ("a.machine.sock", "a.balloon.sock", "control.sock"):
                err = await _expect_error_and_close(lab.run_dir / sock, GARBAGE[what])
                assert isinstance(err["message"], str)
            await lab.quiesce()
            assert np.array_equal(before, lab.host.ledger.state)
            for p in range(8):
                assert await b.read(p, 16) == b.stamp(p)
    run(main())


def test_machine_channel_refuses_bad_boots_and_bad_faults():
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 32})) as lab:
            path = lab.run_dir / "a.machine.sock"
            # Wrong VM name.
            err = await _expect_error_and_close(path, frame({"t": "boot", "vm": "b",
                                                             "version": 1}))
            assert "serves VM 'a'" in err["message"]
            # Wrong version.
            err = await _expect_error_and_close(path, frame({"t": "boot", "vm": "a",
                                                             "version": 9}))
            assert err["code"] == "version"
            # A fault before boot.
            err = await _expect_error_and_close(
                path, frame({"t": "ept_fault", "id": 1, "pfns": P.pfns_to_wire([0])}))
            assert err["code"] == "bad_state"
            b = await lab.guest("b")
            await b.touch([0])
            # A booted guest faulting beyond its RAM is disconnected; nothing is backed.
            a = await lab.guest("a")
            await a.touch([1])
            with pytest.raises(ConnectionError):
                await a.fault([1, 32])
            await asyncio.wait_for(a.closed.wait(), 30)
            assert a.error is not None and a.error.code == "pfn_out_of_range"
            assert "beyond guest RAM" in a.error.message
            for _ in range(2500):  # bounds a hang only
                if lab.host.vms["a"].state == "crashed":
                    break
                await asyncio.sleep(0.02)
            await lab.quiesce()
            assert lab.host.vms["a"].led.index not in lab.host.ledger.vms
            assert lab.host.ledger.frames_used == 1  # B's page only
            assert await b.read(0, 16) == b.stamp(0)
    run(main())


def test_second_guest_for_a_vm_is_refused_without_disturbing_the_first():
    async def main():
        async with Lab(topo(16, 0, {"a": 16})) as lab:
            a = await lab.guest("a")
            await a.touch([0, 1])
            with pytest.raises(ConnectionError):
                await GuestPeer("a").connect(lab.run_dir / "a.machine.sock")
            await a.touch([2])
            assert await a.read(0, 16) == a.stamp(0)
            await lab.quiesce()
    run(main())


def test_hung_guest_that_never_acks_a_shootdown_is_stopped():
    async def main():
        async with Lab(topo(8, 16, {"a": 16, "b": 16})) as lab:
            a, b = await lab.guest("a"), await lab.guest("b")
            lab.host.vms["a"].machine.shootdown_timeout = 0.3
            a.ack_shootdowns = False
            await a.touch(np.arange(8))
            await b.touch(np.arange(8))  # reclaim needs A's frames; A never answers
            await lab.quiesce()
            assert lab.host.vms["a"].state == "crashed"
            assert lab.host.vms["b"].led.backed == 8
            kinds = [e["kind"] for e in lab.host.events if e["vm"] == "a"]
            assert "vm_crashed" in kinds
    run(main())


async def _a_reclaim_waits_on_a(lab: Lab):
    """A holds every frame and answers shootdowns 0.3 s late; B faults, so a reclaim takes
    some of A's frames and waits for A's ack. Returns (a, b, B's fault task)."""
    a, b = await lab.guest("a"), await lab.guest("b")
    await a.touch(np.arange(8))  # every frame
    a.ack_delay = 0.3
    b_faults = asyncio.create_task(b.touch([0]))
    await _shootdown_in_flight(lab, a)
    return a, b, b_faults


async def _shootdown_in_flight(lab: Lab, guest: GuestPeer) -> None:
    """Until ``guest`` holds a shootdown and the host has victims in flight."""
    for _ in range(5000):  # bounds a hang only
        if guest.shootdowns and np.any(lab.host._inflight):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no shootdown reached the guest")


def test_a_hung_guest_does_not_stall_the_other_vms():
    """The host waits for a shootdown ack without its memory lock: while A sits on one,
    C's faults are served; B's fault waits for A's timeout or takes C's page."""
    async def main():
        async with Lab(topo(10, 16, {"a": 8, "b": 8, "c": 8})) as lab:
            a, b, c = [await lab.guest(n) for n in "abc"]
            await a.touch(np.arange(8))  # 8 of 10 frames
            # A's shootdown times out when the test says so (below), not after a wall-clock
            # time a loaded machine could spend before C's fault is served.
            lab.host.vms["a"].machine.shootdown_timeout = 600.0
            a.ack_shootdowns = False
            b_faults = asyncio.create_task(b.touch([0, 1, 2]))  # needs one of A's frames
            await _shootdown_in_flight(lab, a)
            await c.touch([5])  # a free frame: served now, not after A's timeout
            assert lab.host.vms["a"].state == "running" and not b_faults.done()
            assert await c.read(5, 16) == c.stamp(5)
            for fut in lab.host.vms["a"].machine._pending.values():  # A's timeout expires
                fut.set_exception(TimeoutError())
            await b_faults  # A timed out and was stopped; its frames went to B
            await lab.quiesce()
            assert lab.host.vms["a"].state == "crashed"
            # B's fault took what it could not wait for from C (its page went to host swap).
            vc = lab.host.vms["c"]
            assert lab.host.vms["b"].led.backed == 3 and vc.led.backed + vc.led.swapped == 1
            for p in (0, 1, 2):
                assert await b.read(p, 16) == b.stamp(p)
            assert await c.read(5, 16) == c.stamp(5)
    run(main())


def test_a_fault_on_a_page_in_flight_waits_for_its_reclaim():
    """A guest touching its own victim page before it acks: the fault is resumed only once
    the page went to host swap and came back, with its bytes."""
    async def main():
        async with Lab(topo(8, 16, {"a": 8, "b": 8})) as lab:
            a, b, b_faults = await _a_reclaim_waits_on_a(lab)
            victims = np.nonzero(a.ept[:8] == 0)[0]
            assert victims.size >= 1  # cleared before the shootdown was sent
            for p in range(8):  # the victims fault, and wait for the reclaim to end
                assert await a.read(p, 16) == a.stamp(p)
            await b_faults
            await lab.quiesce()
            va = lab.host.vms["a"]
            assert va.host_swap_out >= victims.size and va.host_swap_in >= victims.size
            assert await b.read(0, 16) == b.stamp(0)
    run(main())


def test_a_balloon_batch_naming_a_page_in_flight_waits_then_succeeds():
    async def main():
        async with Lab(topo(8, 16, {"a": 8, "b": 8})) as lab:
            d = await lab.driver("a")
            a, _b, b_faults = await _a_reclaim_waits_on_a(lab)
            victim = int(np.nonzero(a.ept[:8] == 0)[0][0])
            ack = await d.inflate([victim])
            assert ack.ok, ack
            await b_faults
            await lab.quiesce()
            va = lab.host.vms["a"]
            assert va.led.p2m[victim] == -1 and va.led.balloon[victim] == 1
            assert a.ept[victim] == 0
    run(main())


def test_balloon_batches_that_break_the_rules_are_rejected_and_change_nothing():
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 32})) as lab:
            a = await lab.guest("a")
            await a.touch(np.arange(16))
            r, w = await raw_connect(lab.run_dir / "a.balloon.sock")
            w.write(frame({"t": "hello", "version": 1, "features": (1 << 40) | 1,
                           "page_size": 4096, "vm": "a"}))
            assert (await read_frame(r))["t"] == "welcome"
            w.write(frame({"t": "inflate", "id": 1, "pfns": P.pfns_to_wire([4, 5])}))
            assert (await read_frame(r))["ok"] is True
            await lab.quiesce()
            vm = lab.host.vms["a"]
            snapshot = (vm.led.p2m.copy(), vm.led.balloon.copy(), vm.mem.resident_pages())
            cases = [
                ({"t": "inflate", "pfns": P.pfns_to_wire([31, 32])}, "pfn_out_of_range"),
                ({"t": "inflate", "runs": P.runs_to_wire([(30, 5)])}, "pfn_out_of_range"),
                ({"t": "inflate", "pfns": P.pfns_to_wire([7, 7])}, "duplicate_pfn"),
                ({"t": "inflate", "runs": P.runs_to_wire([(6, 2), (7, 1)])}, "duplicate_pfn"),
                ({"t": "inflate", "pfns": P.pfns_to_wire([6, 5])}, "already_ballooned"),
                ({"t": "deflate", "pfns": P.pfns_to_wire([4, 9])}, "not_ballooned"),
                ({"t": "report", "runs": P.runs_to_wire([(8, 1)])}, "feature_not_negotiated"),
                ({"t": "inflate", "pfns": b""}, "empty_batch"),
            ]
            for i, (msg, code) in enumerate(cases):
                w.write(frame({**msg, "id": 100 + i}))
                ack = await read_frame(r)
                assert ack["t"] == "ack" and ack["id"] == 100 + i
                assert ack["ok"] is False and ack["code"] == code, (msg, ack)
                assert ack["message"]
            assert sum(vm.balloon.metrics.rejected.values()) == len(cases)
            await lab.quiesce()
            assert np.array_equal(snapshot[0], vm.led.p2m)
            assert np.array_equal(snapshot[1], vm.led.balloon)
            assert snapshot[2] == vm.mem.resident_pages()
            # The connection survived the rejections: a valid batch still works.
            w.write(frame({"t": "deflate", "id": 200, "pfns": P.pfns_to_wire([4])}))
            assert (await read_frame(r))["ok"] is True
            w.close()
    run(main())


def test_runs_without_ranges_are_rejected():
    async def main():
        async with Lab(topo(32, 0, {"a": 32})) as lab:
            r, w = await raw_connect(lab.run_dir / "a.balloon.sock")
            w.write(frame({"t": "hello", "version": 1, "features": 1, "page_size": 4096,
                           "vm": "a"}))
            welcome = await read_frame(r)
            assert welcome["t"] == "welcome" and welcome["features"] == 1
            w.write(frame({"t": "inflate", "id": 1, "runs": P.runs_to_wire([(0, 4)])}))
            ack = await read_frame(r)
            assert ack["t"] == "ack" and not ack["ok"]
            assert ack["code"] == "feature_not_negotiated"
            assert lab.host.vms["a"].balloon.balloon_pages == 0
            w.close()
    run(main())


def test_driver_that_vanishes_mid_request_leaves_a_consistent_host():
    async def main():
        async with Lab(topo(64, 0, {"a": 64})) as lab:
            a = await lab.guest("a")
            await a.touch(np.arange(48))
            r, w = await raw_connect(lab.run_dir / "a.balloon.sock")
            w.write(frame({"t": "hello", "version": 1, "features": (1 << 40) | 1,
                           "page_size": 4096, "vm": "a"}))
            await read_frame(r)
            # A flood of batches, then vanish without reading a single ack.
            for i in range(40):
                w.write(frame({"t": "inflate", "id": i + 1, "runs": P.runs_to_wire([(i, 1)])}))
            w.write(b"\x00\x00\x01")  # and half a frame header
            w.close()
            vm = lab.host.vms["a"]
            for _ in range(2500):  # bounds a hang only
                if not vm.balloon.connected:
                    break
                await asyncio.sleep(0.02)
            await lab.quiesce()
            # Whatever was applied is consistent: ballooned pages are exactly the released.
            ballooned = np.nonzero(vm.led.balloon)[0]
            assert np.all(vm.led.p2m[ballooned] == -1)
            assert vm.mem.resident_pages() == 48 - ballooned.size
            # The VM still works and a new driver can connect and sees `actual`.
            d = await lab.driver("a")
            assert d.welcome.actual == ballooned.size
            await a.touch([60])
            await lab.quiesce()
    run(main())


def test_driver_that_stops_reading_is_disconnected():
    async def main():
        async with Lab(topo(64, 0, {"a": 64})) as lab:
            import hypervisor.balloon as hb
            old = hb.WRITE_TIMEOUT
            hb.WRITE_TIMEOUT = 0.5
            try:
                r, w = await raw_connect(lab.run_dir / "a.balloon.sock")
                w.write(frame({"t": "hello", "version": 1, "features": (1 << 40) | 1,
                               "page_size": 4096, "vm": "a"}))
                big = {"t": "inflate", "runs": P.runs_to_wire([(70, 1)])}  # rejected each time
                sent = 0
                vm = lab.host.vms["a"]
                # Keep sending requests whose (error) acks we never read.
                while vm.balloon.metrics.connects == 0 or vm.balloon.connected:
                    for _ in range(200):
                        sent += 1
                        w.write(frame({**big, "id": sent}))
                    try:
                        await asyncio.wait_for(w.drain(), 0.5)
                    except (TimeoutError, ConnectionError):
                        break
                    if sent > 400_000:
                        break
                for _ in range(1000):  # bounds a hang only
                    if not vm.balloon.connected:
                        break
                    await asyncio.sleep(0.05)
                assert not vm.balloon.connected
                assert vm.balloon.metrics.rejected.get("pfn_out_of_range", 0) > 0
                w.close()
            finally:
                hb.WRITE_TIMEOUT = old
            await lab.quiesce()
    run(main())


def test_fault_flood_disconnects_only_the_flooding_guest():
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 32})) as lab:
            b = await lab.guest("b")
            await b.touch([0, 1])
            a = await lab.guest("a")
            burst = b"".join(frame({"t": "ept_fault", "id": i + 1,
                                    "pfns": P.pfns_to_wire([i % 32])}) for i in range(500))
            a.ch.writer.write(burst)
            await asyncio.wait_for(a.closed.wait(), 30)
            assert a.error is not None and "outstanding" in a.error.message
            for _ in range(2500):  # bounds a hang only
                if lab.host.vms["a"].state == "crashed":
                    break
                await asyncio.sleep(0.02)
            await lab.quiesce()
            assert lab.host.vms["a"].state == "crashed"
            assert lab.host.ledger.frames_used == 2
            assert await b.read(1, 16) == b.stamp(1)
    run(main())


def test_guest_that_vanishes_mid_fault_leaves_nothing_behind():
    async def main():
        async with Lab(topo(16, 16, {"a": 16, "b": 16})) as lab:
            b = await lab.guest("b")
            await b.touch(np.arange(12))
            a = await lab.guest("a")
            # Needs reclaim of B's pages (a shootdown round trip), and A is gone by then.
            a.ch.writer.write(frame({"t": "ept_fault", "id": 1,
                                     "pfns": P.pfns_to_wire(list(range(10)))}))
            await a.ch.writer.drain()
            a.ch.writer.close()
            for _ in range(2500):  # bounds a hang only
                if lab.host.vms["a"].state == "crashed":
                    break
                await asyncio.sleep(0.02)
            await lab.quiesce()
            assert lab.host.vms["a"].state == "crashed"
            assert lab.host.vms["a"].mem.resident_pages() == 0
            assert lab.host.ledger.slots_used == lab.host.vms["b"].led.swapped
            for p in range(12):
                assert await b.read(p, 16) == b.stamp(p)
            await lab.quiesce()
    run(main())
