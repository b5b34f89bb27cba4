"""Dashboard rendering from snapshots (no host needed)."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from balloonlab.dashboard import bar, compact_size, event_line, format_field, plain_lines, render
from balloonlab.recording import rates, snapshot_from
from protocol.features import Feature
from tests.cli import synthetic


def _text(renderable: object) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_render_table_has_every_vm_and_host_row() -> None:
    s = synthetic.run(3)
    r = rates(s[1], s[2])
    events = [{"time": s[2].time, "kind": "balloon_target", "vm": "a", "pages": 2048}]
    out = _text(render(s[2], r, events, footer="Ctrl-C stops the host"))
    lines = out.splitlines()
    a_line = next(line for line in lines if line.startswith("a "))
    assert "running" in a_line
    assert "600" not in a_line  # pages are shown as sizes, not raw counts
    assert " 2.3M " in a_line  # balloon: 600 pages
    assert " 100k " in a_line  # ops/s: 50k ops per 0.5 s
    assert any(line.startswith("host ") and " 48M " in line for line in lines)
    assert "frames" in lines[0] and "of 48.0 MiB" in lines[0] and "policy none" in lines[0]
    assert "balloon_target a pages=2048" in out
    assert "Ctrl-C stops the host" in out


def _many_vms(n: int) -> tuple[object, dict[str, tuple[float, float]]]:
    names = [f"vm{i:02d}-web" for i in range(n)]
    vms = [{"name": v, "state": "running", "memory_pages": 131072, "driver": "connected"}
           for v in names]
    before = {v: synthetic.memstat(60000, 30000, 32768, ops=10**8, faults=10**6) for v in names}
    after = {v: synthetic.memstat(60000, 30000, 32768, ops=2 * 10**8, faults=2 * 10**6)
             for v in names}
    s0 = snapshot_from(synthetic.host_info(1000), vms, before, now=1_700_000_000.0)
    s1 = snapshot_from(synthetic.host_info(1000), vms, after, now=1_700_000_000.5)
    return s1, rates(s0, s1)


@pytest.mark.parametrize("width", [140, 120, 100])
def test_render_fits_the_terminal_with_32_vms(width: int) -> None:
    """Every cell readable (nothing cut to an ellipsis) at 100-140 columns with 32 VMs,
    and the whole view fits a 45-line terminal."""
    snap, r = _many_vms(32)
    events = [{"time": 1_700_000_000.0, "kind": "policy", "vm": "vm01-web", "policy": "mom",
               "target_pages": 123, "old": 100, "reason": "mom: guest free 12% < 20%"}] * 5
    console = Console(width=width, record=True, color_system=None)
    console.print(render(snap, r, events, footer="Ctrl-C stops the host", width=width))
    lines = console.export_text().splitlines()
    table = [line for line in lines if line.startswith("vm") and "running" in line]
    assert len(table) == 32
    assert not any("…" in line for line in lines[:36]), "\n".join(lines[:5])
    assert all(" 512M " in line and " 117M " in line and " 200M " in line for line in table)
    assert max(len(line.rstrip()) for line in lines) <= width
    assert len(lines) <= 45


def test_event_line_names_features_and_times() -> None:
    ev = {"time": 1_700_000_000.0, "kind": "driver_connected", "vm": "a",
          "features": int(Feature.STATS_VQ.mask | Feature.MUST_TELL_HOST.mask), "seq": 3}
    line = event_line(ev)
    assert "features=must_tell_host,stats" in line and "seq" not in line
    started = format_field("started", 1_700_000_000.25)
    assert started.startswith(time.strftime("%Y-%m-%d %H:%M:%S",
                                            time.localtime(1_700_000_000)))
    assert started.endswith(".250")


def test_plain_lines_one_per_vm_plus_host() -> None:
    s = synthetic.run(2)
    lines = plain_lines(s[1], rates(s[0], s[1]))
    assert len(lines) == 3
    assert " a running " in lines[0] and "balloon=1.2 MiB" in lines[0]
    assert "ops/s=100000" in lines[0]
    assert " b running " in lines[1] and "corrupted=0" in lines[1]
    assert "host small: frames" in lines[2] and "policy none" in lines[2]


def test_bar_proportions() -> None:
    vm = synthetic.run(8)[7].vms[0]  # 8192 pages: 2048 balloon, 3072 backed
    text = bar(vm, width=16).plain
    assert len(text) == 16
    assert text.count("█") == 6 and text.count("░") == 4 and text.count("·") == 6


def test_compact_size() -> None:
    assert [compact_size(n) for n in (0, 900, 1024, 1536, 24 << 10, 512 << 20, 3 << 29)] == [
        "0", "900B", "1K", "1.5K", "24K", "512M", "1.5G"]
