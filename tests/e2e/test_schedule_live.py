"""A topology's ``[[schedule]]`` and ``seed`` on a real host: the host runs each timed action
through the control handlers and says so in a ``schedule`` event; the guest kernel gets the
workload seed derived from the topology's seed, its name and its restart count."""

from __future__ import annotations

import pytest

from hypervisor.schedule import guest_seed

pytestmark = pytest.mark.slow

SCHEDULED = """
[host]
name = "sched"
memory = "64MiB"
swap = "32MiB"
policy = "none"
seed = 11

[[vm]]
name = "a"
memory = "32MiB"
features = ["must_tell_host", "stats", "ranges"]
stats_interval = "200ms"
[[vm.task]]
workload = "idle"
size = "4MiB"

[[schedule]]
at = "1s"
action = "set_policy"
name = "mom"
params = { pressure_threshold = 0.1 }

[[schedule]]
at = "2s"
action = "set_balloon"
vm = "a"
size = "8MiB"

[[schedule]]
at = "3s"
action = "setmem"
vm = "a"
size = "28MiB"
"""


def test_schedule_runs_each_action_in_time_order_with_an_event(live_host):
    host = live_host(SCHEDULED)

    def scheduled() -> list[dict]:
        return [e for e in host.events() if e["kind"] == "schedule"]

    evs = host.wait(lambda: len(scheduled()) == 3 and scheduled(), 60.0,
                    "three schedule events")
    assert [(e["entry"], e["action"], e["vm"], e["ok"]) for e in evs] == [
        (0, "set_policy", None, True), (1, "set_balloon", "a", True), (2, "setmem", "a", True)]
    assert [e["what"] for e in evs] == ["set_policy mom pressure_threshold=0.1",
                                        "set_balloon a 8MiB", "setmem a 28MiB"]
    # Each ran no earlier than its time after the host started (sleeps only ever run late).
    started = next(e["time"] for e in host.events() if e["kind"] == "host_started")
    for e in evs:
        assert e["time"] - started >= e["at"] - 0.05, e
    # The last balloon target is setmem's: 32 MiB - 28 MiB = 4 MiB = 1024 pages. It is a
    # manual target, so the policy switched on before it (mom) leaves it alone.
    assert evs[2]["result"]["target_pages"] == 1024
    assert evs[2]["result"]["manual_target"] is True
    host.wait(lambda: host.stat("a")["balloon_pages"] == 1024, 60.0, "balloon at 1024 pages")
    assert host.stat("a")["target_pages"] == 1024
    assert host.call("host_info")["policy"] == "mom"
    assert host.stat("a")["corrupted_reads"] == 0


def test_guest_workload_seed_derives_from_the_topology_seed(live_host):
    host = live_host(SCHEDULED.split("[[schedule]]")[0])
    # The guest kernel says its seed when it boots (its command line is the fork server's:
    # forked, the --config it was given is not on it).
    log = host.run_dir / "a.kernel.log"
    host.wait(lambda: "booted:" in log.read_text(), 60.0, "a's boot line")
    boot = next(line for line in log.read_text().splitlines() if "booted:" in line)
    assert boot.endswith(f"workload seed {guest_seed(11, 'a', 0)}"), boot
