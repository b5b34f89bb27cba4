"""A 16-VM cut of the shipped ``fleet`` topology, end to end: every VM comes up with its
driver negotiated, the mom policy runs over all of them, nothing is corrupted, and the
host's frames in use equal Linux's resident memfd pages (conservation)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from conftest import LiveHost, host_env, stop_and_check

from balloonlab import launcher
from benchmarks.scale import boot_timeout_for, fleet_cut

VMS = 16


@pytest.mark.slow
def test_sixteen_vm_fleet_cut_runs_clean(tmp_path: Path) -> None:
    topo = fleet_cut(VMS, "e2e-fleet", tmp_path / "run")
    topo_file = tmp_path / "fleet16.toml"
    topo_file.write_text(topo.to_toml())
    host = LiveHost(launcher.launch(topo, topo_file=topo_file, env=host_env()))
    pids: list[int] = []
    try:
        try:  # bounds a hang only: 16 VMs on a loaded 2-core machine take minutes
            launcher.wait_ready(host.launched, boot_timeout_for(VMS) * 2)
        except launcher.LaunchError as e:
            raise AssertionError(f"{e}\n--- host log tail ---\n{host.log_tail()}") from None
        pids = host.process_pids()
        vms = host.call("list_vms")
        assert len(vms) == VMS
        assert all(v["state"] == "running" and v["driver"] == "connected" for v in vms), vms
        # A kernel and a driver per VM, the host and its fork server.
        assert len(set(pids)) == 2 * VMS + 2
        names = [v["name"] for v in vms]

        # Every guest's workload has run (its stats reached the host) and the policy has
        # taken rounds over the whole fleet.
        def all_reported() -> bool:
            stats = {n: host.stat(n) for n in names}
            return all(st["unused"] is not None for st in stats.values()) and all(
                (st["ops"] or 0) > 0 for n, st in stats.items() if not n.startswith("idle"))

        host.wait(all_reported, 300, "every workload to report accesses", interval=0.5)
        rounds0 = host.call("host_info")["policy_rounds"]
        host.wait(lambda: host.call("host_info")["policy_rounds"] >= rounds0 + 2, 300,
                  "two more mom policy rounds", interval=0.5)
        for n in names:
            assert host.stat(n)["corrupted_reads"] == 0, f"corrupted reads in {n}"
        host.check_conservation(settle=30.0)
        assert host.call("host_info")["frames_free"] >= 0
    finally:
        if host.proc.poll() is None and not pids:
            with contextlib.suppress(Exception):
                pids = host.process_pids()
        stop_and_check(host, pids)
