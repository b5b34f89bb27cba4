"""``balloonlab bench reclaim|kernels|protocol|scale|concurrent|fidelity``
(also ``python -m balloonlab.bench ...``).

Results go to ``--out`` (a directory: ``<name>.json``, ``<name>.md`` and, for kernels, a PNG)
and, with ``--json``, one JSON object on stdout. Sizes take B/KiB/MiB/GiB.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import click

from benchmarks import report
from hypervisor.units import parse_size


class _Lines:
    """Progress without a terminal: one plain line per stage on *out*, with the time since
    the start, so a log or a pipe shows where a long run is (and that it is alive)."""

    def __init__(self, out: TextIO, name: str) -> None:
        self.out = out
        self.name = name
        self.t0 = time.monotonic()
        self.last = ""

    def __call__(self, msg: str) -> None:
        if msg == self.last:
            return
        self.last = msg
        self.out.write(f"bench {self.name} {time.monotonic() - self.t0:6.1f}s {msg}\n")
        self.out.flush()


@contextmanager
def _progress(name: str, stream: TextIO | None = None) -> Iterator[Callable[[str], None]]:
    """Progress of one benchmark on stderr (never stdout: ``--json`` output stays clean).

    A rich progress bar (steps, current stage, elapsed time) when stderr is a terminal; a
    plain line per stage otherwise. Messages that start ``[k/N]`` move the bar."""
    out = sys.stderr if stream is None else stream
    if not out.isatty():
        yield _Lines(out, name)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(file=out), transient=True) as prog:
        task = prog.add_task(name, total=None)

        def say(msg: str) -> None:
            m = _STEP.match(msg)
            if m:
                prog.update(task, description=msg, completed=int(m[1]) - 1, total=int(m[2]))
            else:
                prog.update(task, description=msg)

        yield say


_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


def _pick(value: Any, quick: Any, full: Any, is_full: bool) -> Any:
    """An option's value: what the user gave, else the ``--full`` or the quick default."""
    if value is not None:
        return value
    return full if is_full else quick


def _size(_ctx: Any, _param: Any, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def _emit(result: dict[str, Any], out: Path | None, name: str, as_json: bool,
          markdown: str) -> None:
    if result.get("full") is False:
        markdown = (f"Quick run: `balloonlab bench {name} --full` is the sweep docs/results.md "
                    f"reports.\n\n{markdown}")
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


#: Quick (default) and ``--full`` values of the reclaim options.
RECLAIM_QUICK = {"vm_size": 256 << 20, "repeat": 1}
RECLAIM_FULL = {"vm_size": 1 << 30, "repeat": 3}
#: Quick (default) and ``--full`` values of the kernel sweep.
KERNELS_QUICK = {"min_log2": 16, "max_log2": 20, "step": 2, "repeat": 3, "naive_max_log2": 14}
KERNELS_FULL = {"min_log2": 16, "max_log2": 28, "step": 2, "repeat": 3, "naive_max_log2": 16}


def _size_or_none(ctx: Any, param: Any, value: str | None) -> int | None:
    return None if value is None else _size(ctx, param, value)


@bench.command("reclaim")
@click.option("--full", is_flag=True,
              help="the long sweep behind docs/results.md (1 GiB VM, 3 repeats; ~8 min)")
@click.option("--vm-size", default=None, callback=_size_or_none,
              help="guest RAM of the benchmark VM [default: 256MiB; --full: 1GiB]")
@click.option("--repeat", default=None, type=click.IntRange(1, 100),
              help="fresh hosts per scenario, min/median/max over them [default: 1; --full: 3]")
@click.option("--scenario", "scenarios", multiple=True,
              type=click.Choice(["ranges", "virtio", "fragmented"]),
              help="run only these (default: all three)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for reclaim.json and reclaim.md")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def reclaim_cmd(full: bool, vm_size: int | None, repeat: int | None,
                scenarios: tuple[str, ...], out: Path | None, as_json: bool) -> None:
    """Balloon inflate/deflate end to end through real processes vs punch-hole limits.

    The default run takes a minute or two (three short trials); --full is the sweep
    docs/results.md reports."""
    from benchmarks.reclaim import SCENARIOS, BenchError, run_reclaim

    vm_bytes = _pick(vm_size, RECLAIM_QUICK["vm_size"], RECLAIM_FULL["vm_size"], full)
    repeats = _pick(repeat, RECLAIM_QUICK["repeat"], RECLAIM_FULL["repeat"], full)
    try:
        with _progress("reclaim") as say:
            res = run_reclaim(vm_bytes=vm_bytes, repeats=repeats,
                              scenarios=scenarios or SCENARIOS, progress=say)
    except (ValueError, BenchError) as e:
        raise click.ClickException(str(e)) from e
    res["full"] = full
    res["machine"] = report.machine()
    _emit(res, out, "reclaim", as_json, report.reclaim_markdown(res))


@bench.command("kernels")
@click.option("--full", is_flag=True,
              help="the long sweep behind docs/results.md (2^16..2^28 frames; ~35 min)")
@click.option("--min-log2", default=None, type=click.IntRange(1, 30),
              help="smallest size 2^N frames [default: 16]")
@click.option("--max-log2", default=None, type=click.IntRange(1, 30),
              help="largest size 2^N frames (cases whose inputs exceed --mem-budget skip it) "
                   "[default: 20; --full: 28]")
@click.option("--step", default=None, type=click.IntRange(1, 8), help="[default: 2]")
@click.option("--repeat", default=None, type=click.IntRange(1, 1000), help="[default: 3]")
@click.option("--naive-max-log2", default=None, type=click.IntRange(1, 24),
              help="run the naive Python twins up to 2^N only (extrapolated beyond) "
                   "[default: 14; --full: 16]")
@click.option("--mem-budget", default="3GiB", callback=_size, show_default=True)
@click.option("--only", multiple=True, help="kernel name(s) to run (see --list)")
@click.option("--list", "list_", is_flag=True, help="list the kernels and exit")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for kernels.json, kernels.md and kernels.png")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def kernels_cmd(full: bool, min_log2: int | None, max_log2: int | None, step: int | None,
                repeat: int | None, naive_max_log2: int | None, mem_budget: int,
                only: tuple[str, ...], list_: bool, out: Path | None, as_json: bool) -> None:
    """Every Numba kernel vs numpy and its naive twin, 2^min..2^max frames.

    The default run takes about a minute; --full is the sweep docs/results.md reports."""
    from benchmarks import kernels as K

    if list_:
        for name in K.case_names():
            click.echo(name)
        return
    given = {"min_log2": min_log2, "max_log2": max_log2, "step": step, "repeat": repeat,
             "naive_max_log2": naive_max_log2}
    v = {k: _pick(x, KERNELS_QUICK[k], KERNELS_FULL[k], full) for k, x in given.items()}
    if min_log2 is None and v["min_log2"] > v["max_log2"]:
        v["min_log2"] = v["max_log2"]  # `--max-log2 10` alone: one size
    if max_log2 is None and v["max_log2"] < v["min_log2"]:
        v["max_log2"] = v["min_log2"]
    try:
        with _progress("kernels") as say:
            res = K.run_kernels(min_log2=v["min_log2"], max_log2=v["max_log2"], step=v["step"],
                                repeats=v["repeat"], naive_max_log2=v["naive_max_log2"],
                                mem_budget=mem_budget, only=only or None, progress=say)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    res["full"] = full
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

    with _progress("protocol") as say:
        res = B.measure(repeats=repeat, breakdown=breakdown, progress=say)
    res["benchmark"] = "protocol"
    res["machine"] = report.machine()
    _emit(res, out, "protocol", as_json, report.protocol_markdown(res))


def _counts(_ctx: Any, _param: Any, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        counts = tuple(int(c) for c in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated VM counts, got {value!r}") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"VM counts must be at least 1, got {value!r}")
    return counts


@bench.command("concurrent")
@click.option("--vms", default=8, show_default=True, type=click.IntRange(1, 64),
              help="VMs inflating at once")
@click.option("--vm-size", "vm_size", default="128MiB", show_default=True, callback=_size,
              help="each VM's memory")
@click.option("--repeat", default=2, show_default=True, type=click.IntRange(1, 100),
              help="trials, each on a fresh host")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for concurrent.json and concurrent.md")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def concurrent_cmd(vms: int, vm_size: int, repeat: int, out: Path | None,
                   as_json: bool) -> None:
    """Aggregate inflate of several VMs ballooning at once against the same-run punch
    limits of the same total size (about a minute at the defaults)."""
    from benchmarks import concurrent as C
    from benchmarks.reclaim import BenchError

    try:
        with _progress("concurrent") as say:
            res = C.run_concurrent(vms, vm_size, repeat, progress=say)
    except (ValueError, BenchError) as e:
        raise click.ClickException(str(e)) from e
    res["machine"] = report.machine()
    _emit(res, out, "concurrent", as_json, C.markdown(res))


@bench.command("scale")
@click.option("--full", is_flag=True,
              help="the long sweep behind docs/results.md (1, 2, 4, 8, 16, 32 VMs)")
@click.option("--counts", default=None, callback=_counts, metavar="N,N,...",
              help="VM counts to measure [default: 1,2,4,8; --full: 1,2,4,8,16,32]")
@click.option("--sample", "sample_s", default=4.0, show_default=True,
              type=click.FloatRange(0.5, 600), help="seconds of sampling once a host is up")
@click.option("--boot-timeout", "boot_timeout", default=None, type=click.FloatRange(1, 3600),
              help="seconds each host may take to come up [default: 60 + 10 per VM]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for scale.json, scale.md and scale.png")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def scale_cmd(full: bool, counts: tuple[int, ...] | None, sample_s: float,
              boot_timeout: float | None, out: Path | None, as_json: bool) -> None:
    """Up/down time, PSS per process, policy round CPU and control latency against the
    number of VMs (cuts of the fleet topology).

    The default run takes a minute or two; --full is the sweep docs/results.md reports."""
    from benchmarks import scale as S

    chosen = _pick(counts, S.QUICK_COUNTS, S.FULL_COUNTS, full)
    try:
        with _progress("scale") as say:
            res = S.run_scale(chosen, boot_timeout=boot_timeout, sample_s=sample_s,
                              progress=say)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    res["full"] = full
    res["machine"] = report.machine()
    if out is not None:
        S.plot(res, out / "scale.png")
    _emit(res, out, "scale", as_json, S.markdown(res))


@bench.command("fidelity")
@click.option("--full", is_flag=True,
              help="the run behind docs/results.md (192 MiB working set, 30 s windows; "
                   "~4 min)")
@click.option("--regime", "regimes", multiple=True,
              type=click.Choice(["spare", "guest_swap", "host_swap", "ballooned"]),
              help="run only these (default: all four)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="directory for fidelity.json and fidelity.md")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
def fidelity_cmd(full: bool, regimes: tuple[str, ...], out: Path | None,
                 as_json: bool) -> None:
    """Modelled throughput of one workload in one VM: memory to spare, guest swap, host swap
    and ballooned to the same size, with the pathology counters; and the cost of the
    modelled-time bookkeeping in the vCPU loop (a same-run ratio).

    The default run takes about a minute and a half; --full is the run docs/results.md
    reports."""
    from balloonlab.launcher import LaunchError
    from benchmarks import fidelity as F

    params = dict(F.FULL if full else F.QUICK)
    try:
        with _progress("fidelity") as say:
            res = F.run_fidelity(params, progress=say, regimes=regimes or None)
    except (ValueError, RuntimeError, LaunchError) as e:
        raise click.ClickException(str(e)) from e
    res["full"] = full
    res["machine"] = report.machine()
    _emit(res, out, "fidelity", as_json, F.markdown(res))


def main() -> None:
    bench(prog_name="python -m balloonlab.bench")


if __name__ == "__main__":
    main()
