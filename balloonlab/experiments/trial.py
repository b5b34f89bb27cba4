"""One trial: start a real host for the trial's topology, let it run for the trial's
duration while recording it, collect the figures, stop it, leave nothing behind.

``run_trial`` takes and returns plain JSON-ready values so that it runs the same in a local
worker process and on a Dask worker on another machine: the recording (timeseries, events,
summary, the host's output) comes back inside the result as text, and the caller stores it.
It never raises for a failed trial: the result says ``status = "failed"`` with the error in
one line and whatever logs there were.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from balloonlab.experiments.spec import Trial, check_topology

__all__ = ["KEPT_FILES", "TrialFailed", "run_trial", "versions"]

#: Files of a trial's recording that come back with its result (all small).
KEPT_FILES = ("timeseries.csv", "events.jsonl", "summary.json", "topology.toml",
              "hypervisor.out", "final.json")
#: How long a trial's VMs may take to boot on a loaded machine.
BOOT_TIMEOUT = 180.0
#: Test hook: a trial whose id contains this variable's value crashes (a RuntimeError, as a
#: bug would) once its host is up, so the tests can check that a crash is recorded, its host
#: stopped and its logs kept, and that the other trials go on.
CRASH_ENV = "BALLOONLAB_TEST_CRASH_TRIAL"


class TrialFailed(Exception):
    """A trial could not run (one line)."""


def versions() -> dict[str, Any]:
    """Software versions a result row records."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("balloonlab", "numpy", "numba", "msgpack"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _host_name() -> str:
    """A unique host name (so trials on one machine never share a run dir)."""
    return f"x{os.getpid() % 100000}{secrets.token_hex(3)}"


def run_trial(trial_json: Mapping[str, Any]) -> dict[str, Any]:
    """Run one trial; returns its result row (``status`` ``ok`` or ``failed``), with the
    recording's files under ``files`` (name -> text)."""
    from balloonlab.recording import _git_commit, _machine

    trial = Trial.from_json(trial_json)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix=f"balloonlab-trial-{trial.trial_id[:40]}-"))
    result: dict[str, Any] = {
        "experiment": trial.experiment, "trial_id": trial.trial_id, "seed": trial.seed,
        "params": dict(trial.params), "duration_s": trial.duration, "started": started,
        "versions": {**versions(), "git_commit": _git_commit(Path(__file__).resolve().parent)},
        "machine": _machine(), "status": "failed", "error": None, "metrics": {},
    }
    try:
        result["metrics"], result["host_name"] = _run(trial, work)
        result["status"] = "ok"
    except TrialFailed as e:
        result["error"] = str(e)
    except BaseException as e:  # a bug or an interrupt: recorded, never lost
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        (work / "traceback.txt").write_text(traceback.format_exc())
        if isinstance(e, KeyboardInterrupt):
            shutil.rmtree(work, ignore_errors=True)
            raise
    finally:
        result["ended"] = time.time()
        files = {}
        for name in (*KEPT_FILES, "traceback.txt"):
            p = work / name
            if p.is_file():
                files[name] = p.read_text(errors="replace")
        result["files"] = files
        shutil.rmtree(work, ignore_errors=True)
    return result


def _run(trial: Trial, work: Path) -> tuple[dict[str, Any], str]:
    from balloonlab import launcher
    from balloonlab.client import ControlClient
    from balloonlab.dashboard import Monitor
    from balloonlab.recording import Recorder
    from hypervisor import preflight

    problem = check_topology(trial)
    if problem is not None:
        raise TrialFailed(problem)
    topo = trial.topology()
    name = _host_name()
    topo = replace(topo, host=replace(topo.host, name=name, seed=trial.seed, run_dir=None,
                                      metrics=None))
    try:
        preflight.check(topo)
    except preflight.PreflightError as e:
        raise TrialFailed(str(e)) from None
    recorder = Recorder(work, topo)
    try:
        # A worker killed mid-trial (a dask cluster shutting down, a lost node) takes its
        # host with it instead of leaving it running.
        h = launcher.launch(topo, topo_file=(work / "topology.toml").resolve(),
                            output=work / "hypervisor.out", die_with_parent=True)
    except launcher.LaunchError as e:
        recorder.close()
        raise TrialFailed(str(e)) from None
    final: dict[str, Any] = {}
    try:
        try:
            launcher.wait_ready(h, BOOT_TIMEOUT)
        except launcher.LaunchError as e:
            raise TrialFailed(str(e)) from None
        crash = os.environ.get(CRASH_ENV)
        if crash and crash in trial.trial_id:
            raise RuntimeError(f"trial crashed on purpose ({CRASH_ENV}={crash})")
        client = ControlClient(h.run_dir, timeout=10.0)
        monitor = Monitor(client, events_client_factory=lambda: ControlClient(h.run_dir,
                                                                              timeout=None),
                          recorder=recorder)
        try:
            monitor.run(until=time.monotonic() + trial.duration)
            monitor.poll()
            final = {"host": client.call("host_info"), "vms": {}}
            for vm in client.call("list_vms"):
                final["vms"][vm["name"]] = {
                    "dommemstat": client.call("dommemstat", vm=vm["name"]),
                    "counters": client.call("counters", vm=vm["name"]),
                }
        finally:
            monitor.close()
            client.close()
    except BaseException:
        # Whatever went wrong: the host is stopped (its output kept for the logs) and the
        # recording closed before the error is reported.
        if not h.stopped:
            h.stop(keep_output=True)
        recorder.close()
        raise
    h.stop(keep_output=True)
    summary = recorder.close()
    import json

    (work / "final.json").write_text(json.dumps(final, default=str))
    if h.proc.returncode not in (0, None):
        raise TrialFailed(f"the host exited with status {h.proc.returncode} (see hypervisor.out)")
    _check_gone(h.run_dir)
    from balloonlab.recording import read_events

    return measurements(summary, final, read_events(work), trial.optional_vm), name


def _check_gone(run_dir: Path) -> None:
    """The host removes its run dir when it stops; a trial must leave nothing behind."""
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        raise TrialFailed(f"the host left its run dir {run_dir} behind (removed now)")


def measurements(summary: Mapping[str, Any], final: Mapping[str, Any],
                 events: Sequence[Mapping[str, Any]], optional_vm: tuple[str, ...] = ()
                 ) -> dict[str, Any]:
    """The trial's figures, flat: ``host.<name>`` and ``vm.<vm>.<name>`` (spec's catalogue),
    plus the optional fields the build reports (None when it does not)."""
    out: dict[str, Any] = {}
    host = summary.get("host") or {}
    vms = summary.get("vms", {})
    fin_vms = final.get("vms", {})
    totals = {"swap_out_pages": 0, "swap_in_pages": 0, "guest_oom_kills": 0,
              "balloon_moves": 0, "balloon_targets": 0, "corrupted_reads": 0}
    targets: dict[str, int] = {}
    for ev in events:
        if ev.get("kind") in ("balloon_target", "policy") and ev.get("vm") is not None:
            targets[str(ev["vm"])] = targets.get(str(ev["vm"]), 0) + 1
    for name, s in vms.items():
        d = fin_vms.get(name, {}).get("dommemstat", {})
        c = fin_vms.get(name, {}).get("counters", {})
        moves = int(c.get("inflate_batches", 0)) + int(c.get("deflate_batches", 0))
        mt = d.get("modelled_throughput")
        vm = {
            "modelled_seconds": d.get("modelled_seconds"),
            "modelled_throughput": mt,
            "wall_throughput": s.get("mean_ops_per_s"),
            "ops": s.get("ops_during_run"),
            "guest_swap_out_bytes": s.get("swap_out_bytes"),
            "guest_swap_in_bytes": s.get("swap_in_bytes"),
            "major_faults": d.get("major_fault"),
            "oom_kills": s.get("oom_kills"),
            "peak_backed_pages": s.get("peak_backed_pages"),
            "final_backed_pages": s.get("final_backed_pages"),
            "min_backed_pages": s.get("min_backed_pages"),
            "peak_balloon_pages": s.get("peak_balloon_pages"),
            "peak_host_swapped_pages": s.get("peak_host_swapped_pages"),
            "host_swap_out_pages": c.get("host_swap_out"),
            "host_swap_in_pages": c.get("host_swap_in"),
            "balloon_targets": targets.get(name, 0),
            "balloon_moves": moves,
            "inflated_pages": c.get("inflated"),
            "deflated_pages": c.get("deflated"),
            "reported_pages": c.get("reported"),
            "corrupted_reads": s.get("corrupted_reads"),
        }
        for key in optional_vm:
            vm[key] = d.get(key, c.get(key))
        for k, v in vm.items():
            out[f"vm.{name}.{k}"] = v
        totals["swap_out_pages"] += int(c.get("host_swap_out") or 0)
        totals["swap_in_pages"] += int(c.get("host_swap_in") or 0)
        totals["guest_oom_kills"] += int(s.get("oom_kills") or 0)
        totals["balloon_moves"] += moves
        totals["balloon_targets"] += int(targets.get(name, 0))
        totals["corrupted_reads"] += int(s.get("corrupted_reads") or 0)
    hi = final.get("host", {})
    out.update({
        "host.peak_swap_pages": host.get("peak_swap_slots_used"),
        "host.final_swap_pages": (hi["swap_slots_total"] - hi["swap_slots_free"]
                                  if "swap_slots_total" in hi else None),
        "host.peak_frames_used": host.get("peak_frames_used"),
        "host.oom_kills": hi.get("oom_kills"),
        **{f"host.{k}": v for k, v in totals.items()},
    })
    return out
