"""Topology files: the TOML description of one host and its VMs (docs/topology.md).

``parse_topology`` turns TOML text into frozen, fully validated ``Topology`` objects; every
default is filled in here, so the launcher, policies and CLI never see a missing field.
Sizes are bytes, durations seconds, pages 4096 bytes. Any problem raises ``TopologyError``
carrying the source (file path or ``"<default>"``), the dotted key (``vm[1].task[0].size``)
and the problem, with a "did you mean" suggestion for misspelt keys and enum values.

The default topology (used when ``balloonlab up`` gets no file) is the shipped example
``hypervisor/topologies/default.toml``; other shipped examples live beside it.

Why one module of this size: it is the whole topology schema — every key, its type, its
default, its error text and its TOML spelling — in one place, so that ``validate``, ``up``,
``to_toml`` and the docs cannot drift apart.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from hypervisor.schedule import ACTIONS, OPTIONAL, ScheduleEntry
from hypervisor.units import (
    PAGE_SIZE,
    format_duration,
    format_size_exact,
    parse_duration,
    parse_listen_address,
    parse_size,
)
from protocol.cost import DEVICE_KEYS, CostError, format_ns, normalize_cost
from protocol.features import FEATURE_NAMES as _PROTOCOL_FEATURE_NAMES

__all__ = [
    "BUILTIN_POLICIES",
    "DEFAULT_FEATURES",
    "FEATURE_NAMES",
    "NAME_RE",
    "ON_CRASH",
    "WIRES",
    "WORKLOADS",
    "HostConfig",
    "TaskConfig",
    "Topology",
    "TopologyError",
    "VmConfig",
    "default_topology",
    "example_path",
    "list_examples",
    "load_topology",
    "parse_topology",
]

TOPOLOGIES_DIR = Path(__file__).with_name("topologies")

# Balloon feature names as spelled in topologies and on the driver's command line
# (docs/internals.md); protocol.features is their one home.
FEATURE_NAMES: tuple[str, ...] = tuple(_PROTOCOL_FEATURE_NAMES)
DEFAULT_FEATURES: tuple[str, ...] = (
    "must_tell_host", "stats", "deflate_on_oom", "reporting", "ranges")
WORKLOADS: tuple[str, ...] = ("uniform", "zipf", "scan", "hotcold", "phases", "idle",
                              "fileio")
WIRES: tuple[str, ...] = ("ranges", "virtio")
ON_CRASH: tuple[str, ...] = ("restart", "destroy")
BUILTIN_POLICIES: tuple[str, ...] = ("none", "static", "mom", "share")

#: VM and host names become file names in the run directory (``<vm>.balloon.sock``).
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_POLICY_PATH_RE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")

#: Default share of a VM's memory below which policies never shrink it (``min_memory``).
DEFAULT_MIN_MEMORY_FRACTION = 0.10
DEFAULT_SHARES = 1000


class TopologyError(ValueError):
    """A topology could not be read or is invalid.

    ``str(e) == f"{source}: {key}: {problem}"``, plus ``" (did you mean 'x'?)"`` when a close
    match for a misspelt key or value exists (then also in ``e.suggestion``). A file with
    several problems raises one error whose ``errors`` lists them all (the first is the
    error itself) and whose ``str`` is their lines joined by newlines.
    """

    def __init__(self, source: str, key: str, problem: str, suggestion: str | None = None) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        self.suggestion = suggestion
        text = f"{source}: {key}: {problem}"
        if suggestion is not None:
            text += f" (did you mean {suggestion!r}?)"
        self.line = text
        self.errors: list[TopologyError] = [self]
        super().__init__(text)

    @classmethod
    def several(cls, errors: list[TopologyError]) -> TopologyError:
        """One error carrying every problem in *errors* (in order)."""
        first = errors[0]
        if len(errors) == 1:
            return first
        e = cls(first.source, first.key, first.problem, first.suggestion)
        e.errors = list(errors)
        e.args = ("\n".join(x.line for x in errors),)
        return e

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.line


# --------------------------------------------------------------------------------------------
# Config objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """One workload inside a guest. Sizes in bytes, durations and ``start`` in seconds,
    ``rate`` in memory accesses per second (``None``: as fast as the vCPU quantum allows)."""

    workload: str
    size: int
    skew: float = 0.9
    write_ratio: float = 0.3
    rate: float | None = None
    hot_fraction: float = 0.1
    hot_prob: float = 0.9
    duration: float | None = None
    start: float = 0.0
    #: ``idle`` only: seconds the task keeps its memory once all of it is touched, then it
    #: ends (a duration that starts when the touch is done, however long that took).
    hold: float | None = None
    phases: tuple[TaskConfig, ...] = ()
    #: ``fileio`` only: how many files, and bytes per file, on the VM's disk (``size`` is
    #: then their product).
    files: int = 0
    file_size: int = 0

    def to_json(self) -> dict[str, Any]:
        """The task object of docs/internals.md (guest ``--config``)."""
        return {
            "workload": self.workload,
            "size": self.size,
            "skew": self.skew,
            "write_ratio": self.write_ratio,
            "rate": self.rate,
            "hot_fraction": self.hot_fraction,
            "hot_prob": self.hot_prob,
            "duration": self.duration,
            "start": self.start,
            **({"hold": self.hold} if self.hold is not None else {}),
            **({"files": self.files, "file_size": self.file_size}
               if self.workload == "fileio" else {}),
            "phases": [p.to_json() for p in self.phases],
        }


@dataclass(frozen=True, kw_only=True)
class VmConfig:
    """One VM. All memory amounts in bytes, multiples of 4096; ``stats_interval`` in seconds.

    ``min_memory``/``max_memory`` bound the logical size policies may give the VM;
    ``initial_balloon`` is the balloon target at boot; ``shares`` weighs it under ``share``.
    """

    name: str
    memory: int
    features: tuple[str, ...]
    wire: str
    stats_interval: float
    guest_swap: int
    on_crash: str
    tasks: tuple[TaskConfig, ...]
    min_memory: int
    max_memory: int
    shares: int
    initial_balloon: int
    #: Bytes of the guest kernel's image (None: the guest's default); its memmap comes on top.
    kernel_image: int | None = None
    #: The topology's ``[cost]`` table in normal form (protocol.cost), the same for every VM.
    cost: Mapping[str, Any] = field(default_factory=dict)
    #: Bytes of the VM's virtual disk (``<vm>.disk`` in the run dir; 0: no disk).
    disk: int = 0

    @property
    def pages(self) -> int:
        """Guest RAM in 4096-byte pages."""
        return self.memory // PAGE_SIZE

    def guest_config(self, seed: int) -> dict[str, Any]:
        """The ``--config`` JSON object of ``python -m guest.kernel`` (docs/internals.md)."""
        return {
            "name": self.name,
            "memory": self.memory,
            "guest_swap": self.guest_swap,
            "stats_interval": self.stats_interval,
            "seed": seed,
            "tasks": [t.to_json() for t in self.tasks],
            **({"kernel_image": self.kernel_image} if self.kernel_image is not None else {}),
            **({"cost": dict(self.cost)} if self.cost else {}),
            **({"disk": self.disk} if self.disk else {}),
        }


@dataclass(frozen=True, kw_only=True)
class HostConfig:
    """The host: ``memory`` and ``swap`` in bytes, ``policy_interval`` in seconds."""

    name: str
    memory: int
    swap: int
    policy: str
    policy_params: Mapping[str, object] = field(default_factory=dict)
    policy_interval: float
    run_dir: str | None
    #: Seeds every guest's workload streams (with the VM's name and restart count).
    seed: int = 0
    #: ``HOST:PORT`` of the Prometheus ``/metrics`` endpoint (hypervisor.metrics); None: off.
    metrics: str | None = None

    @property
    def frames(self) -> int:
        """Host physical frames (``memory / 4096``)."""
        return self.memory // PAGE_SIZE

    @property
    def swap_slots(self) -> int:
        """Host swap slots, one page each."""
        return self.swap // PAGE_SIZE


@dataclass(frozen=True, kw_only=True)
class Topology:
    """A validated topology; ``source`` is the file it came from (or ``"<default>"``)."""

    host: HostConfig
    vms: tuple[VmConfig, ...]
    source: str
    #: Timed host actions (``hypervisor.schedule.ScheduleEntry``), in file order.
    schedule: tuple[Any, ...] = ()
    #: The ``[cost]`` table in normal form (protocol.cost): only the keys the file sets.
    cost: Mapping[str, Any] = field(default_factory=dict)
    #: Things that are allowed but probably not meant (``SOURCE: KEY: warning: ...`` lines),
    #: e.g. a task larger than its VM's memory, which then lives partly in guest swap.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def vm(self, name: str) -> VmConfig:
        """The VM called *name*; ``KeyError`` naming the known VMs otherwise."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(f"no VM {name!r} in topology (VMs: {', '.join(v.name for v in self.vms)})")

    def to_toml(self) -> str:
        """TOML text that ``parse_topology`` reads back to an equal topology (except source)."""
        return _to_toml(self)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")

_TOP_KEYS = ("host", "vm", "schedule", "cost")
_HOST_KEYS = ("name", "memory", "swap", "policy", "policy_params", "policy_interval", "run_dir",
              "seed", "metrics")
_VM_KEYS = (
    "name",
    "memory",
    "features",
    "wire",
    "stats_interval",
    "guest_swap",
    "on_crash",
    "task",
    "min_memory",
    "max_memory",
    "shares",
    "initial_balloon",
    "kernel_image",
    "disk",
)
_TASK_KEYS = (
    "workload",
    "size",
    "skew",
    "write_ratio",
    "rate",
    "hot_fraction",
    "hot_prob",
    "duration",
    "start",
    "hold",
    "phases",
    "files",
    "file_size",
)


class _Ctx:
    """Error helper bound to one source."""

    def __init__(self, source: str) -> None:
        self.source = source
        #: Problems found so far; parsing goes on past one so that all are reported at once.
        self.errors: list[TopologyError] = []
        self.warnings: list[str] = []

    def collect(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
        """``fn(*args)``, or ``None`` with its ``TopologyError`` recorded."""
        try:
            return fn(*args, **kwargs)
        except TopologyError as e:
            self.errors.extend(e.errors)
            return None

    def warn(self, key: str, problem: str) -> None:
        self.warnings.append(f"{self.source}: {key}: warning: {problem}")

    def error(self, key: str, problem: str, suggestion: str | None = None) -> TopologyError:
        return TopologyError(self.source, key, problem, suggestion)

    def check_keys(self, table: Mapping[str, Any], allowed: Iterable[str], prefix: str) -> None:
        allowed = tuple(allowed)
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                where = f"{prefix}.{key}" if prefix else key
                # Not fatal: the rest of the table is still checked and reported.
                self.errors.append(self.error(
                    where,
                    f"unknown key (allowed: {', '.join(allowed)})",
                    close[0] if close else None,
                ))

    def table(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a table, got {_describe(value)}")
        return value

    def convert(self, key: str, value: Any, fn: Callable[[Any], _T]) -> _T:
        try:
            return fn(value)
        except ValueError as e:
            # units.* prefix their message with the field name; the key already says it.
            msg = str(e)
            prefix = f"{key}: "
            raise self.error(key, msg[len(prefix):] if msg.startswith(prefix) else msg) from None

    def size(self, key: str, value: Any, *, page_multiple: bool = True) -> int:
        nbytes = self.convert(key, value, lambda v: parse_size(v, field=key))
        if page_multiple and nbytes % PAGE_SIZE:
            raise self.error(
                key,
                f"{value!r} ({nbytes} bytes) is not a multiple of the {PAGE_SIZE}-byte page size",
            )
        return nbytes

    def duration(self, key: str, value: Any) -> float:
        return self.convert(key, value, lambda v: parse_duration(v, field=key))

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_describe(value)}")
        return value

    def enum(self, key: str, value: Any, choices: tuple[str, ...]) -> str:
        value = self.string(key, value)
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
            raise self.error(
                key,
                f"{value!r} is not one of {', '.join(choices)}",
                close[0] if close else None,
            )
        return str(value)

    def number(
        self,
        key: str,
        value: Any,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {_describe(value)}")
        x = float(value)
        if not math.isfinite(x):
            raise self.error(key, f"{value!r} is not a finite number")
        if lo is not None and (x < lo or (lo_open and x == lo)):
            bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
            if hi is not None:
                bound = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise self.error(key, f"{value!r} is out of range: must be {bound}")
        if hi is not None and x > hi:
            raise self.error(key, f"{value!r} is out of range: must be in [{lo:g}, {hi:g}]")
        return x

    def name(self, key: str, value: Any) -> str:
        value = self.string(key, value)
        if not NAME_RE.fullmatch(value):
            raise self.error(
                key,
                f"{value!r} is not a valid name: use 1-32 characters of a-z, 0-9, '_' and '-', "
                "starting with a letter or digit (it becomes a file name in the run directory)",
            )
        return str(value)


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, (dict, list)) else kind


def _parse_host(ctx: _Ctx, raw: Mapping[str, Any]) -> HostConfig:
    ctx.check_keys(raw, _HOST_KEYS, "host")
    if "memory" not in raw:
        raise ctx.error("host.memory",
                        "missing: the host's physical memory, e.g. memory = \"1GiB\"")
    name = ctx.name("host.name", raw.get("name", "lab"))
    memory = ctx.size("host.memory", raw["memory"])
    if memory == 0:
        raise ctx.error("host.memory", "must be larger than 0")
    # Default host swap: half the host memory, the same ratio as a VM's default guest swap.
    swap = ctx.size("host.swap", raw.get("swap", memory // 2 // PAGE_SIZE * PAGE_SIZE))
    policy = ctx.string("host.policy", raw.get("policy", "none"))
    if policy not in BUILTIN_POLICIES and not _POLICY_PATH_RE.fullmatch(policy):
        close = difflib.get_close_matches(policy, BUILTIN_POLICIES, n=1, cutoff=0.6)
        raise ctx.error(
            "host.policy",
            f"{policy!r} is neither a built-in policy ({', '.join(BUILTIN_POLICIES)}) "
            "nor a 'package.module:Class' path",
            close[0] if close else None,
        )
    params = raw.get("policy_params", {})
    params = dict(ctx.table(params, "host.policy_params"))
    for k, v in params.items():
        _check_plain(ctx, f"host.policy_params.{k}", v)
    if policy in BUILTIN_POLICIES:
        # Build the policy once now so that a misspelt or out-of-range parameter is
        # reported with the file and key, not later inside the running host.
        from hypervisor.policies import load_policy

        try:
            load_policy(policy, params)
        except ValueError as e:
            known = list(getattr(_policy_class(policy), "DEFAULTS", {}))
            bad = next((k for k in params if k not in known), None)
            close = (difflib.get_close_matches(bad, known, n=1, cutoff=0.5)
                     if bad is not None else [])
            raise ctx.error(
                f"host.policy_params.{bad}" if bad else "host.policy_params",
                str(e),
                close[0] if close else None,
            ) from None
    interval = ctx.duration("host.policy_interval", raw.get("policy_interval", "1s"))
    if interval <= 0:
        raise ctx.error("host.policy_interval", "must be longer than 0")
    run_dir = raw.get("run_dir")
    if run_dir is not None:
        run_dir = ctx.string("host.run_dir", run_dir)
        if not run_dir:
            raise ctx.error("host.run_dir", "must not be empty (omit it for the default)")
        run_dir = os.path.expanduser(run_dir)
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ctx.error("host.seed", f"expected an integer in [0, 2^63), got {_describe(seed)}")
    metrics = raw.get("metrics")
    if metrics is not None:
        metrics = ctx.string("host.metrics", metrics)
        try:
            parse_listen_address(metrics)
        except ValueError as e:
            raise ctx.error("host.metrics", str(e)) from None
    return HostConfig(
        name=name,
        memory=memory,
        swap=swap,
        policy=policy,
        policy_params=params,
        policy_interval=interval,
        run_dir=run_dir,
        seed=seed,
        metrics=metrics,
    )


def _policy_class(name: str) -> type:
    from hypervisor.policies import resolve_policy_class

    return resolve_policy_class(name)


def _check_plain(ctx: _Ctx, key: str, value: Any) -> None:
    """Policy parameters must be plain data (they are recorded as TOML and sent as msgpack)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(ctx, f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(ctx, f"{key}[{i}]", v)
    elif not isinstance(value, (str, int, float, bool)):
        raise ctx.error(
            key, f"expected a string, number, boolean, array or table, got {_describe(value)}")


#: Task fields a phase inherits from its ``phases`` task when the phase does not set them.
_PHASE_INHERITED = ("skew", "write_ratio", "rate", "hot_fraction", "hot_prob")


def _parse_task(
    ctx: _Ctx, raw: Any, key: str, vm_memory: int, *, parent: Mapping[str, Any] | None = None
) -> TaskConfig:
    raw = ctx.table(raw, key)
    ctx.check_keys(raw, _TASK_KEYS, key)
    in_phases = parent is not None
    if parent is not None:
        raw = {**{k: parent[k] for k in _PHASE_INHERITED if k in parent}, **raw}
    if "workload" not in raw:
        raise ctx.error(f"{key}.workload", f"missing: one of {', '.join(WORKLOADS)}")
    workload = ctx.enum(f"{key}.workload", raw["workload"], WORKLOADS)

    phases: tuple[TaskConfig, ...] = ()
    if workload == "phases":
        if in_phases:
            raise ctx.error(f"{key}.workload",
                            "phases cannot nest: a phase must be a plain workload")
        raw_phases = raw.get("phases")
        if not isinstance(raw_phases, list) or not raw_phases:
            raise ctx.error(
                f"{key}.phases",
                "a 'phases' workload needs a non-empty array of phase tables "
                "(each a workload with a duration)",
            )
        phases = tuple(
            _parse_task(ctx, p, f"{key}.phases[{i}]", vm_memory, parent=raw)
            for i, p in enumerate(raw_phases)
        )
        for i, p in enumerate(phases):
            if p.duration is None:
                raise ctx.error(f"{key}.phases[{i}].duration",
                                "missing: every phase needs a duration")
    elif "phases" in raw:
        if in_phases:
            raise ctx.error(f"{key}.phases", "phases cannot nest")
        raise ctx.error(f"{key}.phases", f"only a 'phases' workload takes phases, not {workload!r}")

    files = file_size = 0
    if workload == "fileio":
        if in_phases:
            raise ctx.error(f"{key}.workload", "a fileio task cannot be a phase")
        if "size" in raw:
            raise ctx.error(f"{key}.size", "a fileio task's data is files x file_size on the "
                            "VM's disk: set those instead of size")
        for k in ("files", "file_size"):
            if k not in raw:
                raise ctx.error(f"{key}.{k}", "missing: a fileio task needs files (a count) "
                                "and file_size (e.g. \"1MiB\")")
        fv = raw["files"]
        if isinstance(fv, bool) or not isinstance(fv, int) or fv <= 0:
            raise ctx.error(f"{key}.files", f"expected a positive integer, got {_describe(fv)}")
        files = fv
        file_size = ctx.size(f"{key}.file_size", raw["file_size"])
        if file_size == 0:
            raise ctx.error(f"{key}.file_size", "must be larger than 0")
    else:
        for k in ("files", "file_size"):
            if k in raw:
                raise ctx.error(f"{key}.{k}", f"only a fileio task has files, not {workload!r}")
    if workload == "fileio":
        size = files * file_size
    elif "size" in raw:
        size = ctx.size(f"{key}.size", raw["size"])
    elif phases:
        # A phases task spans the largest working set of its phases.
        size = max(p.size for p in phases)
    else:
        raise ctx.error(f"{key}.size",
                        "missing: the task's working-set size, e.g. size = \"64MiB\"")
    if size == 0:
        raise ctx.error(f"{key}.size", "must be larger than 0")
    if size > vm_memory and workload != "fileio":  # a fileio task's data is on the disk
        # vm_memory here is the VM's memory plus its guest swap: a task may overcommit
        # its guest (that is what guest swap is for), but not beyond what it can hold.
        raise ctx.error(
            f"{key}.size",
            f"{format_size_exact(size)} is larger than its VM's memory plus guest swap "
            f"({format_size_exact(vm_memory)})",
        )
    for i, p in enumerate(phases):
        if p.size > size:
            raise ctx.error(
                f"{key}.phases[{i}].size",
                f"{format_size_exact(p.size)} is larger than the task's size "
                f"({format_size_exact(size)})",
            )

    rate = raw.get("rate")
    if rate is not None:
        rate = ctx.number(f"{key}.rate", rate, lo=0, lo_open=True)
    duration = raw.get("duration")
    if duration is not None:
        duration = ctx.duration(f"{key}.duration", duration)
        if duration <= 0:
            raise ctx.error(f"{key}.duration", "must be longer than 0 (omit it to run forever)")
    hold = raw.get("hold")
    if hold is not None:
        if workload != "idle":
            raise ctx.error(f"{key}.hold", "only an idle task holds its memory for a time")
        hold = ctx.duration(f"{key}.hold", hold)
    return TaskConfig(
        workload=workload,
        size=size,
        skew=ctx.number(f"{key}.skew", raw.get("skew", 0.9), lo=0),
        write_ratio=ctx.number(f"{key}.write_ratio", raw.get("write_ratio", 0.3), lo=0, hi=1),
        rate=rate,
        hot_fraction=ctx.number(
            f"{key}.hot_fraction", raw.get("hot_fraction", 0.1), lo=0, hi=1, lo_open=True
        ),
        hot_prob=ctx.number(f"{key}.hot_prob", raw.get("hot_prob", 0.9), lo=0, hi=1),
        duration=duration,
        start=ctx.duration(f"{key}.start", raw.get("start", 0.0)),
        hold=hold,
        phases=phases,
        files=files,
        file_size=file_size,
    )


def _check_disk(ctx: _Ctx, key: str, disk: int, tasks: Sequence[TaskConfig | None]) -> None:
    """fileio tasks' files lie on the disk one task after another: they must fit."""
    used = 0
    for i, t in enumerate(tasks):
        if t is None or t.workload != "fileio":
            continue
        if disk == 0:
            ctx.errors.append(ctx.error(
                f"{key}.task[{i}].workload", "a fileio task needs a disk: add e.g. "
                "disk = \"64MiB\" to the VM"))
            return
        if used + t.size > disk:
            ctx.errors.append(ctx.error(
                f"{key}.task[{i}].files",
                f"{t.files} files of {format_size_exact(t.file_size)} "
                f"({format_size_exact(t.size)}) do not fit on the VM's disk "
                f"({format_size_exact(disk)}"
                + (f", {format_size_exact(used)} taken by earlier fileio tasks)" if used
                   else ")")))
            return
        used += t.size


def _parse_vm(ctx: _Ctx, raw: Any, key: str, host: HostConfig | None) -> VmConfig:
    raw = ctx.table(raw, key)
    ctx.check_keys(raw, _VM_KEYS, key)
    if "name" not in raw:
        raise ctx.error(f"{key}.name", "missing: every VM needs a name")
    name = ctx.name(f"{key}.name", raw["name"])
    if "memory" not in raw:
        raise ctx.error(f"{key}.memory", "missing: the VM's RAM, e.g. memory = \"512MiB\"")
    memory = ctx.size(f"{key}.memory", raw["memory"])
    if memory == 0:
        raise ctx.error(f"{key}.memory", "must be larger than 0")
    if host is not None and memory > host.memory + host.swap:
        raise ctx.error(
            f"{key}.memory",
            f"{format_size_exact(memory)} is larger than host memory + host swap "
            f"({format_size_exact(host.memory)} + {format_size_exact(host.swap)}): "
            "it could never be fully backed",
        )

    raw_features = raw.get("features", list(DEFAULT_FEATURES))
    if not isinstance(raw_features, list):
        raise ctx.error(f"{key}.features",
                        f"expected an array of feature names, got {_describe(raw_features)}")
    features: list[str] = []
    for i, f in enumerate(raw_features):
        fname = ctx.enum(f"{key}.features[{i}]", f, FEATURE_NAMES)
        if fname in features:
            raise ctx.error(f"{key}.features[{i}]", f"{fname!r} is listed twice")
        features.append(fname)
    wire = ctx.enum(f"{key}.wire", raw.get("wire", "ranges"), WIRES)
    if wire == "ranges" and "ranges" not in features:
        raise ctx.error(
            f"{key}.wire",
            "wire = \"ranges\" needs the \"ranges\" feature: add it to features or use "
            "wire = \"virtio\"",
        )
    stats_interval = ctx.duration(f"{key}.stats_interval", raw.get("stats_interval", "1s"))
    if stats_interval <= 0:
        raise ctx.error(f"{key}.stats_interval", "must be longer than 0")
    guest_swap = ctx.size(f"{key}.guest_swap",
                          raw.get("guest_swap", memory // 2 // PAGE_SIZE * PAGE_SIZE))
    on_crash = ctx.enum(f"{key}.on_crash", raw.get("on_crash", "restart"), ON_CRASH)

    raw_tasks = raw.get("task", [])
    if not isinstance(raw_tasks, list):
        raise ctx.error(f"{key}.task", "expected an array of tables: write [[vm.task]]")
    parsed = [ctx.collect(_parse_task, ctx, t, f"{key}.task[{i}]", memory + guest_swap)
              for i, t in enumerate(raw_tasks)]
    tasks = tuple(t for t in parsed if t is not None)
    disk = ctx.size(f"{key}.disk", raw.get("disk", 0))
    _check_disk(ctx, key, disk, parsed)
    for i, t in enumerate(parsed):
        if t is not None and t.size > memory and t.workload != "fileio":
            ctx.warn(f"{key}.task[{i}].size",
                     f"{format_size_exact(t.size)} is larger than the VM's memory "
                     f"({format_size_exact(memory)}): the task will live partly in guest swap")
    together = sum(t.size for t in tasks if t.workload != "fileio")
    if len(tasks) > 1 and together > memory + guest_swap:
        ctx.warn(f"{key}.task",
                 f"the tasks' sizes add up to {format_size_exact(together)}, more than the VM's "
                 f"memory plus guest swap ({format_size_exact(memory + guest_swap)}): the OOM "
                 "killer will run if they are all resident at once")

    # 10 % of memory, rounded down to whole MiB (to a page for VMs under 10 MiB).
    unit = 1 << 20 if memory >= 10 << 20 else PAGE_SIZE
    default_min = int(memory * DEFAULT_MIN_MEMORY_FRACTION) // unit * unit
    min_memory = ctx.size(f"{key}.min_memory", raw.get("min_memory", default_min))
    max_memory = ctx.size(f"{key}.max_memory", raw.get("max_memory", memory))
    if max_memory > memory:
        raise ctx.error(
            f"{key}.max_memory",
            f"{format_size_exact(max_memory)} is larger than the VM's memory "
            f"({format_size_exact(memory)})",
        )
    if min_memory > max_memory:
        raise ctx.error(
            f"{key}.min_memory",
            f"{format_size_exact(min_memory)} is larger than max_memory "
            f"({format_size_exact(max_memory)})",
        )
    shares_raw = raw.get("shares", DEFAULT_SHARES)
    if isinstance(shares_raw, bool) or not isinstance(shares_raw, int):
        raise ctx.error(f"{key}.shares",
                        f"expected a positive integer, got {_describe(shares_raw)}")
    if shares_raw <= 0:
        raise ctx.error(f"{key}.shares", f"{shares_raw!r} must be a positive integer")
    initial_balloon = ctx.size(f"{key}.initial_balloon", raw.get("initial_balloon", 0))
    if memory - initial_balloon < min_memory:
        raise ctx.error(
            f"{key}.initial_balloon",
            f"{format_size_exact(initial_balloon)} would leave the VM below min_memory "
            f"({format_size_exact(min_memory)})",
        )
    kernel_image = None
    if "kernel_image" in raw:
        kernel_image = ctx.size(f"{key}.kernel_image", raw["kernel_image"])
        memmap = -(-(memory // PAGE_SIZE) * 64 // PAGE_SIZE)  # a 64-byte struct page each
        if kernel_image == 0 or kernel_image // PAGE_SIZE + memmap >= memory // PAGE_SIZE:
            raise ctx.error(
                f"{key}.kernel_image",
                f"{format_size_exact(kernel_image)} plus the memmap ({memmap} pages) leaves no "
                f"room in the VM's {format_size_exact(memory)}" if kernel_image else
                "must be larger than 0 (omit it for the default)")
    return VmConfig(
        name=name,
        memory=memory,
        kernel_image=kernel_image,
        features=tuple(features),
        wire=wire,
        stats_interval=stats_interval,
        guest_swap=guest_swap,
        on_crash=on_crash,
        tasks=tasks,
        min_memory=min_memory,
        max_memory=max_memory,
        shares=shares_raw,
        initial_balloon=initial_balloon,
        disk=disk,
    )


def _parse_document(doc: Mapping[str, Any], source: str) -> Topology:
    # Every problem is collected (ctx.collect, and unknown keys) and all are raised together
    # at the end, so that one `validate` run shows each of them.
    ctx = _Ctx(source)
    ctx.check_keys(doc, _TOP_KEYS, "")
    host: HostConfig | None = None
    if "host" not in doc:
        ctx.errors.append(
            ctx.error("host", "missing: a [host] table with at least memory = \"...\""))
    else:
        host = ctx.collect(lambda: _parse_host(ctx, ctx.table(doc["host"], "host")))
    raw_vms = doc.get("vm")
    parsed: list[tuple[int, VmConfig]] = []
    if raw_vms is None or raw_vms == []:
        ctx.errors.append(ctx.error("vm", "no VMs: add at least one [[vm]] table"))
    elif not isinstance(raw_vms, list):
        ctx.errors.append(ctx.error("vm", "expected an array of tables: write [[vm]], not [vm]"))
    else:
        for i, v in enumerate(raw_vms):
            vm = ctx.collect(_parse_vm, ctx, v, f"vm[{i}]", host)
            if vm is not None:
                parsed.append((i, vm))
    cost: dict[str, Any] = {}
    if "cost" in doc:
        try:
            cost = normalize_cost(doc["cost"])
        except CostError as e:
            ctx.errors.append(ctx.error(e.key, e.problem, e.suggestion))
    vms = tuple(replace(vm, cost=cost) if cost else vm for _, vm in parsed)
    seen: dict[str, int] = {}
    for i, vm in parsed:
        if vm.name in seen:
            ctx.errors.append(ctx.error(
                f"vm[{i}].name", f"duplicate VM name {vm.name!r} (also vm[{seen[vm.name]}])"))
        else:
            seen[vm.name] = i
    schedule: tuple[Any, ...] = ()
    # The schedule names VMs: check it only against a complete list of them.
    if "schedule" in doc and host is not None and isinstance(raw_vms, list) \
            and len(parsed) == len(raw_vms):
        schedule = ctx.collect(_parse_schedule, ctx, doc["schedule"], host, vms) or ()
    if ctx.errors:
        raise TopologyError.several(ctx.errors)
    assert host is not None
    return Topology(host=host, vms=vms, source=source, schedule=schedule, cost=cost,
                    warnings=tuple(ctx.warnings))


def parse_topology(text: str, source: str = "<string>") -> Topology:
    """Parse and validate topology TOML *text*; errors name *source*."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(source, e) from None
    return _parse_document(doc, source)


_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _syntax_error(source: str, e: tomllib.TOMLDecodeError) -> TopologyError:
    msg = str(e)
    m = _TOML_POS_RE.search(msg)
    if m:
        return TopologyError(source, f"line {m.group(1)}, column {m.group(2)}",
                             f"TOML syntax error: {msg[: m.start()]}")
    return TopologyError(source, "(toml)", f"TOML syntax error: {msg}")


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read and validate the topology file at *path*.

    A missing/unreadable file or a TOML syntax error (with its line) is a ``TopologyError``.
    """
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = "no such file"
        if os.sep not in source and not source.endswith(".toml"):
            names = [n for n, _ in list_examples()]
            if source in names:
                hint += f"; the shipped example is at {example_path(source)}"
            else:
                hint += "; `balloonlab topologies` lists the shipped examples"
        raise TopologyError(source, "(file)", hint) from None
    except IsADirectoryError:
        raise TopologyError(source, "(file)", "is a directory, not a topology file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(source, "(file)", f"cannot read: {e}") from None
    return parse_topology(text, source)


def default_topology() -> Topology:
    """The default topology (shipped as ``default.toml``); its source is ``"<default>"``."""
    return parse_topology(example_path("default").read_text(encoding="utf-8"), "<default>")


def example_path(name: str) -> Path:
    """Path of the shipped example *name* (with or without ``.toml``)."""
    stem = name[:-5] if name.endswith(".toml") else name
    path = TOPOLOGIES_DIR / f"{stem}.toml"
    if not NAME_RE.fullmatch(stem) or not path.is_file():
        known = [n for n, _ in list_examples()]
        close = difflib.get_close_matches(stem, known, n=1, cutoff=0.6)
        raise TopologyError(
            "<examples>",
            stem,
            f"no shipped topology of that name (known: {', '.join(known)})",
            close[0] if close else None,
        )
    return path


def list_examples() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of each shipped topology, sorted by name.

    The description is the first comment line of the file.
    """
    out = []
    for path in sorted(TOPOLOGIES_DIR.glob("*.toml")):
        desc = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                desc = line.lstrip("#").strip()
                break
        out.append((path.stem, desc))
    return out


# --------------------------------------------------------------------------------------------
# Writing (for recording the topology a run used)
# --------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _toml_duration(seconds: float) -> str:
    text = format_duration(seconds)
    return json.dumps(text) if parse_duration(text) == seconds else _toml_value(float(seconds))


def _task_lines(task: TaskConfig) -> list[str]:
    lines = [
        f"workload = {_toml_value(task.workload)}",
        f"size = {_toml_value(format_size_exact(task.size))}",
        f"skew = {_toml_value(task.skew)}",
        f"write_ratio = {_toml_value(task.write_ratio)}",
    ]
    if task.rate is not None:
        lines.append(f"rate = {_toml_value(task.rate)}")
    lines += [
        f"hot_fraction = {_toml_value(task.hot_fraction)}",
        f"hot_prob = {_toml_value(task.hot_prob)}",
    ]
    if task.duration is not None:
        lines.append(f"duration = {_toml_duration(task.duration)}")
    lines.append(f"start = {_toml_duration(task.start)}")
    if task.hold is not None:
        lines.append(f"hold = {_toml_duration(task.hold)}")
    if task.workload == "fileio":
        lines = [ln for ln in lines if not ln.startswith("size = ")]
        lines += [f"files = {task.files}",
                  f"file_size = {_toml_value(format_size_exact(task.file_size))}"]
    return lines


def _to_toml(topo: Topology) -> str:
    h = topo.host
    out = [
        f"# topology written by balloonlab from {topo.source}",
        "[host]",
        f"name = {_toml_value(h.name)}",
        f"memory = {_toml_value(format_size_exact(h.memory))}",
        f"swap = {_toml_value(format_size_exact(h.swap))}",
        f"policy = {_toml_value(h.policy)}",
        f"policy_interval = {_toml_duration(h.policy_interval)}",
        f"seed = {h.seed}",
    ]
    if h.run_dir is not None:
        out.append(f"run_dir = {_toml_value(h.run_dir)}")
    if h.metrics is not None:
        out.append(f"metrics = {_toml_value(h.metrics)}")
    if h.policy_params:
        out += ["", "[host.policy_params]"]
        out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in h.policy_params.items()]
    for vm in topo.vms:
        out += [
            "",
            "[[vm]]",
            f"name = {_toml_value(vm.name)}",
            f"memory = {_toml_value(format_size_exact(vm.memory))}",
            f"features = {_toml_value(list(vm.features))}",
            f"wire = {_toml_value(vm.wire)}",
            f"stats_interval = {_toml_duration(vm.stats_interval)}",
            f"guest_swap = {_toml_value(format_size_exact(vm.guest_swap))}",
            f"on_crash = {_toml_value(vm.on_crash)}",
            f"min_memory = {_toml_value(format_size_exact(vm.min_memory))}",
            f"max_memory = {_toml_value(format_size_exact(vm.max_memory))}",
            f"shares = {vm.shares}",
            f"initial_balloon = {_toml_value(format_size_exact(vm.initial_balloon))}",
        ]
        if vm.kernel_image is not None:
            out.append(f"kernel_image = {_toml_value(format_size_exact(vm.kernel_image))}")
        if vm.disk:
            out.append(f"disk = {_toml_value(format_size_exact(vm.disk))}")
        for task in vm.tasks:
            out += ["", "[[vm.task]]", *_task_lines(task)]
            if task.phases:
                # Phases are written as an array of inline tables: TOML has no nested
                # array-of-tables syntax that stays readable here.
                out.append("phases = [")
                for p in task.phases:
                    out.append("  {" + ", ".join(_task_lines(p)) + "},")
                out.append("]")
    if topo.cost:
        out += ["", "[cost]"]
        for k, v in topo.cost.items():
            if k not in DEVICE_KEYS:
                out.append(f"{k} = {_toml_value(format_ns(v))}")
            elif isinstance(v, str):
                out.append(f"{k} = {_toml_value(v)}")
            else:
                out.append(f"{k} = {{latency = {_toml_value(format_ns(v['latency']))}, "
                           f"bandwidth = {v['bandwidth']}}}")
    if topo.schedule:
        out += _schedule_toml(topo.schedule)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ [[schedule]]


def _parse_schedule(ctx: _Ctx, raw: Any, host: HostConfig,
                   vms: Sequence[VmConfig]) -> tuple[ScheduleEntry, ...]:
    """Validate the ``schedule`` array of tables; errors name ``schedule[i].key``."""
    if not isinstance(raw, list):
        raise ctx.error("schedule", "expected an array of tables: write [[schedule]], "
                        "not [schedule]")
    by_name = {v.name: v for v in vms}
    out = []
    for i, item in enumerate(raw):
        # Each entry on its own: a bad one does not hide the problems of the next.
        entry = ctx.collect(_parse_entry, ctx, f"schedule[{i}]", item, by_name)
        if entry is not None:
            out.append(entry)
    return tuple(out)


def _parse_entry(ctx: _Ctx, key: str, item: Any,
                 by_name: Mapping[str, VmConfig]) -> ScheduleEntry:
    t = ctx.table(item, key)
    if "action" not in t:
        raise ctx.error(f"{key}.action", f"missing: one of {', '.join(ACTIONS)}")
    action = ctx.enum(f"{key}.action", t["action"], tuple(ACTIONS))
    need = ACTIONS[action]
    ctx.check_keys(t, ("at", "action", *need, *OPTIONAL.get(action, ())), key)
    if "at" not in t:
        raise ctx.error(f"{key}.at", "missing: when to act, after the host started "
                        "(e.g. at = \"10s\")")
    at = ctx.duration(f"{key}.at", t["at"])
    if at < 0:
        raise ctx.error(f"{key}.at", "must not be negative")
    for k in need:
        if k not in t:
            raise ctx.error(f"{key}.{k}", f"missing: {action} needs {' and '.join(need)}")
    if action == "set_policy":
        return _parse_set_policy(ctx, key, t, at)
    vm_name = ctx.string(f"{key}.vm", t["vm"])
    vm = by_name.get(vm_name)
    if vm is None:
        close = difflib.get_close_matches(vm_name, list(by_name), n=1, cutoff=0.6)
        raise ctx.error(f"{key}.vm", f"no VM {vm_name!r} in this topology "
                        f"(VMs: {', '.join(by_name)})", close[0] if close else None)
    size = ctx.size(f"{key}.size", t["size"])
    if size > vm.memory:
        raise ctx.error(f"{key}.size", f"{t['size']!r} is larger than VM {vm.name!r}'s "
                        f"memory ({format_size_exact(vm.memory)})")
    return ScheduleEntry(at=at, action=action, vm=vm.name, size=size)


def _parse_set_policy(ctx: _Ctx, key: str, t: Mapping[str, Any], at: float) -> ScheduleEntry:
    name = ctx.string(f"{key}.name", t["name"])
    if name not in BUILTIN_POLICIES and not _POLICY_PATH_RE.fullmatch(name):
        close = difflib.get_close_matches(name, BUILTIN_POLICIES, n=1, cutoff=0.6)
        raise ctx.error(f"{key}.name", f"{name!r} is neither a built-in policy "
                        f"({', '.join(BUILTIN_POLICIES)}) nor a 'package.module:Class' path",
                        close[0] if close else None)
    params = dict(ctx.table(t.get("params", {}), f"{key}.params"))
    for k, v in params.items():
        _check_plain(ctx, f"{key}.params.{k}", v)
    if name in BUILTIN_POLICIES:
        from hypervisor.policies import load_policy

        try:
            load_policy(name, params)
        except ValueError as e:
            raise ctx.error(f"{key}.params", str(e)) from None
    return ScheduleEntry(at=at, action="set_policy", name=name, params=params)


def _schedule_toml(entries: Sequence[ScheduleEntry]) -> list[str]:
    """TOML lines of *entries* (``[[schedule]]`` tables), read back equal by the parser."""
    out: list[str] = []
    for e in entries:
        out += ["", "[[schedule]]", f"at = {_toml_duration(e.at)}",
                f"action = {_toml_value(e.action)}"]
        if e.action == "set_policy":
            out.append(f"name = {_toml_value(e.name)}")
            if e.params:
                out.append(f"params = {_toml_value(dict(e.params))}")
        else:
            assert e.size is not None
            out += [f"vm = {_toml_value(e.vm)}", f"size = {_toml_value(format_size_exact(e.size))}"]
    return out
