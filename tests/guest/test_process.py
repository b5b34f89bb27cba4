"""The guest kernel as a real process (``python -m guest.kernel``) against the in-test
hypervisor peer (tests/guest/hostpeer.py) and a test balloon driver speaking the real
kernel-channel protocol over the real socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from guest_hostpeer import HostPeer

from protocol import messages as m
from protocol.aio import Channel, PeerClosed
from protocol.connection import KernelClient
from protocol.features import StatTag as T
from protocol.pfn import runs_to_wire

PAGE = 4096
ROOT = Path(__file__).resolve().parents[2]


def config(pages: int, swap_pages: int, tasks: list[dict]) -> dict:
    return {"name": "vm", "memory": pages * PAGE, "guest_swap": swap_pages * PAGE,
            "stats_interval": 0.5, "seed": 3, "tasks": tasks}


@contextlib.asynccontextmanager
async def guest_vm(tmp_path: Path, pages: int, cfg: dict, env: dict | None = None):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    peer = HostPeer(str(run_dir / "vm.machine.sock"), "vm", pages)
    await peer.start()
    env = {**os.environ, **(env or {})}
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / "build" / "numba-cache"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "guest.kernel", "--vm", "vm",
        "--machine-sock", str(run_dir / "vm.machine.sock"),
        "--kernel-sock", str(run_dir / "vm.kernel.sock"), "--config", json.dumps(cfg),
        env=env, cwd=str(ROOT), stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(peer.booted.wait(), 120)
        yield peer, proc, run_dir
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await peer.close()


async def driver(run_dir: Path) -> Channel:
    return await Channel.connect_unix(run_dir / "vm.kernel.sock", KernelClient())


async def call(ch: Channel, msg_cls, **kw):
    mid = ch.conn.new_id()
    await ch.send(msg_cls(id=mid, **kw))
    while True:
        reply = await asyncio.wait_for(ch.recv(), 60)
        if getattr(reply, "id", None) == mid and not isinstance(reply, m.OomNotify):
            return reply


async def meminfo(ch: Channel) -> dict[int, int]:
    return (await call(ch, m.Meminfo)).stats


async def wait_for(ch: Channel, pred, what: str, limit: float = 90.0) -> dict[int, int]:
    """Poll meminfo until ``pred(stats)``; a generous cap only to fail instead of hanging."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while True:
        st = await meminfo(ch)
        if pred(st):
            return st
        if loop.time() > end:
            raise AssertionError(f"gave up waiting for {what}: {st}")
        await asyncio.sleep(0.05)


async def revoke_at_random(peer, pages: int, seed: int) -> int:
    """The host swaps guest pages behind the guest's back: 20 shootdowns of 200 random
    pages each, 20 ms apart. The pages it took."""
    rng = np.random.default_rng(seed)
    taken = 0
    for _ in range(20):
        taken += await peer.revoke(rng.integers(0, pages, 200))
        await asyncio.sleep(0.02)
    return taken


def test_boots_runs_under_guest_and_host_swap_and_halts(tmp_path) -> None:
    pages = 2048  # 8 MiB of RAM, a 10 MiB working set, 16 MiB of guest swap
    cfg = config(pages, 4096, [{"workload": "zipf", "size": 2560 * PAGE, "skew": 0.6,
                                "write_ratio": 0.4}])

    async def scenario():
        async with guest_vm(tmp_path, pages, cfg) as (peer, proc, run_dir):
            assert (run_dir / "vm.kernel.sock").exists()
            ch = await driver(run_dir)
            await meminfo(ch)
            assert (run_dir / "vm.guest-swap").exists()
            await wait_for(ch, lambda s: s[T.SWAP_OUT] > 0 and s[T.OPS] > 200_000,
                           "guest swapping")
            # now the host swaps guest pages behind its back, with shootdowns
            taken = await revoke_at_random(peer, pages, seed=1)
            base = (await meminfo(ch))[T.OPS]
            st = await wait_for(ch, lambda s: s[T.OPS] > base + 200_000, "more work")
            assert taken > 0
            assert st[T.CORRUPTED_READS] == 0
            assert st[T.SWAP_IN] > 0 and st[T.MAJFLT] > 0 and st[T.EPT_EXITS] > 0
            assert st[T.MEMTOT] == pages * PAGE
            # the guest only touches memory the host backed
            assert peer.resident_pages() <= int(peer.ept.sum())
            await ch.close()
            await peer.halt()
            rc = await asyncio.wait_for(proc.wait(), 30)
            err = (await proc.stderr.read()).decode()
            assert rc == 0, err
            assert "corrupted reads 0" in err
            assert not (run_dir / "vm.kernel.sock").exists()
            assert not (run_dir / "vm.guest-swap").exists()

    asyncio.run(scenario())


def test_halt_right_behind_a_resume_exits_0_without_a_traceback(tmp_path) -> None:
    """The shutdown race: a vCPU resumes from a fault, the halt is already read, and the
    task's next access would exit to a host that is gone."""
    pages = 1024
    cfg = config(pages, 0, [{"workload": "uniform", "size": 900 * PAGE, "write_ratio": 0.5}])

    async def scenario():
        async with guest_vm(tmp_path, pages, cfg) as (peer, proc, run_dir):
            ch = await driver(run_dir)
            await wait_for(ch, lambda s: s[T.OPS] > 50_000, "the task running")
            await ch.close()
            async with peer._lock:  # faults wait: none is served behind our back
                await peer._revoke(np.arange(pages))  # every next access faults
                loop = asyncio.get_running_loop()
                end = loop.time() + 60
                while not peer.in_flight:
                    assert loop.time() < end, "the guest never faulted"
                    await asyncio.sleep(0.01)
                assert await peer.resume_then_halt() >= 1
            rc = await asyncio.wait_for(proc.wait(), 60)
            err = (await proc.stderr.read()).decode()
            assert rc == 0, err
            assert "Traceback" not in err and "stopping: halt (test)" in err, err

    asyncio.run(scenario())


def test_a_phase_rate_limits_the_task(tmp_path) -> None:
    """Each phase runs at its own rate: an upper bound on the operations done, which a
    loaded machine can only make easier to meet."""
    rate = 2000.0
    cfg = config(1024, 0, [{"workload": "phases", "phases": [
        {"workload": "uniform", "size": 100 * PAGE, "rate": rate, "duration": 1000}]}])

    async def scenario():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with guest_vm(tmp_path, 1024, cfg) as (peer, proc, run_dir):
            ch = await driver(run_dir)
            await wait_for(ch, lambda s: s[T.OPS] > 0, "the task running")
            await asyncio.sleep(1.0)
            ops = (await meminfo(ch))[T.OPS]
            # tokens accrue at `rate` from the task's start and cap at one quantum
            assert 0 < ops <= rate * (loop.time() - t0) + 32768, ops
            await ch.close()
            await peer.halt()
            assert await asyncio.wait_for(proc.wait(), 30) == 0

    asyncio.run(scenario())


def test_exits_cleanly_when_the_hypervisor_vanishes(tmp_path) -> None:
    cfg = config(1024, 0, [{"workload": "uniform", "size": 100 * PAGE}])

    async def scenario():
        async with guest_vm(tmp_path, 1024, cfg) as (peer, proc, run_dir):
            await peer.close()  # EOF on the machine channel
            rc = await asyncio.wait_for(proc.wait(), 30)
            assert rc == 0
            assert "vanished" in (await proc.stderr.read()).decode()
            assert not (run_dir / "vm.kernel.sock").exists()

    asyncio.run(scenario())


def test_bad_workload_is_refused_at_start_naming_the_field(tmp_path) -> None:
    cfg = config(1024, 0, [{"workload": "zipf", "size": 100 * PAGE, "skew": -1}])

    async def scenario():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "guest.kernel", "--vm", "vm", "--machine-sock",
            str(tmp_path / "none.sock"), "--kernel-sock", str(tmp_path / "k.sock"),
            "--config", json.dumps(cfg), cwd=str(ROOT), stderr=asyncio.subprocess.PIPE)
        rc = await proc.wait()
        return rc, (await proc.stderr.read()).decode()

    rc, err = asyncio.run(scenario())
    assert rc == 2
    assert "config.tasks[0].skew" in err


def test_kernel_channel_balloon_and_hostile_inputs(tmp_path) -> None:
    pages = 8192
    cfg = config(pages, 0, [{"workload": "uniform", "size": 200 * PAGE, "write_ratio": 0.5}])

    async def scenario():
        async with guest_vm(tmp_path, pages, cfg) as (peer, proc, run_dir):
            ch = await driver(run_dir)
            st0 = await meminfo(ch)
            # absurd requests: clear error, nothing changed
            for kw in ({"count": 0, "max_order": 0}, {"count": pages + 1, "max_order": 3}):
                r = await call(ch, m.BalloonAlloc, **kw)
                assert isinstance(r, m.Ack) and not r.ok and r.code == "bad_field"
            r = await call(ch, m.ReportIsolate, min_order=3, max_runs=0)
            assert isinstance(r, m.Ack) and not r.ok
            # a real inflate: highest orders first
            r = await call(ch, m.BalloonAlloc, count=4096, max_order=10)
            assert isinstance(r, m.Pages)
            runs = r.run_array.astype(np.int64)
            assert int(runs[:, 1].sum()) == 4096
            assert len(runs) <= 8  # order-10 blocks, coalesced
            lst = await call(ch, m.BalloonList)
            assert np.array_equal(lst.run_array.astype(np.int64), runs)
            st = await meminfo(ch)
            assert st[T.BALLOON_PAGES] == 4096
            assert st[T.MEMTOT] == (pages - 4096) * PAGE
            # free pages not in the balloon: refused, naming the page; nothing changed
            stranger = int(runs[-1, 0] + runs[-1, 1]) % pages
            while stranger in range(int(runs[0, 0]), int(runs[0, 0] + runs[0, 1])):
                stranger = (stranger + 4096) % pages
            bad = np.array([[runs[0, 0], 1], [stranger, 1]])
            r = await call(ch, m.BalloonFree, runs=runs_to_wire(bad))
            assert isinstance(r, m.Ack) and not r.ok
            assert str(stranger) in (r.message or "")
            r = await call(ch, m.BalloonFree, runs=runs_to_wire(np.array([[pages, 1]])))
            assert not r.ok and r.code == "pfn_out_of_range"
            r = await call(ch, m.BalloonFree, runs=runs_to_wire(np.array([[runs[0, 0], 2],
                                                                         [runs[0, 0] + 1, 1]])))
            assert not r.ok and r.code == "duplicate_pfn"
            assert (await meminfo(ch))[T.BALLOON_PAGES] == 4096
            # a real deflate
            r = await call(ch, m.BalloonFree, runs=runs_to_wire(runs))
            assert r.ok
            # reporting: isolate, done -> reported; report_done of non-isolated refused
            r = await call(ch, m.ReportIsolate, min_order=9, max_runs=4)
            iso = r.run_array.astype(np.int64)
            assert len(iso) and (iso[:, 1] >= 512).all()
            r = await call(ch, m.ReportDone, runs=runs_to_wire(iso))
            assert r.ok
            assert (await meminfo(ch))[T.REPORTED_PAGES] >= 512
            r = await call(ch, m.ReportDone, runs=runs_to_wire(iso))
            assert not r.ok
            # isolate, then vanish: the pages come back (unreported) for the next driver
            r = await call(ch, m.ReportIsolate, min_order=0, max_runs=2)
            assert len(r.run_array)
            await ch.close()
            ch = await driver(run_dir)
            st = await meminfo(ch)
            assert st[T.BALLOON_PAGES] == 0 and st[T.CORRUPTED_READS] == 0
            assert st[T.MEMFREE] + st[T.ANON_PAGES] * PAGE + st[T.KERNEL_PAGES] * PAGE == \
                pages * PAGE
            # a second driver at the same time is refused with an error frame; the first
            # keeps its connection
            other = await driver(run_dir)
            await other.send(m.Meminfo(id=other.conn.new_id()))
            refusal = await asyncio.wait_for(other.recv(), 60)
            assert isinstance(refusal, m.Error) and refusal.code == "bad_state"
            assert "already connected" in refusal.message
            with pytest.raises(PeerClosed):
                await asyncio.wait_for(other.recv(), 60)
            await other.close()
            assert (await meminfo(ch))[T.CORRUPTED_READS] == 0
            # malformed frames: an error reply and a closed connection, guest unharmed
            for junk in (struct.pack(">I", 3) + b"\x93\x01\x02",  # array, not a map
                         struct.pack(">I", 0),
                         struct.pack(">I", 9 << 20),
                         _frame({"t": "balloon_alloc", "id": 1, "count": -1, "max_order": 1}),
                         _frame({"t": "balloon_alloc", "id": 1, "count": 5, "max_order": 99}),
                         _frame({"t": "warp_drive", "id": 1})):
                await ch.close()
                r, w = await asyncio.open_unix_connection(str(run_dir / "vm.kernel.sock"))
                w.write(junk)
                await w.drain()
                data = await asyncio.wait_for(r.read(), 30)  # until EOF
                body = msgpack.unpackb(data[4:], raw=False)
                assert body["t"] == "error" and body["message"]
                w.close()
                ch = await driver(run_dir)
            st2 = await meminfo(ch)
            assert st2[T.BALLOON_PAGES] == 0 and st2[T.CORRUPTED_READS] == 0
            assert st2[T.OPS] > st0[T.OPS]
            await ch.close()
            await peer.halt()
            assert await asyncio.wait_for(proc.wait(), 30) == 0

    asyncio.run(scenario())


def test_working_sets_shrink_and_finished_tasks_free_memory(tmp_path) -> None:
    pages = 4096
    cfg = config(pages, 0, [
        {"workload": "phases", "phases": [
            {"workload": "idle", "size": 1024 * PAGE, "duration": 1.5},
            {"workload": "idle", "size": 128 * PAGE, "duration": 1000}]},
        {"workload": "uniform", "size": 512 * PAGE, "duration": 1.0, "write_ratio": 0.5},
    ])

    async def scenario():
        async with guest_vm(tmp_path, pages, cfg) as (peer, proc, run_dir):
            ch = await driver(run_dir)
            # (States that last, not a moment both tasks are up: on a loaded machine that
            # moment may be over before the first meminfo.)
            st = await wait_for(ch, lambda s: s[T.TASKS_RUNNING] == 1 and s[T.ANON_PAGES] <= 128,
                                "task 1 finished and the phase shrink")
            # Both tasks had their memory: each of their pages was faulted in once.
            assert st[T.MINFLT] >= 1024 + 512
            assert st[T.ANON_PAGES] == 128  # the idle phase re-touched its smaller set
            assert st[T.CORRUPTED_READS] == 0
            free = st[T.MEMFREE] // PAGE
            assert free == pages - st[T.KERNEL_PAGES] - 128
            await ch.close()
            await peer.halt()
            assert await asyncio.wait_for(proc.wait(), 30) == 0

    asyncio.run(scenario())


def test_deflate_on_oom_then_oom_kill(tmp_path) -> None:
    """No swap, most of RAM in the balloon, a task that needs it: the kernel asks the driver
    (oom_notify) first; when the driver refuses, the OOM killer runs."""
    pages = 4096
    # The tasks start late enough for the driver to fill the balloon first, even on a
    # loaded machine.
    cfg = config(pages, 0, [{"workload": "scan", "size": 3000 * PAGE, "write_ratio": 0.5,
                             "start": 4.0},
                            {"workload": "scan", "size": 1500 * PAGE, "start": 5.0}])

    async def scenario():
        async with guest_vm(tmp_path, pages, cfg) as (peer, proc, run_dir):
            ch = await driver(run_dir)
            r = await call(ch, m.BalloonAlloc, count=3000, max_order=10)
            held = r.run_array.astype(np.int64)
            assert int(held[:, 1].sum()) >= 2000
            # answer oom_notify by deflating one run at a time
            notified = 0
            while True:
                msg = await asyncio.wait_for(ch.recv(), 60)
                if isinstance(msg, m.OomNotify):
                    notified += 1
                    if len(held):
                        await call_free(ch, held[:1])
                        held = held[1:]
                        await ch.send(m.Ack(id=msg.id, ok=True))
                    else:
                        await ch.send(m.Ack(id=msg.id, ok=False, code="not_negotiated"))
                        break
            st = await wait_for(ch, lambda s: s[T.OOM_KILL] >= 1, "an OOM kill")
            assert notified >= 1 and st[T.BALLOON_PAGES] == 0
            assert st[T.CORRUPTED_READS] == 0
            await ch.close()
            await peer.halt()
            assert await asyncio.wait_for(proc.wait(), 30) == 0

    asyncio.run(scenario())


async def call_free(ch: Channel, runs: np.ndarray) -> None:
    r = await call(ch, m.BalloonFree, runs=runs_to_wire(runs))
    assert r.ok


def _frame(d: dict) -> bytes:
    body = msgpack.packb(d, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def test_fileio_through_the_page_cache_under_host_swap(tmp_path) -> None:
    """A fileio task in the real kernel process, its disk a real file: the cache fills,
    writes back and is reclaimed while the host takes frames away behind its back; every
    block read holds its last write."""
    pages = 2048  # 8 MiB of RAM; 12 MiB of files on a 16 MiB disk
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    disk = run_dir / "vm.disk"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    cfg = {**config(pages, 512, [
        {"workload": "fileio", "files": 12, "file_size": 1 << 20, "write_ratio": 0.4,
         "skew": 0.5},
        {"workload": "zipf", "size": 256 * PAGE, "write_ratio": 0.5}]),
        "disk": 16 << 20, "disk_path": str(disk)}

    async def scenario():
        async with guest_vm(tmp_path, pages, cfg) as (peer, proc, run_dir):
            ch = await driver(run_dir)
            await wait_for(ch, lambda s: s.get(T.DISK_WRITE_PAGES, 0) > 0
                           and s.get(T.CACHE_DROPPED_CLEAN, 0) + s.get(T.CACHE_WRITTEN_BACK, 0)
                           > 0, "the cache to fill, write back and be reclaimed")
            taken = await revoke_at_random(peer, pages, seed=2)
            base = (await meminfo(ch))[T.OPS]
            st = await wait_for(ch, lambda s: s[T.OPS] > base + 100_000, "more work")
            assert taken > 0
            assert st[T.CORRUPTED_READS] == 0
            assert st[T.CACHES] == st[T.CACHE_PAGES] * PAGE > 0
            assert st[T.DISK_READ_PAGES] > 0 and st[T.DISK_READ_ERRORS] == 0
            assert peer.resident_pages() <= int(peer.ept.sum())
            await ch.close()
            await peer.halt()
            rc = await asyncio.wait_for(proc.wait(), 30)
            err = (await proc.stderr.read()).decode()
            assert rc == 0, err
            assert "corrupted reads 0" in err
            assert disk.exists()  # the host's file: the guest leaves it

    asyncio.run(scenario())


def test_a_disk_the_guest_cannot_open_fails_its_boot(tmp_path) -> None:
    cfg = {**config(1024, 0, [{"workload": "fileio", "files": 1, "file_size": PAGE}]),
           "disk": 1 << 20, "disk_path": str(tmp_path / "run" / "missing.disk")}

    async def scenario():
        async with guest_vm(tmp_path, 1024, cfg) as (peer, proc, run_dir):
            rc = await asyncio.wait_for(proc.wait(), 60)
            return rc, (await proc.stderr.read()).decode()

    rc, err = asyncio.run(scenario())
    assert rc == 1
    assert "boot failed: cannot open the disk" in err and "missing.disk" in err
