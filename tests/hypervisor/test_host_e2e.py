"""The Host with the real guest kernel and balloon driver processes (a few seconds)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hv_peers import run

from hypervisor.host import Host
from hypervisor.topology import parse_topology

TOPOLOGY = """
[host]
name = "e2e"
memory = "96MiB"
swap = "64MiB"
policy = "none"
[[vm]]
name = "a"
memory = "64MiB"
stats_interval = "250ms"
guest_swap = "16MiB"
[[vm.task]]
workload = "idle"
size = "48MiB"
duration = "1s"
"""


async def _until(cond, what: str, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_real_guest_inflate_releases_exactly_the_backed_pages():
    async def main():
        base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
        host = Host(parse_topology(TOPOLOGY), run_dir=base / "run")
        await host.start()
        try:
            vm = host.vms["a"]
            # The idle task touches 48 MiB, then ends and frees it (still backed).
            await _until(lambda: vm.balloon.connected and vm.led.backed >= 12288, "boot")
            await _until(lambda: vm.balloon.stats.get(265, 1) == 0, "task end")
            async with host.mm_lock:
                host.check_conservation()
                before = vm.mem.resident_pages()
            host.set_balloon_target(vm, 12288)
            await _until(lambda: vm.balloon.balloon_pages >= 12288, "inflate")
            async with host.mm_lock:
                host.check_conservation()
                released = vm.balloon.metrics.released_frames
                assert released > 0
                assert vm.mem.resident_pages() == before - released
            host.set_balloon_target(vm, 0)
            await _until(lambda: vm.balloon.balloon_pages == 0, "deflate")
            await _until(lambda: vm.balloon.actual == 0, "actual")
            assert vm.balloon.stats.get(256, 0) == 0  # no corrupted reads
            assert vm.balloon.metrics.rejected == {}
            async with host.mm_lock:
                host.check_conservation()
        finally:
            await host.shutdown("test over")
            shutil.rmtree(base, ignore_errors=True)
    run(main())


# Run in a fresh interpreter: in this one, other tests may have loaded kernels already.
_NO_LOAD_AFTER_START = r"""
import asyncio, shutil, sys, tempfile
from pathlib import Path
from numba.core.registry import CPUDispatcher
from hypervisor.host import Host
from hypervisor.topology import parse_topology

def signatures():
    out = {}
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in ("protocol", "hypervisor"):
            for k, v in vars(mod).items():
                if isinstance(v, CPUDispatcher):
                    out[f"{name}.{k}"] = set(map(str, v.signatures))
    return out

async def until(cond):
    while not cond():
        await asyncio.sleep(0.02)

async def main():
    base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    host = Host(parse_topology(sys.argv[1]), run_dir=base / "run")
    await host.start()
    before = signatures()
    try:
        vm = host.vms["a"]
        await until(lambda: vm.balloon.connected and vm.led.backed >= 12288)
        host.set_balloon_target(vm, 12288)
        await until(lambda: vm.balloon.balloon_pages >= 12288)
        host.set_balloon_target(vm, 0)
        await until(lambda: vm.balloon.balloon_pages == 0)
    finally:
        await host.shutdown("test over")
        shutil.rmtree(base, ignore_errors=True)
    for name, sigs in signatures().items():
        for sig in sorted(sigs - before.get(name, set())):
            print(name, sig)

asyncio.run(main())
"""


def test_the_balloon_path_loads_no_kernel_after_start():
    """The host loads every Numba kernel of the balloon path at start, for the argument
    types the path passes (decoded batches are read-only arrays, a type of their own):
    none is compiled or read from the cache mid-inflate, where it would cost tens of
    milliseconds and, out of descriptors, fail the batch."""
    out = subprocess.run([sys.executable, "-c", _NO_LOAD_AFTER_START, TOPOLOGY],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "", f"kernels loaded after start:\n{out.stdout}"
