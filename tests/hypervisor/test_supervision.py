"""The Host launches and supervises VM processes (stand-ins from fakevm.py speaking the real
protocol), restarts a dead driver, frees and restarts a crashed guest, and leaves no orphan."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hv_peers import run, topo

from balloonlab.client import ControlClient
from hypervisor.host import Host
from hypervisor.rundir import pid_alive
from hypervisor.topology import parse_topology
from protocol import syscalls

FAKEVM = Path(__file__).resolve().parent / "fakevm.py"


_alive = pid_alive


async def _wait_event(host: Host, kind: str, count: int = 1, timeout: float = 30) -> None:
    t0 = time.monotonic()
    while sum(1 for e in host.events if e["kind"] == kind) < count:
        assert time.monotonic() - t0 < timeout, f"no {count}x {kind}: {list(host.events)}"
        await asyncio.sleep(0.05)


def test_supervision_restarts_driver_and_crashed_guest_then_shuts_down_clean():
    async def main():
        base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
        host = Host(parse_topology(topo(64, 16, {"a": 32})), run_dir=base / "run",
                    vm_command=[sys.executable, str(FAKEVM)])
        pids: set[int] = set()
        try:
            await host.start()
            vm = host.vms["a"]
            await _wait_event(host, "vm_booted")
            await _wait_event(host, "driver_connected")
            pids |= {vm.kernel_proc.pid, vm.driver_proc.pid}
            async with host.mm_lock:
                host.check_conservation()
                assert vm.led.backed == 8
            # Driver dies: restarted with backoff, reconnects.
            vm.driver_proc.kill()
            await _wait_event(host, "driver_restarted")
            await _wait_event(host, "driver_connected", 2)
            pids.add(vm.driver_proc.pid)
            # Guest kernel dies: its frames are freed, the VM restarts (on_crash=restart).
            vm.kernel_proc.kill()
            await _wait_event(host, "vm_crashed")
            await _wait_event(host, "vm_restarted")
            await _wait_event(host, "vm_booted", 2)
            pids |= {vm.kernel_proc.pid}
            crash = next(e for e in host.events if e["kind"] == "vm_crashed")
            assert crash["frames"] == 8
            await _wait_event(host, "driver_connected", 3)
            pids.add(vm.driver_proc.pid)
            log = base / "run" / "a.kernel.log"
            for _ in range(200):  # the restarted guest faulted its pages in again
                if log.read_text().count("booted") == 2:
                    break
                await asyncio.sleep(0.05)
            assert log.read_text().count("booted") == 2
            async with host.mm_lock:
                host.check_conservation()
                assert vm.led.backed == 8
        finally:
            await host.shutdown("test over")
            shutil.rmtree(base, ignore_errors=True)
        assert not (base / "run").exists()
        assert not [p for p in pids if _alive(p)]
    run(main())


def test_python_m_hypervisor_runs_until_sigterm(tmp_path):
    run_dir = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp")) / "run"
    toml = tmp_path / "t.toml"
    toml.write_text(topo(2048, 0, {"a": 1024}).replace(
        'policy_interval = "1s"\n', f'policy_interval = "1s"\nrun_dir = "{run_dir}"\n'))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", "--topology", str(toml),
                             "--log-level", "WARNING"], env=env)
    try:
        t0 = time.monotonic()
        info = None
        while info is None:
            assert proc.poll() is None, "hypervisor exited early"
            assert time.monotonic() - t0 < 60
            try:
                with ControlClient(run_dir) as c:
                    info = c.call("host_info")
            except (ConnectionError, OSError):
                time.sleep(0.1)
        assert info["pid"] == proc.pid and info["frames_total"] == 2048
        # Let the real guest kernel and driver come up, so there is something to orphan.
        while True:
            assert time.monotonic() - t0 < 60, "VM a never came up"
            with ControlClient(run_dir) as c:
                (vm,) = c.call("list_vms")
            if vm["driver"] == "connected":
                break
            time.sleep(0.1)
        assert _procs_mentioning(str(run_dir))
        # A second host over the same run dir is refused while this one lives.
        second = subprocess.run([sys.executable, "-m", "hypervisor", "--topology", str(toml)],
                                env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 3 and "already running" in second.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not run_dir.exists()
        # No VM process (their command lines name the run dir) outlives the host.
        assert _procs_mentioning(str(run_dir)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(run_dir.parent, ignore_errors=True)


def test_bad_topology_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\nname = "x"\nmemory = "lots"\n')
    r = subprocess.run([sys.executable, "-m", "hypervisor", "--topology", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "memory" in r.stderr


def test_crashed_guest_with_on_crash_destroy_stays_down():
    async def main():
        base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
        host = Host(parse_topology(topo(64, 0, {"a": 32}, extra='on_crash = "destroy"\n')),
                    run_dir=base / "run", vm_command=[sys.executable, str(FAKEVM)])
        try:
            await host.start()
            vm = host.vms["a"]
            await _wait_event(host, "driver_connected")
            vm.kernel_proc.kill()
            await _wait_event(host, "vm_destroyed")
            assert vm.state == "destroyed"
            assert not [e for e in host.events if e["kind"] == "vm_restarted"]
            async with host.mm_lock:
                host.check_conservation()
                assert host.ledger.frames_used == 0
            assert vm.driver_proc.returncode is not None
        finally:
            await host.shutdown("test over")
            shutil.rmtree(base, ignore_errors=True)
    run(main())


def _procs_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


# ---------------------------------------------------------------- starting a process fails


@pytest.mark.parametrize("plan, error", [
    ("spawn@3=EMFILE", "EMFILE"),
    ("spawn@3=ENOMEM", "ENOMEM"),
    ("rundir.open@5=ENFILE", "ENFILE"),
])
def test_a_vm_process_that_cannot_start_is_retried_with_an_event(plan, error):
    """The restart after a crash cannot start the kernel (no descriptor for its log, no
    memory for the fork): an event names the error, and the VM comes back on a retry."""
    async def main():
        base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
        host = Host(parse_topology(topo(64, 16, {"a": 32})), run_dir=base / "run",
                    vm_command=[sys.executable, str(FAKEVM)])
        syscalls.install(plan)  # calls 1, 2: kernel, driver (for rundir.open, 1-2 are
        try:                    # the pid and generation files)
            await host.start()
            vm = host.vms["a"]
            await _wait_event(host, "driver_connected")
            vm.kernel_proc.kill()
            await _wait_event(host, "vm_spawn_failed")
            failed = next(e for e in host.events if e["kind"] == "vm_spawn_failed")
            assert failed["vm"] == "a" and failed["process"] == "kernel"
            assert failed["error"] == error and failed["attempt"] == 1
            await _wait_event(host, "vm_booted", 2)
            await _wait_event(host, "driver_connected", 2)
            assert vm.state == "running"
            async with host.mm_lock:
                host.check_conservation()
        finally:
            syscalls.clear()
            await host.shutdown("test over")
            shutil.rmtree(base, ignore_errors=True)
    run(main())


def test_a_vm_stays_down_while_descriptors_are_short_then_comes_back():
    """Every attempt fails while the shortage lasts (one event each, with backoff); the VM
    boots once descriptors are available again."""
    async def main():
        base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
        host = Host(parse_topology(topo(64, 16, {"a": 32})), run_dir=base / "run",
                    vm_command=[sys.executable, str(FAKEVM)])
        syscalls.install("rundir.open@5+=EMFILE")
        try:
            await host.start()
            vm = host.vms["a"]
            await _wait_event(host, "driver_connected")
            vm.kernel_proc.kill()
            await _wait_event(host, "vm_spawn_failed", 3)
            fails = [e for e in host.events if e["kind"] == "vm_spawn_failed"]
            assert [e["attempt"] for e in fails[:3]] == [1, 2, 3]
            assert fails[1]["retry_in"] > fails[0]["retry_in"]  # backing off
            assert vm.state == "created" and vm.kernel_proc.returncode is not None
            assert sum(1 for e in host.events if e["kind"] == "vm_booted") == 1
            syscalls.clear()  # descriptors are back
            try:
                await _wait_event(host, "vm_booted", 2)
            except AssertionError:
                print("KLOG", (base / "run" / "a.kernel.log").read_text())
                raise
            await _wait_event(host, "driver_connected", 2)
        finally:
            syscalls.clear()
            await host.shutdown("test over")
            shutil.rmtree(base, ignore_errors=True)
    run(main())


def test_a_disk_that_cannot_be_created_stops_only_its_vm():
    """VM "a" has a disk whose creation fails (injected ENOSPC at disk.create): one event
    and one log line, "a" is destroyed without starting a process; "b" boots as usual. A VM
    whose disk is made finds it in the run dir, sized, and named in its --config."""
    async def main():
        base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
        text = topo(64, 16, {"a": 16, "b": 16, "c": 16})
        text = text.replace('name = "a"\n', 'name = "a"\ndisk = "1MiB"\n')
        text = text.replace('name = "c"\n', 'name = "c"\ndisk = "2MiB"\n')
        host = Host(parse_topology(text), run_dir=base / "run",
                    vm_command=[sys.executable, str(FAKEVM)])
        syscalls.install("disk.create@1=ENOSPC")
        try:
            await host.start()
            await _wait_event(host, "vm_disk_failed")
            await _wait_event(host, "vm_booted", 2)
            failed = next(e for e in host.events if e["kind"] == "vm_disk_failed")
            assert failed["vm"] == "a" and failed["error"] == "ENOSPC"
            assert failed["path"].endswith("a.disk")
            a = host.vms["a"]
            assert a.state.value == "destroyed" and a.kernel_proc is None
            booted = {e["vm"] for e in host.events if e["kind"] == "vm_booted"}
            assert booted == {"b", "c"}
            assert not (base / "run" / "a.disk").exists()
            disk = base / "run" / "c.disk"
            assert disk.stat().st_size == 2 << 20 and (disk.stat().st_mode & 0o777) == 0o600
            argv = host.supervisor.vm_argv(host.vms["c"], "kernel")
            cfg = json.loads(argv[argv.index("--config") + 1])
            assert (cfg["disk"], cfg["disk_path"]) == (2 << 20, str(disk))
            async with host.mm_lock:
                host.check_conservation()
        finally:
            syscalls.clear()
            await host.shutdown("test over")
            shutil.rmtree(base, ignore_errors=True)

    run(main())
