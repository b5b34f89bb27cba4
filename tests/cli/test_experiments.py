"""Experiments: definitions, the runner's bookkeeping (resume, failures), the report, and the
same trials on the local executor and on a dask LocalCluster.

The live tests run a tiny sweep of their own (one 32 MiB VM whose only task writes 8 MiB
once and holds it): a few seconds per trial, and its modelled time is deterministic for a
seed -- every page is touched exactly once with no memory pressure, so the modelled clock is
pages × (access + fault + zeroing + EPT) whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from balloonlab.cli import cli
from balloonlab.experiments.report import ours_value, report
from balloonlab.experiments.runner import ResultStore, tidy_rows
from balloonlab.experiments.spec import (
    SpecError,
    build_has,
    check_topology,
    list_definitions,
    load_definition,
    parse_definition,
)
from balloonlab.experiments.trial import CRASH_ENV

TINY = textwrap.dedent("""
    [experiment]
    name = "tiny"
    title = "one small VM writes 8 MiB once"
    duration = "30s"

    [grid]
    seed = [1, 2, 3]
    touch = ["8MiB"]

    [quick]
    duration = "2s"
    seed = [1, 2]

    [variant.touch.8MiB]
    "vm.a.task.0.size" = "8MiB"

    [measure]
    vm = ["modelled_seconds", "ops", "peak_backed_pages"]
    host = ["peak_swap_pages"]

    [[published]]
    figure = "nothing published: a test"
    source = "the test"
    ours = { measure = "vm.a.modelled_seconds", where = { touch = "8MiB" } }

    [topology.host]
    name = "tiny"
    memory = "64MiB"
    swap = "32MiB"
    policy = "none"
    policy_interval = "500ms"

    [[topology.vm]]
    name = "a"
    memory = "32MiB"
    guest_swap = "16MiB"
    stats_interval = "250ms"
    [[topology.vm.task]]
    workload = "idle"
    size = "4MiB"
""")


def _write(tmp_path: Path, text: str, name: str = "tiny.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- definitions ----------------------------------------------------------------------------


# Trial ids in another interpreter (another hash seed): resuming a run needs the same ids.
_IDS_ELSEWHERE = """
import sys
from balloonlab.experiments.spec import list_definitions, load_definition
for path in list_definitions():
    for t in load_definition(path).trials():
        print(path.stem, t.trial_id)
"""


def test_shipped_definitions_parse_and_expand() -> None:
    names = set()
    elsewhere = subprocess.run([sys.executable, "-c", _IDS_ELSEWHERE], capture_output=True,
                               text=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert elsewhere.returncode == 0, elsewhere.stderr
    ids_elsewhere: dict[str, list[str]] = {}
    for line in elsewhere.stdout.splitlines():
        stem, tid = line.split()
        ids_elsewhere.setdefault(stem, []).append(tid)
    for path in list_definitions():
        d = load_definition(path)
        names.add(d.name)
        assert d.name == path.stem
        full, quick = d.trials(), d.trials(quick=True)
        assert full and quick and len(quick) <= len(full)
        assert d.quick_duration <= d.duration
        ids = [t.trial_id for t in full]
        assert len(set(ids)) == len(ids)  # unique
        assert ids == ids_elsewhere[path.stem]  # stable across processes
        assert d.published, f"{d.name}: no published figure to compare with"
        for p in d.published:
            assert p.source and p.figure
    assert {"policies-side-by-side", "page-reporting-memhog", "esx-idle-tax", "vswapper",
            "esx-balloon-overhead"} <= names


def test_variants_set_the_topology(tmp_path: Path) -> None:
    d = load_definition(list_definitions()[0].parent / "policies-side-by-side.toml")
    by_policy = {t.params["policy"]: t for t in d.trials(quick=True) if t.seed == 1}
    assert set(by_policy) == {"none", "static", "mom", "share"}
    static = by_policy["static"].topology()
    assert static.host.policy == "static"
    assert static.host.policy_params["targets"]["a"] == 20480
    assert by_policy["share"].topology().host.policy == "share"


def test_unknown_key_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    bad = _write(tmp_path, TINY.replace('duration = "30s"', 'duraton = "30s"'), "bad.toml")
    with pytest.raises(SpecError) as e:
        load_definition(bad)
    lines = str(e.value).splitlines()
    assert any(f"{bad}: experiment.duraton: unknown key" in ln and "did you mean 'duration'"
               in ln for ln in lines), lines
    r = CliRunner().invoke(cli, ["sweep", str(bad)])
    assert r.exit_code == 1
    assert "balloonlab: error:" in r.output and "experiment.duraton" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("grid, key", [
    ("[grid]\n", "grid: empty grid"),
    ("[grid]\nseed = []\n", "grid.seed: empty grid axis"),
])
def test_empty_grid_is_refused(tmp_path: Path, grid: str, key: str) -> None:
    text = TINY.replace('[grid]\nseed = [1, 2, 3]\ntouch = ["8MiB"]\n', grid)
    text = text.replace('[quick]\nduration = "2s"\nseed = [1, 2]\n', "")
    text = text.replace('[variant.touch.8MiB]\n"vm.a.task.0.size" = "8MiB"\n', "")
    with pytest.raises(SpecError) as e:
        parse_definition(text, "g.toml")
    assert f"g.toml: {key}" in str(e.value)


def test_bad_paths_and_labels_are_refused() -> None:
    text = TINY.replace('"vm.a.task.0.size"', '"vm.nosuch.task.0.size"')
    with pytest.raises(SpecError, match=r"t.toml: variant.touch.8MiB: no vm 'nosuch'"):
        parse_definition(text, "t.toml")
    text = TINY.replace('touch = ["8MiB"]', 'touch = ["8MiB", "9MiB"]')
    with pytest.raises(SpecError, match=r"grid.touch: '9MiB' has no \[variant.touch.9MiB\]"):
        parse_definition(text, "t.toml")
    text = TINY.replace('vm = ["modelled_seconds"', 'vm = ["modeled_seconds"')
    with pytest.raises(SpecError, match="did you mean 'modelled_seconds'"):
        parse_definition(text, "t.toml")


def test_where_filters_trials(tmp_path: Path) -> None:
    d = load_definition(_write(tmp_path, TINY))
    assert [t.seed for t in d.trials(quick=True)] == [1, 2]
    assert [t.seed for t in d.trials(quick=True, where={"seed": "2"})] == [2]
    assert d.trials(where={"touch": "1MiB"}) == []


def test_definition_whose_topology_is_wrong_is_one_line_naming_the_key(tmp_path: Path) -> None:
    # It declares it needs `fileio`, which this build has, and its fileio task has no files:
    # the loader's complaint is the line, not a missing workload.
    assert build_has("fileio") and build_has("pathology_counters")
    assert not build_has("time_travel")
    text = TINY.replace('duration = "30s"\n', 'duration = "30s"\nneeds = ["fileio"]\n', 1)
    text = text.replace('workload = "idle"', 'workload = "fileio"', 1)
    path = _write(tmp_path, text)
    assert tuple(load_definition(path).trials(quick=True)[0].needs) == ("fileio",)
    r = CliRunner().invoke(cli, ["sweep", str(path), "--quick",
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 1
    assert "vm[0].task[0].size: a fileio task's data is files x file_size" in r.output
    assert "does not have" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1, r.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_shipped_esx_balloon_overhead_runs_on_this_build() -> None:
    d = load_definition(next(p for p in list_definitions()
                             if p.stem == "esx-balloon-overhead"))
    trials = d.trials(quick=True)
    assert len(trials) == 4
    for t in trials:
        assert check_topology(t) is None, t
        vm = t.topology().vms[0]
        assert vm.disk and [task.workload for task in vm.tasks] == ["fileio"]


def test_unknown_experiment_is_one_line() -> None:
    r = CliRunner().invoke(cli, ["experiment", "run", "vswaper"])
    assert r.exit_code == 1
    assert "no experiment 'vswaper'" in r.output and "did you mean 'vswapper'" in r.output


def test_scheduler_that_does_not_answer_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(cli, ["sweep", str(_write(tmp_path, TINY)), "--quick", "--out",
                                 str(tmp_path / "out"), "--scheduler",
                                 f"tcp://127.0.0.1:{port}"])
    assert r.exit_code == 1
    err = [ln for ln in r.output.splitlines() if ln.startswith("balloonlab: error:")]
    assert len(err) == 1 and f"scheduler tcp://127.0.0.1:{port} does not answer" in err[0]
    assert "Traceback" not in r.output
    assert not list((tmp_path / "out").glob("trials/*.json"))


# ---- report from stored results --------------------------------------------------------------


def _result(trial_id: str, seed: int, policy: str, thr: float, status: str = "ok"
            ) -> dict[str, object]:
    return {"experiment": "policies-side-by-side", "trial_id": trial_id, "seed": seed,
            "params": {"policy": policy}, "duration_s": 24.0, "status": status,
            "error": None if status == "ok" else "boom", "started": 1.0, "ended": 31.0,
            "metrics": {"vm.a.modelled_throughput": thr, "host.swap_out_pages": 10 * seed},
            "versions": {"balloonlab": "0.1.0"}, "machine": {"hostname": "h", "cores": 2},
            "files": {"summary.json": "{}"}}


def test_report_regenerates_tables_from_stored_results(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.save(_result("t-none-1", 1, "none", 100.0))
    store.save(_result("t-none-2", 2, "none", 300.0))
    store.save(_result("t-share-1", 1, "share", 400.0))
    store.save(_result("t-share-2", 2, "share", 600.0))
    store.save(_result("t-mom-1", 1, "mom", 0.0, status="failed"))
    assert (tmp_path / "trials" / "t-none-1" / "summary.json").read_text() == "{}"
    r = CliRunner().invoke(cli, ["experiment", "report", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["trial_id"] for row in rows] == ["t-mom-1", "t-none-1", "t-none-2",
                                                 "t-share-1", "t-share-2"]
    assert rows[1]["param.policy"] == "none" and rows[1]["vm.a.modelled_throughput"] == 100.0
    assert rows[1]["wall_s"] == 30.0 and rows[0]["status"] == "failed"
    csv_text = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_text) == 6 and "vm.a.modelled_throughput" in csv_text[0]
    md = (tmp_path / "report" / "report.md").read_text()
    # one column per variant; the median of 100 and 300 and the range for policy=none,
    # 500 [400–600] for share; mom's only trial failed: a column with nothing in it
    assert ("| measurement | policy=mom (n=0) | policy=none (n=2) | policy=share (n=2) |"
            in md)
    assert "| `vm.a.modelled_throughput` | – | 200 [100–300] | 500 [400–600] |" in md
    assert "failed: `t-mom-1`: boom" in md
    assert (tmp_path / "report" / "policies-side-by-side.png").stat().st_size > 0
    # Ours for the shipped comparison (swap-outs of none over share, per seed): 1.0 each.
    ok = [x for x in store.load().values() if x["status"] == "ok"]
    assert ours_value(ok, {"measure": "host.swap_out_pages",
                           "ratio": [{"policy": "none"}, {"policy": "share"}]}) == (1.0, 1.0, 1.0)
    # The report is a pure function of the stored results.
    (tmp_path / "results.csv").unlink()
    report(tmp_path)
    assert (tmp_path / "results.csv").read_text().splitlines() == csv_text
    assert tidy_rows(store.load().values()) == rows


def test_report_of_an_empty_directory_is_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["experiment", "report", str(tmp_path)])
    assert r.exit_code == 1 and "no stored results" in r.output


# ---- live: real hosts ------------------------------------------------------------------------


def _results(out: Path) -> dict[str, dict[str, object]]:
    return ResultStore(out).load()


@pytest.mark.slow
def test_resume_skips_finished_trials_and_a_crash_is_recorded(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    defn = _write(tmp_path, TINY)
    out = tmp_path / "out"
    ids = [t.trial_id for t in load_definition(defn).trials(quick=True)]
    # seed 2 crashes once its host is up; seed 1 must still run and be stored
    monkeypatch.setenv(CRASH_ENV, ids[1])
    r = CliRunner().invoke(cli, ["sweep", str(defn), "--quick", "--out", str(out), "-j", "1"])
    assert r.exit_code == 1, r.output
    assert "1 trial(s) failed" in r.output
    res = _results(out)
    assert res[ids[0]]["status"] == "ok"
    assert res[ids[1]]["status"] == "failed"
    assert "RuntimeError: trial crashed on purpose" in str(res[ids[1]]["error"])
    logs = out / "trials" / ids[1]
    assert (logs / "traceback.txt").is_file() and (logs / "hypervisor.out").is_file()
    first_started = res[ids[0]]["started"]
    assert res[ids[0]]["metrics"]["vm.a.corrupted_reads"] == 0  # type: ignore[index]

    # Rerun: the finished trial is kept as it was, only the failed one runs again.
    monkeypatch.delenv(CRASH_ENV)
    r = CliRunner().invoke(cli, ["sweep", str(defn), "--quick", "--out", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output
    assert "1 trials run" in r.output and "(1 already done" in r.output
    res = _results(out)
    assert res[ids[0]]["started"] == first_started
    assert res[ids[1]]["status"] == "ok"
    rows = json.loads((out / "results.json").read_text())
    assert {row["trial_id"] for row in rows} == set(ids)
    # nothing left behind: no run dir of a trial's host
    for row in rows:
        from hypervisor.rundir import default_run_dir

        assert not default_run_dir(str(res[row["trial_id"]]["host_name"])).exists()

    # A third run has nothing to do.
    r = CliRunner().invoke(cli, ["sweep", str(defn), "--quick", "--out", str(out)])
    assert r.exit_code == 0 and "0 trials run" in r.output


@pytest.mark.slow
def test_dask_local_cluster_gives_the_local_executors_modelled_figures(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    defn = _write(tmp_path, TINY)
    local, remote = tmp_path / "local", tmp_path / "dask"
    r = CliRunner().invoke(cli, ["sweep", str(defn), "--quick", "--out", str(local)])
    assert r.exit_code == 0, r.output
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster:
        r = CliRunner().invoke(cli, ["sweep", str(defn), "--quick", "--out", str(remote),
                                     "--scheduler", cluster.scheduler_address])
    assert r.exit_code == 0, r.output
    assert "dask scheduler" in r.output
    a, b = _results(local), _results(remote)
    assert set(a) == set(b) and len(a) == 2
    for tid in a:
        ma, mb = a[tid]["metrics"], b[tid]["metrics"]
        assert isinstance(ma, dict) and isinstance(mb, dict)
        # Deterministic for a seed: 8 MiB written once, no pressure (see the module doc).
        assert ma["vm.a.modelled_seconds"] == mb["vm.a.modelled_seconds"]
        assert ma["vm.a.modelled_seconds"] > 0
        assert ma["host.peak_swap_pages"] == mb["host.peak_swap_pages"] == 0
        assert ma["vm.a.corrupted_reads"] == mb["vm.a.corrupted_reads"] == 0
        # the recording came back from the worker and was stored beside the result
        assert (remote / "trials" / tid / "timeseries.csv").stat().st_size > 0


@pytest.mark.slow
def test_a_trial_host_dies_with_its_killed_caller(tmp_path: Path) -> None:
    # A dask worker killed mid-trial must not leave its host running: the trial launches
    # with die_with_parent, so SIGKILL of the caller brings the host (and its VMs) down.
    import os
    import signal
    import subprocess
    import sys
    import time

    from hypervisor.rundir import default_run_dir, pid_alive

    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from dataclasses import replace
        from balloonlab import launcher
        from hypervisor.topology import example_path, load_topology
        topo = load_topology(example_path("two-vms-small"))
        topo = replace(topo, host=replace(topo.host, name=sys.argv[1]))
        h = launcher.launch(topo, output=sys.argv[2], die_with_parent=True)
        launcher.wait_ready(h, 180)
        print(h.pid, flush=True)
        time.sleep(600)
    """), f"pdeath{os.getpid() % 10000}", str(tmp_path / "host.out")],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    host_pid = int(child.stdout.readline())
    run_dir = default_run_dir(f"pdeath{os.getpid() % 10000}")
    assert pid_alive(host_pid) and run_dir.exists()
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 60  # generous: the host shuts its VMs down in order
    while pid_alive(host_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(host_pid), "the host outlived its killed caller"
    while run_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not run_dir.exists()
