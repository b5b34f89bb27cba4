"""QMP and Prometheus metrics against a real host started by ``balloonlab up --detach``:
hypervisor, guest kernels and balloon drivers as processes.

A short private XDG_RUNTIME_DIR per test keeps it away from any other host on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import ExecuteError, QMPClient

from balloonlab.cli import cli
from balloonlab.client import ControlClient
from hypervisor.rundir import pid_alive

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WAIT = 60.0  # bounds a hang only
MIB = 1 << 20


@pytest.fixture
def xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bl-"))  # short: socket paths are limited to 108 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(REPO / "build" / "numba-cache"))
    yield d
    if (d / "balloonlab" / "small" / "hypervisor.pid").exists():
        CliRunner().invoke(cli, ["down", "--host", "small", "--timeout", "10s"])
    shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred, what: str):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[-1].split()[0].decode()


def scrape(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=WAIT) as r:
        text = r.read().decode()
    return {(s.name, s.labels.get("domain", "")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_qmp_and_metrics_on_a_real_host(xdg: Path) -> None:
    port = free_port()
    r = CliRunner()
    res = r.invoke(cli, ["up", "two-vms-small", "--detach", "--boot-timeout", "90s",
                         "--metrics", f"127.0.0.1:{port}"])
    assert res.exit_code == 0, (res.output, res.stderr)
    url = f"http://127.0.0.1:{port}/metrics"
    assert url in res.stdout
    run_dir = xdg / "balloonlab" / "small"
    client = ControlClient(run_dir, timeout=10.0)
    vms = {v["name"]: v for v in client.call("list_vms")}
    pids = [p for v in vms.values() for p in (v["pid"], v["driver_pid"])]

    # Metrics agree with dommemstat (guest stats move, so compare the host-side ones).
    wait_for(lambda: all(client.call("dommemstat", vm=v)["last_update"] for v in vms),
             "the guests' first stats")
    m = scrape(url)
    st = client.call("dommemstat", vm="a")
    assert m[("libvirt_domain_info_maximum_memory_bytes", "a")] == 32 * MIB
    assert m[("libvirt_domain_memory_stats_actual_balloon_bytes", "a")] == st["actual"]
    assert m[("balloonlab_domain_running", "b")] == 1
    assert m[("balloonlab_corrupted_reads_total", "a")] == 0

    async def qmp_session() -> None:
        a, b = QMPClient("a"), QMPClient("b")
        await a.connect(str(run_dir / "a.qmp.sock"))
        await b.connect(str(run_dir / "b.qmp.sock"))
        with a.listener() as la, b.listener() as lb:
            # stop: both guest processes are really stopped, and resumed by cont.
            await a.execute("stop")
            assert (await a.execute("query-status"))["status"] == "paused"
            assert [proc_state(p) for p in (vms["a"]["pid"], vms["a"]["driver_pid"])] == \
                ["T", "T"]
            await a.execute("cont")
            assert (await a.execute("query-status"))["status"] == "running"
            assert proc_state(vms["a"]["pid"]) != "T"
            # balloon: the guest ends with 24 MiB; BALLOON_CHANGE says so.
            await a.execute("balloon", {"value": 24 * MIB})
            async with asyncio.timeout(WAIT):
                while True:
                    ev = await la.get()
                    if ev["event"] == "BALLOON_CHANGE" and ev["data"]["actual"] == 24 * MIB:
                        break
            assert await a.execute("query-balloon") == {"actual": 24 * MIB}
            # An error changes nothing.
            with pytest.raises(ExecuteError) as ei:
                await a.execute("qom-get", {"path": "/machine/nope", "property": "x"})
            assert ei.value.error_class == "DeviceNotFound"
            # system_powerdown halts b for good; a keeps running.
            await b.execute("system_powerdown")
            seen = []
            async with asyncio.timeout(WAIT):
                while "SHUTDOWN" not in seen:
                    seen.append((await lb.get())["event"])
            assert seen == ["POWERDOWN", "SHUTDOWN"]
            assert (await b.execute("query-status"))["status"] == "shutdown"
            assert (await a.execute("query-status"))["status"] == "running"
        await a.disconnect()
        await b.disconnect()

    asyncio.run(asyncio.wait_for(qmp_session(), WAIT * 2))
    assert client.call("dommemstat", vm="a")["actual"] == 24 * MIB
    assert wait_for(lambda: not pid_alive(vms["b"]["pid"]), "b's guest kernel to exit")
    states = {v["name"]: v["state"] for v in client.call("list_vms")}
    assert states == {"a": "running", "b": "halted"}
    m = scrape(url)
    assert m[("libvirt_domain_memory_stats_actual_balloon_bytes", "a")] == 24 * MIB
    assert m[("balloonlab_domain_running", "b")] == 0
    assert m[("libvirt_domain_memory_stats_rss_bytes", "b")] == 0
    assert m[("balloonlab_corrupted_reads_total", "a")] == 0
    client.close()

    async def pause_a() -> None:
        a = QMPClient("a")
        await a.connect(str(run_dir / "a.qmp.sock"))
        await a.execute("stop")
        await a.disconnect()

    # A paused VM does not keep the host from stopping: it is resumed to halt.
    asyncio.run(asyncio.wait_for(pause_a(), WAIT))
    assert proc_state(vms["a"]["pid"]) == "T"
    assert "stopped" in r.invoke(cli, ["down", "--host", "small"]).stdout
    wait_for(lambda: not any(pid_alive(p) for p in pids), "every VM process to exit")
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        raise AssertionError("metrics still served after down")


#: A host too small for both VMs once a's task starts (after b is paused): the host must
#: reclaim, and b's idle pages are the coldest.
SQUEEZED = """
[host]
name = "small"
memory = "24MiB"
swap = "64MiB"
policy = "none"
policy_interval = "500ms"

[[vm]]
name = "a"
memory = "32MiB"
stats_interval = "250ms"
guest_swap = "16MiB"
[[vm.task]]
workload = "uniform"
size = "20MiB"
start = "8s"

[[vm]]
name = "b"
memory = "32MiB"
stats_interval = "250ms"
guest_swap = "16MiB"
[[vm.task]]
workload = "idle"
size = "12MiB"
"""


def test_a_paused_vm_answers_shootdowns_and_stays_paused(xdg: Path, tmp_path: Path) -> None:
    topo = tmp_path / "squeezed.toml"
    topo.write_text(SQUEEZED)
    r = CliRunner()
    res = r.invoke(cli, ["up", str(topo), "--detach", "--boot-timeout", "90s"])
    assert res.exit_code == 0, (res.output, res.stderr)
    run_dir = xdg / "balloonlab" / "small"
    client = ControlClient(run_dir, timeout=10.0)
    b_pid = next(v["pid"] for v in client.call("list_vms") if v["name"] == "b")

    async def stop_b() -> None:
        b = QMPClient("b")
        await b.connect(str(run_dir / "b.qmp.sock"))
        await b.execute("stop")
        await b.disconnect()

    asyncio.run(asyncio.wait_for(stop_b(), WAIT))
    paused_at = max(e["seq"] for e in client.call("events"))
    # a's task starts: the host reclaims b's frames, which needs b's shootdown_ack; b runs
    # for the round trip, its pages go to host swap, and it is stopped again.
    wait_for(lambda: any(e["kind"] == "host_swap_out" and e["vm"] == "b"
                         and e["seq"] > paused_at for e in client.call("events")),
             "a host swap-out of the paused VM's pages")
    wait_for(lambda: proc_state(b_pid) == "T", "b stopped again")
    evs = [e for e in client.call("events") if e["seq"] > paused_at]
    assert not [e for e in evs if e["kind"] in ("vm_crashed", "vm_restarted")
                and e["vm"] == "b"], evs
    assert {v["name"]: v["state"] for v in client.call("list_vms")}["b"] == "running"

    async def status_b() -> str:
        b = QMPClient("b")
        await b.connect(str(run_dir / "b.qmp.sock"))
        status = (await b.execute("query-status"))["status"]
        await b.disconnect()
        return str(status)

    assert asyncio.run(asyncio.wait_for(status_b(), WAIT)) == "paused"
    assert client.call("dommemstat", vm="a")["corrupted_reads"] == 0
    client.close()
    assert "stopped" in r.invoke(cli, ["down", "--host", "small"]).stdout
