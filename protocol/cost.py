"""The ``[cost]`` table of a topology: keys, defaults, device presets, parsing.

Shared by the topology parser (which validates the table and passes it to each guest in its
``--config``) and the guest kernel (whose :mod:`guest.cost` charges these costs to its tasks'
modelled clocks).  Neither side imports the other, so the schema lives here.

Units: times are integer nanoseconds, bandwidths integer bytes per second.  A time is written
as a non-negative number of nanoseconds or a string with a unit (``"100ns"``, ``"0.75us"``,
``"3µs"``, ``"8ms"``, ``"1s"``); a bandwidth as a number of bytes/s or a string such as
``"500MB/s"``, ``"2.5GB/s"`` or ``"150MiB/s"``.  A device is a preset name (``nvme``, ``ssd``,
``hdd``) or a table ``{latency = "90us", bandwidth = "500MB/s"}``.

:func:`normalize_cost` turns a raw table into the normal form: times as ints (ns), devices as
a preset name or ``{"latency": ns, "bandwidth": bytes_per_s}``; it accepts its own output, so
the guest can check the table it is handed again.  Every problem is a :class:`CostError`
naming the key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol.constants import PAGE_SIZE

__all__ = [
    "COST_DEFAULTS",
    "COST_KEYS",
    "DEVICE_KEYS",
    "DEVICE_PRESETS",
    "MAX_TIME_NS",
    "CostError",
    "Device",
    "format_ns",
    "normalize_cost",
    "parse_bandwidth",
    "parse_ns",
    "resolve_device",
]


class CostError(ValueError):
    """A bad ``[cost]`` entry; ``key`` names it (``cost.memory_access``)."""

    def __init__(self, key: str, problem: str, suggestion: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.suggestion = suggestion
        super().__init__(f"{key}: {problem}")


@dataclass(frozen=True)
class Device:
    """A block device as the cost model sees it: a fixed per-I/O latency plus transfer time."""

    latency_ns: int
    bandwidth: int  # bytes per second

    def io_ns(self, pages: int) -> int:
        """Modelled time of one I/O moving ``pages`` pages (0 pages: no I/O, no time)."""
        if pages <= 0:
            return 0
        return self.latency_ns + pages * PAGE_SIZE * 1_000_000_000 // self.bandwidth


#: Device presets: per-I/O latency (ns) and sustained bandwidth (bytes/s).  Sources in
#: docs/architecture.md, "Cost model".
DEVICE_PRESETS: dict[str, Device] = {
    "nvme": Device(latency_ns=15_000, bandwidth=2_500_000_000),
    "ssd": Device(latency_ns=90_000, bandwidth=500_000_000),
    "hdd": Device(latency_ns=8_000_000, bandwidth=150_000_000),
}

#: The time keys and their defaults (ns); the device keys and theirs (a preset name).
COST_DEFAULTS: dict[str, int | str] = {
    "memory_access": 100,  # one DRAM access
    "minor_fault": 750,  # a guest page fault that maps a fresh page (without zeroing it)
    "page_zero": 1_000,  # zeroing one 4 KiB page (memset at ~4 GB/s)
    "ept_exit": 3_000,  # one EPT-violation exit: exit, host fault handling, entry
    "ept_page": 250,  # per page the host backs in one exit (frame allocation, EPT update)
    "guest_swap_device": "ssd",
    "host_swap_device": "ssd",
    "disk_device": "ssd",
}
DEVICE_KEYS = ("guest_swap_device", "host_swap_device", "disk_device")
COST_KEYS = tuple(COST_DEFAULTS)
#: Anything above this (one minute per event) is taken for a typo, not a model.
MAX_TIME_NS = 60 * 1_000_000_000
#: Bandwidth bounds: 1 KB/s to 1 TB/s.
MIN_BANDWIDTH = 1_000
MAX_BANDWIDTH = 10**12

_NUM_UNIT = re.compile(r"^\s*(?P<num>-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)\s*"
                       r"(?P<unit>[A-Za-zµ/]*)\s*$")
_TIME_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_BW_UNITS = {"b/s": 1, "kb/s": 10**3, "mb/s": 10**6, "gb/s": 10**9,
             "kib/s": 1 << 10, "mib/s": 1 << 20, "gib/s": 1 << 30}
_TIME_FORMS = "a number of nanoseconds or a string like '100ns', '0.75us', '8ms' (ns, us, ms, s)"
_BW_FORMS = "bytes per second or a string like '500MB/s', '2.5GB/s', '150MiB/s'"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def parse_ns(value: Any, key: str) -> int:
    """A time in integer nanoseconds; :class:`CostError` for anything else, negative or absurd."""
    num = _number(value)
    if num is None:
        if not isinstance(value, str):
            raise CostError(key, f"expected {_TIME_FORMS}, got {value!r}")
        mt = _NUM_UNIT.match(value)
        if mt is None:
            raise CostError(key, f"{value!r} is not a time; expected {_TIME_FORMS}")
        unit = mt["unit"] or "ns"
        if unit not in _TIME_UNITS:
            raise CostError(key, f"{value!r} has unknown unit {unit!r}; expected {_TIME_FORMS}")
        num = float(mt["num"]) * _TIME_UNITS[unit]
    if num != num or num < 0:
        raise CostError(key, f"{value!r} is negative; a cost cannot be")
    if num > MAX_TIME_NS:
        raise CostError(key, f"{value!r} is absurd (more than 60 s per event)")
    return round(num)


def parse_bandwidth(value: Any, key: str) -> int:
    """A bandwidth in integer bytes per second, within 1 KB/s .. 1 TB/s."""
    num = _number(value)
    if num is None:
        if not isinstance(value, str):
            raise CostError(key, f"expected {_BW_FORMS}, got {value!r}")
        mt = _NUM_UNIT.match(value)
        unit = (mt["unit"] if mt is not None else "").lower() or "b/s"
        if mt is None or unit not in _BW_UNITS:
            raise CostError(key, f"{value!r} is not a bandwidth; expected {_BW_FORMS}")
        num = float(mt["num"]) * _BW_UNITS[unit]
    if num != num or num < 0:
        raise CostError(key, f"{value!r} is negative; a bandwidth cannot be")
    if not MIN_BANDWIDTH <= num <= MAX_BANDWIDTH:
        raise CostError(key, f"{value!r} is absurd (expected 1KB/s .. 1000GB/s)")
    return round(num)


def _device(value: Any, key: str) -> str | dict[str, int]:
    if isinstance(value, str):
        if value not in DEVICE_PRESETS:
            close = difflib.get_close_matches(value, DEVICE_PRESETS, n=1, cutoff=0.5)
            raise CostError(key, f"no device preset {value!r} (presets: "
                            f"{', '.join(DEVICE_PRESETS)}; or a table with latency and "
                            "bandwidth)", close[0] if close else None)
        return value
    if not isinstance(value, Mapping):
        raise CostError(key, f"expected a preset name ({', '.join(DEVICE_PRESETS)}) or a "
                        f"table {{latency = ..., bandwidth = ...}}, got {value!r}")
    for k in value:
        if k not in ("latency", "bandwidth"):
            raise CostError(f"{key}.{k}", "unknown key (allowed: latency, bandwidth)")
    for k in ("latency", "bandwidth"):
        if k not in value:
            raise CostError(f"{key}.{k}", "missing: a device table needs latency and bandwidth")
    return {"latency": parse_ns(value["latency"], f"{key}.latency"),
            "bandwidth": parse_bandwidth(value["bandwidth"], f"{key}.bandwidth")}


def normalize_cost(raw: Any, prefix: str = "cost") -> dict[str, Any]:
    """The normal form of a ``[cost]`` table (only the keys given; defaults are not filled
    in).  Raises :class:`CostError` naming ``prefix.key`` on the first problem."""
    if not isinstance(raw, Mapping):
        raise CostError(prefix, f"expected a table, got {raw!r}")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}"
        if k not in COST_DEFAULTS:
            close = difflib.get_close_matches(str(k), COST_KEYS, n=1, cutoff=0.6)
            raise CostError(key, f"unknown key (allowed: {', '.join(COST_KEYS)})",
                            close[0] if close else None)
        out[k] = _device(v, key) if k in DEVICE_KEYS else parse_ns(v, key)
    return out


def resolve_device(value: str | Mapping[str, int]) -> Device:
    """The :class:`Device` of a normalised device entry."""
    if isinstance(value, str):
        return DEVICE_PRESETS[value]
    return Device(latency_ns=int(value["latency"]), bandwidth=int(value["bandwidth"]))


def format_ns(ns: int) -> str:
    """Shortest exact time string for TOML output: ``"100ns"``, ``"3us"``, ``"8ms"``."""
    for unit, mult in (("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)):
        if ns and ns % mult == 0:
            return f"{ns // mult}{unit}"
    return f"{ns}ns"
