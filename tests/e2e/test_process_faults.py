"""Process faults on a real host: kill -9 and SIGSTOP/SIGCONT of each process kind (guest
kernel, balloon driver, hypervisor) at the moments that matter — mid-inflate, mid-deflate,
mid-reclaim (host swap), mid-shutdown — and what must hold afterwards: no corrupted read in
a surviving VM, frames in use == resident memfd pages, the VM handled as its ``on_crash``
says, its neighbours still making progress, and nothing left behind (no process of the host,
no run dir, no output file after a clean stop).

Every wait is on a condition, bounded only against a hang.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BOOT_TIMEOUT, LiveHost, _alive, host_env, start_host, stop_and_check

from balloonlab import launcher
from hypervisor.topology import parse_topology

PAGE = 4096
WAIT = 60.0  # bounds a hang, never a deadline a loaded machine must meet

TWO_VMS = """
[host]
name = "{name}"
memory = "{host_mib}MiB"
swap = "{swap_mib}MiB"
policy = "none"
policy_interval = "500ms"

[[vm]]
name = "a"
memory = "32MiB"
stats_interval = "200ms"
guest_swap = "16MiB"
on_crash = "{on_crash}"
[[vm.task]]
workload = "uniform"
size = "{a_task_mib}MiB"
rate = 200000

[[vm]]
name = "b"
memory = "32MiB"
stats_interval = "200ms"
guest_swap = "16MiB"
[[vm.task]]
workload = "uniform"
size = "8MiB"
rate = 100000
"""


def two_vms(name: str, *, host_mib: int = 96, swap_mib: int = 32, on_crash: str = "restart",
            a_task_mib: int = 12) -> str:
    return TWO_VMS.format(name=name, host_mib=host_mib, swap_mib=swap_mib, on_crash=on_crash,
                          a_task_mib=a_task_mib)


def wait_for(pred: Callable[[], Any], what: str, timeout: float = WAIT,
             interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


def count(host: LiveHost, kind: str, vm: str | None = None) -> int:
    return sum(1 for e in host.events() if e["kind"] == kind and (vm is None or e["vm"] == vm))


def ops(host: LiveHost, vm: str) -> int:
    return int(host.stat(vm).get("ops", 0) or 0)


def corrupted(host: LiveHost, vm: str) -> int:
    return int(host.stat(vm).get("corrupted_reads", 0) or 0)


def progresses(host: LiveHost, vm: str) -> None:
    """``vm``'s tasks keep running: its op count moves."""
    first = ops(host, vm)
    wait_for(lambda: ops(host, vm) > first, f"{vm} to make progress")


def procs_under(run_dir: Path) -> list[int]:
    """Processes whose command line names ``run_dir`` (the VM processes of that host)."""
    out = []
    needle = str(run_dir).encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def vm_pids(host: LiveHost, vm: str) -> tuple[int, int]:
    v = host.vm(vm)
    return int(v["pid"]), int(v["driver_pid"])


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Callable[..., LiveHost]]:
    """Start hosts (same run dir for the same ``slot``); stop and check them all at the end,
    and make sure no process of any of them is left, whatever the test did."""
    started: list[LiveHost] = []
    run_dirs: set[Path] = set()

    def start(toml: str, slot: int = 0, wait: bool = True) -> LiveHost:
        run_dir = tmp_path / f"run{slot}"
        run_dirs.add(run_dir)
        h = start_host(toml, run_dir, tmp_path / f"topology{len(started)}.toml", wait=False)
        started.append(h)
        if wait:
            try:
                launcher.wait_ready(h.launched, BOOT_TIMEOUT)
            except launcher.LaunchError as e:
                raise AssertionError(f"{e}\n{h.log_tail()}") from None
        return h

    yield start

    try:
        for h in started:
            pids: list[int] = []
            if h.proc.poll() is None:
                with contextlib.suppress(Exception):
                    pids = h.process_pids()
                stop_and_check(h, pids)
            else:
                with contextlib.suppress(Exception):
                    h.launched.stop(5.0)  # exited already: a clean exit's output goes
    finally:
        for run_dir in run_dirs:
            for pid in procs_under(run_dir):  # never leave a process behind, even on failure
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
    for run_dir in run_dirs:
        wait_for(lambda rd=run_dir: not procs_under(rd), f"no process left under {run_dir}")


# ------------------------------------------------------------------ the hypervisor dies


def test_vm_processes_die_with_a_killed_hypervisor_even_when_stopped(hosts):
    """kill -9 of the hypervisor while one guest kernel is stopped: every VM process dies
    with it (the stopped one too), so an old kernel resumed later cannot remove the files of
    the next host in the same run dir, and the next host's driver reconnects after a
    restart. (Before: the stopped kernel lived on; once resumed it deleted the new
    b.kernel.sock and b.guest-swap.)"""
    toml = two_vms("orphans")
    h1 = hosts(toml, slot=0)
    b_kernel, _ = vm_pids(h1, "b")
    old = [p for p in h1.process_pids() if p != h1.proc.pid]
    assert len(old) == 5  # four VM processes and the fork server
    os.kill(b_kernel, signal.SIGSTOP)
    os.kill(h1.proc.pid, signal.SIGKILL)
    h1.proc.wait(WAIT)
    wait_for(lambda: not [p for p in old if _alive(p)], "every VM process of the killed host "
             "to die with it (the stopped kernel too)")
    # The same topology comes up again in the same run dir.
    h2 = hosts(toml, slot=0)
    assert h2.run_dir == h1.run_dir
    with contextlib.suppress(ProcessLookupError):
        os.kill(b_kernel, signal.SIGCONT)
    sock = h2.run_dir / "b.kernel.sock"
    swap = h2.run_dir / "b.guest-swap"
    assert sock.exists() and swap.exists()
    # The new VM b's driver can reconnect to its kernel after a restart.
    _, b_driver = vm_pids(h2, "b")
    os.kill(b_driver, signal.SIGKILL)
    h2.wait(lambda: count(h2, "driver_restarted", "b") >= 1, WAIT, "b's driver restarted")
    h2.wait(lambda: count(h2, "driver_connected", "b") >= 2, WAIT, "b's driver reconnected")
    assert sock.exists() and swap.exists()
    assert corrupted(h2, "a") == 0 and corrupted(h2, "b") == 0
    h2.check_conservation()


def test_a_vm_process_of_a_dead_hypervisor_exits_at_once(tmp_path):
    """A VM process whose hypervisor died between the fork and its start-up finds another
    parent, and exits instead of running unsupervised."""
    env = dict(host_env(), BALLOONLAB_HOST_PID="1")  # "our hypervisor is pid 1": not our parent
    r = subprocess.run(
        [sys.executable, "-m", "guest.balloon_driver", "--vm", "x", "--balloon-sock",
         str(tmp_path / "none.sock"), "--kernel-sock", str(tmp_path / "none2.sock")],
        env=env, capture_output=True, text=True, timeout=WAIT,
        cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 1
    assert "the hypervisor (pid 1) is gone" in r.stderr


# ------------------------------------------------------------------ descriptor exhaustion


def _rlimit_nofile(n: int) -> Callable[[], None]:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return set_limit


@pytest.mark.slow
def test_a_vm_comes_back_after_descriptor_exhaustion_with_an_event(tmp_path):
    """With a descriptor limit a few above what the running hypervisor has open, 60 idle
    connections to control.sock use up its descriptors (the host refuses the surplus and
    says why); a guest kernel killed then cannot be restarted (no descriptor for its log):
    the host says so in an event and retries, and the VM boots again once descriptors are
    free."""
    run_dir = tmp_path / "run"
    topo_file = tmp_path / "t.toml"
    toml = two_vms("emfile").replace("[host]", f'[host]\nrun_dir = "{run_dir}"', 1)
    topo_file.write_text(toml)
    h = launcher.launch(parse_topology(toml, str(topo_file)), topo_file=topo_file,
                        env=host_env())
    host = LiveHost(h)
    conns: list[socket.socket] = []
    pids: list[int] = []
    try:
        launcher.wait_ready(h, BOOT_TIMEOUT)
        pids = host.process_pids()
        # The real limit, in the hypervisor only (the launcher's Popen has no preexec hook, so
        # lower it on the running process: prlimit(2) on another process). It must bite
        # before control.sock's own bound on clients does, whatever the host has open: a
        # few descriptors above what it holds now.
        limit = len(os.listdir(f"/proc/{h.proc.pid}/fd")) + 6
        resource.prlimit(h.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        a_kernel, _ = vm_pids(host, "a")
        for _ in range(60):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                s.connect(str(run_dir / "control.sock"))
            conns.append(s)
        log = run_dir / "hypervisor.log"
        # Connections wait in the backlog until the host accepts them, which a loaded
        # machine may delay: kill only once the host has run out of descriptors (it refuses
        # a connection, and says so).
        wait_for(lambda: "out of file descriptors" in log.read_text(errors="replace"),
                 "the host to run out of descriptors")
        # The dead kernel frees more descriptors than its restart needs (its machine socket,
        # its own and its driver's pidfds), and whether the accept loop (with connections
        # still in the backlog) or the restart takes them first is a race. So that the
        # restart meets exhaustion whoever wins, the limit now drops below every descriptor
        # the host holds: nothing new can be opened, as when each freed one is taken at once.
        resource.prlimit(h.proc.pid, resource.RLIMIT_NOFILE, (3, limit))  # soft limit only
        os.kill(a_kernel, signal.SIGKILL)
        wait_for(lambda: "vm_spawn_failed" in log.read_text(errors="replace"),
                 "the failed restart to be logged as an event")
        resource.prlimit(h.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        for s in conns:
            s.close()
        conns.clear()
        host.wait(lambda: count(host, "vm_booted", "a") >= 2, WAIT, "a to boot again")
        fails = [e for e in host.events() if e["kind"] == "vm_spawn_failed"]
        assert fails and all(e["error"] in ("EMFILE", "ENFILE") for e in fails)
        assert any(e["vm"] == "a" and e["process"] == "kernel" for e in fails)
        host.wait(lambda: host.vm("a").get("driver") == "connected", WAIT, "a's driver")
        progresses(host, "b")
        assert corrupted(host, "b") == 0
        host.check_conservation()
        pids += [p for p in host.process_pids() if p not in pids]
    finally:
        for s in conns:
            s.close()
        stop_and_check(host, pids)


# ------------------------------------------------------------------ faults at a moment
#
# A moment is started, then the fault strikes at once: mid-inflate and mid-deflate are
# "right after the host sent the new target"; mid-reclaim is "while the host is swapping out"
# (a host smaller than its guests' touched memory reclaims all the time). Whatever the fault
# caught in flight, the same things must hold afterwards.

MOMENTS = {
    # moment: (host MiB, host swap MiB, a's task MiB, a's on_crash)
    "inflate": (96, 32, 12, "restart"),
    "deflate": (96, 32, 12, "destroy"),
    "reclaim": (24, 64, 24, "restart"),
}
INFLATE_PAGES = 4096  # 16 MiB of a's 32 MiB


def fresh_stat(host: LiveHost, vm: str) -> dict[str, Any]:
    """A dommemstat with guest stats newer than now (one stats interval later)."""
    first = host.stat(vm).get("last_update")
    return wait_for(lambda: (s := host.stat(vm)).get("last_update") != first and s,
                    f"fresh stats from {vm}")


def start_moment(host: LiveHost, moment: str) -> None:
    if moment == "inflate":
        host.call("set_balloon", vm="a", pages=INFLATE_PAGES)
    elif moment == "deflate":
        host.call("set_balloon", vm="a", pages=INFLATE_PAGES)
        host.wait(lambda: host.stat("a")["balloon_pages"] == INFLATE_PAGES, WAIT,
                  "a's balloon inflated")
        host.call("set_balloon", vm="a", pages=0)
    else:
        first = count(host, "host_swap_out")
        host.wait(lambda: count(host, "host_swap_out") > first, WAIT, "the host reclaiming")


def strike(host: LiveHost, pid: int, how: str, *, neighbour: str | None = "b") -> None:
    """kill -9 ``pid``, or stop it until the neighbour made progress (or a second passed,
    for the hypervisor itself, which cannot be asked while stopped), then continue it."""
    if how == "kill":
        os.kill(pid, signal.SIGKILL)
        return
    os.kill(pid, signal.SIGSTOP)
    try:
        if neighbour is None:
            time.sleep(1.0)  # the length of the fault, not a wait for anything
        else:
            progresses(host, neighbour)
    finally:
        os.kill(pid, signal.SIGCONT)


def settled(host: LiveHost, moment: str, *, a_gone: bool = False) -> None:
    """Every VM is as its on_crash says, the moment's operation finished, neighbours make
    progress, nothing was corrupted, and frames in use == resident memfd pages."""
    if a_gone:
        host.wait(lambda: host.vm("a")["state"] == "destroyed", WAIT, "a destroyed")
        assert count(host, "vm_restarted", "a") == 0
    running = ["b"] if a_gone else ["a", "b"]
    for vm in running:
        host.wait(lambda v=vm: host.vm(v)["state"] == "running"
                  and host.vm(v).get("driver") == "connected", WAIT, f"{vm} running, driver up")
    if not a_gone and moment in ("inflate", "deflate"):
        want = INFLATE_PAGES if moment == "inflate" else 0
        host.wait(lambda: host.stat("a")["balloon_pages"] == want, WAIT,
                  f"a's balloon at {want} pages")
    for vm in running:
        progresses(host, vm)
        assert fresh_stat(host, vm)["corrupted_reads"] in (0, None), f"{vm}: corrupted reads"
    if a_gone:
        assert host.stat("a")["backed_pages"] == 0  # its memory went back to the host
    host.check_conservation()


FAULTS = [(kind, how, moment) for kind in ("kernel", "driver") for how in ("kill", "stop")
          for moment in MOMENTS]


#: One case of each process kind and signal, each at another moment, run in `make test`;
#: the whole matrix is `make test-long`.
FAULTS_IN_MAKE_TEST = {("kernel", "kill", "inflate"), ("kernel", "stop", "reclaim"),
                       ("driver", "kill", "deflate"), ("driver", "stop", "inflate")}


def _fault_marks(f: tuple[str, str, str]) -> tuple[pytest.MarkDecorator, ...]:
    if f == ("kernel", "kill", "inflate"):
        return ()
    return (pytest.mark.slow,) if f in FAULTS_IN_MAKE_TEST else (pytest.mark.slow,
                                                                 pytest.mark.long)


@pytest.mark.parametrize("kind, how, moment", [
    pytest.param(*f, marks=_fault_marks(f), id="-".join(f)) for f in FAULTS])
def test_a_vm_process_fault_mid_operation(hosts, kind, how, moment):
    host_mib, swap_mib, a_mib, on_crash = MOMENTS[moment]
    host = hosts(two_vms(f"pf{kind[0]}{how[0]}{moment[0]}", host_mib=host_mib, swap_mib=swap_mib,
                         on_crash=on_crash, a_task_mib=a_mib))
    kernel, driver = vm_pids(host, "a")
    start_moment(host, moment)
    strike(host, kernel if kind == "kernel" else driver, how)
    if kind == "kernel" and how == "kill":
        host.wait(lambda: count(host, "vm_crashed", "a") >= 1, WAIT, "a's crash noticed")
        if on_crash == "restart":
            host.wait(lambda: count(host, "vm_booted", "a") >= 2, WAIT, "a booted again")
    elif kind == "driver" and how == "kill":
        host.wait(lambda: count(host, "driver_restarted", "a") >= 1, WAIT, "a's driver back")
    settled(host, moment, a_gone=(kind == "kernel" and how == "kill" and on_crash == "destroy"))


@pytest.mark.slow
@pytest.mark.parametrize("how, moment", [
    ("kill", "reclaim"), ("stop", "inflate"),
    pytest.param("kill", "inflate", marks=pytest.mark.long),
    pytest.param("stop", "reclaim", marks=pytest.mark.long)])
def test_a_hypervisor_fault_mid_operation(hosts, how, moment):
    """kill -9: every VM process dies with the hypervisor, and the next host in the same run
    dir starts clean; stop/cont: everything carries on."""
    host_mib, swap_mib, a_mib, on_crash = MOMENTS[moment]
    toml = two_vms(f"ph{how[0]}{moment[0]}", host_mib=host_mib, swap_mib=swap_mib,
                   on_crash=on_crash, a_task_mib=a_mib)
    host = hosts(toml, slot=0)
    vm_procs = [p for p in host.process_pids() if p != host.proc.pid]
    start_moment(host, moment)
    strike(host, host.proc.pid, how, neighbour=None)
    if how == "kill":
        host.proc.wait(WAIT)
        wait_for(lambda: not [p for p in vm_procs if _alive(p)],
                 "the VM processes to die with their hypervisor")
        host = hosts(toml, slot=0)  # the stale run dir is cleaned and reused
        start_moment(host, moment)
    settled(host, moment)


@pytest.mark.slow
@pytest.mark.parametrize("kind, how", [
    ("kernel", "kill"), ("hypervisor", "kill"),
    pytest.param("kernel", "stop", marks=pytest.mark.long),
    pytest.param("driver", "kill", marks=pytest.mark.long),
    pytest.param("driver", "stop", marks=pytest.mark.long),
    pytest.param("hypervisor", "stop", marks=pytest.mark.long)])
def test_a_process_fault_mid_shutdown(hosts, kind, how):
    """`shutdown`, and at once a fault: the host still stops, and leaves nothing behind."""
    host = hosts(two_vms(f"ps{kind[0]}{how[0]}"))
    pids = host.process_pids()
    kernel, driver = vm_pids(host, "a")
    target = {"kernel": kernel, "driver": driver, "hypervisor": host.proc.pid}[kind]
    host.call("set_balloon", vm="a", pages=INFLATE_PAGES)
    host.call("shutdown")
    if how == "kill":
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGSTOP)
            time.sleep(0.5)  # the length of the fault
            os.kill(target, signal.SIGCONT)
    rc = host.proc.wait(WAIT)
    wait_for(lambda: not [p for p in pids if _alive(p)], "every process of the host gone")
    if kind == "hypervisor" and how == "kill":
        assert rc == -signal.SIGKILL
    else:
        assert rc == 0, host.log_tail()
        assert not host.run_dir.exists()
