"""Inflate release rate, end to end through the Host (not a test: a quick measurement).

    NUMBA_CACHE_DIR=build/numba-cache .venv/bin/python tests/hypervisor/bench_inflate.py [MiB]
    NUMBA_CACHE_DIR=build/numba-cache .venv/bin/python tests/hypervisor/bench_inflate.py \
        sizes [MiB ...]
    NUMBA_CACHE_DIR=build/numba-cache .venv/bin/python tests/hypervisor/bench_inflate.py \
        split [MiB]

An in-test guest faults in the whole VM, then an in-test driver inflates all of it over the
real balloon socket: RANGES with contiguous runs in 64 Ki-page batches, RANGES with every
other page (runs of one page: one punch per page), and virtio-style 256-pfn messages.
Each rate is printed with the same-run references: one PUNCH_HOLE over the same size, and
one PUNCH_HOLE per 4 KiB page, on a scratch memfd.

``split [MiB]`` (default 1024) inflates a fully backed VM in the balloon driver's batch shape
(contiguous 128 MiB batches) under cProfile and prints the host's release time and the part
of it spent inside ``fallocate`` (the punch): what is left is the host's own overhead.

``sizes`` (default 256 1024 4096 MiB) holds the batches fixed and varies the VM: in each VM,
after one small warm-up inflate, the guest backs the same 64 MiB (at the start of RAM) and
the driver inflates it as 8 contiguous batches of 8 MiB (one run each) and then, after a
deflate and a refault, as 8 batches of 2048 one-page runs (every other page). It prints the
host's release time per batch (``BalloonBackend.release_seconds``: EPT, ledger, punch) per
VM size: it should follow the batch's pages and runs, not the size of the VM.
"""
from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import Lab, topo

from hypervisor.vmmem import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

PAGE = 4096


def reference(pages: int) -> tuple[float, float]:
    fd = os.memfd_create("bench-ref", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, pages * PAGE)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        fallocate(fd, 0, 0, pages * PAGE)
        t0 = time.perf_counter()
        fallocate(fd, mode, 0, pages * PAGE)
        one = pages / (time.perf_counter() - t0)
        fallocate(fd, 0, 0, pages * PAGE)
        t0 = time.perf_counter()
        for p in range(pages):
            fallocate(fd, mode, p * PAGE, PAGE)
        per_page = pages / (time.perf_counter() - t0)
        return one, per_page
    finally:
        os.close(fd)


async def one_case(pages: int, case: str) -> float:
    async with Lab(topo(pages + 64, 0, {"a": pages})) as lab:
        g = await lab.guest("a")
        d = await lab.driver("a", features=["must_tell_host", "ranges"] if case != "virtio"
                             else ["must_tell_host"])
        await g.touch(np.arange(pages), stamp=False)
        vm = lab.host.vms["a"]
        assert vm.mem.resident_pages() == pages
        if case == "runs":
            batches = [np.arange(s, min(s + 65536, pages)) for s in range(0, pages, 65536)]
        elif case == "fragmented":
            every_other = np.arange(0, pages, 2)
            batches = [every_other[i:i + 65536] for i in range(0, every_other.size, 65536)]
        else:
            batches = [np.arange(s, min(s + 256, pages)) for s in range(0, pages, 256)]
        want = sum(b.size for b in batches)
        t0 = time.perf_counter()
        for b in batches:
            ack = await d.inflate(b, runs=case != "virtio")
            assert ack.ok, ack
        dt = time.perf_counter() - t0
        assert vm.mem.resident_pages() == pages - want
        async with lab.host.mm_lock:
            lab.host.check_conservation()
        return want / dt


async def sizes_case(pages: int) -> dict[str, float]:
    """Host release seconds per batch for fixed batches in a VM of ``pages`` pages."""
    span = 64 * 256  # 64 MiB of pages
    async with Lab(topo(pages + 1024, 0, {"a": pages})) as lab:
        g = await lab.guest("a")
        d = await lab.driver("a")
        vm = lab.host.vms["a"]
        out: dict[str, float] = {}
        await g.touch(np.arange(span, span + 64), stamp=False)  # warm-up: kernels loaded
        assert (await d.inflate(np.arange(span, span + 64))).ok
        for shape in ("contiguous", "one-page runs"):
            await g.touch(np.arange(span), stamp=False)
            if shape == "contiguous":
                batches = [np.arange(s, s + span // 8) for s in range(0, span, span // 8)]
            else:
                odd = np.arange(0, span, 2)
                batches = [odd[i:i + 2048] for i in range(0, odd.size, 2048)]
            t0 = vm.balloon.release_seconds
            for b in batches:
                ack = await d.inflate(b)
                assert ack.ok, ack
            out[shape] = (vm.balloon.release_seconds - t0) / len(batches)
            ballooned = np.concatenate(batches)
            assert (await d.deflate(ballooned)).ok
        async with lab.host.mm_lock:
            lab.host.check_conservation()
        return out


def sizes(mibs: list[int]) -> None:
    print("host release time per inflate batch (64 MiB backed, 8 batches of 8 MiB)")
    print(f"{'VM MiB':>8} {'contiguous (1 run)':>20} {'2048 one-page runs':>20}")
    for mib in mibs:
        r = asyncio.run(sizes_case(mib * 256))
        print(f"{mib:>8} {r['contiguous'] * 1e3:>17.2f} ms "
              f"{r['one-page runs'] * 1e3:>17.2f} ms")


async def split_case(pages: int) -> tuple[float, float, int]:
    """Host release seconds and, of them, seconds inside fallocate for the balloon driver's
    batch shape (contiguous 128 MiB batches) over a fully backed VM (cProfile)."""
    async with Lab(topo(pages + 1024, 0, {"a": pages})) as lab:
        g = await lab.guest("a")
        d = await lab.driver("a")
        vm = lab.host.vms["a"]
        await g.touch(np.arange(pages), stamp=False)
        assert (await d.inflate(np.arange(pages - 64, pages))).ok  # warm-up
        prof = cProfile.Profile()
        t0 = vm.balloon.release_seconds
        starts = range(0, pages - 64 - 32768 + 1, 32768)
        prof.enable()
        for s in starts:
            assert (await d.inflate(np.arange(s, s + 32768))).ok
        prof.disable()
        release = vm.balloon.release_seconds - t0
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        punch = sum(v[3] for k, v in stats.items()
                    if k[2] == "fallocate" and k[0].endswith("vmmem.py"))
        return release, punch, len(starts)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "split":
        mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
        release, punch, n = asyncio.run(split_case(mib * 256))
        print(f"{n} batches of 128 MiB in a {mib} MiB VM: host release {release * 1e3:.1f} ms, "
              f"of which fallocate {punch * 1e3:.1f} ms ({punch / release:.0%}); the rest "
              f"{(release - punch) / n * 1e3:.2f} ms per batch")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "sizes":
        sizes([int(a) for a in sys.argv[2:]] or [256, 1024, 4096])
        return
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    pages = mib * 256
    one, per_page = reference(pages)
    print(f"VM {mib} MiB = {pages} pages")
    print(f"reference: one PUNCH_HOLE     {one:12.0f} pages/s ({one * PAGE / 2**30:.2f} GiB/s)")
    print(f"reference: PUNCH_HOLE per page {per_page:12.0f} pages/s "
          f"({per_page * PAGE / 2**30:.2f} GiB/s)")
    for case in ("runs", "fragmented", "virtio"):
        rate = asyncio.run(one_case(pages, case))
        print(f"inflate {case:10s} {rate:12.0f} pages/s ({rate * PAGE / 2**30:.2f} GiB/s) "
              f"= {rate / one:.2f}x one-punch, {rate / per_page:.2f}x per-page punch")


if __name__ == "__main__":
    main()
