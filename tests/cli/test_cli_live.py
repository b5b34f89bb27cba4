"""The CLI against a real host: hypervisor, guest kernels and balloon drivers as processes.

Each test uses its own short XDG_RUNTIME_DIR so that it can never see (or stop) another
host on the machine, and the tiny `two-vms-small` topology so that boot takes moments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from balloonlab.cli import cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Short path: Unix socket names are limited to 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="bl-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(REPO / "build" / "numba-cache"))
    yield d
    # Whatever happened, leave no host behind: stop it through its own pid file.
    run_dir = d / "balloonlab" / "small"
    pid_file = run_dir / "hypervisor.pid"
    if pid_file.exists():
        CliRunner().invoke(cli, ["down", "--host", "small", "--timeout", "10s"])
    shutil.rmtree(d, ignore_errors=True)


def _ok(res: object) -> str:
    assert res.exit_code == 0, (res.output, getattr(res, "stderr", ""))  # type: ignore[attr-defined]
    return res.stdout  # type: ignore[attr-defined]


def test_up_detach_control_down(xdg: Path) -> None:
    r = CliRunner()
    out = _ok(r.invoke(cli, ["up", "two-vms-small", "--detach", "--boot-timeout", "90s"]))
    assert "host small is up: 2 VMs running" in out

    vms = json.loads(_ok(r.invoke(cli, ["list", "--json"])))
    assert {v["name"]: (v["state"], v["driver"]) for v in vms} == {
        "a": ("running", "connected"), "b": ("running", "connected")}
    host = json.loads(_ok(r.invoke(cli, ["host", "--json", "--host", "small"])))
    assert host["name"] == "small" and host["frames_total"] == 48 * 256

    _ok(r.invoke(cli, ["set-balloon", "a", "4MiB"]))
    stat = json.loads(_ok(r.invoke(cli, ["dommemstat", "a", "--json"])))
    assert stat["target_pages"] == 1024
    text = _ok(r.invoke(cli, ["dommemstat", "a"]))
    assert "target_pages" in text and "(4.0 MiB)" in text

    res = r.invoke(cli, ["dommemstat", "nosuchvm"])
    assert res.exit_code == 1 and res.stderr.startswith("balloonlab: error: ")
    assert len(res.stderr.strip().splitlines()) == 1

    evs = [json.loads(line) for line in _ok(r.invoke(cli, ["events", "--json"])).splitlines()]
    assert any(e["kind"] == "driver_connected" for e in evs)

    res = r.invoke(cli, ["up", "two-vms-small", "--detach"])
    assert res.exit_code == 1 and "already running" in res.stderr

    out_file = xdg / "balloonlab" / "small.hypervisor.out"
    assert out_file.is_file() and not out_file.is_symlink()
    assert os.stat(out_file).st_mode & 0o777 == 0o600
    assert "stopped" in _ok(r.invoke(cli, ["down"]))
    res = r.invoke(cli, ["list"])
    assert res.exit_code == 1 and "no running host" in res.stderr
    # Nothing of the host is left: no run dir, no output file (it used to stay behind).
    assert sorted(os.listdir(xdg / "balloonlab")) == []


def test_up_for_record_then_plot(xdg: Path, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    env = dict(os.environ)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("balloonlab")), "up", "two-vms-small", "--for", "4s",
         "--record", str(rec), "--boot-timeout", "90s"],
        env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "run summary" in proc.stdout and "corrupted reads: 0" in proc.stdout
    for name in ("timeseries.csv", "events.jsonl", "topology.toml", "summary.json"):
        assert (rec / name).is_file(), name
    summary = json.loads((rec / "summary.json").read_text())
    assert set(summary["vms"]) == {"a", "b"}
    assert summary["ticks"] >= 2 and summary["corrupted_reads_total"] == 0
    assert summary["vms"]["a"]["ops_during_run"] > 0
    rows = (rec / "timeseries.csv").read_text().splitlines()
    assert len(rows) >= 1 + 2 * 2
    res = CliRunner().invoke(cli, ["plot", str(rec)])
    assert res.exit_code == 0, res.output
    assert (rec / "memory.png").read_bytes()[:4] == b"\x89PNG"
    # the host is gone after the run
    assert not (xdg / "balloonlab" / "small" / "control.sock").exists() or \
        CliRunner().invoke(cli, ["list"]).exit_code == 1


def test_ctrl_c_stops_host_and_prints_summary(xdg: Path, tmp_path: Path) -> None:
    import signal

    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("balloonlab")), "up", "two-vms-small",
         "--no-dashboard", "--boot-timeout", "90s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # plain status lines: the first host line means "monitoring"
            if "host small: frames" in line:
                break
        else:
            pytest.fail(f"no status line; stderr: {proc.stderr.read() if proc.stderr else ''}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "run summary" in out and "corrupted reads: 0" in out
    assert "Traceback" not in err
    res = CliRunner().invoke(cli, ["list"])
    assert res.exit_code == 1 and "no running host" in res.stderr
