"""Modelled throughput beside wall-clock throughput: snapshots, recordings, the dashboard."""

from __future__ import annotations

from rich.console import Console

from balloonlab.dashboard import plain_lines, render
from balloonlab.recording import (
    TIMESERIES_COLUMNS,
    RateWindow,
    Recorder,
    modelled_rates,
    read_timeseries,
    snapshot_from,
)
from hypervisor.topology import parse_topology
from tests.cli import synthetic

T0 = 1_700_000_000.0
VMS = [{"name": "a", "state": "running", "memory_pages": 8192, "driver": "connected"}]


def _snap(t: float, ops: int, modelled: float | None):
    st = synthetic.memstat(4000, 0, 0, ops=ops, faults=10)
    if modelled is not None:
        st["modelled_seconds"] = modelled
    return snapshot_from(synthetic.host_info(1000), VMS, {"a": st}, now=t)


def test_modelled_rate_is_accesses_per_modelled_second() -> None:
    s0, s1 = _snap(T0, 1_000_000, 0.5), _snap(T0 + 2, 3_000_000, 0.9)
    assert s1.vms[0].modelled_ns == 900_000_000
    # 2 M accesses in 0.4 modelled seconds (and 2 wall-clock seconds)
    assert modelled_rates(s0, s1) == {"a": 2_000_000 / 0.4}
    assert modelled_rates(None, s1) == {"a": None}
    assert modelled_rates(_snap(T0, 0, None), s1) == {"a": None}  # not reported before
    w = RateWindow()
    w.update(s0)
    assert w.update(s1)["a"] == (1_000_000.0, 0.0) and w.modelled["a"] == 5_000_000.0


def test_dashboard_shows_model_column_when_wide_and_plain_lines_always() -> None:
    s0, s1 = _snap(T0, 1_000_000, 0.5), _snap(T0 + 2, 3_000_000, 0.9)
    modelled = modelled_rates(s0, s1)
    for width, shown in ((140, True), (100, False)):
        console = Console(width=width, record=True, color_system=None)
        console.print(render(s1, {"a": (1e6, 0.0)}, width=width, modelled=modelled))
        text = console.export_text()
        assert ("model" in text) is shown and ("5.0M" in text) is shown
        assert max(len(line.rstrip()) for line in text.splitlines()) <= width
    line = plain_lines(s1, {"a": (1e6, 0.0)}, modelled)[0]
    assert "ops/s=1000000" in line and "modelled_ops/s=5000000" in line
    assert "modelled_ops/s" not in plain_lines(s1, {"a": (1e6, 0.0)})[0]


def test_recording_has_modelled_columns(tmp_path) -> None:
    topo = parse_topology('[host]\nmemory = "64MiB"\n[[vm]]\nname = "a"\nmemory = "32MiB"\n',
                          "lab.toml")
    rec = Recorder(tmp_path / "rec", topo)
    rec.tick(_snap(T0, 0, None))
    # 3 s apart: each rate is over the previous tick alone (the window is 2 s)
    rec.tick(_snap(T0 + 3, 1_000_000, 0.5))
    rec.tick(_snap(T0 + 6, 3_000_000, 0.9))
    rec.close()
    i = TIMESERIES_COLUMNS.index("modelled_seconds")
    assert TIMESERIES_COLUMNS[i + 1] == "modelled_ops_per_s"
    rows = read_timeseries(tmp_path / "rec")
    assert [r["modelled_seconds"] for r in rows[1:]] == [0.5, 0.9]
    assert rows[0]["modelled_seconds"] != rows[0]["modelled_seconds"]  # nan: not reported
    assert rows[2]["modelled_ops_per_s"] == 2_000_000 / 0.4
