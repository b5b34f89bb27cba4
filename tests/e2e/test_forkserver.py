"""The fork server on a real host: VM processes are forked from one preloaded process
(``guest.forkserver``) yet are real processes of their own, children of the hypervisor,
with nothing of the server's descriptors; they die with the hypervisor; a fork server that is
killed is reported and replaced without taking a VM down; a hung one is reported, killed and
bypassed (the VM process is exec'd) without hanging the host; a crashing VM restarts as
before.

Every wait is on a condition, bounded only against a hang.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import test_process_faults as pf
from conftest import _alive
from test_process_faults import count, procs_under, two_vms, vm_pids, wait_for

#: The fixture of test_process_faults: hosts stopped and checked, nothing left behind.
hosts = pf.hosts

WAIT = 60.0

pytestmark = pytest.mark.slow


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def ppid(pid: int) -> int:
    return int(_stat(pid)[1])


def session(pid: int) -> int:
    return int(_stat(pid)[3])


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out[int(entry.name)] = os.readlink(entry)
        except OSError:
            pass
    return out


def forkserver_pid(host) -> int | None:
    return host.call("host_info").get("forkserver_pid")


def test_vm_processes_are_forked_children_of_the_host_with_nothing_inherited(hosts):
    h = hosts(two_vms("fs-tree"))
    fs = forkserver_pid(h)
    assert fs is not None, "the host runs a fork server by default"
    assert ppid(fs) == h.proc.pid
    assert threads(fs) == 1, "the fork server must stay single-threaded (it forks)"
    assert "guest.forkserver" in Path(f"/proc/{fs}/cmdline").read_bytes().decode()
    starts = [e for e in h.events() if e["kind"] == "forkserver_started"]
    assert len(starts) == 1 and starts[0]["pid"] == fs
    pids = [p for v in ("a", "b") for p in vm_pids(h, v)]
    assert len(set(pids)) == 4 and fs not in pids and h.proc.pid not in pids
    server_sockets = {t for t in fd_targets(fs).values() if t.startswith("socket:")}
    for pid in pids:
        # Forked, not exec'd: the command line is the server's; re-parented to the host;
        # a session of its own (the supervisor kills the whole group).
        assert b"guest.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert ppid(pid) == h.proc.pid, f"{pid} is not the hypervisor's child"
        assert session(pid) == pid
        # Nothing of the server's descriptors (its socket to the host, its log) leaked in.
        targets = fd_targets(pid)
        assert not server_sockets & set(targets.values()), targets
        assert not any(t.endswith("forkserver.log") for t in targets.values()), targets
        assert targets[1].endswith(".log") and targets[2] == targets[1]
    comms = sorted(Path(f"/proc/{p}/comm").read_text().strip() for p in pids)
    assert comms == ["driver:a", "driver:b", "kernel:a", "kernel:b"]
    # The run dir is named on every forked command line: `ps` shows whose they are.
    assert set(pids) | {fs} <= set(procs_under(h.run_dir))


def test_kill_9_of_the_host_leaves_no_process_behind(hosts):
    h = hosts(two_vms("fs-kill9"))
    fs = forkserver_pid(h)
    assert fs is not None
    victims = [fs, *(p for v in ("a", "b") for p in vm_pids(h, v))]
    os.kill(h.proc.pid, signal.SIGKILL)
    h.proc.wait(WAIT)
    wait_for(lambda: not [p for p in victims if _alive(p)],
             "the fork server and every VM process to die with the hypervisor")
    wait_for(lambda: not procs_under(h.run_dir), "no process naming the run dir")


def test_a_killed_fork_server_is_reported_and_replaced_and_takes_no_vm_down(hosts):
    h = hosts(two_vms("fs-replace"))
    fs = forkserver_pid(h)
    assert fs is not None
    before = {v: vm_pids(h, v) for v in ("a", "b")}
    os.kill(fs, signal.SIGKILL)
    h.wait(lambda: count(h, "forkserver_died") >= 1, WAIT, "forkserver_died")
    died = next(e for e in h.events() if e["kind"] == "forkserver_died")
    assert died["pid"] == fs and died["status"] == -signal.SIGKILL
    # Every VM process lives on: it is the host's child, not the server's.
    for pids in before.values():
        assert all(_alive(p) for p in pids)
    assert not count(h, "vm_crashed")
    # A crashing guest kernel restarts as before, forked from a new server.
    os.kill(before["a"][0], signal.SIGKILL)
    h.wait(lambda: count(h, "vm_booted", "a") >= 2, WAIT, "a to boot again")
    h.wait(lambda: h.vm("a").get("driver") == "connected", WAIT, "a's driver to reconnect")
    assert count(h, "vm_crashed", "a") == 1 and count(h, "vm_restarted", "a") == 1
    new_fs = forkserver_pid(h)
    assert new_fs is not None and new_fs != fs and _alive(new_fs)
    starts = [e for e in h.events() if e["kind"] == "forkserver_started"]
    assert [e["starts"] for e in starts] == [1, 2]
    kernel, driver = vm_pids(h, "a")
    assert kernel != before["a"][0]
    assert ppid(kernel) == h.proc.pid and ppid(driver) == h.proc.pid
    assert b"guest.forkserver" in Path(f"/proc/{kernel}/cmdline").read_bytes()
    assert vm_pids(h, "b") == before["b"]


def test_a_hung_fork_server_is_killed_and_the_vm_process_is_execd(hosts):
    h = hosts(two_vms("fs-hung"))
    fs = forkserver_pid(h)
    assert fs is not None
    a_kernel, _ = vm_pids(h, "a")
    os.kill(fs, signal.SIGSTOP)  # alive but answering nothing
    os.kill(a_kernel, signal.SIGKILL)
    # The host stays responsive meanwhile (the control socket answers at once).
    assert h.vm("b")["state"] == "running"
    h.wait(lambda: count(h, "forkserver_hung") >= 1, WAIT, "forkserver_hung")
    h.wait(lambda: count(h, "vm_booted", "a") >= 2, WAIT, "a to boot again")
    wait_for(lambda: not _alive(fs), "the hung server to be killed")
    kernel, _ = vm_pids(h, "a")
    cmdline = Path(f"/proc/{kernel}/cmdline").read_bytes()
    assert b"guest.kernel" in cmdline and b"guest.forkserver" not in cmdline, "exec'd"
    assert ppid(kernel) == h.proc.pid
    assert not count(h, "forkserver_died"), "a server the host killed is reported as hung"


def test_without_the_fork_server_every_vm_process_is_execd(hosts, monkeypatch):
    """``BALLOONLAB_FORK_SERVER=0`` (as ``python -m hypervisor --no-fork-server``) is the
    plain exec path: no server, each VM process a fresh ``python -m guest...``."""
    monkeypatch.setenv("BALLOONLAB_FORK_SERVER", "0")
    h = hosts(two_vms("fs-off"))
    assert forkserver_pid(h) is None
    assert not count(h, "forkserver_started")
    kernel, driver = vm_pids(h, "a")
    assert b"guest.kernel" in Path(f"/proc/{kernel}/cmdline").read_bytes()
    assert b"guest.balloon_driver" in Path(f"/proc/{driver}/cmdline").read_bytes()
    assert ppid(kernel) == h.proc.pid and ppid(driver) == h.proc.pid


def test_fault_plans_and_counts_reach_the_forked_processes(hosts, monkeypatch, tmp_path):
    """The environment of each request is the forked process's own: a fault plan of
    ``protocol.syscalls`` fires in the guest kernels, and each VM process (not the server)
    writes its call counts at exit, after its ``atexit`` handlers ran."""
    counts = tmp_path / "counts"
    counts.mkdir()
    monkeypatch.setenv("BALLOONLAB_FAULT_COUNTS", str(counts))
    monkeypatch.setenv("BALLOONLAB_FAULTS", "guestswap.truncate@1=EIO")
    h = hosts(two_vms("fs-faults"))
    fs = forkserver_pid(h)
    kernels = {v: vm_pids(h, v)[0] for v in ("a", "b")}
    drivers = {v: vm_pids(h, v)[1] for v in ("a", "b")}
    h.call("shutdown")
    assert h.proc.wait(WAIT) == 0
    def written(pid: int) -> dict | None:
        try:
            return json.loads((counts / f"{pid}.json").read_text())
        except (OSError, ValueError):  # not yet, or half written
            return None

    wait_for(lambda: all(written(p) for p in kernels.values()),
             "every guest kernel to write its counts at exit")
    for pid in kernels.values():
        doc = written(pid)
        assert doc is not None and doc["pid"] == pid
        assert doc["calls"].get("guestswap.truncate") == 1
        assert doc["fired"] == ["guestswap.truncate@1=EIO"]
    for pid in drivers.values():
        doc = written(pid)  # a driver may be SIGKILLed at the grace's end: no file then
        assert doc is None or "guestswap.truncate" not in doc["calls"]
    assert not (counts / f"{fs}.json").exists(), "the server runs no injection point"
