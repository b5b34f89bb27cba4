"""Sockets and descriptors under failure: stalled control clients are cut off, a process out
of descriptors refuses with an error frame and keeps serving, injected accept and boot
hand-off failures are survived.

Timeouts here are the ones under test, shortened for the test; every wait is on a condition
(an EOF, an event), bounded only by a generous limit that catches a hang.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hv_peers import Lab, raw_connect, read_frame, run, topo

from balloonlab.client import ControlClient, ControlError
from hypervisor import rundir
from hypervisor.control import MAX_CLIENTS
from protocol import syscalls
from protocol.aio import Listener, refuse
from protocol.framing import decode_payload

#: Bounds a wait that should end within a second; only a hang reaches it.
HANG = 30.0


async def _frames_until_eof(reader: asyncio.StreamReader) -> list[dict]:
    """Every frame the host sends on a connection until it closes it (raises on a hang)."""
    out: list[dict] = []
    while True:
        f = await read_frame(reader, timeout=HANG)
        if f is None:
            return out
        out.append(f)


@pytest.fixture(autouse=True)
def _no_injection():
    syscalls.clear()
    yield
    syscalls.clear()


def test_idle_control_clients_time_out_and_a_new_client_is_served():
    async def main():
        async with Lab(topo(64, 0, {"a": 16})) as lab:
            lab.host.control.idle_timeout = 0.3
            n = MAX_CLIENTS + 8
            conns = [await raw_connect(lab.run_dir / rundir.CONTROL_SOCK) for _ in range(n)]
            results = await asyncio.gather(*(_frames_until_eof(r) for r, _ in conns))
            for _, w in conns:
                w.close()
            # Every idle connection was closed with a reason: the ones beyond MAX_CLIENTS at
            # once (busy), the others once idle for idle_timeout.
            assert all(len(fr) == 1 and fr[0]["t"] == "error" for fr in results), results
            assert {fr[0]["code"] for fr in results} == {"unavailable"}
            texts = [fr[0]["message"] for fr in results]
            assert sum("sent nothing for 0.3 s" in t for t in texts) >= MAX_CLIENTS - 1
            assert sum("connections are being served already" in t for t in texts) >= 1
            info = await asyncio.to_thread(
                lambda: ControlClient(lab.run_dir).call("host_info"))
            assert info["frames_total"] == 64
            assert any(e["kind"] == "connection_refused" for e in lab.host.events)
    run(main())


def test_a_following_client_is_not_idle():
    async def main():
        async with Lab(topo(64, 0, {"a": 16})) as lab:
            lab.host.control.idle_timeout = 0.2

            def follow() -> list[str]:
                seen = []
                with ControlClient(lab.run_dir, timeout=HANG) as c:
                    for ev in c.events(follow=True):
                        seen.append(ev["kind"])
                        if ev["kind"] == "balloon_target":
                            return seen
                return seen

            task = asyncio.ensure_future(asyncio.to_thread(follow))
            # Long past the idle timeout, the follower still gets a new event.
            for _ in range(10):
                await asyncio.sleep(0.1)
            lab.host.set_balloon_target(lab.host.vms["a"], 4, reason="test")
            seen = await asyncio.wait_for(task, HANG)
            assert seen[-1] == "balloon_target"
    run(main())


def test_half_a_frame_is_cut_off_after_the_frame_timeout():
    async def main():
        async with Lab(topo(64, 0, {"a": 16})) as lab:
            lab.host.control.frame_timeout = 0.3
            r, w = await raw_connect(lab.run_dir / rundir.CONTROL_SOCK)
            w.write(b"\x00\x00\x01")  # three bytes of a four-byte length prefix
            await w.drain()
            frames = await _frames_until_eof(r)
            w.close()
            assert [f["code"] for f in frames] == ["unavailable"]
            assert "half a frame" in frames[0]["message"]
            # Others are served meanwhile and after.
            info = await asyncio.to_thread(lambda: ControlClient(lab.run_dir).call("host_info"))
            assert info["name"] == "t"
    run(main())


def test_injected_emfile_at_control_accept_is_refused_and_the_next_client_served():
    async def main():
        async with Lab(topo(64, 0, {"a": 16})) as lab:
            syscalls.install("control.accept@1=EMFILE")

            def first() -> ControlError:
                with pytest.raises(ControlError) as ei:
                    ControlClient(lab.run_dir).call("host_info")
                return ei.value

            err = await asyncio.to_thread(first)
            assert err.code == "unavailable" and "out of file descriptors (EMFILE)" in err.message
            assert syscalls.fired() == ["control.accept@1=EMFILE"]
            info = await asyncio.to_thread(lambda: ControlClient(lab.run_dir).call("host_info"))
            assert info["frames_total"] == 64
            ev = [e for e in lab.host.events if e["kind"] == "connection_refused"]
            assert ev and "EMFILE" in ev[0]["reason"]
    run(main())


def test_a_sticky_emfile_refuses_every_client_without_spinning_then_recovers():
    async def main():
        async with Lab(topo(64, 0, {"a": 16})) as lab:
            syscalls.install("control.accept@1+=ENFILE")
            for _ in range(3):
                r, w = await raw_connect(lab.run_dir / rundir.CONTROL_SOCK)
                frames = await _frames_until_eof(r)
                w.close()
                assert [f["code"] for f in frames] == ["unavailable"]
                assert "ENFILE" in frames[0]["message"]
            calls = syscalls.counts()["control.accept"]
            assert calls == 3  # one accept attempt per connection: no busy loop
            syscalls.clear()
            info = await asyncio.to_thread(lambda: ControlClient(lab.run_dir).call("host_info"))
            assert info["frames_total"] == 64
    run(main())


def test_listener_survives_real_descriptor_exhaustion():
    """Fill the process's descriptor table for real: the listener refuses with its reserved
    descriptor, then serves again once descriptors are free."""
    async def main():
        base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
        served: list[bytes] = []
        hog: list[int] = []

        async def handler(conn: socket.socket) -> None:
            loop = asyncio.get_running_loop()
            served.append(await loop.sock_recv(conn, 16))
            refuse(conn, "served")

        lst = Listener.bind(base / "l.sock", handler, name="l.sock").start()
        try:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                while True:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            client.connect(str(base / "l.sock"))  # the client's descriptor exists already
            client.settimeout(HANG)
            data = await asyncio.to_thread(client.recv, 4096)
            client.close()
            assert b"out of file descriptors (EMFILE)" in data
            assert lst.refused == 1 and not served
            for fd in hog:
                os.close(fd)
            hog.clear()
            c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c2.settimeout(HANG)
            c2.connect(str(base / "l.sock"))
            c2.sendall(b"hello")
            reply = await asyncio.to_thread(c2.recv, 4096)
            c2.close()
            assert decode_payload(reply[4:])["message"] == "served" and served == [b"hello"]
        finally:
            for fd in hog:
                os.close(fd)
            lst.close()
            shutil.rmtree(base, ignore_errors=True)
    run(main())


def test_a_client_reads_a_refusal_sent_before_its_request(tmp_path):
    """The race of a refused connection, made certain: the server has sent its error frame
    and closed before the client writes its request. The client still reports the
    server's reason, not a broken pipe."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(tmp_path / "control.sock"))
    lsock.listen(1)
    try:
        client = ControlClient(tmp_path / "control.sock", timeout=HANG)
        conn, _ = lsock.accept()
        refuse(conn, "control.sock: out of file descriptors (EMFILE); try again later")
        with pytest.raises(ControlError) as ei:
            client.call("host_info")
        client.close()
        assert ei.value.code == "unavailable" and "EMFILE" in ei.value.message
    finally:
        lsock.close()


HOST_UNDER_ULIMIT = textwrap.dedent("""
    import asyncio, resource, sys
    from hypervisor.host import Host
    from hypervisor.topology import parse_topology

    async def main():
        host = Host(parse_topology(sys.argv[2]), launch_vm_processes=False, run_dir=sys.argv[1])
        await host.start()
        host.control.idle_timeout = float(sys.argv[3])
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        print("ready", flush=True)
        await host.wait_stopped()

    asyncio.run(main())
""")


@pytest.mark.slow
def test_sixty_idle_clients_under_ulimit_48_then_a_client_is_served():
    base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    proc = subprocess.Popen([sys.executable, "-c", HOST_UNDER_ULIMIT, str(base / "run"),
                             topo(64, 0, {"a": 16, "b": 16}), "1.0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

        async def main():
            conns = [await raw_connect(base / "run" / rundir.CONTROL_SOCK) for _ in range(60)]
            results = await asyncio.gather(*(_frames_until_eof(r) for r, _ in conns))
            for _, w in conns:
                w.close()
            return results

        results = run(main())
        texts = [fr[0]["message"] for fr in results if fr]
        assert len(texts) == 60, results
        assert any("out of file descriptors" in t for t in texts), texts
        assert any("sent nothing for 1 s" in t for t in texts), texts
        with ControlClient(base / "run", timeout=HANG) as c:
            assert c.call("host_info")["frames_total"] == 64
            c.call("shutdown")
        assert proc.wait(HANG) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


async def _wait_event(host, kind: str, count: int = 1) -> list[dict]:
    """The events of ``kind`` once there are ``count`` of them (bounded only against a hang)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 300
    while True:
        evs = [e for e in host.events if e["kind"] == kind]
        if len(evs) >= count:
            return evs
        assert loop.time() < end, f"no {count}x {kind}: {list(host.events)}"
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("plan, on_crash", [
    ("machine.sendmsg@1=EIO", "restart"),
    ("machine.accept@1=EMFILE", "destroy"),
])
def test_a_failed_boot_handoff_crashes_only_that_vm(plan, on_crash):
    """Real guest kernels: the first boot hand-off fails (the memfds cannot be sent, or the
    connection cannot be accepted); that VM's kernel exits with one line, its supervisor
    restarts or destroys it per on_crash, and the other VM never notices."""
    from hypervisor.host import Host
    from hypervisor.topology import parse_topology

    async def main():
        base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
        host = Host(parse_topology(topo(256, 0, {"a": 64, "b": 64},
                                        f'on_crash = "{on_crash}"\n')), run_dir=base / "run")
        syscalls.install(plan)
        try:
            await host.start()
            if plan.startswith("machine.sendmsg"):
                (ev,) = await _wait_event(host, "boot_failed")
                victim = ev["vm"]
                assert "EIO" in ev["reason"] or "Input/output error" in ev["reason"]
            else:
                (ev,) = await _wait_event(host, "connection_refused")
                victim = ev["socket"].split(".")[0]
                assert "EMFILE" in ev["reason"]
            other = "b" if victim == "a" else "a"
            if on_crash == "restart":
                await _wait_event(host, "vm_restarted")
                await _wait_event(host, "vm_booted", 2)  # the other, and the victim once
                assert host.vms[victim].restarts == 1
            else:
                await _wait_event(host, "vm_destroyed")
                assert host.vms[victim].state.value == "destroyed"
            await _wait_event(host, "vm_booted", 1)
            assert host.vms[other].restarts == 0 and host.vms[other].state.value == "running"
            assert [e["vm"] for e in host.events if e["kind"] == "vm_crashed"] == [victim]
            log = (base / "run" / f"{victim}.kernel.log").read_text()
            assert "boot failed" in log and "Traceback" not in log, log
            async with host.mm_lock:
                host.check_conservation()
        finally:
            await host.shutdown("test over")
            shutil.rmtree(base, ignore_errors=True)
    asyncio.run(asyncio.wait_for(main(), 600))  # real VM processes: a hang bound only
