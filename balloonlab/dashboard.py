"""Live view of a running host: a rich table refreshed ~4 times a second, or plain lines.

Rendering is pure: ``render(snapshot, rates, events)`` builds a rich renderable and
``plain_lines(snapshot, rates)`` the no-TTY text, both from a ``recording.Snapshot`` (pages
of 4096 bytes host-side, bytes guest-side). ``Monitor`` does the I/O: it polls a control
client (``host_info``, ``list_vms``, ``dommemstat`` per VM), follows the event stream on a
second connection in a background thread, and feeds a ``Recorder`` and ``RunSummary``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from balloonlab.client import ControlError
from balloonlab.recording import (
    RateWindow,
    Recorder,
    RunSummary,
    Snapshot,
    VmSnapshot,
    snapshot_from,
)
from hypervisor.units import PAGE_SIZE, format_size

__all__ = [
    "PLAIN_INTERVAL",
    "REFRESH_HZ",
    "ClientLike",
    "Monitor",
    "bar",
    "compact_size",
    "event_line",
    "format_field",
    "plain_lines",
    "render",
]

#: Dashboard refresh rate (polls per second while the live view is shown).
REFRESH_HZ = 4.0
#: Seconds between plain status lines when stdout is not a terminal.
PLAIN_INTERVAL = 5.0
#: Width of the per-VM memory bar in characters.
BAR_WIDTH = 20
#: Recent events shown under the table (fewer when many VMs fill the screen).
EVENT_LINES = 5
#: VM rows above which only ``FEW_EVENT_LINES`` events are shown.
MANY_VMS = 16
FEW_EVENT_LINES = 2
#: Terminal width the table needs besides the bar (compact cells, 12 columns).
TABLE_WIDTH_WITHOUT_BAR = 94
#: Width of the optional ``model`` column (accesses per modelled second), shown when the
#: terminal leaves room for it beside a bar of at least 6.
MODEL_COLUMN_WIDTH = 6


class ClientLike(Protocol):
    """What ``Monitor`` needs from ``balloonlab.client.ControlClient``."""

    def call(self, method: str, **params: Any) -> Any: ...
    def events(self, follow: bool) -> Any: ...
    def close(self) -> None: ...


def _pages(n: int) -> str:
    return format_size(n * PAGE_SIZE)


def _opt(nbytes: int | None) -> str:
    return "-" if nbytes is None else format_size(nbytes)


def compact_size(nbytes: int) -> str:
    """A size in at most 5 characters for table cells, binary units: ``"512M"``, ``"1.5G"``,
    ``"24K"``, ``"0"``, ``"900B"``."""
    if nbytes == 0:
        return "0"
    n = abs(int(nbytes))
    sign = "-" if nbytes < 0 else ""
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult:
            v = n / mult
            text = f"{v:.1f}" if v < 10 and n % mult else f"{v:.0f}"
            return f"{sign}{text}{unit}"
    return f"{sign}{n}B"


def _cpages(n: int) -> str:
    return compact_size(n * PAGE_SIZE)


def _copt(nbytes: int | None) -> str:
    return "-" if nbytes is None else compact_size(nbytes)


def _count(x: float) -> str:
    """A rate in at most 5 characters: ``"950"``, ``"12.5k"``, ``"100k"``, ``"3.2M"``."""
    for suffix, mult in (("M", 1e6), ("k", 1e3)):
        if x >= mult:
            v = x / mult
            return f"{v:.1f}{suffix}" if v < 100 else f"{v:.0f}{suffix}"
    return f"{x:.0f}"


def bar(vm: VmSnapshot, width: int = BAR_WIDTH) -> Text:
    """``width`` cells of the VM's memory: backed ``█`` (red part host-swapped ``▒``), balloon
    ``░``, the rest (unbacked, not ballooned) ``·``."""
    total = max(vm.memory_pages, 1)

    def cells(pages: int) -> int:
        return min(width, round(width * pages / total))

    backed = cells(vm.backed_pages)
    swapped = min(cells(vm.host_swapped_pages), width - backed)
    balloon = min(cells(vm.balloon_pages), width - backed - swapped)
    rest = width - backed - swapped - balloon
    t = Text()
    t.append("█" * backed, style="cyan")
    t.append("▒" * swapped, style="red")
    t.append("░" * balloon, style="green")
    t.append("·" * rest, style="dim")
    return t


def _host_line(snap: Snapshot) -> str:
    h = snap.host
    swap = (
        f"swap {_pages(h.swap_slots_used)} / {_pages(h.swap_slots_total)}"
        if h.swap_slots_total
        else "swap off"
    )
    return (
        f"host {h.name}: frames {_pages(h.frames_used)} used, {_pages(h.frames_free)} free "
        f"of {_pages(h.frames_total)}; {swap}; policy {h.policy}"
    )


def render(
    snap: Snapshot,
    vm_rates: Mapping[str, tuple[float, float]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    footer: str = "",
    width: int | None = None,
    modelled: Mapping[str, float | None] | None = None,
) -> RenderableType:
    """The live view: one row per VM, a host row, then the last few events.

    *modelled* (VM name → accesses per modelled second, ``RateWindow.modelled``) adds a
    ``model`` column beside the wall-clock ``ops/s`` when the terminal is wide enough.

    Cells are compact (sizes like ``512M`` in binary units, rates like ``12.5k``) so that the
    table fits 100 columns; the memory bar takes what the terminal *width* leaves (up to
    ``BAR_WIDTH``). The host's policy, frames and swap are in the title line.
    """
    bar_width = BAR_WIDTH
    show_model = modelled is not None and (
        width is None or width - TABLE_WIDTH_WITHOUT_BAR - MODEL_COLUMN_WIDTH >= 6)
    if width is not None:
        used = TABLE_WIDTH_WITHOUT_BAR + (MODEL_COLUMN_WIDTH if show_model else 0)
        bar_width = max(6, min(BAR_WIDTH, width - used))
    table = Table(title=_host_line(snap), title_justify="left", expand=False,
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True,
                  show_edge=False)
    for col, justify in (
        ("vm", "left"),
        ("state", "left"),
        ("size", "right"),
        ("target", "right"),
        ("balloon", "right"),
        ("backed", "right"),
        ("h.swap", "right"),
        ("g.free", "right"),
        ("g.swap", "right"),
        ("ops/s", "right"),
        *((("model", "right"),) if show_model else ()),
        ("flt/s", "right"),
        ("bad", "right"),
        ("memory", "left"),
    ):
        table.add_column(col, justify=justify, no_wrap=True)
    for vm in snap.vms:
        ops_s, faults_s = vm_rates.get(vm.name, (0.0, 0.0))
        mr = (modelled or {}).get(vm.name)
        model_cell = ((_count(mr) if mr is not None else "-"),) if show_model else ()
        state = vm.state if vm.driver in (None, "connected") else f"{vm.state}/{vm.driver}"
        table.add_row(
            vm.name,
            Text(state, style="green" if vm.state == "running" else "yellow"),
            _cpages(vm.memory_pages),
            _cpages(vm.target_pages),
            _cpages(vm.balloon_pages),
            _cpages(vm.backed_pages),
            _cpages(vm.host_swapped_pages),
            _copt(vm.guest_free_bytes),
            _copt(vm.guest_swap_used_bytes),
            _count(ops_s),
            *model_cell,
            _count(faults_s),
            Text(str(vm.corrupted_reads), style="bold red" if vm.corrupted_reads else ""),
            bar(vm, bar_width),
        )
    h = snap.host
    table.add_section()
    table.add_row(
        Text("host", style="bold"),
        "",
        _cpages(h.frames_total),
        "",
        "",
        _cpages(h.frames_used),
        _cpages(h.swap_slots_used) if h.swap_slots_total else "off",
        "",
        "",
        "",
        "",
        "",
        *(("",) if show_model else ()),
        _host_bar(snap, bar_width),
    )
    parts: list[RenderableType] = [table]
    shown = EVENT_LINES if len(snap.vms) <= MANY_VMS else FEW_EVENT_LINES
    for ev in list(events)[-shown:]:
        parts.append(Text(event_line(ev), style="dim", no_wrap=True, overflow="ellipsis"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def _host_bar(snap: Snapshot, width: int = BAR_WIDTH) -> Text:
    h = snap.host
    used = min(width, round(width * h.frames_used / max(h.frames_total, 1)))
    t = Text()
    t.append("█" * used, style="red" if h.frames_free * 20 < h.frames_total else "cyan")
    t.append("·" * (width - used), style="dim")
    return t


#: Fields holding a UNIX time, shown as local time.
_TIME_FIELDS = frozenset({"time", "started", "last_update", "ended", "since"})


def format_field(key: str, value: Any) -> str:
    """One field of an event or a host answer for people: UNIX times as local time, a
    feature mask as feature names, the rest as is."""
    if key in _TIME_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            return str(value)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        return f"{stamp}.{int(value * 1000) % 1000:03d}" if not float(value).is_integer() \
            else stamp
    if key == "features" and isinstance(value, int) and not isinstance(value, bool):
        from protocol.features import Feature

        return ",".join(Feature.to_names(value)) or "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def event_line(ev: Mapping[str, Any]) -> str:
    """``HH:MM:SS kind vm key=value ...``: one event for people."""
    when = ev.get("time")
    stamp = (time.strftime("%H:%M:%S", time.localtime(when))
             if isinstance(when, (int, float)) else "--:--:--")
    extra = " ".join(f"{k}={format_field(k, v)}" for k, v in ev.items()
                     if k not in ("time", "kind", "vm", "seq"))
    vm = f" {ev['vm']}" if ev.get("vm") else ""
    return f"{stamp} {ev.get('kind', '?')}{vm} {extra}".rstrip()


_event_line = event_line  # the name the CLI used before


def plain_lines(snap: Snapshot, vm_rates: Mapping[str, tuple[float, float]],
                modelled: Mapping[str, float | None] | None = None) -> list[str]:
    """No-TTY status: one line per VM, then the host line; with *modelled*, each VM's
    accesses per modelled second beside its wall-clock ones."""
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.time))
    lines = []
    for vm in snap.vms:
        ops_s, faults_s = vm_rates.get(vm.name, (0.0, 0.0))
        lines.append(
            f"{stamp} {vm.name} {vm.state} size={_pages(vm.memory_pages)} "
            f"target={_pages(vm.target_pages)} balloon={_pages(vm.balloon_pages)} "
            f"backed={_pages(vm.backed_pages)} host_swap={_pages(vm.host_swapped_pages)} "
            f"free={_opt(vm.guest_free_bytes)} guest_swap={_opt(vm.guest_swap_used_bytes)} "
            f"ops/s={ops_s:.0f} faults/s={faults_s:.0f} corrupted={vm.corrupted_reads}"
            + (f" modelled_ops/s={mr:.0f}"
               if (mr := (modelled or {}).get(vm.name)) is not None else "")
        )
    lines.append(f"{stamp} {_host_line(snap)}")
    return lines


class Monitor:
    """Polls a running host and keeps the latest snapshot, rates, recent events and summary.

    *client* answers the polls; *events_client_factory* (optional) opens a second
    connection whose ``events(follow=True)`` stream is read in a daemon thread.
    """

    def __init__(
        self,
        client: ClientLike,
        *,
        events_client_factory: Callable[[], ClientLike] | None = None,
        recorder: Recorder | None = None,
        summary: RunSummary | None = None,
    ) -> None:
        self.client = client
        self.recorder = recorder
        self.summary = recorder.summary if recorder is not None else (summary or RunSummary())
        self.last: Snapshot | None = None
        self._rates = RateWindow()
        self.last_rates: dict[str, tuple[float, float]] = {}
        self.recent_events: deque[Mapping[str, Any]] = deque(maxlen=EVENT_LINES)
        self._events: queue.Queue[Mapping[str, Any]] = queue.Queue()
        self._events_client: ClientLike | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if events_client_factory is not None:
            self._events_client = events_client_factory()
            self._thread = threading.Thread(target=self._follow, name="balloonlab-events",
                                            daemon=True)
            self._thread.start()

    def _follow(self) -> None:
        assert self._events_client is not None
        try:
            for ev in self._events_client.events(True):
                if self._stop.is_set():
                    break
                self._events.put(ev)
        except Exception:  # the host went away or the stream closed: polling reports it
            pass

    def poll(self) -> Snapshot:
        """One poll of the host; records it and folds in events received meanwhile."""
        host = self.client.call("host_info")
        vms = self.client.call("list_vms")
        stats = {}
        for vm in vms:
            try:
                stats[vm["name"]] = self.client.call("dommemstat", vm=vm["name"])
            except ControlError:  # a VM destroyed between list_vms and dommemstat
                pass
        snap = snapshot_from(host, vms, stats)
        self.drain_events()
        self.last = snap
        self.last_rates = self._rates.update(snap)
        if self.recorder is not None:
            self.recorder.tick(snap)
        else:
            self.summary.add(snap)
        return snap

    def drain_events(self) -> None:
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            self.recent_events.append(ev)
            if self.recorder is not None:
                self.recorder.event(ev)
            else:
                self.summary.add_event(ev)

    def renderable(self, footer: str = "", width: int | None = None) -> RenderableType:
        if self.last is None:
            return Text("waiting for the first sample…")
        return render(self.last, self.last_rates, list(self.recent_events), footer=footer,
                      modelled=self._rates.modelled,
                      width=width)

    def run(
        self,
        *,
        until: float | None,
        console: Console | None = None,
        plain_out: TextIO | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """Poll until the monotonic deadline *until* (None: until *stop* is set or Ctrl-C).

        With a terminal *console* shows the live table at ``REFRESH_HZ``; with *plain_out*
        writes ``plain_lines`` every ``PLAIN_INTERVAL`` seconds; with neither just polls
        (to record). ``KeyboardInterrupt`` propagates to the caller, which shuts down.
        """
        stop = stop or threading.Event()
        period = 1.0 / REFRESH_HZ

        def finished() -> bool:
            return stop.is_set() or (until is not None and time.monotonic() >= until)

        def footer() -> str:
            left = "" if until is None else f"{max(until - time.monotonic(), 0):.0f}s left · "
            return f"{left}Ctrl-C stops the host"

        if console is not None:
            with Live(self.renderable(), console=console, refresh_per_second=REFRESH_HZ,
                      transient=False) as live:
                while not finished():
                    self.poll()
                    live.update(self.renderable(footer(), console.width))
                    stop.wait(period)
            return
        next_line = 0.0
        while not finished():
            snap = self.poll()
            now = time.monotonic()
            if plain_out is not None and now >= next_line:
                for line in plain_lines(snap, self.last_rates, self._rates.modelled):
                    print(line, file=plain_out, flush=True)
                next_line = now + PLAIN_INTERVAL
            stop.wait(period)

    def close(self) -> None:
        self._stop.set()
        self.drain_events()
        if self._events_client is not None:
            try:
                self._events_client.close()
            except Exception:
                pass
