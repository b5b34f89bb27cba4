"""Inflate release rate, end to end through the Host (not a test: a quick measurement).

    NUMBA_CACHE_DIR=build/numba-cache .venv/bin/python tests/hypervisor/bench_inflate.py [MiB]

An in-test guest faults in the whole VM, then an in-test driver inflates all of it over the
real balloon socket: RANGES with contiguous runs in 64 Ki-page batches, RANGES with every
other page (runs of one page: one punch per page), and virtio-style 256-pfn messages.
Each rate is printed with the same-run references: one PUNCH_HOLE over the same size, and
one PUNCH_HOLE per 4 KiB page, on a scratch memfd.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import Lab, topo  # noqa: E402

from hypervisor.vmmem import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate  # noqa: E402

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


def main() -> None:
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
