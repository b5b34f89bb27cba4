"""The fork server as a process of its own (no hypervisor): what it loads, how it answers a
bad request, and that it stays one thread and leaves at end of file; and the guest
processes' import graph (no user-tool library in a VM process)."""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120.0  # bounds a hang only
#: Libraries of the user tools and the host: a VM process never imports them.
FORBIDDEN = ("click", "rich", "matplotlib", "prometheus_client", "hypervisor", "balloonlab",
             "benchmarks", "tests", "pytest", "hypothesis")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / "build" / "numba-cache"))
    env.pop("BALLOONLAB_HOST_PID", None)
    return env


def test_the_vm_processes_import_no_user_tool_library() -> None:
    code = ("import sys, json\n"
            "from guest import forkserver\n"
            "forkserver.preload()\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, timeout=WAIT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    modules = json.loads(r.stdout.splitlines()[-1])
    assert "guest.kernel" in modules and "guest.balloon_driver" in modules
    bad = [m for m in modules if m.split(".")[0] in FORBIDDEN]
    assert not bad, f"imported by the VM processes: {bad}"


def test_the_server_answers_a_bad_request_stays_single_threaded_and_leaves_at_eof(
        tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log = open(tmp_path / "fs.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "guest.forkserver", "--fd", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        env=_env(), cwd=ROOT)
    theirs.close()
    try:
        ours.settimeout(WAIT)
        ready = json.loads(ours.recv(1 << 16))
        assert ready["ready"] is True and ready["pid"] == proc.pid
        assert ready["threads"] == 1
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 1
        # No descriptor passed, an unknown process kind: refused, nothing forked.
        ours.send(json.dumps({"id": 1, "which": "shell", "argv": [], "env": {}}).encode())
        reply = json.loads(ours.recv(1 << 16))
        assert reply["id"] == 1 and reply["errno"] == 22 and "bad request" in reply["error"]
        ours.send(b"not json")
        reply = json.loads(ours.recv(1 << 16))
        assert reply["errno"] == 22 and "pid" not in reply
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children == []
        assert proc.poll() is None
    finally:
        ours.close()  # end of file: the server leaves
        assert proc.wait(WAIT) == 0
        log.close()
    assert "ready in" in (tmp_path / "fs.log").read_text()


def test_a_process_the_host_never_learned_of_exits_before_main(tmp_path: Path) -> None:
    """The host's end is shut before the answer can reach it: the forked driver never gets
    its go, says why in its log and exits without running ``main``; the server leaves."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "guest.forkserver", "--fd", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    theirs.close()
    log_path = tmp_path / "x.driver.log"
    logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        ours.settimeout(WAIT)
        assert json.loads(ours.recv(1 << 16))["ready"] is True
        ours.shutdown(socket.SHUT_RD)  # the server's answer now fails (EPIPE)
        req = {"id": 1, "which": "driver", "env": _env(),
               "argv": ["--vm", "x", "--balloon-sock", str(tmp_path / "none.sock"),
                        "--kernel-sock", str(tmp_path / "none2.sock")]}
        ours.sendmsg([json.dumps(req).encode()],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [logfd]))])
        assert proc.wait(WAIT) == 0
    finally:
        os.close(logfd)
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + WAIT
    while "died before handing" not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log_path.read_text()
    assert "guest.balloon_driver: the fork server died before handing this process over" in text
    assert "lost a peer" not in text and "negotiated" not in text  # main never ran
