"""The three layers end to end: real hypervisor, guest kernel and balloon driver processes.

Every test checks the project's integrity proof (zero corrupted reads) and the memory
conservation invariant against Linux's own count of resident memfd pages.
"""

from __future__ import annotations

import os
import signal

import pytest

MiB = 1 << 20
PAGE = 4096


def _no_corruption(host, *vms: str) -> None:
    for vm in vms:
        assert host.stat(vm)["corrupted_reads"] == 0, f"corrupted reads in {vm}"


def _event_kinds(host, vm: str | None = None) -> list[str]:
    return [e["kind"] for e in host.events() if vm is None or e.get("vm") == vm]


# A VM whose whole RAM was touched by a task that then ended: every free guest page is
# backed by a host frame, so every ballooned page must release exactly one frame. The task
# ends a second after its last touch (`hold`), however long a loaded machine makes the touch.
TOUCHED_THEN_FREED = """
[host]
name = "e2e-{name}"
memory = "160MiB"
swap = "0"
policy = "none"

[[vm]]
name = "a"
memory = "32MiB"
features = [{features}]
wire = "{wire}"
stats_interval = "200ms"
guest_swap = "32MiB"
[[vm.task]]
workload = "idle"
size = "40MiB"
hold = "1s"
"""


def _touched_host(live_host, name: str, *, wire: str = "ranges",
                  features: str = '"must_tell_host", "stats", "deflate_on_oom", "ranges"'):
    if wire == "virtio":
        features = features.replace(', "ranges"', "")
    host = live_host(TOUCHED_THEN_FREED.format(name=name, wire=wire, features=features))
    # Wait until the task has touched everything and ended (its memory freed, still backed).
    def touched_and_freed() -> bool:
        st = host.stat("a")
        return st["backed_pages"] >= 0.9 * 8192 and (st["usable"] or 0) >= 20 * MiB

    host.wait(touched_and_freed, 60, "the idle task to touch RAM and end")
    return host


@pytest.mark.parametrize("wire", ["ranges", "virtio"])
def test_inflate_releases_exactly_the_ballooned_pages(live_host, wire):
    host = _touched_host(live_host, f"inflate-{wire}", wire=wire)
    host.check_conservation()
    before = host.memfd_resident_pages()["a"]
    backed_before = host.stat("a")["backed_pages"]
    assert before == backed_before

    target = 4096  # 16 MiB of the 32 MiB VM
    host.call("set_balloon", vm="a", pages=target)
    # The host's view (balloon_pages) comes first; the driver reports `actual` after the
    # last ack: wait for both, then read the rest.
    host.wait(lambda: host.stat("a")["balloon_pages"] == target, 60, "balloon to reach target")
    st = host.wait(lambda: (lambda s: s if s["actual"] == (8192 - target) * 4096 else None)(
        host.stat("a")), 60, "the driver's actual (the guest's current memory, in bytes)")
    after = host.memfd_resident_pages()["a"]
    counters = host.call("counters", vm="a")
    assert counters["inflated"] == target
    # Linux's own count of resident pages fell by exactly the frames the host says the
    # balloon released: one per ballooned page that was backed ...
    assert before - after == counters["released_frames"], (before, after, counters)
    # ... and at most the pages the guest never touched (a few below its watermarks)
    # were ballooned without being backed.
    never_backed = 8192 - backed_before
    assert target - never_backed <= before - after <= target, (before, after, never_backed)
    assert st["backed_pages"] == after
    host.check_conservation()
    _no_corruption(host, "a")


@pytest.mark.slow
def test_deflate_returns_memory_that_tasks_then_use(live_host):
    host = live_host("""
[host]
name = "e2e-deflate"
memory = "128MiB"
swap = "0"
policy = "none"

[[vm]]
name = "a"
memory = "48MiB"
features = ["must_tell_host", "stats", "ranges"]
stats_interval = "200ms"
guest_swap = "64MiB"
[[vm.task]]
workload = "zipf"
size = "8MiB"
skew = 0.8
[[vm.task]]
workload = "uniform"
size = "32MiB"
write_ratio = 0.5
start = "12s"  # after the balloon inflated, even on a loaded machine
""")
    target = 6144  # 24 MiB ballooned: the second task will not fit beside it
    host.call("set_balloon", vm="a", pages=target)
    host.wait(lambda: host.stat("a")["balloon_pages"] >= target - 64, 60, "inflate")
    # The second task starts and runs short of memory (it swaps in the guest).
    host.wait(lambda: (host.stat("a")["swap_out"] or 0) > 0, 60, "guest swapping under the balloon")
    squeezed = host.stat("a")["backed_pages"]
    host.call("set_balloon", vm="a", pages=0)
    host.wait(lambda: host.stat("a")["balloon_pages"] == 0, 60, "deflate")
    # The deflated memory is used: more of the VM is backed than the balloon allowed.
    host.wait(lambda: host.stat("a")["backed_pages"] > squeezed + 2048, 60,
              "tasks to use the deflated memory")
    ops = host.stat("a")["ops"] or 0
    host.wait(lambda: (host.stat("a")["ops"] or 0) > ops, 60, "tasks to keep running")
    host.check_conservation()
    _no_corruption(host, "a")


@pytest.mark.slow
def test_driver_killed_mid_inflate_is_restarted_and_reconciled(live_host):
    host = _touched_host(live_host, "kill", wire="virtio")
    target = 6000
    host.call("set_balloon", vm="a", pages=target)
    host.wait(lambda: host.stat("a")["balloon_pages"] > 500, 60, "inflate to be under way")
    old_pid = host.vm("a")["driver_pid"]
    os.kill(old_pid, signal.SIGKILL)
    host.wait(lambda: host.vm("a").get("driver") == "connected"
              and host.vm("a")["driver_pid"] not in (None, old_pid), 60,
              "the driver to be restarted and reconnect")
    assert "driver_restarted" in _event_kinds(host, "a")
    host.wait(lambda: host.stat("a")["balloon_pages"] == target, 60, "target after restart")
    # The three views agree: host, driver (actual) and guest kernel's balloon list.
    host.wait(lambda: host.stat("a")["actual"] == (8192 - target) * 4096, 60,
              "driver's actual to match")
    host.wait(lambda: host.stat("a").get("guest_balloon_pages") == target, 60,
              "the guest kernel's balloon list to match (no page leaked or counted twice)")
    host.check_conservation()
    _no_corruption(host, "a")


OOM_TOPOLOGY = """
[host]
name = "e2e-oom-{name}"
memory = "128MiB"
swap = "0"
policy = "none"

[[vm]]
name = "a"
memory = "32MiB"
features = [{features}]
stats_interval = "200ms"
guest_swap = "0"
[[vm.task]]
workload = "uniform"
size = "16MiB"
write_ratio = 0.5
start = "12s"
"""
# (The task starts late enough that the balloon is inflated first, even on a loaded machine.)


@pytest.mark.slow
def test_deflate_on_oom_shrinks_the_balloon_instead_of_killing(live_host):
    host = live_host(OOM_TOPOLOGY.format(
        name="deflate", features='"must_tell_host", "stats", "deflate_on_oom", "ranges"'))
    host.call("set_balloon", vm="a", pages=5120)  # 20 MiB: the 16 MiB task cannot fit
    host.wait(lambda: host.stat("a")["balloon_pages"] >= 4096, 60, "inflate before the task")
    # The task starts, runs out of memory, and the balloon gives way.
    host.wait(lambda: (host.stat("a")["ops"] or 0) > 200_000, 60, "the task to run")
    st = host.stat("a")
    assert st["oom_kills"] == 0
    assert st["balloon_pages"] < 5120
    assert "guest_oom_kill" not in _event_kinds(host, "a")
    host.check_conservation()
    _no_corruption(host, "a")


@pytest.mark.slow
def test_without_deflate_on_oom_the_oom_killer_acts_and_is_reported(live_host):
    host = live_host(OOM_TOPOLOGY.format(name="kill",
                                         features='"must_tell_host", "stats", "ranges"'))
    host.call("set_balloon", vm="a", pages=5120)
    host.wait(lambda: host.stat("a")["balloon_pages"] >= 4096, 60, "inflate before the task")
    host.wait(lambda: (host.stat("a")["oom_kills"] or 0) >= 1, 60, "the guest OOM killer")
    host.wait(lambda: "guest_oom_kill" in _event_kinds(host, "a"), 60, "an OOM event")
    assert host.stat("a")["balloon_pages"] >= 4096  # the balloon did not give way
    host.check_conservation()
    _no_corruption(host, "a")


@pytest.mark.slow
def test_free_page_reporting_returns_a_finished_tasks_memory(live_host):
    host = live_host("""
[host]
name = "e2e-report"
memory = "128MiB"
swap = "0"
policy = "none"

[[vm]]
name = "a"
memory = "64MiB"
features = ["must_tell_host", "stats", "reporting", "ranges"]
stats_interval = "200ms"
guest_swap = "0"
[[vm.task]]
workload = "idle"
size = "40MiB"
hold = "1s"
""")
    host.wait(lambda: host.stat("a")["backed_pages"] >= 10240, 60, "the task to touch 40 MiB")
    # Once the task has ended and its memory is free, reporting hands it back to the host.
    host.wait(lambda: host.stat("a")["backed_pages"] < 4096, 60,
              "free page reporting to release the finished task's memory")
    assert host.stat("a")["balloon_pages"] == 0  # reporting is not ballooning
    host.check_conservation()
    _no_corruption(host, "a")


@pytest.mark.slow
def test_a_guest_killed_mid_run_is_freed_and_restarted_and_its_neighbour_never_notices(live_host):
    host = live_host("""
[host]
name = "e2e-crash"
memory = "96MiB"
swap = "0"
policy = "none"

[[vm]]
name = "a"
memory = "32MiB"
stats_interval = "200ms"
on_crash = "restart"
[[vm.task]]
workload = "uniform"
size = "16MiB"
write_ratio = 0.5

[[vm]]
name = "b"
memory = "32MiB"
stats_interval = "200ms"
[[vm.task]]
workload = "zipf"
size = "12MiB"
write_ratio = 0.5
""")
    host.call("set_balloon", vm="a", pages=2048)
    host.wait(lambda: host.stat("a")["balloon_pages"] == 2048, 60, "a's balloon")
    host.wait(lambda: host.stat("a")["backed_pages"] >= 4096, 60, "a's task to touch its memory")
    b_ops = host.stat("b")["ops"] or 0
    old_pid = host.vm("a")["pid"]
    os.kill(old_pid, signal.SIGKILL)
    host.wait(lambda: "vm_crashed" in _event_kinds(host, "a"), 60, "the crash to be reported")
    # Restarted with a fresh guest: running again, driver negotiated, new process.
    host.wait(lambda: host.vm("a")["state"] == "running" and host.vm("a")["pid"] != old_pid
              and host.vm("a").get("driver") == "connected", 60, "a to be restarted")
    host.wait(lambda: (host.stat("a")["ops"] or 0) > 0, 60, "a's new guest to run its task")
    # Nothing of the old guest is left in the ledger or in Linux: conservation holds.
    host.check_conservation()
    # The neighbour kept running the whole time, and nothing it wrote was lost.
    host.wait(lambda: (host.stat("b")["ops"] or 0) > b_ops + 100_000, 60, "b to keep running")
    assert host.call("counters", vm="b")["restarts"] == 0
    _no_corruption(host, "a", "b")
