"""End-to-end harness: a real hypervisor process with real guest kernel and driver processes.

``live_host(toml)`` starts ``python -m hypervisor --topology FILE`` with a private run
directory, waits until every VM runs and its driver has negotiated, and yields a
:class:`LiveHost` with a control client. Teardown shuts the host down and checks that no
process of the topology is left behind.

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
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from balloonlab.client import ControlClient, HostNotRunning
from hypervisor.rundir import pid_alive

PAGE = 4096
BOOT_TIMEOUT = 60.0


_alive = pid_alive


class LiveHost:
    def __init__(self, proc: subprocess.Popen[bytes], run_dir: Path, log: Path) -> None:
        self.proc = proc
        self.run_dir = run_dir
        self.log = log
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
        pids = [self.proc.pid]
        for v in self.call("list_vms"):
            for key in ("pid", "driver_pid"):
                if v.get(key):
                    pids.append(int(v[key]))
        return pids


@pytest.fixture
def live_host(tmp_path: Path) -> Iterator[Callable[[str], LiveHost]]:
    started: list[LiveHost] = []

    def start(toml: str) -> LiveHost:
        run_dir = tmp_path / f"run{len(started)}"
        topo = tmp_path / f"topology{len(started)}.toml"
        # Every test gets its own run dir so tests can run in parallel.
        toml = toml.replace("[host]", f'[host]\nrun_dir = "{run_dir}"', 1)
        topo.write_text(toml)
        log = tmp_path / f"host{len(started)}.log"
        env = dict(os.environ)
        env.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[2]
                                              / "build" / "numba-cache"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "hypervisor", "--topology", str(topo)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        host = LiveHost(proc, run_dir, log)
        started.append(host)  # from here on, teardown stops it whatever happens
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not (run_dir / "control.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"host did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        host.wait(lambda: all(v["state"] == "running" and v.get("driver") == "connected"
                              for v in host.call("list_vms")),
                  BOOT_TIMEOUT, "every VM running with its driver connected")
        return host

    yield start

    for host in started:
        pids: list[int] = []
        if host.proc.poll() is None:
            with contextlib.suppress(Exception):
                pids = host.process_pids()
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
            raise AssertionError("host did not shut down within 20 s")
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in pids if _alive(p)]
        assert not left, f"processes left after shutdown: {left}"
        if host.proc.returncode == 0:
            assert not host.run_dir.exists(), "run dir not removed at shutdown"
