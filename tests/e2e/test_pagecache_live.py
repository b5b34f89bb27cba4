"""The page cache end to end: a VM running the dbench-like ``fileio`` workload over its
virtual disk beside a VM of anonymous memory, both in guest swap, on a host too small for
both (host swap), then a balloon that takes the file VM's memory. Every block read back
from the cache or the disk must hold its last write (zero corrupted reads)."""

from __future__ import annotations

import pytest

MiB = 1 << 20
PAGE = 4096

TOPOLOGY = """
[host]
name = "e2e-pagecache"
memory = "56MiB"
swap = "128MiB"
policy = "none"

[[vm]]
name = "files"
memory = "32MiB"
guest_swap = "16MiB"
disk = "64MiB"
stats_interval = "200ms"
min_memory = "4MiB"
[[vm.task]]
workload = "fileio"
files = 40
file_size = "1MiB"
write_ratio = 0.4
skew = 0.6
[[vm.task]]
workload = "zipf"
size = "6MiB"
write_ratio = 0.5

[[vm]]
name = "anon"
memory = "32MiB"
guest_swap = "32MiB"
stats_interval = "200ms"
[[vm.task]]
workload = "uniform"
size = "40MiB"
write_ratio = 0.5
"""


@pytest.mark.slow
def test_fileio_beside_anon_with_guest_and_host_swap_keeps_every_block(live_host):
    host = live_host(TOPOLOGY)
    disk = host.run_dir / "files.disk"
    assert disk.stat().st_size == 64 * MiB

    def busy() -> bool:
        f, a = host.stat("files"), host.stat("anon")
        return ((f["disk_caches"] or 0) > 8 * MiB and (f["disk_write_pages"] or 0) > 0
                and (f["disk_read_pages"] or 0) > 0 and (a["swap_out"] or 0) > 0
                and f["host_swapped_pages"] + a["host_swapped_pages"] > 0)

    host.wait(busy, 120, "file I/O through the cache, guest swap and host swap all at work")
    f = host.stat("files")
    assert f["disk_caches"] == (f["guest_cache_pages"] or 0) * PAGE
    assert (f["guest_dirty_pages"] or 0) <= (f["guest_cache_pages"] or 0)
    # coalescing: the cache reads and writes runs of contiguous blocks
    assert f["disk_read_ios"] < f["disk_read_pages"]
    assert host.stat("anon")["guest_cache_pages"] is None  # no disk, no page cache
    # The host swaps clean cache pages (the disk holds them): silent swap writes, counted by
    # the guest from the shootdowns that name them.
    host.wait(lambda: (host.stat("files")["silent_swap_writes"] or 0) > 0, 120,
              "the host to swap clean page-cache pages out")
    # The balloon takes the file VM's memory: cold cache pages are dropped (or written
    # back) to make room, and nothing read afterwards is wrong.
    host.call("set_balloon", vm="files", pages=4096)
    host.wait(lambda: host.stat("files")["balloon_pages"] == 4096, 120, "the files balloon")
    ops = host.stat("files")["ops"] or 0
    host.wait(lambda: (host.stat("files")["ops"] or 0) > ops + 200_000, 120,
              "the file VM to keep working in 16 MiB")
    for vm in ("files", "anon"):
        assert host.stat(vm)["corrupted_reads"] == 0, f"corrupted reads in {vm}"
    assert host.stat("files")["disk_read_errors"] == 0
    assert "vm_crashed" not in [e["kind"] for e in host.events()]
    host.check_conservation()
