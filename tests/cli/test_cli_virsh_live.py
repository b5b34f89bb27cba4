"""What a new user meets at the command line, against real hosts: virsh's meanings and
sizes, manual targets, `--force`, `events | head`, `down --all`, a policy module of one's own.

Each test has its own short XDG_RUNTIME_DIR (it can never see or stop another host on the
machine) and the tiny `two-vms-small` topology. Waits are on conditions; their timeouts only
bound a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from balloonlab.cli import cli
from hypervisor.topology import example_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BALLOONLAB = str(Path(sys.executable).with_name("balloonlab"))
MiB = 1 << 20


@pytest.fixture
def xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bl-"))  # short: socket paths are limited to 108 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(REPO / "build" / "numba-cache"))
    yield d
    # Whatever happened, leave no host behind.
    base = d / "balloonlab"
    if base.is_dir() and any((p / "hypervisor.pid").exists() for p in base.iterdir()):
        CliRunner().invoke(cli, ["down", "--all", "--timeout", "10s"])
    shutil.rmtree(d, ignore_errors=True)


def _ok(res: Any) -> str:
    assert res.exit_code == 0, (res.output, res.stderr)
    return res.stdout


def _wait(pred: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout  # bounds a hang only
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _stat(vm: str, host: str | None = None) -> dict[str, Any]:
    args = ["dommemstat", vm, "--json"] + (["--host", host] if host else [])
    return json.loads(_ok(CliRunner().invoke(cli, args)))


def _topology(tmp: Path, name: str, policy: str = "none") -> Path:
    text = example_path("two-vms-small").read_text()
    text = text.replace('name = "small"', f'name = "{name}"', 1)
    text = text.replace('policy = "none"', f'policy = "{policy}"', 1)
    f = tmp / f"{name}.toml"
    f.write_text(text)
    return f


def test_virsh_meanings_sizes_and_manual_targets(xdg: Path) -> None:
    r = CliRunner()
    _ok(r.invoke(cli, ["up", "two-vms-small", "--detach", "--boot-timeout", "90s"]))
    _wait(lambda: _stat("a").get("guest_anon_pages") is not None, "a's first stats")

    # actual is the guest's current memory: all 32 MiB (virsh prints KiB, --json bytes).
    text = _ok(r.invoke(cli, ["dommemstat", "a"]))
    assert text.splitlines()[0].split() == ["actual", str(32 * 1024)]
    assert _stat("a")["actual_bytes"] == 32 * MiB

    # A bare number is KiB as in virsh: 24576 is 24 MiB, and the command says so.
    out = _ok(r.invoke(cli, ["setmem", "a", "24576"]))
    assert out.startswith("a: target 24 MiB (24576 KiB); the balloon takes 8.0 MiB (2048 pages)")
    assert "the policy leaves a alone until `balloonlab policy ...`" in out
    _wait(lambda: _stat("a")["actual_bytes"] == 24 * MiB, "a's balloon to reach 8 MiB")
    st = _stat("a")
    assert st["balloon_pages"] == 2048 and st["target_pages"] == 2048
    assert st["manual_target"] is True
    assert _ok(r.invoke(cli, ["dommemstat", "a"])).splitlines()[0].split() == [
        "actual", str(24 * 1024)]
    # virsh's spellings work: 24M is the same target (so nothing changes).
    assert _ok(r.invoke(cli, ["setmem", "a", "24M"])).startswith("a: target 24 MiB (24576 KiB)")

    # Squeezing below what the tasks hold resident asks for --force and changes nothing.
    res = r.invoke(cli, ["setmem", "a", "24K"])
    assert res.exit_code == 1, res.output
    (line,) = res.stderr.strip().splitlines()
    assert "less than its tasks use now" in line and "add --force" in line
    assert _stat("a")["target_pages"] == 2048
    res = r.invoke(cli, ["set-balloon", "a", "33M"])
    assert res.exit_code == 1 and "more than its memory" in res.stderr
    assert _stat("a")["target_pages"] == 2048

    out = _ok(r.invoke(cli, ["set-balloon", "a", "--release"]))
    assert out.startswith("a: released to the policy")
    assert _stat("a")["manual_target"] is False

    # `events | head`: the reader goes away; the follower ends quietly with status 0.
    proc = subprocess.Popen([BALLOONLAB, "events", "--follow"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline()
        proc.stdout.close()
        # New events make the follower write into the closed pipe.
        for size in ("1M", "2M", "1M", "2M"):
            _ok(r.invoke(cli, ["set-balloon", "b", size]))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err == b""

    # Events speak for people: feature names, one event per manual target change.
    lines = _ok(r.invoke(cli, ["events"])).splitlines()
    connected = [x for x in lines if " driver_connected a " in x]
    assert connected and "features=must_tell_host,stats" in connected[0]
    assert any(" balloon_target a " in x and "reason=setmem" in x for x in lines)
    assert "stopped" in _ok(r.invoke(cli, ["down"]))


def test_down_with_two_hosts_offers_all(xdg: Path, tmp_path: Path) -> None:
    r = CliRunner()
    for name in ("small", "small2"):
        f = _topology(tmp_path, name)
        _ok(r.invoke(cli, ["up", str(f), "--detach", "--boot-timeout", "90s"]))
    res = r.invoke(cli, ["down"])
    assert res.exit_code == 1
    (line,) = res.stderr.strip().splitlines()
    assert "several hosts are running (small, small2)" in line and "--all" in line
    out = _ok(r.invoke(cli, ["down", "--all"]))
    assert out.splitlines() == ["host small stopped", "host small2 stopped"]
    res = r.invoke(cli, ["list"])
    assert res.exit_code == 1 and "no running host" in res.stderr


POLICY_MODULE = '''
from hypervisor.policies import Decision, Policy


class Quarter(Policy):
    """Balloons a quarter of every VM."""

    name = "quarter"

    def decide(self, host, vms, history):
        return [Decision(vm=v.name, target_pages=v.memory_pages // 4, reason="quarter")
                for v in vms if v.target_pages != v.memory_pages // 4]
'''


@pytest.mark.parametrize("how", ["cwd", "PYTHONPATH"])
def test_own_policy_module_is_importable(xdg: Path, tmp_path: Path, how: str) -> None:
    """docs/policies.md: a module in the directory `up` runs from, or on PYTHONPATH."""
    pkg = tmp_path / "mine"
    pkg.mkdir()
    (pkg / "quarterpol.py").write_text(POLICY_MODULE)
    f = _topology(tmp_path, "small", policy="quarterpol:Quarter")
    env = dict(os.environ)
    if how == "PYTHONPATH":
        env["PYTHONPATH"] = str(pkg)
        cwd = tmp_path
    else:
        env.pop("PYTHONPATH", None)
        cwd = pkg
    proc = subprocess.run([BALLOONLAB, "up", str(f), "--detach", "--boot-timeout", "90s"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    _wait(lambda: _stat("a")["target_pages"] == 8192 // 4, "the policy's target for a")
    evs = [json.loads(x) for x in _ok(CliRunner().invoke(cli, ["events", "--json"])).splitlines()]
    mine = [e for e in evs if e["kind"] == "policy" and e["vm"] == "a"]
    assert mine and mine[0]["policy"] == "quarterpol:Quarter" and mine[0]["reason"] == "quarter"
    assert "stopped" in _ok(CliRunner().invoke(cli, ["down"]))
