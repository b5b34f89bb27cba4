"""False swap reads in a live host with the real guest kernel and driver: provoked by host
swap, avoided (with double paging) by the balloon under the same pressure.

One VM of 32 MiB. A first task writes 20 MiB for 3 s and ends (its pages are freed); a
second starts at 4 s and works on 36 MiB, more than the VM has. Under host swap the host has
16 MiB for the VM: it swaps out the first task's pages behind the guest's back, and when the
guest hands the freed pages to the second task the host reads their stale bytes back only
for the guest to zero them. Under the balloon the host has room and the VM is ballooned to
16 MiB at boot: the same pressure lands on guest swap only, and nothing is read back from
host swap. Double paging is provoked at unit level (tests/guest/test_pathologies.py): live,
the guest reaches its own memory pressure only after minutes of host thrashing. Nothing
here depends on how fast the machine is: the waits are for counters, bounded only against a
hang.
"""

from __future__ import annotations

import pytest

TASKS = """
[[vm.task]]
workload = "scan"
size = "20MiB"
write_ratio = 1.0
duration = "3s"
[[vm.task]]
workload = "uniform"
size = "36MiB"
write_ratio = 0.5
start = "4s"
"""


def topology(name: str, host_memory: str, balloon: str) -> str:
    return (f'[host]\nname = "{name}"\nmemory = "{host_memory}"\nswap = "128MiB"\n'
            f'policy = "none"\n\n[[vm]]\nname = "a"\nmemory = "32MiB"\nkernel_image = "1MiB"\n'
            f'guest_swap = "32MiB"\nstats_interval = "200ms"\nmin_memory = "8MiB"\n'
            f'initial_balloon = "{balloon}"\n' + TASKS)


@pytest.mark.slow
def test_host_swap_makes_false_reads_the_balloon_none(live_host):
    host = live_host(topology("e2e-patho-swap", "16MiB", "0"))

    def provoked():
        st = host.stat("a")
        return st if (st.get("false_swap_reads") or 0) > 0 else None

    st = host.wait(provoked, 180, "false reads under host swap")
    assert st["host_swap_reads"] >= st["false_swap_reads"] > 0
    assert st["host_swap_noncontig_ratio"] is not None
    assert st["corrupted_reads"] == 0
    info = host.call("host_info")
    assert info["false_swap_reads"] >= st["false_swap_reads"]
    assert info["host_swap_reads"] >= st["host_swap_reads"]
    kinds = {(e.get("kind"), e.get("counter")) for e in host.events()}
    assert ("pathology", "false_swap_reads") in kinds
    assert ("pathology", "host_swap_reads_noncontig") in kinds

    ball = live_host(topology("e2e-patho-balloon", "96MiB", "16MiB"))

    def pressed():
        s = ball.stat("a")
        # The second task cycles through guest swap: major faults well past its start.
        return s if (s.get("major_fault") or 0) > 2000 else None

    sb = ball.wait(pressed, 180, "the second task under guest swap in the ballooned VM")
    assert sb["balloon_pages"] == 16 * 256
    assert sb["host_swap_reads"] == 0 and sb["host_swapped_pages"] == 0
    assert sb["double_paging"] == 0
    assert sb["false_swap_reads"] == 0
    assert sb["corrupted_reads"] == 0
