"""Run trials on an executor and store their results, one file per trial, as they finish.

Output directory layout::

    DIR/trials/<trial_id>.json     one result per trial, written atomically when it finishes
    DIR/trials/<trial_id>/         its recording: timeseries.csv, events.jsonl, summary.json,
                                   topology.toml, hypervisor.out, final.json (traceback.txt)
    DIR/results.csv, results.json  the tidy table: one row per trial (rewritten at the end)

A trial whose result says ``ok`` is never run again: a second ``run`` into the same
directory (after Ctrl-C, a lost worker or a failed trial) runs only what is missing or
failed. Executors: :class:`LocalExecutor` (worker processes on this machine) and
:class:`DaskExecutor` (a ``distributed`` cluster at ``tcp://HOST:PORT``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from balloonlab.experiments.spec import Trial
from balloonlab.experiments.trial import run_trial

__all__ = ["DaskExecutor", "Executor", "ExecutorError", "LocalExecutor", "ResultStore",
           "default_jobs", "run_trials", "tidy_rows"]


class ExecutorError(Exception):
    """The executor cannot be used (one line): e.g. a scheduler that does not answer."""


class Executor(Protocol):
    """Runs ``run_trial`` on trial dicts; yields results as they finish, in any order."""

    description: str

    def map_unordered(self, trials: Sequence[Mapping[str, Any]]) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...


def default_jobs(trials: Sequence[Trial], cores: int | None = None) -> int:
    """How many trials at once this machine holds: every VM is a busy guest process (and a
    mostly idle driver), the host one more; a trial of *n* VMs wants about ceil(n / 2) of
    the cores to itself, so its figures are not mostly CPU contention."""
    cores = cores or os.cpu_count() or 1
    widest = max((t.vms for t in trials), default=1)
    return max(1, min(len(trials) or 1, cores // max(1, math.ceil(widest / 2))))


class LocalExecutor:
    """Worker processes on this machine (``jobs`` at once)."""

    def __init__(self, jobs: int) -> None:
        import multiprocessing

        self.jobs = jobs
        self.description = f"local, {jobs} at once"
        # spawn: a clean interpreter per worker, no threads or sockets inherited from the CLI.
        self._pool = ProcessPoolExecutor(max_workers=jobs,
                                         mp_context=multiprocessing.get_context("spawn"))

    def map_unordered(self, trials: Sequence[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        pending: dict[Future[dict[str, Any]], Mapping[str, Any]] = {
            self._pool.submit(run_trial, t): t for t in trials}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                t = pending.pop(f)
                try:
                    yield f.result()
                except Exception as e:  # the worker process died: recorded like a failure
                    yield _lost(t, f"worker process lost: {type(e).__name__}: {e}")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """A ``distributed`` scheduler; each trial is one task (retried once on a lost worker)."""

    def __init__(self, address: str, *, connect_timeout: float = 10.0) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise ExecutorError("--scheduler needs dask's distributed package: "
                                "pip install 'balloonlab[dask]'") from None
        try:
            self.client = Client(address, timeout=connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise ExecutorError(f"scheduler {address} does not answer "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                ) from None
        except ValueError as e:
            raise ExecutorError(f"scheduler address {address!r}: {e}") from None
        workers = len(self.client.scheduler_info().get("workers", {}))
        self.description = f"dask scheduler {address} ({workers} workers)"

    def map_unordered(self, trials: Sequence[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        from distributed import as_completed

        futures = {self.client.submit(run_trial, dict(t), key=f"trial-{t['trial_id']}",
                                      pure=False, retries=1): t for t in trials}
        for f in as_completed(futures, loop=self.client.loop):
            t = futures[f]
            try:
                yield f.result()
            except Exception as e:
                yield _lost(t, f"dask task failed: {type(e).__name__}: {e}")
            finally:
                f.release()

    def close(self) -> None:
        if self.client.status != "closed":
            self.client.close()


def _lost(t: Mapping[str, Any], error: str) -> dict[str, Any]:
    return {"experiment": t["experiment"], "trial_id": t["trial_id"], "seed": t["seed"],
            "params": t["params"], "duration_s": t["duration"], "status": "failed",
            "error": error.splitlines()[0], "metrics": {}, "files": {}}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultStore:
    """The results of one output directory."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.trials_dir = self.out / "trials"

    def load(self) -> dict[str, dict[str, Any]]:
        """Every stored result, by trial id (files that cannot be read are skipped)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.trials_dir.is_dir():
            return out
        for p in sorted(self.trials_dir.glob("*.json")):
            try:
                r = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(r, dict) and "trial_id" in r:
                out[r["trial_id"]] = r
        return out

    def finished(self) -> set[str]:
        return {k for k, r in self.load().items() if r.get("status") == "ok"}

    def save(self, result: dict[str, Any], trial: Mapping[str, Any] | None = None) -> Path:
        """Store one result: its recording files first, then its JSON (the marker that the
        trial is done), both atomically."""
        result = dict(result)
        files = result.pop("files", {}) or {}
        tdir = self.trials_dir / result["trial_id"]
        for name, text in files.items():
            _atomic_write(tdir / name, text)
        result["files"] = sorted(files)
        result["dir"] = str(tdir.relative_to(self.out))
        if trial is not None:
            result["topology_source"] = trial.get("source")
        p = self.trials_dir / f"{result['trial_id']}.json"
        _atomic_write(p, json.dumps(result, indent=1, sort_keys=True, default=str))
        return p

    def write_tables(self, results: Iterable[Mapping[str, Any]] | None = None) -> tuple[Path, Path]:
        rows = tidy_rows(results if results is not None else self.load().values())
        _atomic_write(self.out / "results.json", json.dumps(rows, indent=1, default=str))
        cols: list[str] = []
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        fixed = [c for c in cols if not c.startswith(("vm.", "host."))]
        measured = sorted(c for c in cols if c.startswith(("vm.", "host.")))
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fixed + measured, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        _atomic_write(self.out / "results.csv", buf.getvalue())
        return self.out / "results.csv", self.out / "results.json"


def tidy_rows(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per trial: identity, parameters (``param.<axis>``), status, provenance,
    then every measurement (``vm.<vm>.<name>``, ``host.<name>``)."""
    rows = []
    for r in sorted(results, key=lambda r: (r.get("experiment", ""), r.get("trial_id", ""))):
        v = r.get("versions") or {}
        mach = r.get("machine") or {}
        row: dict[str, Any] = {
            "experiment": r.get("experiment"), "trial_id": r.get("trial_id"),
            "seed": r.get("seed"),
            **{f"param.{k}": val for k, val in (r.get("params") or {}).items()},
            "status": r.get("status"), "error": r.get("error"),
            "duration_s": r.get("duration_s"),
            "wall_s": (r["ended"] - r["started"]) if r.get("ended") and r.get("started")
            else None,
            "topology": f"{r.get('dir', '')}/topology.toml" if r.get("dir") else None,
            "balloonlab": v.get("balloonlab"), "git_commit": v.get("git_commit"),
            "python": v.get("python"), "numpy": v.get("numpy"), "numba": v.get("numba"),
            "machine": mach.get("hostname"), "cores": mach.get("cores"),
            "kernel": mach.get("kernel"),
        }
        row.update(r.get("metrics") or {})
        rows.append(row)
    return rows


def run_trials(trials: Sequence[Trial], store: ResultStore, executor: Executor, *,
               on_result: Callable[[dict[str, Any], int, int], None] | None = None
               ) -> list[dict[str, Any]]:
    """Run every trial not already finished in ``store``; store each result as it comes.
    Returns the results of this run (finished ones from before are not among them)."""
    done = store.finished()
    todo = [t.to_json() for t in trials if t.trial_id not in done]
    by_id = {t["trial_id"]: t for t in todo}
    out = []
    for r in executor.map_unordered(todo):
        store.save(r, by_id.get(r["trial_id"]))
        r.pop("files", None)
        out.append(r)
        if on_result is not None:
            on_result(r, len(out), len(todo))
    return out
