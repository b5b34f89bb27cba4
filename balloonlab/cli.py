"""The ``balloonlab`` command line (console script ``balloonlab = balloonlab.cli:main``).

``up`` launches the hypervisor (``python -m hypervisor --topology FILE``), waits until every
VM runs and its balloon driver has negotiated, then shows the dashboard, records, or
returns (``--detach``). Every other host command is a control-channel client of a running
host (``--host NAME``, default: the only one running). ``validate``, ``topologies`` and
``plot`` work offline. Sizes take virsh's units (K/KiB, M/MiB, G/GiB, ... binary; KB, MB,
GB decimal) and a bare number is KiB, as in virsh; durations take ms/s/m (docs/cli.md).

Errors are one line on stderr and exit status 1 (2 for usage errors), never a traceback.

Why one module of this size: it is the click group with every command's options, help text
and one-line error mapping, and nothing else — each command body delegates to the launcher,
the client, the recorder or the plots. Keeping the commands together keeps their options,
units and messages consistent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TextIO, cast

import click

from balloonlab.bench import bench
from balloonlab.client import ControlClient, ControlError, HostNotRunning
from balloonlab.experiments.commands import experiment, sweep
from balloonlab.recording import SUMMARY_HEADERS, Recorder, RecordingError, summary_table_rows
from hypervisor.rundir import RunDirError
from hypervisor.topology import (
    Topology,
    TopologyError,
    default_topology,
    example_path,
    list_examples,
    load_topology,
)
from hypervisor.units import (
    PAGE_SIZE,
    format_duration,
    format_size,
    format_size_echo,
    parse_duration,
    parse_size,
)

__all__ = ["cli", "main"]

#: How long `up` waits for every VM to boot and its driver to negotiate.
DEFAULT_BOOT_TIMEOUT = "60s"
#: How long `down`/the end of `up` waits for the hypervisor to exit after `shutdown`.
SHUTDOWN_TIMEOUT = 20.0


class CliError(click.ClickException):
    """One-line user-facing error (exit status 1)."""

    def show(self, file: Any = None) -> None:
        # Several problems (a topology's) are one line each, every one with the prefix.
        for line in self.format_message().splitlines() or [""]:
            click.echo(f"balloonlab: error: {line}", err=True)


def _fail(message: str) -> NoReturn:
    raise CliError(message)


def _host_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "no usable host": mapped to one-line errors."""
    return (ConnectionError, FileNotFoundError, TimeoutError, RunDirError, HostNotRunning,
            ControlError)


def _describe_error(e: BaseException) -> str:
    code = getattr(e, "code", None)
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    if type(e).__name__ == "ControlError" and code:
        return f"host refused: {msg} [{code}]"
    if isinstance(e, ConnectionRefusedError | FileNotFoundError):
        return f"no running host answers ({msg}); start one with `balloonlab up`"
    return str(msg)


class _Group(click.Group):
    """Turns the project's expected errors into one line on stderr, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except TopologyError as e:
            raise CliError(str(e)) from None
        except RecordingError as e:
            raise CliError(str(e)) from None
        except _host_errors() as e:
            raise CliError(_describe_error(e)) from None
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------------------------
# Host connection helpers
# --------------------------------------------------------------------------------------------


def _run_dir_for(host: str | None) -> Path:
    """The run dir of ``--host``: a host name, or a path (for a topology's own ``run_dir``)."""
    from hypervisor.rundir import NoHostFound, find_host, is_live

    if host is not None and os.sep in host:
        run_dir = Path(host).expanduser()
        if run_dir.name == "control.sock":
            run_dir = run_dir.parent
        if not is_live(run_dir):
            raise NoHostFound(f"no running host in {run_dir}")
        return run_dir
    return find_host(host)


@contextmanager
def _connect(host: str | None, timeout: float | None = 5.0) -> Iterator[Any]:
    run_dir = _run_dir_for(host)
    client = ControlClient(run_dir, timeout=timeout)
    try:
        yield client
    finally:
        client.close()


host_option = click.option(
    "--host", "host", default=None, metavar="NAME",
    help="Host name, or its run directory (default: the only running host).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _size_arg(value: str, field: str) -> int:
    """A size argument as virsh reads one: a bare number is KiB; must be whole pages."""
    try:
        nbytes = parse_size(value, field=field, bare_unit=1024)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if nbytes % PAGE_SIZE:
        raise click.BadParameter(
            f"{value!r} is {format_size_echo(nbytes)}, not a whole number of "
            f"{PAGE_SIZE // 1024} KiB pages", param_hint=field)
    return nbytes


def _duration_arg(value: str | None, field: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value, field=field)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# --------------------------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="balloonlab", prog_name="balloonlab")
def cli() -> None:
    """balloonlab: an emulated hypervisor for studying memory ballooning.

    Start with `balloonlab demo`, or `balloonlab up FILE` with a topology
    (`balloonlab topologies` lists the shipped ones).
    """


# ---- offline commands -----------------------------------------------------------------------


def _topology_text(topo: Topology) -> str:
    h = topo.host
    vm_total = sum(v.memory for v in topo.vms)
    lines = [
        f"{topo.source}: ok",
        f"host {h.name}: memory {format_size(h.memory)} ({h.frames} frames), "
        f"swap {format_size(h.swap) if h.swap else 'off'}, policy {h.policy} "
        f"every {format_duration(h.policy_interval)}",
        f"{len(topo.vms)} VM{'s' if len(topo.vms) != 1 else ''}, "
        f"{format_size(vm_total)} of guest RAM: overcommit {vm_total / h.memory:.2f}x",
    ]
    for v in topo.vms:
        tasks = ", ".join(f"{t.workload} {format_size(t.size)}" for t in v.tasks) or "no tasks"
        lines.append(
            f"  {v.name}: {format_size(v.memory)}, wire {v.wire}, "
            f"features {','.join(v.features) or '-'}; {tasks}"
        )
    return "\n".join(lines)


def _topology_json(topo: Topology) -> dict[str, Any]:
    h = topo.host
    return {
        "source": topo.source,
        "host": {
            "name": h.name, "memory": h.memory, "swap": h.swap, "frames": h.frames,
            "policy": h.policy, "policy_params": dict(h.policy_params),
            "policy_interval": h.policy_interval, "run_dir": h.run_dir,
        },
        "vms": [
            {
                "name": v.name, "memory": v.memory, "pages": v.pages, "features": list(v.features),
                "wire": v.wire, "stats_interval": v.stats_interval, "guest_swap": v.guest_swap,
                "on_crash": v.on_crash, "min_memory": v.min_memory, "max_memory": v.max_memory,
                "shares": v.shares, "initial_balloon": v.initial_balloon,
                "tasks": [t.to_json() for t in v.tasks],
            }
            for v in topo.vms
        ],
    }


def _topology_path(file: str | None) -> Path | None:
    """The file behind FILE: a path, a shipped example's name, or (None) the default's file."""
    if file is None:
        return example_path("default")
    path = Path(file)
    if not path.exists() and os.sep not in file and file in {n for n, _ in list_examples()}:
        return example_path(file)
    return path


def _resolve_topology(file: str | None) -> Topology:
    """FILE, or a shipped example's name, or the default topology."""
    if file is None:
        return default_topology()
    path = _topology_path(file)
    assert path is not None
    topo = load_topology(path)
    for warning in topo.warnings:
        click.echo(f"balloonlab: {warning}", err=True)
    return topo


@cli.command()
@click.argument("file")
@json_option
@click.option("--resolved", is_flag=True,
              help="Print the topology with every default spelled out (TOML).")
def validate(file: str, as_json: bool, resolved: bool) -> None:
    """Check a topology FILE (or a shipped example's name) without starting anything."""
    topo = _resolve_topology(file)
    if resolved:
        click.echo(topo.to_toml(), nl=False)
    elif as_json:
        _print_json(_topology_json(topo))
    else:
        click.echo(_topology_text(topo))


@cli.command()
@json_option
def topologies(as_json: bool) -> None:
    """List the shipped example topologies (use a name wherever a FILE is expected)."""
    items = [(n, d, str(example_path(n))) for n, d in list_examples()]
    if as_json:
        _print_json([{"name": n, "description": d, "path": p} for n, d, p in items])
        return
    width = max(len(n) for n, _, _ in items)
    for n, d, _p in items:
        click.echo(f"{n:<{width}}  {d}")
    click.echo(f"\n(files in {example_path(items[0][0]).parent})")


@cli.command()
@click.argument("directories", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the PNGs (default: DIRECTORY; for several runs, ./compare).")
def plot(directories: tuple[Path, ...], out_dir: Path | None) -> None:
    """Plot a run recorded with `up --record DIRECTORY`: memory.png and host.png. With
    several directories, overlay the runs: one PNG per metric, one line per run."""
    from balloonlab.plot import plot_run, plot_runs

    if len(directories) == 1:
        paths = plot_run(directories[0], out_dir)
    else:
        paths = plot_runs(directories, out_dir if out_dir is not None else Path("compare"))
    for p in paths:
        click.echo(str(p))


# ---- reading commands -------------------------------------------------------------------------


@cli.command()
@host_option
@json_option
def host(host: str | None, as_json: bool) -> None:
    """Show the host's frames, swap and policy."""
    with _connect(host) as c:
        info = c.call("host_info")
    if as_json:
        _print_json(info)
        return
    used = info["frames_total"] - info["frames_free"]
    swap_total, swap_free = info.get("swap_slots_total", 0), info.get("swap_slots_free", 0)
    click.echo(f"host      {info.get('name')} (pid {info.get('pid')})")
    click.echo(f"frames    {used} used / {info['frames_total']} "
               f"({format_size(used * PAGE_SIZE)} of "
               f"{format_size(info['frames_total'] * PAGE_SIZE)}), "
               f"{info['frames_free']} free")
    if swap_total:
        click.echo(f"swap      {swap_total - swap_free} used / {swap_total} slots "
                   f"({format_size((swap_total - swap_free) * PAGE_SIZE)} of "
                   f"{format_size(swap_total * PAGE_SIZE)})")
    else:
        click.echo("swap      off")
    click.echo(f"policy    {info.get('policy')}")
    from balloonlab.dashboard import format_field

    for k in sorted(set(info) - {"name", "pid", "frames_total", "frames_free", "swap_slots_total",
                                 "swap_slots_free", "policy"}):
        click.echo(f"{k:<9} {format_field(k, info[k])}")


@cli.command("list")
@host_option
@json_option
def list_(host: str | None, as_json: bool) -> None:
    """List the VMs of the running host."""
    with _connect(host) as c:
        vms = c.call("list_vms")
    if as_json:
        _print_json(vms)
        return
    click.echo(f"{'name':<16} {'state':<12} {'driver':<12} {'memory':>12} {'balloon':>12} "
               f"{'target':>12}")
    for vm in vms:
        click.echo(
            f"{vm['name']:<16} {vm.get('state', '?'):<12} {vm.get('driver', '-')!s:<12} "
            f"{format_size(int(vm.get('memory_pages', 0)) * PAGE_SIZE):>12} "
            f"{format_size(int(vm.get('balloon_pages') or 0) * PAGE_SIZE):>12} "
            f"{format_size(int(vm.get('target_pages') or 0) * PAGE_SIZE):>12}"
        )


#: ``dommemstat`` fields that are memory amounts in bytes on the control channel: the text
#: output shows them in KiB (as ``virsh dommemstat``), ``--json`` as ``<name>_bytes``.
DOMMEMSTAT_BYTES = frozenset({
    "actual", "swap_in", "swap_out", "unused", "available", "usable", "disk_caches", "rss",
    "guest_swap_total", "guest_swap_free",
})
#: The fields ``virsh dommemstat`` prints, in its order; the project's own fields follow.
VIRSH_FIELDS = ("actual", "swap_in", "swap_out", "major_fault", "minor_fault", "unused",
                "available", "usable", "disk_caches", "last_update", "rss")


def dommemstat_json(stats: dict[str, Any]) -> dict[str, Any]:
    """``dommemstat --json``: byte amounts renamed ``<name>_bytes``, everything else as is."""
    return {f"{k}_bytes" if k in DOMMEMSTAT_BYTES else k: v for k, v in stats.items()}


def dommemstat_lines(stats: dict[str, Any]) -> list[str]:
    """``dommemstat`` text: virsh's fields first, memory amounts in KiB as virsh prints them,
    then the project's fields (pages with their size, times as local time)."""
    from balloonlab.dashboard import format_field

    order = [k for k in VIRSH_FIELDS if k in stats] + [k for k in stats if k not in VIRSH_FIELDS]
    width = max([20, *(len(k) + 1 for k in order)])
    lines = []
    for k in order:
        v = stats[k]
        if v is None:
            continue  # not reported (yet): virsh leaves such fields out too
        if k == "tasks" and isinstance(v, list):
            for t in v:  # one line per task: its accesses and modelled clock
                mt, wt = t.get("modelled_throughput"), t.get("wall_throughput")
                lines.append(f"{'task ' + str(t.get('task')):<{width}} accesses "
                             f"{t.get('accesses')}  modelled {t.get('modelled_seconds', 0):.6f} s"
                             f"  {'-' if mt is None else f'{mt:,.0f}'} accesses/modelled s"
                             f"  {'-' if wt is None else f'{wt:,.0f}'} accesses/wall s")
            continue
        if k in ("modelled_seconds", "modelled_throughput") and isinstance(v, float):
            text = f"{v:.6f}" if k == "modelled_seconds" else f"{v:,.0f}"
        elif k in DOMMEMSTAT_BYTES and isinstance(v, int):
            text = str(v // 1024)
        elif isinstance(v, int) and not isinstance(v, bool) and k.endswith("_pages"):
            text = f"{v}  ({format_size(v * PAGE_SIZE)})"
        else:
            text = format_field(k, v)
        lines.append(f"{k:<{width}} {text}")
    return lines


@cli.command()
@click.argument("vm")
@host_option
@json_option
def dommemstat(vm: str, host: str | None, as_json: bool) -> None:
    """Memory statistics of VM: virsh's fields in KiB (`actual` is the guest's current
    memory), then the host's view; --json gives bytes, in fields named *_bytes."""
    with _connect(host) as c:
        stats = c.call("dommemstat", vm=vm)
    if as_json:
        _print_json(dommemstat_json(stats))
        return
    for line in dommemstat_lines(stats):
        click.echo(line)


@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they happen.")
@host_option
@json_option
def events(follow: bool, host: str | None, as_json: bool) -> None:
    """Print the host's events (JSON lines with --json)."""
    from balloonlab.dashboard import event_line

    with _quiet_on_broken_pipe(), _connect(host, timeout=None if follow else 5.0) as c:
        for ev in c.events(follow):
            click.echo(json.dumps(ev, sort_keys=True, default=str) if as_json else event_line(ev))


@contextmanager
def _quiet_on_broken_pipe() -> Iterator[None]:
    """`balloonlab events | head`: the reader went away; end quietly with status 0."""
    try:
        yield
    except BrokenPipeError:
        _silence_stdout()
        raise click.exceptions.Exit(0) from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# ---- acting commands --------------------------------------------------------------------------

_HOLD_NOTE = ("the policy leaves {vm} alone until `balloonlab policy ...` or "
              "`balloonlab set-balloon {vm} --release`")


def _vm_memory(c: Any, vm: str) -> int:
    """VM's configured memory in bytes (one-line error naming the VMs when unknown)."""
    vms = c.call("list_vms")
    for v in vms:
        if v["name"] == vm:
            return int(v["memory_pages"]) * PAGE_SIZE
    known = ", ".join(v["name"] for v in vms) or "none"
    _fail(f"no VM named {vm!r} (VMs: {known})")


def _check_squeeze(c: Any, vm: str, keep: int, force: bool) -> None:
    """Refuse (unless *force*) a target that leaves *vm* less memory than its tasks and guest
    kernel hold resident: the rest would be pushed to guest swap or the OOM killer."""
    if force:
        return
    st = c.call("dommemstat", vm=vm)
    anon, kernel = st.get("guest_anon_pages"), st.get("guest_kernel_pages")
    if anon is None:
        return  # no stats yet: nothing to compare with
    used = (int(anon) + int(kernel or 0)) * PAGE_SIZE
    if keep < used:
        _fail(f"{vm} would keep {format_size(keep)}, less than its tasks use now "
              f"({format_size(int(anon) * PAGE_SIZE)} resident + "
              f"{format_size(int(kernel or 0) * PAGE_SIZE)} guest kernel = {format_size(used)}); "
              "add --force to squeeze it anyway (its pages go to guest swap)")


force_option = click.option(
    "--force", is_flag=True,
    help="Allow a target that leaves the VM less memory than its tasks use now.")


@cli.command()
@click.argument("vm")
@click.argument("size")
@force_option
@host_option
def setmem(vm: str, size: str, force: bool, host: str | None) -> None:
    """Set VM's current memory to SIZE, as `virsh setmem` (a bare number is KiB) and QEMU's
    `balloon`: the balloon takes the rest. The policy then leaves VM alone until released."""
    nbytes = _size_arg(size, "SIZE")
    with _connect(host) as c:
        memory = _vm_memory(c, vm)
        if nbytes > memory:
            _fail(f"{vm}: SIZE {format_size_echo(nbytes)} is more than its memory "
                  f"({format_size_echo(memory)})")
        _check_squeeze(c, vm, nbytes, force)
        c.call("setmem", vm=vm, bytes=nbytes)
    balloon = memory - nbytes
    click.echo(f"{vm}: target {format_size_echo(nbytes)}; the balloon takes "
               f"{format_size(balloon)} ({balloon // PAGE_SIZE} pages); "
               + _HOLD_NOTE.format(vm=vm))


@cli.command("set-balloon")
@click.argument("vm")
@click.argument("size", required=False)
@click.option("--release", is_flag=True,
              help="Hand VM back to the policy (its target stays until the policy moves it).")
@force_option
@host_option
def set_balloon(vm: str, size: str | None, release: bool, force: bool, host: str | None) -> None:
    """Set VM's balloon target to SIZE (a bare number is KiB, as everywhere on this command
    line): the balloon holds SIZE, the guest keeps the rest. The policy then leaves VM
    alone until `balloonlab policy ...` or `set-balloon VM --release`."""
    if release:
        if size is not None:
            raise click.UsageError("give SIZE or --release, not both")
        with _connect(host) as c:
            r = c.call("set_balloon", vm=vm, release=True)
        click.echo(f"{vm}: released to the policy (balloon target stays "
                   f"{format_size(int(r['target_pages']) * PAGE_SIZE)} until it moves it)")
        return
    if size is None:
        raise click.UsageError("missing SIZE (or --release)")
    nbytes = _size_arg(size, "SIZE")
    with _connect(host) as c:
        memory = _vm_memory(c, vm)
        if nbytes > memory:
            _fail(f"{vm}: SIZE {format_size_echo(nbytes)} is more than its memory "
                  f"({format_size_echo(memory)})")
        _check_squeeze(c, vm, memory - nbytes, force)
        c.call("set_balloon", vm=vm, pages=nbytes // PAGE_SIZE)
    click.echo(f"{vm}: balloon target {format_size_echo(nbytes)}, {nbytes // PAGE_SIZE} pages; "
               f"{vm} keeps {format_size(memory - nbytes)}; " + _HOLD_NOTE.format(vm=vm))


def _param_value(text: str) -> Any:
    """``k=v`` values: JSON when they parse as JSON (numbers, booleans, lists), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@cli.command()
@click.argument("name")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="Policy parameter (repeatable); VALUE is JSON or a plain string.")
@host_option
def policy(name: str, params: tuple[str, ...], host: str | None) -> None:
    """Switch the running host to policy NAME (none, static, mom, share, or pkg.mod:Class)."""
    parsed: dict[str, Any] = {}
    for p in params:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{p!r} is not KEY=VALUE", param_hint="--param")
        parsed[key] = _param_value(value)
    with _connect(host) as c:
        r = c.call("set_policy", name=name, params=parsed)
    suffix = f" with {json.dumps(parsed, sort_keys=True)}" if parsed else ""
    released = (r or {}).get("released") if isinstance(r, dict) else None
    held = f"; manual targets released: {', '.join(released)}" if released else ""
    click.echo(f"policy {name}{suffix}{held}")


def _shutdown(run_dir: Path, timeout: float = SHUTDOWN_TIMEOUT,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    """Ask the host in *run_dir* to shut down and wait for its process to exit; escalate to
    SIGTERM, then SIGKILL, only for a process this CLI started or that the pid file names."""
    from balloonlab.launcher import stop_host

    stop_host(run_dir, timeout, proc)


def _live_hosts() -> list[Path]:
    """Run directories of every live host under the default base directory."""
    from hypervisor.rundir import base_dir, is_live

    base = base_dir()
    if not base.is_dir():
        return []
    return sorted(d for d in base.iterdir() if d.is_dir() and is_live(d))


@cli.command()
@host_option
@click.option("--all", "all_", is_flag=True, help="Stop every running host.")
@click.option("--timeout", default="20s", show_default=True,
              help="How long to wait for the host to exit.")
def down(host: str | None, all_: bool, timeout: str) -> None:
    """Stop the running host (every running host with --all) and all its VMs."""
    from hypervisor import rundir
    from hypervisor.rundir import NoHostFound

    wait = _duration_arg(timeout, "--timeout")
    assert wait is not None
    if all_:
        if host is not None:
            raise click.UsageError("--all and --host exclude each other")
        hosts = _live_hosts()
        if not hosts:
            _fail("no running host found; nothing to stop")
        for d in hosts:  # a path names a run directory, as --host accepts
            click.get_current_context().invoke(down, host=str(d), all_=False, timeout=timeout)
        return
    try:
        run_dir = _run_dir_for(host)
    except NoHostFound as e:
        if "several" in str(e):
            _fail(f"{e}, or stop them all with --all")
        raise
    pid = rundir.read_pid(run_dir)
    _shutdown(run_dir, wait)
    if pid is not None and rundir.pid_alive(pid):
        _fail(f"host {run_dir.name} (pid {pid}) did not stop; see {rundir.output_path(run_dir)}")
    if not os.path.lexists(run_dir):  # a clean stop: the host's output is not worth keeping
        rundir.remove_output(rundir.output_path(run_dir))
    click.echo(f"host {run_dir.name} stopped")


# ---- up / demo --------------------------------------------------------------------------------


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run summary ({summary.get('duration_s', 0):.1f} s)", title_justify="left")
    for h in SUMMARY_HEADERS:
        table.add_column(h, justify="left" if h in ("vm", "state") else "right")
    for row in summary_table_rows(summary):
        table.add_row(*row)
    console = Console(file=sys.stdout, width=max(100, Console().width))
    console.print(table)
    host = summary.get("host")
    if host:
        console.print(
            f"host {host['name']}: peak frames used "
            f"{format_size(host['peak_frames_used'] * PAGE_SIZE)} "
            f"of {format_size(host['frames_total'] * PAGE_SIZE)}, peak host swap "
            f"{format_size(host['peak_swap_slots_used'] * PAGE_SIZE)}"
        )
    if summary.get("events"):
        console.print("events: " + ", ".join(f"{k} {v}" for k, v in summary["events"].items()))
    from balloonlab.recording import story_lines

    for line in story_lines(summary):
        console.print(line)
    bad = summary.get("corrupted_reads_total", 0)
    console.print(
        f"corrupted reads: {bad}" + ("  <-- DATA LOSS" if bad else " (none: nothing was lost)")
    )


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP act like Ctrl-C while `up` runs, so that `kill` of the CLI (or a
    closed terminal) still shuts the host down in order instead of orphaning it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_up(
    topo: Topology,
    *,
    topo_path: Path | None,
    for_: float | None,
    detach: bool,
    record: Path | None,
    dashboard: bool,
    boot_timeout: float,
) -> dict[str, Any] | None:
    """`up` of *topo*, read by the host from *topo_path* (None: written to a temporary file,
    for topologies built in memory): launch, wait, then detach or monitor until *for_* seconds
    pass, Ctrl-C (or SIGTERM/SIGHUP), or the host exits; shut down and return the run summary
    (``None`` when detached)."""
    from hypervisor import preflight

    try:  # refuse a topology this machine cannot hold, before anything starts
        preflight.check(topo)
    except preflight.PreflightError as e:
        _fail(str(e))
    with _stop_on_signals():
        return _run_up(topo, topo_path=topo_path, for_=for_, detach=detach, record=record,
                       dashboard=dashboard, boot_timeout=boot_timeout)


def _run_up(
    topo: Topology,
    *,
    topo_path: Path | None,
    for_: float | None,
    detach: bool,
    record: Path | None,
    dashboard: bool,
    boot_timeout: float,
) -> dict[str, Any] | None:
    from rich.console import Console

    from balloonlab import launcher
    from balloonlab.dashboard import Monitor

    recorder = Recorder(record, topo) if record is not None else None
    # The recorded copy of the topology is what the host runs; without a recording, a
    # topology built in memory goes to a temporary file (the launcher's).
    if record is not None:  # exactly when there is a recorder
        topo_file: Path | None = (record / "topology.toml").resolve()
    else:
        topo_file = topo_path.resolve() if topo_path is not None else None
    # The host's own stdout/stderr (startup errors, tracebacks): DIR/hypervisor.out with
    # --record, else <run dir>.hypervisor.out beside the run dir (the launcher's default).
    out = (record / "hypervisor.out") if record is not None else None

    err = Console(file=sys.stderr)
    tty = sys.stdout.isatty()
    try:
        h = launcher.launch(topo, topo_file=topo_file, output=out)
    except BaseException as e:
        if recorder is not None:
            recorder.close()
        if isinstance(e, launcher.LaunchError):
            _fail(str(e))
        raise
    proc, log_path = h.proc, h.output
    try:
        if tty:
            with err.status("starting host…") as status:
                launcher.wait_ready(h, boot_timeout, status.update)
        else:
            launcher.wait_ready(h, boot_timeout)
    except BaseException as e:
        if proc.poll() is None:
            h.stop(5.0, keep_output=True)
        if recorder is not None:
            recorder.close()
        if isinstance(e, launcher.LaunchError):
            _fail(str(e))
        raise
    run_dir = h.run_dir
    if detach:
        click.echo(f"host {topo.host.name} is up: {len(topo.vms)} VMs running (pid {proc.pid}, "
                   f"run dir {run_dir}); `balloonlab down --host {topo.host.name}` stops it")
        if topo.host.metrics is not None and not topo.host.metrics.endswith(":0"):
            click.echo(f"metrics: http://{topo.host.metrics}/metrics")
        if recorder is not None:
            recorder.close()
        return None

    client = ControlClient(run_dir, timeout=5.0)
    monitor = Monitor(
        client,
        events_client_factory=lambda: ControlClient(run_dir, timeout=None),
        recorder=recorder,
    )
    until = None if for_ is None else time.monotonic() + for_
    stop = threading.Event()
    exited: list[str] = []
    shutting_down = threading.Event()

    def watch() -> None:  # stop monitoring when the host exits by itself
        proc.wait()
        if not shutting_down.is_set():
            exited.append(f"the hypervisor exited with status {proc.returncode}")
            stop.set()

    threading.Thread(target=watch, name="balloonlab-watch", daemon=True).start()
    try:
        monitor.run(
            until=until,
            console=Console() if (tty and dashboard) else None,
            plain_out=None if (tty and dashboard) else sys.stdout,
            stop=stop,
        )
    except KeyboardInterrupt:
        pass  # Ctrl-C: stop the host in order and print the summary
    except _host_errors():
        if not exited:
            raise
    finally:
        monitor.close()
        client.close()
        shutting_down.set()
        click.echo("stopping host…", err=True)
        # A clean run's host output is not worth keeping (a recording keeps it).
        h.stop(SHUTDOWN_TIMEOUT, keep_output=bool(exited) or recorder is not None)
    if recorder is not None:
        summary = recorder.close({"log": str(log_path)})
    else:
        summary = monitor.summary.to_json()
    _print_summary(summary)
    if exited:
        _fail(f"{exited[0]} before the run ended; see {log_path} and {run_dir}")
    if record is not None:
        click.echo(f"recorded to {record} (plot with `balloonlab plot {record}`)")
    return summary


@cli.command()
@click.argument("file", required=False)
@click.option("--for", "for_", metavar="DURATION", default=None,
              help="Stop the host after DURATION (e.g. 30s, 2m). Default: until Ctrl-C.")
@click.option("--detach", is_flag=True,
              help="Return once every VM is up; `balloonlab down` stops it.")
@click.option("--record", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR",
              help="Record timeseries.csv, events.jsonl, topology.toml, summary.json.")
@click.option("--no-dashboard", is_flag=True, help="Plain status lines instead of the live table.")
@click.option("--boot-timeout", default=DEFAULT_BOOT_TIMEOUT, show_default=True, metavar="DURATION",
              help="How long to wait for every VM to boot and negotiate.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, metavar="N",
              help="Seed of the guest workload streams (overrides the topology's host seed).")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9177).")
def up(file: str | None, for_: str | None, detach: bool, record: Path | None, no_dashboard: bool,
       boot_timeout: str, seed: int | None, metrics: str | None) -> None:
    """Start a host from topology FILE (a path or a shipped example name; default: the
    built-in three-VM lab) and watch it."""
    if detach and for_ is not None:
        raise click.UsageError("--detach and --for exclude each other (the host keeps running)")
    duration = _duration_arg(for_, "--for")
    boot = _duration_arg(boot_timeout, "--boot-timeout")
    assert boot is not None
    topo = _resolve_topology(file)
    topo_path = _topology_path(file)
    if seed is not None:
        from dataclasses import replace

        topo = replace(topo, host=replace(topo.host, seed=seed))
        topo_path = None  # the host reads the topology with this seed from a copy
    if metrics is not None:
        from dataclasses import replace

        topo = replace(topo, host=replace(topo.host, metrics=metrics))
        topo_path = None
    if topo.host.metrics is not None:
        _check_metrics_address(topo.host.metrics)
    run_up(topo, topo_path=topo_path, for_=duration, detach=detach, record=record,
           dashboard=not no_dashboard, boot_timeout=boot)


def _check_metrics_address(addr: str) -> None:
    """Fail in one line, before anything starts, when the metrics address is invalid or
    cannot be bound (taken, or not an address of this machine)."""
    import socket

    from hypervisor.units import parse_listen_address

    try:
        host, port = parse_listen_address(addr)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, stype, proto, _name, sockaddr = infos[0]
        with socket.socket(family, stype, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the host's server
            s.bind(sockaddr)
    except ValueError as e:
        _fail(f"--metrics: {e}")
    except OSError as e:
        _fail(f"metrics address {addr} cannot be used: {e.strerror or e}")


@cli.command()
@click.option("--for", "for_", metavar="DURATION", default="60s", show_default=True,
              help="How long to run.")
@click.option("--record", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR",
              help="Where to record (default: a new results/demo-<time> directory here).")
def demo(for_: str, record: Path | None) -> None:
    """Run the default three-VM lab with the dashboard, then print a summary and plot it."""
    duration = _duration_arg(for_, "--for")
    if record is None:
        record = Path("results") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_up(default_topology(), topo_path=example_path("default"), for_=duration,
                     detach=False, record=record, dashboard=True,
                     boot_timeout=parse_duration(DEFAULT_BOOT_TIMEOUT))
    if summary is not None:
        from balloonlab.plot import plot_run

        for p in plot_run(record):
            click.echo(f"plot: {p}")


@cli.command()
def transcript() -> None:
    """Show the balloon protocol at work: a driver and a device state machine talking over
    a real socket pair (negotiation, target, inflate/deflate, stats, a refused batch)."""
    from balloonlab.transcript import run_transcript

    out = _PipeGuard(sys.stdout)
    try:
        run_transcript(cast(TextIO, out))
    except Exception:
        if not out.broken:
            raise
    if out.broken:  # `balloonlab transcript | head`: the reader went away; end quietly
        _silence_stdout()


class _PipeGuard:
    """A text stream over *inner* that stops writing, quietly, once the reader of a pipe has
    gone away (``broken`` is then set)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.inner.write(text)
                self.inner.flush()
            except BrokenPipeError:
                self.broken = True
        return len(text)

    def flush(self) -> None:
        pass


cli.add_command(bench, "bench")
cli.add_command(experiment, "experiment")
cli.add_command(sweep, "sweep")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="balloonlab")
