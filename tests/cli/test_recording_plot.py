"""Recording writer, summary and plots on synthetic snapshots."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from balloonlab.plot import plot_run
from balloonlab.recording import (
    TIMESERIES_COLUMNS,
    Recorder,
    RecordingError,
    RunSummary,
    rates,
    read_events,
    read_timeseries,
    snapshot_from,
)
from hypervisor.topology import example_path, load_topology, parse_topology
from tests.cli import synthetic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(tmp_path: Path, ticks: int = 10) -> Path:
    topo = load_topology(example_path("two-vms-small"))
    out = tmp_path / "rec"
    with Recorder(out, topo) as rec:
        for snap in synthetic.run(ticks):
            rec.tick(snap)
        rec.event({"time": synthetic.run(1)[0].time + 2.0, "kind": "guest_oom_kill", "vm": "b", "pid": 3})
        rec.event({"time": synthetic.run(1)[0].time + 1.0, "kind": "balloon_target", "vm": "a",
                   "pages": 2048})
    return out


def test_snapshot_units() -> None:
    snap = synthetic.run(2)[1]
    a = snap.vms[0]
    assert a.guest_free_bytes == 4 << 20  # `unused`: guest MEMFREE in bytes
    assert a.guest_available_bytes == 8 << 20  # `usable`: guest MemAvailable
    assert a.swap_out_bytes == 8192
    assert a.guest_swap_used_bytes == 65536
    assert snap.host.frames_used == synthetic.FRAMES - snap.host.frames_free
    missing = snapshot_from(synthetic.host_info(100), synthetic.list_vms(), {}, now=1.0)
    assert missing.vms[0].guest_free_bytes is None and missing.vms[0].backed_pages == 0


def test_rates_and_counter_reset() -> None:
    s0, s1 = synthetic.run(2)
    assert rates(None, s0) == {"a": (0.0, 0.0), "b": (0.0, 0.0)}
    r = rates(s0, s1)
    assert r["a"] == (50_000 / 0.5, 100 / 0.5)
    assert r["b"] == (80_000 / 0.5, 400 / 0.5)
    # restarted VM: counters went backwards -> zero, not negative
    assert rates(s1, s0) == {"a": (0.0, 0.0), "b": (0.0, 0.0)}


def test_recorder_files(tmp_path: Path) -> None:
    out = record(tmp_path)
    with open(out / "timeseries.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == TIMESERIES_COLUMNS
    assert len(rows) == 1 + 10 * 2  # one row per VM per tick
    parsed = read_timeseries(out)
    a_rows = [r for r in parsed if r["vm"] == "a"]
    assert [r["balloon_pages"] for r in a_rows][:3] == [0, 300, 600]
    assert a_rows[1]["ops_per_s"] == 100_000.0 and a_rows[0]["elapsed"] == 0.0
    events = read_events(out)
    assert [e["kind"] for e in events] == ["guest_oom_kill", "balloon_target"]
    topo = parse_topology((out / "topology.toml").read_text(), "x")
    assert topo == dataclasses.replace(load_topology(example_path("two-vms-small")), source="x")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ticks"] == 10 and summary["duration_s"] == 4.5
    assert summary["vms"]["a"]["peak_balloon_pages"] == 2048
    assert summary["vms"]["b"]["ops_during_run"] == 9 * 80_000
    assert summary["vms"]["b"]["mean_ops_per_s"] == pytest.approx(9 * 80_000 / 4.5)
    assert summary["events"] == {"balloon_target": 1, "guest_oom_kill": 1}
    assert summary["corrupted_reads_total"] == 0


def test_summary_counts_ops_across_restart() -> None:
    s = synthetic.run(4)
    summary = RunSummary()
    for snap in (s[0], s[3], s[1], s[2]):  # s[1] after s[3]: counters reset (restart)
        summary.add(snap)
    # a: 0 -> 150k (+150k), reset to 50k (+50k), -> 100k (+50k)
    assert summary.to_json()["vms"]["a"]["ops_during_run"] == 250_000


def test_plot_writes_valid_pngs(tmp_path: Path) -> None:
    out = record(tmp_path)
    paths = plot_run(out)
    assert [p.name for p in paths] == ["memory.png", "host.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
        # not blank: lines were drawn in more than one colour
        assert len({tuple(px) for px in img[::7, ::7].reshape(-1, img.shape[2]).tolist()}) > 5


def test_plot_errors(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="no such file"):
        plot_run(tmp_path)
    (tmp_path / "timeseries.csv").write_text(",".join(TIMESERIES_COLUMNS) + "\n")
    with pytest.raises(RecordingError, match="no samples"):
        plot_run(tmp_path)
    (tmp_path / "timeseries.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RecordingError, match="not a balloonlab timeseries"):
        plot_run(tmp_path)


def test_rate_window_smooths_bursty_stats() -> None:
    from balloonlab.recording import RateWindow

    def snap(t: float, ops: int) -> object:
        stats = {"a": synthetic.memstat(100, 0, 0, ops=ops, faults=0)}
        return snapshot_from(synthetic.host_info(100), synthetic.list_vms()[:1], stats, now=t)

    w = RateWindow(2.0)
    # stats arrive once per 2 s while polls come every 0.5 s: per-poll rates would be 0 or 800
    seq = [(0.0, 0), (0.5, 0), (1.0, 0), (1.5, 0), (2.0, 400), (2.5, 400), (3.0, 400)]
    out = [w.update(snap(t, ops))["a"][0] for t, ops in seq]  # type: ignore[arg-type]
    assert out[0] == 0.0
    assert out[1:4] == [0.0, 0.0, 0.0]
    assert out[4] == 400 / 2.0  # over the 2 s window, not 400 / 0.5
    assert out[5] == 400 / 2.0  # base 0.5 s
    assert out[6] == 400 / 2.0  # base 1.0 s
