"""The pre-flight check: a topology this machine cannot hold is refused at `up`, in one line
naming the numbers, before any process starts."""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from balloonlab.cli import cli
from hypervisor import preflight
from hypervisor.preflight import (
    EXEC_HOST_OVERHEAD,
    EXEC_PER_VM_OVERHEAD,
    HOST_OVERHEAD,
    PER_VM_OVERHEAD,
    Capacity,
    PreflightError,
)
from hypervisor.topology import example_path, load_topology, parse_topology

MIB = 1 << 20


def _topology_text(vms: int, host_memory: str = "64MiB", run_dir: Path | None = None) -> str:
    head = f'[host]\nname = "pf"\nmemory = "{host_memory}"\npolicy = "none"\n'
    if run_dir is not None:
        head += f'run_dir = "{run_dir}"\n'
    vm = '[[vm]]\nname = "v{i}"\nmemory = "4MiB"\n[[vm.task]]\nworkload = "idle"\nsize = "1MiB"\n'
    return head + "".join(vm.format(i=i) for i in range(vms))


def test_memory_refusal_names_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALLOONLAB_FORK_SERVER", raising=False)
    topo = parse_topology(_topology_text(3), "three.toml")
    need = 3 * PER_VM_OVERHEAD + HOST_OVERHEAD + 64 * MIB
    cap = Capacity(mem_available=need - 1, nproc_limit=None, nproc_used=0)
    with pytest.raises(PreflightError) as e:
        preflight.check(topo, cap)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"3 VMs × {PER_VM_OVERHEAD // MIB} MiB per VM" in msg
    assert f"= {need // MIB:,} MiB > MemAvailable {(need - 1) / MIB:,.0f} MiB" in msg
    assert "MiB hypervisor and fork server +" in msg
    # Exactly enough fits.
    preflight.check(topo, Capacity(mem_available=need, nproc_limit=None, nproc_used=0))


def test_memory_estimate_follows_how_vm_processes_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exec'd VM processes (no fork server) are whole interpreters: the estimate says so."""
    topo = parse_topology(_topology_text(3), "three.toml")
    forked = 3 * PER_VM_OVERHEAD + HOST_OVERHEAD + 64 * MIB
    execd = 3 * EXEC_PER_VM_OVERHEAD + EXEC_HOST_OVERHEAD + 64 * MIB
    assert forked < execd
    cap = Capacity(mem_available=forked, nproc_limit=None, nproc_used=0)
    preflight.check(topo, cap, fork_server=True)
    words = (f"3 VMs × {EXEC_PER_VM_OVERHEAD // MIB} MiB per VM \\+ "
             f"{EXEC_HOST_OVERHEAD // MIB} MiB hypervisor \\+")
    with pytest.raises(PreflightError, match=words):
        preflight.check(topo, cap, fork_server=False)
    # Unspecified: as a host started from this environment would run.
    monkeypatch.setenv("BALLOONLAB_FORK_SERVER", "0")
    with pytest.raises(PreflightError):
        preflight.check(topo, cap)
    monkeypatch.delenv("BALLOONLAB_FORK_SERVER")
    preflight.check(topo, cap)


def test_process_refusal_names_the_numbers() -> None:
    topo = parse_topology(_topology_text(10), "ten.toml")
    cap = Capacity(mem_available=None, nproc_limit=100, nproc_used=79)
    with pytest.raises(PreflightError, match=r"needs 22 processes \(2 × 10 VMs \+ 1 host \+ 1 "
                                             r"fork server\) but RLIMIT_NPROC 100 leaves room "
                                             r"for 21"):
        preflight.check(topo, cap, fork_server=True)
    preflight.check(topo, Capacity(mem_available=None, nproc_limit=102, nproc_used=80),
                    fork_server=True)
    # Exec'd VM processes: no fork server.
    with pytest.raises(PreflightError, match=r"needs 21 processes \(2 × 10 VMs \+ 1 host\) but "
                                             r"RLIMIT_NPROC 100 leaves room for 20"):
        preflight.check(topo, Capacity(mem_available=None, nproc_limit=100, nproc_used=80),
                        fork_server=False)
    preflight.check(topo, Capacity(mem_available=None, nproc_limit=101, nproc_used=80),
                    fork_server=False)


def test_machine_capacity_reads_this_machine() -> None:
    cap = preflight.machine_capacity()
    assert cap.mem_available is not None and cap.mem_available > 0
    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if soft == resource.RLIM_INFINITY or os.getuid() == 0:  # root: not bound by the limit
        assert cap.nproc_limit is None
    else:
        assert cap.nproc_limit == soft
        assert cap.nproc_used >= 1  # this test's own process at least
    assert preflight._tasks_of_user(os.getuid()) >= threading.active_count()


def test_shipped_fleet_fits_a_machine_with_3_gib_free() -> None:
    """With the fork server the 32 VMs cost less than 2 GiB beyond the host's 1 GiB; exec'd,
    more than 5 GiB."""
    fleet = load_topology(example_path("fleet"))
    assert len(fleet.vms) == 32
    assert fleet.host.memory < sum(v.memory for v in fleet.vms)  # overcommitted

    def cap(gib: int) -> Capacity:
        return Capacity(mem_available=gib << 30, nproc_limit=None, nproc_used=0)

    preflight.check(fleet, cap(3), fork_server=True)
    with pytest.raises(PreflightError):
        preflight.check(fleet, cap(2), fork_server=True)
    preflight.check(fleet, cap(8), fork_server=False)
    with pytest.raises(PreflightError):
        preflight.check(fleet, cap(4), fork_server=False)


@pytest.mark.parametrize(("vms", "host_memory", "expected"), [
    (10_000, "64MiB", "10000 VMs ×"),           # far more processes' memory than exists
    (1, "1048576GiB", "1,073,741,824 MiB host memory"),  # an absurd host
])
def test_up_refuses_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           vms: int, host_memory: str, expected: str) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    run_dir = tmp_path / "run"
    f = tmp_path / "big.toml"
    f.write_text(_topology_text(vms, host_memory, run_dir))
    res = CliRunner().invoke(cli, ["up", str(f), "--detach"])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "does not fit in memory" in lines[0] and expected in lines[0], lines[0]
    assert "MemAvailable" in lines[0]
    # Nothing started: no run dir, no host output file beside it.
    assert not run_dir.exists()
    assert not list(tmp_path.glob("run*.hypervisor.out"))
