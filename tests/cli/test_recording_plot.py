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
        rec.event({"time": synthetic.run(1)[0].time + 2.0, "kind": "guest_oom_kill", "vm": "b",
                   "pid": 3})
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


# -- provenance, the run's story, decision ticks, several runs ------------------------------


def test_recording_carries_provenance(tmp_path: Path) -> None:
    out = record(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"] == meta
    assert meta["balloonlab_version"]
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["hostname"]
    assert meta["machine"]["kernel"] and meta["machine"]["memory_bytes"] > 0
    assert meta["seed"] == 0 and meta["policy"] == "none"
    # The topology as resolved (every default spelled out) reads back to the same lab.
    topo = load_topology(example_path("two-vms-small"))
    assert parse_topology(meta["topology"], "x") == dataclasses.replace(topo, source="x")
    # This test runs from a git checkout: the commit is recorded (40 hex digits).
    assert meta["git_commit"] is None or len(meta["git_commit"].split("+")[0]) == 40


def test_provenance_lists_policy_parameters_with_defaults() -> None:
    from balloonlab.recording import provenance

    topo = parse_topology('[host]\nmemory = "64MiB"\npolicy = "mom"\nseed = 5\n'
                          '[host.policy_params]\npressure_threshold = 0.3\n'
                          '[[vm]]\nname = "a"\nmemory = "32MiB"\n', "lab.toml")
    p = provenance(topo)
    assert p["seed"] == 5 and p["policy"] == "mom"
    assert p["policy_params"]["pressure_threshold"] == 0.3
    assert p["policy_params"]["stat_avg_samples"] == 10  # a default, spelled out


def _story_summary(swap_event_at: float | None) -> dict:
    s = synthetic.run(10)
    summary = RunSummary()
    for snap in s:
        summary.add(snap)
    summary.add_event({"time": s[0].time + 1.2, "kind": "policy", "vm": "a", "target_pages": 512,
                       "policy": "mom", "reason": "x"})
    summary.add_event({"time": s[0].time + 3.0, "kind": "policy", "vm": "a",
                       "target_pages": 2048, "policy": "mom", "reason": "x"})
    if swap_event_at is not None:
        summary.add_event({"time": s[0].time + swap_event_at, "kind": "host_swap_out",
                           "vm": "b", "pages": 10})
    return summary.to_json()


def test_summary_tells_when_the_policy_acted_and_what_each_vm_gave() -> None:
    from balloonlab.recording import story_lines

    j = _story_summary(swap_event_at=2.0)
    assert j["first_balloon_target_s"] == pytest.approx(1.2)
    assert (j["first_balloon_target_vm"], j["first_balloon_target_pages"]) == ("a", 512)
    assert j["first_host_swap_out_s"] == pytest.approx(2.0)
    # a: backed 4096 -> 3072 pages (its balloon took 2048, half of them backed);
    # b: 1000 -> 4600 pages.
    assert (j["vms"]["a"]["gave_pages"], j["vms"]["a"]["got_pages"]) == (1024, 0)
    assert (j["vms"]["b"]["gave_pages"], j["vms"]["b"]["got_pages"]) == (0, 3600)
    lines = story_lines(j)
    assert lines[0] == ("first balloon target at 1.2 s (a: 2.0 MiB), 0.8 s before the first "
                        "host swap-out at 2.0 s")
    assert lines[1].startswith("a: gave back 4.0 MiB (backed 16.0 MiB at start, 12.0 MiB lowest")
    assert "balloon up to 8.0 MiB" in lines[1]
    assert lines[2].startswith("b: took 14.1 MiB (") and "never ballooned" in lines[2]


def test_summary_says_when_the_host_swapped_first_or_never() -> None:
    from balloonlab.recording import story_lines

    assert story_lines(_story_summary(swap_event_at=0.5))[0].endswith(
        "; the host swapped first, at 0.5 s")
    assert story_lines(_story_summary(swap_event_at=None))[0].endswith(
        "; the host never swapped")
    empty = RunSummary().to_json()
    assert story_lines(empty) == ["no balloon target was set; the host never swapped"]


def test_plot_marks_each_balloon_target_decision(tmp_path: Path) -> None:
    from balloonlab.plot import _target_ticks

    t0 = 1000.0
    events = [
        {"time": t0 + 1.0, "kind": "policy", "vm": "a", "target_pages": 10},
        {"time": t0 + 1.0, "kind": "balloon_target", "vm": "a", "target_pages": 10},
        {"time": t0 + 2.5, "kind": "schedule", "vm": "b", "action": "set_balloon"},
        {"time": t0 + 3.0, "kind": "schedule", "vm": None, "action": "set_policy"},
        {"time": t0 + 4.0, "kind": "host_swap_out", "vm": "a", "pages": 3},
    ]
    assert _target_ticks(events, t0) == {"a": [1.0], "b": [2.5]}


def _pixels(path: Path) -> set:
    img = mpimg.imread(path)
    return {tuple(px) for px in img.reshape(-1, img.shape[2]).tolist()}


def test_plot_draws_target_dashed_in_its_own_colour_and_guest_swap(tmp_path: Path) -> None:
    from matplotlib.colors import to_rgba

    out = record(tmp_path)
    memory = plot_run(out)[0]
    colours = _pixels(memory)
    for name in ("tab:orange", "tab:purple", "tab:green"):  # target, guest swap, balloon
        rgba = to_rgba(name)
        assert any(all(abs(a - b) < 0.02 for a, b in zip(px, rgba)) for px in colours), name


def test_plot_overlays_several_runs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from balloonlab.cli import cli

    first = record(tmp_path / "one")
    second = tmp_path / "two" / "rec"
    with Recorder(second, load_topology(example_path("two-vms-small"))) as rec:
        for snap in synthetic.run(6, t0=1_800_000_000.0):
            rec.tick(snap)
    res = CliRunner().invoke(cli, ["plot", str(first), str(second), "--out",
                                   str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    names = [Path(p).name for p in res.stdout.split()]
    assert names == ["compare-host-frames.png", "compare-host-swap.png", "compare-backed.png",
                     "compare-balloon.png", "compare-guest-swap.png", "compare-ops.png"]
    for n in names:
        assert (tmp_path / "cmp" / n).read_bytes()[:8] == PNG_MAGIC
    # Both runs are named "rec": the legend falls back to their paths.
    from balloonlab.plot import _run_labels

    assert _run_labels([first, second]) == [str(first), str(second)]
    assert _run_labels([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]


def test_plot_of_several_runs_names_the_bad_one(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from balloonlab.cli import cli

    good = record(tmp_path)
    res = CliRunner().invoke(cli, ["plot", str(good), str(tmp_path / "missing"),
                                   "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 1
    assert "missing/timeseries.csv: no such file" in res.output
    assert not (tmp_path / "cmp").exists()  # nothing written before every run was read


@pytest.mark.slow
def test_up_seed_reaches_the_recording_and_the_guests(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    topo = tmp_path / "lab.toml"
    topo.write_text(f"""
[host]
name = "seedtest-{os.getpid()}"
memory = "48MiB"
run_dir = "{tmp_path / 'run'}"
seed = 3

[[vm]]
name = "a"
memory = "32MiB"
stats_interval = "250ms"
[[vm.task]]
workload = "zipf"
size = "8MiB"
rate = 20000
""")
    rec = tmp_path / "rec"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(Path(__file__).resolve().parents[2]
                                                 / "build" / "numba-cache")}
    cli = Path(sys.executable).parent / "balloonlab"
    res = subprocess.run([str(cli), "up", str(topo), "--seed", "42",
                          "--for", "2s", "--no-dashboard", "--record", str(rec)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    meta = json.loads((rec / "meta.json").read_text())
    assert meta["seed"] == 42  # --seed wins over the file's seed = 3
    assert parse_topology((rec / "topology.toml").read_text(), "x").host.seed == 42
    assert json.loads((rec / "summary.json").read_text())["provenance"]["seed"] == 42


def test_story_times_count_from_the_host_start_when_it_was_seen() -> None:
    from balloonlab.recording import story_lines

    s = synthetic.run(4)
    summary = RunSummary()
    # The event stream replays history: the host started and the policy acted before the
    # recorder's first tick.
    summary.add_event({"time": s[0].time - 5.0, "kind": "host_started", "vm": None})
    summary.add_event({"time": s[0].time - 2.0, "kind": "policy", "vm": "a",
                       "target_pages": 256})
    for snap in s:
        summary.add(snap)
    j = summary.to_json()
    assert j["first_balloon_target_s"] == pytest.approx(3.0) and j["story_origin"] == \
        "host_started"
    assert story_lines(j)[0].startswith("first balloon target at 3.0 s after the host started")
    # A VM whose backed memory moved by less than 1 % of its size held steady.
    vm = {"first_backed_pages": 1000, "min_backed_pages": 1000, "peak_backed_pages": 1050,
          "final_backed_pages": 1050, "peak_balloon_pages": 0, "memory_pages": 8192,
          "gave_pages": 0, "got_pages": 50, "gave_first": False}
    assert story_lines({"vms": {"web": vm}})[1].startswith("web: held steady (")
    assert story_lines({"vms": {"web": {**vm, "got_pages": 90}}})[1].startswith(
        "web: took 360.0 KiB (")


def test_story_orders_what_a_vm_took_and_gave_back() -> None:
    from balloonlab.recording import story_lines

    # b grows by 3600 pages over the run, then falls back by 3000 (a spike that ends).
    s = synthetic.run(10)
    summary = RunSummary()
    for snap in s:
        summary.add(snap)
    last = s[-1]
    b = dataclasses.replace(last.vms[1], backed_pages=1600)
    summary.add(dataclasses.replace(last, time=last.time + 0.5, vms=(last.vms[0], b)))
    j = summary.to_json()
    assert (j["vms"]["b"]["got_pages"], j["vms"]["b"]["gave_pages"]) == (3600, 3000)
    assert story_lines(j)[2].startswith("b: took 14.1 MiB, then gave back 11.7 MiB (")


def test_host_plot_keeps_a_numeric_time_axis_with_decision_ticks(tmp_path: Path,
                                                                monkeypatch) -> None:
    # Regression: the host plot once drew its ticks from the tick rows' column names, which
    # turned the time axis into categories.
    import balloonlab.plot as P

    out = record(tmp_path)
    figs = []
    real_close = P.plt.close
    monkeypatch.setattr(P.plt, "close", lambda fig: (figs.append(fig), real_close(fig)))
    plot_run(out)
    host_fig = figs[-1]
    for ax in host_fig.axes:
        assert ax.xaxis.get_converter() is None
        lo, hi = ax.get_xlim()
        assert lo < 0.5 and 4.0 < hi < 10.0  # elapsed seconds of the 4.5 s recording


def test_pathology_counters_reach_the_timeseries_and_the_summary(tmp_path: Path) -> None:
    from balloonlab.recording import PATHOLOGY_COLUMNS

    topo = load_topology(example_path("two-vms-small"))
    base = synthetic.run(2)
    with Recorder(tmp_path / "rec", topo) as rec:
        for i, snap in enumerate(base):
            counts = {k: (i + 1) * (n + 1) for n, k in enumerate(PATHOLOGY_COLUMNS)}
            vms = tuple(dataclasses.replace(v, **counts) if v.name == "a" else v
                        for v in snap.vms)
            rec.tick(dataclasses.replace(snap, vms=vms))
    assert set(PATHOLOGY_COLUMNS) <= set(TIMESERIES_COLUMNS)
    rows = [r for r in read_timeseries(tmp_path / "rec") if r["vm"] == "a"]
    assert [r["double_paging"] for r in rows] == [1, 2]
    assert [r["host_swap_reads_noncontig"] for r in rows] == [6, 12]
    b = [r for r in read_timeseries(tmp_path / "rec") if r["vm"] == "b"]
    assert all(r[k] == 0 for r in b for k in PATHOLOGY_COLUMNS)
    summary = json.loads((tmp_path / "rec" / "summary.json").read_text())
    assert summary["vms"]["a"]["false_swap_reads"] == 4
    # From dommemstat: the fields by name; absent (an old host) reads as 0.
    st = {"double_paging": 3, "false_swap_reads": 1, "host_swap_reads": 9,
          "host_swap_reads_noncontig": 2}
    snap = snapshot_from(synthetic.host_info(100), synthetic.list_vms(), {"a": st}, now=1.0)
    a = snap.vms[0]
    assert (a.double_paging, a.false_swap_reads, a.silent_swap_writes, a.stale_swap_reads,
            a.host_swap_reads, a.host_swap_reads_noncontig) == (3, 1, 0, 0, 9, 2)
