"""Parsing and formatting of the sizes and durations used in topology files and on the CLI.

Units: sizes are bytes (``int``), durations are seconds (``float``), pages are 4096 bytes.

Accepted size forms: a non-negative integer, or a string holding a number and an optional
unit with virsh's meanings (optional space between them; the unit's case does not matter):

- ``B``, ``bytes``: bytes;
- ``K``, ``KiB``, ``M``, ``MiB``, ``G``, ``GiB``, ``T``, ``TiB``, ``P``, ``PiB``, ``E``,
  ``EiB``: binary multiples (1024, 1024², ...);
- ``KB``, ``MB``, ``GB``, ``TB``, ``PB``, ``EB``: decimal multiples (1000, 1000², ...).

A number without a unit is in *bare_unit* bytes: 1 (bytes) in topology files, 1024 (KiB)
for the command line's virsh-style size arguments (``balloonlab setmem a 24576`` is
24 MiB, as ``virsh setmem``).

Accepted duration forms: a non-negative number (seconds), or a string holding a number
followed by ``ms``, ``s`` or ``m`` (``"250ms"``, ``"10s"``, ``"2m"``), or a plain number string.
"""

from __future__ import annotations

import ipaddress
import math
import re
from fractions import Fraction

from protocol.constants import PAGE_SIZE

__all__ = [
    "DURATION_UNITS",
    "PAGE_SIZE",
    "SIZE_UNITS",
    "format_duration",
    "format_pages",
    "format_size",
    "format_size_echo",
    "format_size_exact",
    "parse_duration",
    "parse_listen_address",
    "parse_size",
    "size_unit",
]

#: Multipliers of the binary units, in bytes (the units ``format_size`` writes).
SIZE_UNITS: dict[str, int] = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_PREFIXES = "kmgtpe"
#: Multipliers of the accepted duration units, in seconds.
DURATION_UNITS: dict[str, Fraction] = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60)}

_NUMBER_UNIT = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*$")

_SIZE_FORMS = (
    "a non-negative integer or a string like '64KiB', '512MiB', '1GiB', '500MB' "
    "(units: B, K/KiB, M/MiB, G/GiB, T/TiB = powers of 1024; KB, MB, GB, TB = powers of 1000)"
)
_DURATION_FORMS = (
    "a non-negative number (seconds) or a string like '250ms', '10s', '2m' (units: ms, s, m)"
)


def size_unit(unit: str) -> int | None:
    """Bytes per *unit* as virsh reads it (case-insensitive), or ``None`` if unknown."""
    u = unit.lower()
    if u in ("b", "byte", "bytes"):
        return 1
    if not u or u[0] not in _PREFIXES:
        return None
    power = _PREFIXES.index(u[0]) + 1
    rest = u[1:]
    if rest in ("", "ib"):
        return 1 << (10 * power)
    if rest == "b":
        return int(1000**power)
    return None


def parse_size(value: str | int, *, field: str = "size", bare_unit: int = 1) -> int:
    """Return *value* as a whole number of bytes.

    A number without a unit (an ``int``, or a string without one) counts *bare_unit* bytes.
    Raises ``ValueError`` naming *field*, the offending value and the accepted forms when the
    value is malformed, negative, uses an unknown unit, or is not a whole number of bytes.
    """
    if isinstance(value, bool):  # bool is an int subclass; `memory = true` is a typo, not 1 byte
        raise ValueError(f"{field}: {value!r} is not a size; expected {_SIZE_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{field}: {value!r} is negative; expected {_SIZE_FORMS}")
        return value * bare_unit
    if not isinstance(value, str):
        raise ValueError(
            f"{field}: {value!r} ({type(value).__name__}) is not a size; expected {_SIZE_FORMS}"
        )
    m = _NUMBER_UNIT.match(value)
    if m is None:
        raise ValueError(f"{field}: {value!r} is not a size; expected {_SIZE_FORMS}")
    unit = m.group("unit")
    scale = size_unit(unit) if unit else bare_unit
    if scale is None:
        raise ValueError(f"{field}: {value!r} has unknown unit {unit!r}; expected {_SIZE_FORMS}")
    # Fraction keeps "1.5GiB" exact; floats would round large byte counts.
    nbytes = Fraction(m.group("num")) * scale
    if nbytes.denominator != 1:
        raise ValueError(f"{field}: {value!r} is not a whole number of bytes")
    return int(nbytes)


def parse_duration(value: str | int | float, *, field: str = "duration") -> float:
    """Return *value* as seconds (``float``).

    Raises ``ValueError`` naming *field*, the offending value and the accepted forms when the
    value is malformed, negative, not finite, or uses an unknown unit.
    """
    if isinstance(value, bool):
        raise ValueError(f"{field}: {value!r} is not a duration; expected {_DURATION_FORMS}")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(
                f"{field}: {value!r} is not a non-negative finite duration; "
                f"expected {_DURATION_FORMS}"
            )
        return seconds
    if not isinstance(value, str):
        raise ValueError(
            f"{field}: {value!r} ({type(value).__name__}) is not a duration; "
            f"expected {_DURATION_FORMS}"
        )
    m = _NUMBER_UNIT.match(value)
    if m is None:
        raise ValueError(f"{field}: {value!r} is not a duration; expected {_DURATION_FORMS}")
    unit = m.group("unit") or "s"
    if unit not in DURATION_UNITS:
        raise ValueError(
            f"{field}: {value!r} has unknown unit {unit!r}; expected {_DURATION_FORMS}"
        )
    return float(Fraction(m.group("num")) * DURATION_UNITS[unit])


def format_size(nbytes: int) -> str:
    """Human-readable size with one decimal in the largest fitting binary unit: ``"512.0 MiB"``.

    Sizes under 1 KiB are shown in bytes (``"100 B"``); negative values keep their sign (used
    for deltas).
    """
    sign = "-" if nbytes < 0 else ""
    n = abs(int(nbytes))
    if n < SIZE_UNITS["KiB"]:
        return f"{sign}{n} B"
    for unit in ("GiB", "MiB", "KiB"):
        if n >= SIZE_UNITS[unit]:
            return f"{sign}{n / SIZE_UNITS[unit]:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_size_exact(nbytes: int) -> str:
    """Exact size string that ``parse_size`` reads back: the largest unit dividing *nbytes*.

    ``536870912 -> "512MiB"``, ``3072 -> "3KiB"``, ``1536 -> "1536B"``, ``0 -> "0"``. Used when
    writing topology files.
    """
    if nbytes < 0:
        raise ValueError(f"size: {nbytes!r} is negative")
    if nbytes == 0:
        return "0"
    for unit in ("GiB", "MiB", "KiB"):
        if nbytes % SIZE_UNITS[unit] == 0:
            return f"{nbytes // SIZE_UNITS[unit]}{unit}"
    return f"{nbytes}B"


def format_size_echo(nbytes: int) -> str:
    """A parsed size shown back to the user: ``"24 MiB (24576 KiB)"``, ``"1000 KiB"``,
    ``"1.5 GiB (1572864 KiB)"``, ``"100 B"`` (KiB is virsh's unit)."""
    if nbytes < 0:
        raise ValueError(f"size: {nbytes!r} is negative")
    if nbytes % 1024:
        return f"{nbytes} B" if nbytes < 1024 else f"{format_size(nbytes)} ({nbytes} B)"
    kib = f"{nbytes // 1024} KiB"
    for unit in ("GiB", "MiB"):
        if nbytes >= SIZE_UNITS[unit]:
            if nbytes % SIZE_UNITS[unit] == 0:
                return f"{nbytes // SIZE_UNITS[unit]} {unit} ({kib})"
            return f"{format_size(nbytes)} ({kib})"
    return kib


def format_pages(pages: int) -> str:
    """Page count with its size in bytes: ``"131072 pages (512.0 MiB)"``."""
    unit = "page" if abs(pages) == 1 else "pages"
    return f"{pages} {unit} ({format_size(pages * PAGE_SIZE)})"


def format_duration(seconds: float) -> str:
    """Short duration string for humans: ``"250ms"``, ``"10s"``, ``"2m"``, else ``"1.25s"``."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"duration: {seconds!r} is not a non-negative finite duration")
    if seconds and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    ms = seconds * 1000
    # ms / 1000 * 1000 is not always an integer in binary floating point (2069.823 s):
    # compare with a tolerance far below a microsecond.
    if abs(ms - round(ms)) < 1e-6:
        return f"{round(ms)}ms"
    return f"{seconds:.12g}s"


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def parse_listen_address(text: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[v6]:PORT`` for IPv6); ValueError naming the
    problem. Port 0 asks the system for a free port."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"expected HOST:PORT, e.g. \"127.0.0.1:9177\", got {text!r}")
    host, _, port_s = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
    elif not host:
        raise ValueError(f"no host before the port in {text!r} (e.g. \"127.0.0.1:9177\")")
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _HOSTNAME_RE.fullmatch(host) or host.replace(".", "").isdigit():
                raise ValueError(f"{host!r} in {text!r} is neither an IPv4 address nor a "
                                 "host name (IPv6: \"[::1]:9177\")") from None
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"port {port_s!r} in {text!r} is not a number in 0..65535")
    return host, int(port_s)
