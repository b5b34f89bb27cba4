"""``balloonlab bench reclaim|kernels`` (also ``python -m balloonlab.bench reclaim|kernels``).

Results go to ``--out`` (a directory: ``<name>.json``, ``<name>.md`` and, for kernels, a PNG)
and, with ``--json``, one JSON object on stdout. Sizes take B/KiB/MiB/GiB.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from benchmarks import report
from hypervisor.units import parse_size


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A rich spinner with the current step on a TTY; silent otherwise (and with --json)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda _msg: None
        return
    import re

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)

    step = re.compile(r"^\[(\d+)/(\d+)\]")

    with Progress(SpinnerColumn(), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task("starting", total=None)

        def say(msg: str) -> None:
            # Messages that start "[k/N]" move the bar; others only change the text.
            m = step.match(msg)
            if m:
                prog.update(task, description=msg, completed=int(m[1]) - 1, total=int(m[2]))
            else:
                prog.update(task, description=msg)

        yield say


def _size(_ctx: Any, _param: Any, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def _emit(result: dict[str, Any], out: Path | None, name: str, as_json: bool,
          markdown: str) -> None:
    if out is not None:
        report.write_json(result, out / f"{name}.json")
        (out / f"{name}.md").write_text(markdown + "\n")
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        click.echo(markdown)
        if out is not None:
            click.echo(f"\nwrote {out / (name + '.json')}", err=True)


@click.group("bench")
def bench() -> None:
    """Benchmarks measured against this machine's own limits (docs/results.md)."""


@bench.command("reclaim")
@click.option("--vm-size", default="1GiB", callback=_size, show_default=True,
              help="guest RAM of the benchmark VM")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 100),
              help="fresh hosts per scenario (min/median/max over them)")
@click.option("--scenario", "scenarios", multiple=True,
              type=click.Choice(["ranges", "virtio", "fragmented"]),
              help="run only these (default: all three)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for reclaim.json and reclaim.md")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def reclaim_cmd(vm_size: int, repeat: int, scenarios: tuple[str, ...], out: Path | None,
                as_json: bool) -> None:
    """Balloon inflate/deflate end to end through real processes vs punch-hole limits."""
    from benchmarks.reclaim import SCENARIOS, BenchError, run_reclaim

    try:
        with _progress(not as_json) as say:
            res = run_reclaim(vm_bytes=vm_size, repeats=repeat,
                              scenarios=scenarios or SCENARIOS, progress=say)
    except (ValueError, BenchError) as e:
        raise click.ClickException(str(e)) from e
    res["machine"] = report.machine()
    _emit(res, out, "reclaim", as_json, report.reclaim_markdown(res))


@bench.command("kernels")
@click.option("--min-log2", default=16, show_default=True, type=click.IntRange(1, 30))
@click.option("--max-log2", default=28, show_default=True, type=click.IntRange(1, 30),
              help="largest size 2^N frames (cases whose inputs exceed --mem-budget skip it)")
@click.option("--step", default=2, show_default=True, type=click.IntRange(1, 8))
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--naive-max-log2", default=16, show_default=True, type=click.IntRange(1, 24),
              help="run the naive Python twins up to 2^N only (extrapolated beyond)")
@click.option("--mem-budget", default="3GiB", callback=_size, show_default=True)
@click.option("--only", multiple=True, help="kernel name(s) to run (see --list)")
@click.option("--list", "list_", is_flag=True, help="list the kernels and exit")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for kernels.json, kernels.md and kernels.png")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def kernels_cmd(min_log2: int, max_log2: int, step: int, repeat: int, naive_max_log2: int,
                mem_budget: int, only: tuple[str, ...], list_: bool, out: Path | None,
                as_json: bool) -> None:
    """Every Numba kernel vs numpy and its naive twin, 2^min..2^max frames."""
    from benchmarks import kernels as K

    if list_:
        for name in K.case_names():
            click.echo(name)
        return
    try:
        with _progress(not as_json) as say:
            res = K.run_kernels(min_log2=min_log2, max_log2=max_log2, step=step,
                                repeats=repeat, naive_max_log2=naive_max_log2,
                                mem_budget=mem_budget, only=only or None, progress=say)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    res["machine"] = report.machine()
    if out is not None:
        report.plot_kernels(res, out / "kernels.png")
    _emit(res, out, "kernels", as_json, report.kernels_markdown(res))


@bench.command("protocol")
@click.option("--repeat", default=7, show_default=True, type=click.IntRange(1, 1000),
              help="interleaved repeats per workload (min/median/max over them)")
@click.option("--breakdown", is_flag=True, help="also time each stage (µs per message)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for protocol.json and protocol.md")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def protocol_cmd(repeat: int, breakdown: bool, out: Path | None, as_json: bool) -> None:
    """The protocol codec (encode + decode of inflate batches) vs bare msgpack."""
    from benchmarks import protocol as B

    with _progress(not as_json) as say:
        res = B.measure(repeats=repeat, breakdown=breakdown, progress=say)
    res["benchmark"] = "protocol"
    res["machine"] = report.machine()
    _emit(res, out, "protocol", as_json, report.protocol_markdown(res))


def main() -> None:
    bench(prog_name="python -m balloonlab.bench")


if __name__ == "__main__":
    main()
