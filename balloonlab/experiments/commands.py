"""``balloonlab experiment list|run|report`` and ``balloonlab sweep FILE``."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click

from balloonlab.experiments.runner import (
    DaskExecutor,
    Executor,
    ExecutorError,
    LocalExecutor,
    ResultStore,
    default_jobs,
    run_trials,
)
from balloonlab.experiments.spec import (
    Definition,
    SpecError,
    Trial,
    check_topology,
    list_definitions,
    load_definition,
    shipped,
)

__all__ = ["experiment", "sweep"]

DEFAULT_OUT = Path("results") / "experiments"


class _Fail(click.ClickException):
    def show(self, file: object = None) -> None:
        for line in self.format_message().splitlines() or [""]:
            click.echo(f"balloonlab: error: {line}", err=True)


def _where(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{it!r} is not KEY=VALUE", param_hint="--where")
        out[k] = v
    return out


@click.group()
def experiment() -> None:
    """Reproduce published ballooning results: shipped experiments, each a grid of trials
    on real hosts (docs/experiments.md)."""


@experiment.command("list")
def list_() -> None:
    """The shipped experiments, their trial counts and whether this build can run them."""
    try:
        _list()
    except BrokenPipeError:  # `balloonlab experiment list | head`: end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _list() -> None:
    for path in list_definitions():
        try:
            d = load_definition(path)
        except SpecError as e:
            click.echo(f"{path.stem:<24} invalid: {str(e).splitlines()[0]}")
            continue
        full, quick = d.trials(), d.trials(quick=True)
        problem = check_topology(full[0]) if full else "no trials"
        status = "ready" if problem is None else f"cannot run here: {problem}"
        click.echo(f"{d.name:<24} {len(full):>3} trials × {d.duration:g} s "
                   f"(--quick: {len(quick)} × {d.quick_duration:g} s)  {status}")
        click.echo(f"{'':<24} {d.title}")


def _options(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
                     default=DEFAULT_OUT, show_default=True,
                     help="Output directory; rerunning into it resumes (finished trials are "
                          "kept).")(f)
    f = click.option("--quick", is_flag=True,
                     help="The quick grid: fewer seeds, shorter runs.")(f)
    f = click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
                     help="Run the trials on a dask distributed cluster.")(f)
    f = click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None,
                     help="Local trials at once (default: what the cores allow for the "
                          "trial's size).")(f)
    f = click.option("--where", "where", multiple=True, metavar="KEY=VALUE",
                     help="Only the trials whose parameter (or seed) KEY is VALUE.")(f)
    return f


@experiment.command("run")
@click.argument("name")
@_options
def run(name: str, out: Path, quick: bool, scheduler: str | None, jobs: int | None,
        where: tuple[str, ...]) -> None:
    """Run experiment NAME (or `all`), store every trial's result in --out, then write the
    tables and the report."""
    try:
        if name == "all":
            defs = [load_definition(p) for p in list_definitions()]
        else:
            defs = [shipped(name)]
    except SpecError as e:
        raise _Fail(str(e)) from None
    _run(defs, out=out, quick=quick, scheduler=scheduler, jobs=jobs, where=_where(where),
         strict=name != "all")


@experiment.command("report")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--to", "to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write report.md and the plots (default: DIRECTORY/report).")
def report_cmd(directory: Path, to: Path | None) -> None:
    """Tables and plots from the results stored in DIRECTORY (no trial is rerun)."""
    from balloonlab.experiments.report import ReportError, report

    try:
        p = report(directory, to)
    except ReportError as e:
        raise _Fail(str(e)) from None
    click.echo(f"tables: {directory / 'results.csv'}, {directory / 'results.json'}")
    click.echo(f"report: {p}")


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_options
def sweep(file: Path, out: Path, quick: bool, scheduler: str | None, jobs: int | None,
          where: tuple[str, ...]) -> None:
    """Run a grid of your own: FILE is an experiment definition (docs/experiments.md)."""
    try:
        d = load_definition(file)
    except SpecError as e:
        raise _Fail(str(e)) from None
    _run([d], out=out, quick=quick, scheduler=scheduler, jobs=jobs, where=_where(where),
         strict=True)


def _run(defs: Sequence[Definition], *, out: Path, quick: bool, scheduler: str | None,
         jobs: int | None, where: dict[str, str], strict: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if scheduler is not None and jobs is not None:
        raise click.UsageError("--jobs is for the local executor; a dask cluster runs as many "
                               "trials at once as it has worker threads")
    err = Console(file=sys.stderr)
    trials: list[Trial] = []
    runnable: list[Definition] = []
    for d in defs:
        ts = d.trials(quick=quick, where=where)
        if not ts:
            msg = f"{d.name}: no trial matches --where {where}"
            if strict:
                raise _Fail(msg)
            err.print(f"skipped {msg}", soft_wrap=True, markup=False)
            continue
        problem = check_topology(ts[0])
        if problem is not None:
            if strict:
                raise _Fail(problem)
            err.print(f"skipped {d.name}: {problem}", soft_wrap=True, markup=False)
            continue
        trials += ts
        runnable.append(d)
    if not trials:
        raise _Fail("nothing to run")
    store = ResultStore(out)
    (out / "definitions").mkdir(parents=True, exist_ok=True)
    for d in runnable:
        shutil.copyfile(d.source, out / "definitions" / f"{d.name}.toml")
    done = store.finished()
    todo = [t for t in trials if t.trial_id not in done]
    # Local: each experiment's trials with as many at once as its size allows (a 1-VM trial
    # fits twice on 2 cores, a 3-VM one once); dask: one cluster for everything.
    batches: list[tuple[Executor, list[Trial]]] = []
    try:
        if scheduler is not None:
            batches.append((DaskExecutor(scheduler), todo))
        else:
            for d in runnable:
                mine = [t for t in todo if t.experiment == d.name]
                if mine:
                    batches.append((LocalExecutor(jobs or default_jobs(mine)), mine))
    except ExecutorError as e:
        raise _Fail(str(e)) from None
    how = "; ".join(dict.fromkeys(ex.description for ex, _ in batches)) or "nothing to do"
    err.print(f"{len(trials)} trials ({len(trials) - len(todo)} already done in {out}); "
              f"{how}", soft_wrap=True, markup=False)
    failed: list[str] = []
    t0 = time.monotonic()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=False) as progress:
            bar = progress.add_task("trials", total=len(trials), completed=len(trials) - len(todo))

            def on_result(r: dict[str, object], n: int, total: int) -> None:
                ok = r.get("status") == "ok"
                if not ok:
                    failed.append(str(r.get("trial_id")))
                wall = float(r.get("ended", 0) or 0) - float(r.get("started", 0) or 0)  # type: ignore[arg-type]
                progress.console.print(
                    f"{'ok    ' if ok else 'FAILED'} {r.get('trial_id')}"
                    + (f" ({wall:.0f} s)" if wall > 0 else "")
                    + ("" if ok else f": {r.get('error')}"), soft_wrap=True, markup=False)
                progress.update(bar, advance=1,
                                description=f"trials ({len(failed)} failed)" if failed
                                else "trials")

            for executor, batch in batches:
                run_trials(batch, store, executor, on_result=on_result)
                executor.close()
    except KeyboardInterrupt:
        for executor, _ in batches:
            executor.close()
        stored = len(store.finished())
        store.write_tables()
        err.print(f"interrupted: {stored} finished trials are stored in {out}; the same "
                  "command resumes", soft_wrap=True, markup=False)
        raise click.exceptions.Exit(130) from None
    from balloonlab.experiments.report import report

    csv_path, json_path = store.write_tables()
    rep = report(out)
    click.echo(f"{len(todo)} trials run in {time.monotonic() - t0:.0f} s, {len(failed)} failed")
    click.echo(f"tables: {csv_path}, {json_path}")
    click.echo(f"report: {rep}")
    if failed:
        raise _Fail(f"{len(failed)} trial(s) failed (logs under {out / 'trials'}); rerunning "
                    "the same command retries them")
