"""Smoke tests of ``balloonlab bench scale``: the fleet cuts it runs, its result and report,
a host that does not come up is a failed point (never a hang), and one real 1-VM point.
No timing assertions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from balloonlab.bench import bench
from benchmarks import scale as S
from hypervisor.topology import example_path, load_topology, parse_topology


def test_fleet_cut_takes_the_first_vms_and_cycles_beyond_the_fleet(tmp_path: Path) -> None:
    fleet = load_topology(example_path("fleet"))
    cut = S.fleet_cut(4, "cut", tmp_path / "run", 0.5)
    assert cut.vms == fleet.vms[:4]
    assert cut.host.name == "cut" and cut.host.run_dir == str(tmp_path / "run")
    assert cut.host.policy == "mom" and cut.host.policy_interval == 0.5
    big = S.fleet_cut(70, "big")
    names = [v.name for v in big.vms]
    assert len(set(names)) == 70
    assert names[32] == f"{fleet.vms[0].name}-1" and names[69] == f"{fleet.vms[5].name}-2"
    # What the host reads back is the same topology.
    assert parse_topology(cut.to_toml()).vms == cut.vms
    with pytest.raises(ValueError, match="at least 1 VM"):
        S.fleet_cut(0, "none")


def _point(n: int, up: float, **kw: object) -> dict[str, object]:
    return {"vms": n, "ok": True, "up_s": up, "down_s": 1.0 * n, "first_up_s": up / 2,
            "pss_kernel_mib": {"median": 80.0}, "pss_driver_mib": {"median": 70.0},
            "pss_host_mib": 90.0, "pss_per_vm_mib": 150.0, "policy_round_ms": 0.5 * n,
            "dommemstat_p50_ms": 1.0, "dommemstat_p99_ms": 5.0, **kw}


def test_result_ratios_and_report_with_a_failed_point(tmp_path: Path) -> None:
    failed = {"vms": 8, "ok": False, "vms_up": 6, "error": "VMs not ready after 1m 40s"}
    res = S.build_result([_point(1, 10.0), _point(4, 30.0), failed], interpreter_s=0.2)
    p1, p4 = res["points"][:2]
    assert p1["up_vs_smallest"] == 1.0 and p4["up_vs_smallest"] == 3.0
    assert p4["up_per_vm_s"] == 7.5 and p4["up_in_interpreter_starts"] == 150.0
    assert p4["policy_round_vs_smallest"] == 4.0 and p4["down_vs_smallest"] == 4.0
    assert res["failed"] == [{"vms": 8, "error": "VMs not ready after 1m 40s"}]
    md = S.markdown(res)
    assert "| 8 | failed | 6/8 up |" in md
    assert "- 8 VMs: VMs not ready after 1m 40s" in md
    S.plot(res, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 10_000


def test_bad_counts_are_refused_in_one_line() -> None:
    res = CliRunner().invoke(bench, ["scale", "--counts", "4,0"])
    assert res.exit_code == 2 and "VM counts must be at least 1" in res.output
    res = CliRunner().invoke(bench, ["scale", "--counts", "four"])
    assert res.exit_code == 2 and "expected comma-separated VM counts" in res.output
    with pytest.raises(ValueError, match="at least 1"):
        S.run_scale(())


@pytest.mark.slow
def test_a_host_that_does_not_come_up_is_a_failed_point(tmp_path: Path) -> None:
    # A boot timeout no host meets: the point carries the error and the host is stopped.
    point = S.measure_count(2, tmp_path, boot_timeout=0.05)
    assert point["ok"] is False
    assert "not ready after" in point["error"] and "host stopped" in point["error"]
    assert point["vms_up"] < 2
    assert _processes_mentioning(str(tmp_path)) == []  # the host was stopped, not left


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_one_vm_point_end_to_end(tmp_path: Path) -> None:
    env = {"NUMBA_CACHE_DIR": os.environ.get(
        "NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "build" / "numba-cache"))}
    res = CliRunner(env=env).invoke(
        bench, ["scale", "--counts", "1", "--sample", "1", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "scale.json").read_text())
    assert doc["counts"] == [1] and doc["failed"] == []
    p = doc["points"][0]
    assert p["ok"] and p["up_s"] > 0 and p["down_s"] > 0 and p["exit_status"] == 0
    assert p["pss_kernel_mib"]["median"] > 1 and p["pss_driver_mib"]["median"] > 1
    assert p["pss_host_mib"] > 1
    # The VM processes are forked from the host's fork server, whose PSS counts too; the
    # guest RAM the kernel touched is split out.
    assert p["pss_forkserver_mib"] > 1
    assert 0 < p["pss_guest_ram_mib"]["median"] < p["pss_kernel_mib"]["median"]
    assert 0 < p["pss_per_vm_beyond_ram_mib"] < (p["pss_total_mib"] - p["pss_host_mib"])
    assert p["dommemstat_calls"] >= 20 and p["dommemstat_p99_ms"] >= p["dommemstat_p50_ms"] > 0
    assert p["corrupted_reads"] == 0
    assert p["policy_rounds"] >= 1 and p["policy_round_ms"] > 0  # the host's new counter
    assert (tmp_path / "scale.md").read_text().startswith("Quick run")
    assert (tmp_path / "scale.png").exists()
