"""Modelled time and the guest kernel's own memory, end to end: a real host, guest kernel and
balloon driver; the `[cost]` table travels from the topology to the guest, and modelled time
comes back through the driver's stats to `dommemstat` and the CLI.

No assertion here depends on how fast the machine is: modelled time is charged per event,
and the checks relate fields of one `dommemstat` answer to each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PAGE = 4096
#: The console script installed beside the interpreter running the tests.
CLI = str(Path(sys.executable).parent / "balloonlab")

COST_TOPOLOGY = """
[host]
name = "e2e-modelled"
memory = "160MiB"
swap = "64MiB"
policy = "none"

[[vm]]
name = "a"
memory = "32MiB"
kernel_image = "1MiB"
stats_interval = "200ms"
guest_swap = "16MiB"
[[vm.task]]
workload = "uniform"
size = "8MiB"
write_ratio = 0.3
[[vm.task]]
workload = "uniform"
size = "4MiB"
rate = 200000

[cost]
memory_access = "200ns"
minor_fault = "1us"
host_swap_device = "hdd"
guest_swap_device = {latency = "20us", bandwidth = "2GB/s"}
"""


def test_dommemstat_reports_modelled_time_and_kernel_memory(live_host, tmp_path):
    host = live_host(COST_TOPOLOGY)

    def reported():
        st = host.stat("a")
        tasks = st.get("tasks") or []
        ok = (st.get("modelled_seconds") and st.get("ops") and len(tasks) == 2
              and all(t["accesses"] > 0 for t in tasks))
        return st if ok else None

    st = host.wait(reported, 60, "modelled time of both tasks in dommemstat")
    # The kernel's own memory: a 1 MiB image and one 64-byte descriptor per page of 32 MiB.
    memmap = 8192 * 64 // PAGE
    assert st["guest_kernel_memmap_pages"] == memmap == 128
    assert st["guest_kernel_pages"] == 256 + memmap
    assert st["backed_pages"] >= st["guest_kernel_pages"]  # touched at boot: backed
    # One stats message: the VM's clock is its tasks' clocks added, and its accesses theirs.
    ns = round(st["modelled_seconds"] * 1e9)
    tasks = st["tasks"]
    assert sum(t["accesses"] for t in tasks) == st["ops"]
    assert abs(sum(t["modelled_seconds"] for t in tasks) - st["modelled_seconds"]) < 1e-6
    # Each access costs 200 ns from this topology, and every first touch a minor fault
    # (1 us + zeroing) and an EPT exit on top: the clock is above the accesses' share.
    assert ns > 200 * st["ops"] + 1000 * st["minor_fault"]
    want = st["ops"] * 1e9 / ns
    assert abs(st["modelled_throughput"] - want) <= 1e-6 * want
    for t in tasks:
        assert t["modelled_throughput"] <= 1e9 / 200 + 1e-6  # never faster than the accesses
        assert t["wall_seconds"] > 0
        assert abs(t["wall_throughput"] - t["accesses"] / t["wall_seconds"]) \
            <= 1e-6 * t["wall_throughput"]
    assert st["corrupted_reads"] == 0

    # The same fields through the CLI, in text and --json.
    at = ["--host", str(host.run_dir)]
    out = subprocess.run([CLI, "dommemstat", "a", *at, "--json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    assert js["modelled_seconds"] > 0 and len(js["tasks"]) == 2
    text = subprocess.run([CLI, "dommemstat", "a", *at], capture_output=True, text=True,
                          timeout=60)
    assert text.returncode == 0, text.stderr
    assert "modelled_seconds" in text.stdout and "task 1" in text.stdout


def test_bad_cost_table_is_one_line_naming_file_and_key(tmp_path):
    f = tmp_path / "lab.toml"
    f.write_text(COST_TOPOLOGY.replace('host_swap_device = "hdd"', 'host_swap_device = "tape"'))
    res = subprocess.run([CLI, "validate", str(f)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert f"{f}: cost.host_swap_device: no device preset 'tape'" in lines[0]
