"""Dashboard rendering from snapshots (no host needed)."""

from __future__ import annotations

from rich.console import Console

from balloonlab.dashboard import bar, plain_lines, render
from balloonlab.recording import rates
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
    a_line = next(line for line in lines if line.strip().startswith("│ a ") or " a " in line[:6])
    assert "running" in a_line
    assert "600" not in a_line  # pages are shown as sizes, not raw counts
    assert "2.3 MiB" in a_line  # balloon: 600 pages
    assert "100,000" in a_line  # ops/s: 50k ops per 0.5 s
    assert any("host" in line and "48.0 MiB" in line for line in lines)
    assert "balloon_target a pages=2048" in out
    assert "Ctrl-C stops the host" in out


def test_plain_lines_one_per_vm_plus_host() -> None:
    s = synthetic.run(2)
    lines = plain_lines(s[1], rates(s[0], s[1]))
    assert len(lines) == 3
    assert " a running " in lines[0] and "balloon=1.2 MiB" in lines[0] and "ops/s=100000" in lines[0]
    assert " b running " in lines[1] and "corrupted=0" in lines[1]
    assert "host small: frames" in lines[2] and "policy none" in lines[2]


def test_bar_proportions() -> None:
    vm = synthetic.run(8)[7].vms[0]  # 8192 pages: 2048 balloon, 3072 backed
    text = bar(vm, width=16).plain
    assert len(text) == 16
    assert text.count("█") == 6 and text.count("░") == 4 and text.count("·") == 6
