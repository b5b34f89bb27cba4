"""Experiment definitions: a topology template, a grid of parameters and seeds, the
measurements to take and the published figures to compare with.

A definition is a TOML file (the shipped ones live beside this module; ``balloonlab sweep
FILE`` reads a user's own)::

    [experiment]
    name = "vswapper"
    title = "..."                 # one line
    description = "..."           # a paragraph, for the report
    duration = "40s"              # each trial runs its host this long after every VM is up
    needs = []                    # features of the build it needs, e.g. ["fileio"]

    [grid]                        # the trials: every combination of the axes, per seed
    seed = [1, 2, 3]
    cap = ["host-swap", "balloon"]        # an axis of labels, set by [variant.cap.*]
    "host.policy" = ["none", "mom"]       # or an axis over a topology key (a dotted path)

    [quick]                       # --quick: replaces grid axes and duration (fewer, shorter)
    duration = "20s"
    seed = [1, 2]

    [variant.cap.balloon]         # what the label `balloon` of axis `cap` sets in the topology
    "vm.g.initial_balloon" = "64MiB"

    [measure]
    vm = ["modelled_seconds", "modelled_throughput"]    # per VM (catalogue: VM_MEASURES)
    host = ["peak_swap_pages"]                          # host-wide (HOST_MEASURES)
    optional_vm = ["refaults"]    # read from dommemstat/counters when the build has them

    [[published]]                 # figures from the literature, compared in the report
    figure = "..."                # what the source says, in words
    source = "..."                # where (paper, section, or secondary source)
    confirmed = true              # false: taken from a secondary source, not the paper itself
    note = "..."
    value = 5.8                   # optional: the number to compare ours with
    ours = { measure = "vm.g3.modelled_seconds",
             ratio = [{ reporting = "off" }, { reporting = "on" }] }

    [topology]                    # a topology (docs/topology.md) as sub-tables
    [topology.host] ...
    [[topology.vm]] ...

Dotted paths address the topology document: ``host.policy``, ``vm.NAME.KEY`` (a VM by its
name, or ``vm.0.KEY`` by index), ``vm.NAME.task.0.size``. Every problem is one line naming
the file and the key (``SpecError``), like a topology's.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hypervisor.topology import Topology, TopologyError
from hypervisor.topology import _parse_document as parse_topology_document
from hypervisor.units import parse_duration

__all__ = [
    "HOST_MEASURES",
    "VM_MEASURES",
    "Definition",
    "Published",
    "SpecError",
    "Trial",
    "definition_dir",
    "list_definitions",
    "load_definition",
    "parse_definition",
    "shipped",
]

#: Per-VM measurements every trial takes (the definition picks which its report shows).
VM_MEASURES: dict[str, str] = {
    "modelled_seconds": "the VM's modelled time at the end (its tasks' clocks added), s",
    "modelled_throughput": "accesses per modelled second over the run",
    "wall_throughput": "accesses per wall-clock second over the run",
    "ops": "memory accesses done during the run",
    "guest_swap_out_bytes": "bytes the guest wrote to its swap",
    "guest_swap_in_bytes": "bytes the guest read back from its swap",
    "major_faults": "guest major faults (swap-ins)",
    "oom_kills": "guest OOM kills",
    "peak_backed_pages": "most host frames the VM held",
    "final_backed_pages": "host frames the VM held at the end",
    "min_backed_pages": "fewest host frames the VM held after its first stats",
    "peak_balloon_pages": "largest balloon",
    "peak_host_swapped_pages": "most of its pages in host swap at once",
    "host_swap_out_pages": "pages the host swapped out of this VM",
    "host_swap_in_pages": "pages the host swapped back in for this VM",
    "balloon_targets": "balloon target changes (policy, manual, schedule)",
    "balloon_moves": "inflate and deflate batches the driver sent",
    "inflated_pages": "pages inflated",
    "deflated_pages": "pages deflated",
    "reported_pages": "pages returned by free page reporting",
    "corrupted_reads": "reads that found a wrong stamp (must be 0)",
}

#: Host-wide measurements.
HOST_MEASURES: dict[str, str] = {
    "peak_swap_pages": "most host swap slots in use at once",
    "final_swap_pages": "host swap slots in use at the end",
    "swap_out_pages": "pages the host swapped out (all VMs)",
    "swap_in_pages": "pages the host swapped back in (all VMs)",
    "peak_frames_used": "most host frames in use at once",
    "oom_kills": "host OOM kills",
    "guest_oom_kills": "guest OOM kills (all VMs)",
    "balloon_moves": "inflate and deflate batches (all VMs)",
    "balloon_targets": "balloon target changes (all VMs)",
    "corrupted_reads": "corrupted reads (all VMs; must be 0)",
}

_TOP_KEYS = ("experiment", "grid", "quick", "variant", "measure", "published", "topology",
             "plot")
_EXPERIMENT_KEYS = ("name", "title", "description", "duration", "needs")
_MEASURE_KEYS = ("vm", "host", "optional_vm")
_PUBLISHED_KEYS = ("figure", "source", "confirmed", "note", "value", "ours")
_OURS_KEYS = ("measure", "per", "ratio", "where", "scale")
_PLOT_KEYS = ("timeseries", "where", "metric")
#: Features a definition may say it needs, and how to tell whether this build has them.
KNOWN_NEEDS = ("fileio", "pathology_counters")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")


class SpecError(ValueError):
    """A definition is invalid: one line per problem, each naming the file and the key."""


@dataclass(frozen=True)
class Published:
    figure: str
    source: str
    confirmed: bool
    note: str = ""
    value: float | None = None
    #: How to compute ours: measure (a result column), and either ``ratio`` (two param
    #: filters: median of the first over the median of the second) or ``where`` (one filter).
    ours: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Trial:
    """One run: a topology (TOML text, host name and seed still to be set) for a duration."""

    experiment: str
    trial_id: str
    params: Mapping[str, Any]
    seed: int
    duration: float
    topology_doc: Mapping[str, Any]
    source: str
    optional_vm: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "trial_id": self.trial_id,
                "params": dict(self.params), "seed": self.seed, "duration": self.duration,
                "topology_doc": self.topology_doc, "source": self.source,
                "optional_vm": list(self.optional_vm), "needs": list(self.needs)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Trial:
        return cls(experiment=d["experiment"], trial_id=d["trial_id"], params=d["params"],
                   seed=d["seed"], duration=d["duration"], topology_doc=d["topology_doc"],
                   source=d["source"], optional_vm=tuple(d.get("optional_vm", ())),
                   needs=tuple(d.get("needs", ())))

    def topology(self) -> Topology:
        """The trial's topology, validated (``TopologyError`` when the build rejects it)."""
        return parse_topology_document(self.topology_doc, self.source)

    @property
    def vms(self) -> int:
        return len(self.topology_doc.get("vm", []))


@dataclass(frozen=True)
class Definition:
    name: str
    title: str
    description: str
    source: str
    duration: float
    quick_duration: float
    needs: tuple[str, ...]
    grid: Mapping[str, Sequence[Any]]
    quick_grid: Mapping[str, Sequence[Any]]
    variants: Mapping[str, Mapping[str, Mapping[str, Any]]]
    vm_measures: tuple[str, ...]
    host_measures: tuple[str, ...]
    optional_vm: tuple[str, ...]
    published: tuple[Published, ...]
    topology: Mapping[str, Any]
    plot: Mapping[str, Any] = field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        """The grid's axes other than ``seed``, in file order."""
        return [k for k in self.grid if k != "seed"]

    def trials(self, *, quick: bool = False,
               where: Mapping[str, str] | None = None) -> list[Trial]:
        """Every trial of the grid (the quick grid with ``quick``), optionally only those
        whose parameters match ``where`` (values compared as text)."""
        grid = {**self.grid, **(self.quick_grid if quick else {})}
        duration = self.quick_duration if quick else self.duration
        axes = [k for k in grid if k != "seed"]
        seeds = list(grid.get("seed", [0]))
        out = []
        for combo in itertools.product(*(grid[a] for a in axes)):
            params = dict(zip(axes, combo))
            doc = copy.deepcopy(dict(self.topology))
            for axis, value in params.items():
                if axis in self.variants:
                    for path, v in self.variants[axis][str(value)].items():
                        _set_path(doc, path, v, self.source, f"variant.{axis}.{value}")
                else:
                    _set_path(doc, axis, value, self.source, f"grid.{axis}")
            for seed in seeds:
                if where and any(str({**params, "seed": seed}.get(k)) != v
                                 for k, v in where.items()):
                    continue
                out.append(Trial(
                    experiment=self.name, trial_id=_trial_id(self.name, params, seed, duration,
                                                             doc),
                    params=params, seed=int(seed), duration=duration, topology_doc=doc,
                    source=f"{self.source} [topology]", optional_vm=self.optional_vm,
                    needs=self.needs))
        return out


def _trial_id(name: str, params: Mapping[str, Any], seed: int, duration: float,
              doc: Mapping[str, Any]) -> str:
    """A readable, stable id: the labels, the seed, and a hash of everything that makes the
    trial (so an edited definition gives new trials instead of reusing old results)."""
    h = hashlib.sha256(json.dumps([name, dict(params), seed, duration, doc], sort_keys=True,
                                  default=str).encode()).hexdigest()[:8]
    labels = "-".join(re.sub(r"[^a-z0-9]+", "_", str(v).lower()).strip("_") for v in
                      params.values())
    return f"{name}--{labels + '-' if labels else ''}s{seed}-{h}"


def _set_path(doc: dict[str, Any], path: str, value: Any, source: str, key: str) -> None:
    """Set ``value`` at dotted ``path`` of the topology document."""
    parts = path.split(".")
    cur: Any = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            idx = _list_index(cur, part)
            if idx is None:
                names = [str(x.get("name")) for x in cur if isinstance(x, dict)]
                raise SpecError(f"{source}: {key}: no {'.'.join(parts[:i]) or 'item'} "
                                f"{part!r} in the topology (have: {', '.join(names) or 'none'})")
            if last:
                cur[idx] = copy.deepcopy(value)
                return
            cur = cur[idx]
        elif isinstance(cur, dict):
            if last:
                cur[part] = copy.deepcopy(value)
                return
            if part not in cur:
                cur[part] = {}
            cur = cur[part]
        else:
            raise SpecError(f"{source}: {key}: {'.'.join(parts[:i])} is not a table")


def _list_index(items: list[Any], part: str) -> int | None:
    if part.isdigit():
        return int(part) if int(part) < len(items) else None
    for i, x in enumerate(items):
        if isinstance(x, dict) and x.get("name") == part:
            return i
    return None


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _suggest(word: str, allowed: Iterable[str]) -> str:
    import difflib

    m = difflib.get_close_matches(word, list(allowed), n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


class _Errors:
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, key: str, problem: str) -> None:
        self.lines.append(f"{self.source}: {key}: {problem}")

    def keys(self, table: Mapping[str, Any], allowed: Sequence[str], prefix: str) -> None:
        for k in table:
            if k not in allowed:
                self.add(f"{prefix}{k}", f"unknown key (allowed: {', '.join(allowed)})"
                         + _suggest(k, allowed))

    def duration(self, key: str, value: Any) -> float:
        try:
            d = parse_duration(value, field=key)
        except (ValueError, TypeError) as e:
            self.add(key, str(e))
            return 0.0
        if d <= 0:
            self.add(key, "must be > 0")
        return d


def parse_definition(text: str, source: str) -> Definition:
    """Parse and validate a definition; every problem at once in one ``SpecError``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: TOML syntax error: {e}") from None
    err = _Errors(source)
    err.keys(doc, _TOP_KEYS, "")
    exp = doc.get("experiment")
    if not isinstance(exp, dict):
        err.add("experiment", "missing: a table with at least name and duration")
        exp = {}
    err.keys(exp, _EXPERIMENT_KEYS, "experiment.")
    name = exp.get("name", "")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        err.add("experiment.name", f"{name!r} is not a name ([a-z0-9][a-z0-9_-]*, at most 48)")
    duration = err.duration("experiment.duration", exp.get("duration", 0))
    needs = exp.get("needs", [])
    if not isinstance(needs, list) or any(n not in KNOWN_NEEDS for n in needs):
        err.add("experiment.needs", f"{needs!r}: a list of {', '.join(KNOWN_NEEDS)}")
        needs = []

    topo = doc.get("topology")
    if not isinstance(topo, dict):
        err.add("topology", "missing: the topology template ([topology.host], [[topology.vm]])")
        topo = {}

    variants_raw = doc.get("variant", {})
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    if not isinstance(variants_raw, dict):
        err.add("variant", "must be a table of axes")
    else:
        for axis, labels in variants_raw.items():
            if not isinstance(labels, dict) or not all(isinstance(v, dict)
                                                       for v in labels.values()):
                err.add(f"variant.{axis}", "must be tables [variant.AXIS.LABEL] of "
                        "dotted topology paths")
                continue
            variants[axis] = labels

    grid = _parse_grid(err, doc.get("grid"), "grid", variants, required=True)
    quick_raw = doc.get("quick", {})
    quick_duration = duration
    if not isinstance(quick_raw, dict):
        err.add("quick", "must be a table")
        quick_raw = {}
    quick_axes = {k: v for k, v in quick_raw.items() if k != "duration"}
    if "duration" in quick_raw:
        quick_duration = err.duration("quick.duration", quick_raw["duration"])
    for k in quick_axes:
        if k not in grid:
            err.add(f"quick.{k}", "not an axis of [grid] (quick only replaces axes)"
                    + _suggest(k, grid))
    quick_grid = _parse_grid(err, quick_axes, "quick", variants, required=False)

    for axis in variants:
        if axis not in grid:
            err.add(f"variant.{axis}", "no such axis in [grid]" + _suggest(axis, grid))

    measure = doc.get("measure", {})
    if not isinstance(measure, dict):
        err.add("measure", "must be a table")
        measure = {}
    err.keys(measure, _MEASURE_KEYS, "measure.")
    vm_m = _names(err, measure.get("vm", []), "measure.vm", VM_MEASURES)
    host_m = _names(err, measure.get("host", []), "measure.host", HOST_MEASURES)
    opt = measure.get("optional_vm", [])
    if not isinstance(opt, list) or not all(isinstance(x, str) for x in opt):
        err.add("measure.optional_vm", "must be a list of field names")
        opt = []

    published = []
    pubs = doc.get("published", [])
    if not isinstance(pubs, list):
        err.add("published", "must be an array of tables [[published]]")
        pubs = []
    for i, p in enumerate(pubs):
        key = f"published[{i}]"
        if not isinstance(p, dict):
            err.add(key, "must be a table")
            continue
        err.keys(p, _PUBLISHED_KEYS, f"{key}.")
        for req in ("figure", "source"):
            if not isinstance(p.get(req), str):
                err.add(f"{key}.{req}", "missing: text")
        if not isinstance(p.get("confirmed", False), bool):
            err.add(f"{key}.confirmed", "must be true or false")
        ours = p.get("ours")
        if ours is not None:
            if not isinstance(ours, dict) or "measure" not in ours:
                err.add(f"{key}.ours", "must be a table with measure (and ratio or where)")
                ours = None
            else:
                err.keys(ours, _OURS_KEYS, f"{key}.ours.")
                r = ours.get("ratio")
                if r is not None and (not isinstance(r, list) or len(r) != 2):
                    err.add(f"{key}.ours.ratio", "must be two parameter filters")
        value = p.get("value")
        if value is not None and not isinstance(value, int | float):
            err.add(f"{key}.value", "must be a number")
        published.append(Published(figure=str(p.get("figure", "")),
                                   source=str(p.get("source", "")),
                                   confirmed=bool(p.get("confirmed", False)),
                                   note=str(p.get("note", "")),
                                   value=None if value is None else float(value), ours=ours))
    plot = doc.get("plot", {})
    if not isinstance(plot, dict):
        err.add("plot", "must be a table")
        plot = {}
    err.keys(plot, _PLOT_KEYS, "plot.")

    if err.lines:
        raise SpecError("\n".join(err.lines))
    defn = Definition(
        name=name, title=str(exp.get("title", name)), description=str(exp.get("description", "")),
        source=source, duration=duration, quick_duration=quick_duration, needs=tuple(needs),
        grid=grid, quick_grid=quick_grid, variants=variants, vm_measures=vm_m,
        host_measures=host_m, optional_vm=tuple(opt), published=tuple(published),
        topology=topo, plot=plot)
    # Expand once: a path that does not exist in the template is an error now, not mid-run.
    defn.trials()
    defn.trials(quick=True)
    return defn


def _parse_grid(err: _Errors, raw: Any, prefix: str,
                variants: Mapping[str, Mapping[str, Any]], *, required: bool
                ) -> dict[str, list[Any]]:
    if raw is None:
        if required:
            err.add(prefix, "missing: the parameter grid, e.g. [grid] seed = [1, 2, 3]")
        return {}
    if not isinstance(raw, dict):
        err.add(prefix, "must be a table of axes, each a list of values")
        return {}
    if required and not raw:
        err.add(prefix, "empty grid: give at least one axis, e.g. seed = [1, 2, 3]")
    out: dict[str, list[Any]] = {}
    for axis, values in raw.items():
        key = f"{prefix}.{axis}"
        if not isinstance(values, list):
            err.add(key, "must be a list of values")
            continue
        if not values:
            err.add(key, "empty grid axis: no trial would run")
            continue
        if axis == "seed" and not all(isinstance(s, int) and not isinstance(s, bool)
                                      and 0 <= s < 2**63 for s in values):
            err.add(key, "seeds must be integers in [0, 2^63)")
            continue
        if axis in variants:
            for v in values:
                if str(v) not in variants[axis]:
                    err.add(key, f"{v!r} has no [variant.{axis}.{v}] table"
                            + _suggest(str(v), variants[axis]))
        elif axis != "seed" and not (axis.startswith("host.") or axis.startswith("vm.")
                                     or axis.startswith("cost.")):
            err.add(key, "unknown axis: a topology path (host.*, vm.NAME.*, cost.*) "
                    "or an axis with [variant.AXIS.LABEL] tables")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            err.add(key, "repeated value")
        out[axis] = values
    return out


def _names(err: _Errors, value: Any, key: str, allowed: Mapping[str, str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        err.add(key, "must be a list of measurement names")
        return ()
    for x in value:
        if x not in allowed:
            err.add(key, f"unknown measurement {x!r} (known: {', '.join(allowed)})"
                    + _suggest(x, allowed))
    return tuple(x for x in value if x in allowed)


def load_definition(path: str | Path) -> Definition:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read: {e}") from None
    return parse_definition(text, str(p))


def definition_dir() -> Path:
    """Where the shipped definitions live (package data)."""
    return Path(str(resources.files("balloonlab.experiments")))


def list_definitions() -> list[Path]:
    return sorted(definition_dir().glob("*.toml"))


def shipped(name: str) -> Definition:
    """The shipped definition called ``name``."""
    names = {p.stem: p for p in list_definitions()}
    if name not in names:
        raise SpecError(f"no experiment {name!r} (shipped: {', '.join(sorted(names))})"
                        + _suggest(name, names))
    return load_definition(names[name])


def build_has(need: str) -> bool:
    """Whether this build has ``need`` (one of :data:`KNOWN_NEEDS`)."""
    if need == "fileio":
        from hypervisor.topology import WORKLOADS

        return "fileio" in WORKLOADS
    if need == "pathology_counters":
        import importlib.util

        return importlib.util.find_spec("hypervisor.pathologies") is not None
    return False


def check_topology(trial: Trial) -> str | None:
    """None when this build accepts the trial's topology, else one line saying why not: the
    needs the build lacks, when the definition declared some, or the loader's complaint."""
    try:
        trial.topology()
    except TopologyError as e:
        first = str(e).splitlines()[0]
        if trial.needs and not all(build_has(n) for n in trial.needs):
            return (f"{trial.experiment} needs the {' and '.join(trial.needs)} "
                    f"{'workload' if 'fileio' in trial.needs else 'feature'}, which this build "
                    f"does not have ({first})")
        return first
    return None
