"""End-to-end harness: a real hypervisor process with real guest kernel and driver processes.

``live_host(toml)`` starts ``python -m hypervisor --topology FILE`` with a private run
directory through the project's launcher (:mod:`balloonlab.launcher`), waits until every VM
runs and its driver has negotiated, and yields a :class:`LiveHost` with a control client.
Teardown shuts the host down and checks that no process of the topology is left behind.

Memory is measured independently of the hypervisor's own bookkeeping: the resident pages
of each VM's RAM memfd are read through ``/proc/<host pid>/fd`` (``st_blocks``), so the
conservation check ``frames in use == Σ resident pages`` compares the ledger with what
Linux really holds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balloonlab import launcher
from balloonlab.client import ControlClient, HostNotRunning
from hypervisor.rundir import pid_alive
from hypervisor.topology import parse_topology

PAGE = 4096
BOOT_TIMEOUT = 60.0


_alive = pid_alive


class LiveHost:
    def __init__(self, launched: launcher.Launched) -> None:
        self.launched = launched
        self.proc: subprocess.Popen[bytes] = launched.proc
        self.run_dir = launched.run_dir
        self.log = launched.output
        self._client: ControlClient | None = None

    @property
    def client(self) -> ControlClient:
        """Connect on first use, retrying while the host is still starting to listen
        (the socket file exists a moment before the server accepts)."""
        if self._client is None:
            deadline = time.monotonic() + BOOT_TIMEOUT
            while True:
                try:
                    self._client = ControlClient(self.run_dir, timeout=10.0)
                    break
                except HostNotRunning:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        return self._client

    def call(self, method: str, **params: Any) -> Any:
        return self.client.call(method, **params)

    def stat(self, vm: str) -> dict[str, Any]:
        return self.call("dommemstat", vm=vm)

    def vm(self, name: str) -> dict[str, Any]:
        for v in self.call("list_vms"):
            if v["name"] == name:
                return v
        raise KeyError(name)

    def events(self) -> list[dict[str, Any]]:
        return self.call("events")

    def wait(self, pred: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = pred()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                             f"last value {last!r}\n--- host log tail ---\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ----------------------------------------------------------- independent measurement

    def memfd_resident_pages(self) -> dict[str, int]:
        """Resident pages of each VM's RAM memfd, as Linux reports them."""
        out: dict[str, int] = {}
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for entry in fd_dir.iterdir():
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            if target.startswith("/memfd:balloonlab-") and "-ram" in target:
                name = target[len("/memfd:balloonlab-"):].split("-ram")[0]
                try:
                    st = os.stat(entry)
                except OSError:
                    continue
                out[name] = st.st_blocks * 512 // PAGE
        return out

    def frames_in_use(self) -> int:
        info = self.call("host_info")
        return info["frames_total"] - info["frames_free"]

    def check_conservation(self, settle: float = 5.0) -> None:
        """frames in use == Σ resident memfd pages (retried briefly: faults in flight)."""
        deadline = time.monotonic() + settle
        while True:
            used = self.frames_in_use()
            res = sum(self.memfd_resident_pages().values())
            if used == res:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"frames in use {used} != resident memfd pages {res}")
            time.sleep(0.05)

    def process_pids(self) -> list[int]:
        """The hypervisor, its fork server (when one runs) and every VM process."""
        pids = [self.proc.pid]
        fs = self.call("host_info").get("forkserver_pid")
        if fs:
            pids.append(int(fs))
        for v in self.call("list_vms"):
            for key in ("pid", "driver_pid"):
                if v.get(key):
                    pids.append(int(v[key]))
        return pids


def host_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[2]
                                          / "build" / "numba-cache"))
    return env


def start_host(toml: str, run_dir: Path, topo_file: Path, *, wait: bool = True) -> LiveHost:
    """Launch a host of ``toml`` in ``run_dir`` (written to ``topo_file``); with ``wait``,
    return once every VM runs with its driver connected."""
    # Every test gets its own run dir so tests can run in parallel.
    toml = toml.replace("[host]", f'[host]\nrun_dir = "{run_dir}"', 1)
    topo_file.write_text(toml)
    topo = parse_topology(toml, str(topo_file))
    host = LiveHost(launcher.launch(topo, topo_file=topo_file, env=host_env()))
    if wait:
        try:
            launcher.wait_ready(host.launched, BOOT_TIMEOUT)
        except launcher.LaunchError as e:
            raise AssertionError(f"{e}\n--- host log tail ---\n{host.log_tail()}") from None
    return host


def stop_and_check(host: LiveHost, pids: list[int]) -> None:
    """Shut ``host`` down; no process of it (``pids``) may be left, nor (after a clean stop)
    its run dir or its output file."""
    if host.proc.poll() is None:
        with contextlib.suppress(Exception):
            host.call("shutdown")
    else:
        # It died on its own (that failed the test already); its VMs must be gone too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.proc.pid, signal.SIGKILL)
    try:
        host.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(host.proc.pid, signal.SIGKILL)
        host.proc.wait(timeout=5)
        raise AssertionError("host did not shut down within 20 s") from None
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    assert not left, f"processes left after shutdown: {left}"
    if host.proc.returncode == 0:
        assert not host.run_dir.exists(), "run dir not removed at shutdown"
        host.launched.stop(1.0)  # reaped already: removes the output file
        assert not host.log.exists(), "host output file not removed after a clean stop"


@pytest.fixture
def live_host(tmp_path: Path) -> Iterator[Callable[[str], LiveHost]]:
    started: list[LiveHost] = []

    def start(toml: str) -> LiveHost:
        n = len(started)
        host = start_host(toml, tmp_path / f"run{n}", tmp_path / f"topology{n}.toml",
                          wait=False)
        started.append(host)  # from here on, teardown stops it whatever happens
        try:
            launcher.wait_ready(host.launched, BOOT_TIMEOUT)
        except launcher.LaunchError as e:
            raise AssertionError(f"{e}\n--- host log tail ---\n{host.log_tail()}") from None
        return host

    yield start

    for host in started:
        pids: list[int] = []
        if host.proc.poll() is None:
            with contextlib.suppress(Exception):
                pids = host.process_pids()
        stop_and_check(host, pids)
