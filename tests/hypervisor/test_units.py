"""hypervisor.units: size/duration parsing and formatting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.units import (
    PAGE_SIZE,
    format_duration,
    format_pages,
    format_size,
    format_size_echo,
    format_size_exact,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 << 20),
        ("1GiB", 1 << 30),
        ("4096", 4096),
        ("0", 0),
        (1024, 1024),
        (0, 0),
        ("64KiB", 64 << 10),
        ("100B", 100),
        ("1.5GiB", 3 << 29),
        (" 512 MiB ", 512 << 20),
        # virsh's suffixes: K/M/G/T = KiB/MiB/GiB/TiB, KB/MB/GB = powers of 1000, any case
        ("24M", 24 << 20),
        ("24MB", 24_000_000),
        ("24mib", 24 << 20),
        ("1K", 1024),
        ("1KB", 1000),
        ("1G", 1 << 30),
        ("2GB", 2 * 10**9),
        ("1T", 1 << 40),
        ("1TiB", 1 << 40),
        ("3 bytes", 3),
    ],
)
def test_parse_size_accepts_documented_forms(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad",
    ["512Mb2", "1Q", "1KiBs", "-1", -1, "abc", "", "1.5", "0.5B", "MiB", True, 1.5, None, "1e3",
     "1Mi", "1kbit"],
)
def test_parse_size_rejects_with_named_field(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(bad, field="vm[0].memory")  # type: ignore[arg-type]
    msg = str(info.value)
    assert msg.startswith("vm[0].memory: ")
    assert repr(bad) in msg
    assert "KiB" in msg or "whole number" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24576", 24 << 20), (24576, 24 << 20), ("24M", 24 << 20), ("100B", 100), ("8 KB", 8000)],
)
def test_bare_number_counts_bare_unit(text: str | int, expected: int) -> None:
    """The command line's virsh-style sizes: a number without a unit is KiB."""
    assert parse_size(text, bare_unit=1024) == expected


def test_format_size_echo() -> None:
    assert format_size_echo(24 << 20) == "24 MiB (24576 KiB)"
    assert format_size_echo(1000 * 1024) == "1000 KiB"
    assert format_size_echo(3 << 29) == "1.5 GiB (1572864 KiB)"
    assert format_size_echo(100) == "100 B"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("250ms", 0.25), ("10s", 10.0), ("2m", 120.0), ("1.5", 1.5), (3, 3.0), (0.5, 0.5), ("0", 0.0)],
)
def test_parse_duration(text: str | float, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["10h", "-1s", -2, float("nan"), float("inf"), "s", False, "1 min"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^policy_interval: .*(ms, s, m|finite)"):
        parse_duration(bad, field="policy_interval")  # type: ignore[arg-type]


def test_format_size_and_pages() -> None:
    assert format_size(512 << 20) == "512.0 MiB"
    assert format_size(1 << 30) == "1.0 GiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(100) == "100 B"
    assert format_size(-(2 << 20)) == "-2.0 MiB"
    assert format_pages(131072) == "131072 pages (512.0 MiB)"
    assert format_pages(1) == "1 page (4.0 KiB)"


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_exact_round_trips(n: int) -> None:
    assert parse_size(format_size_exact(n)) == n


@given(st.integers(min_value=0, max_value=10**7))
def test_format_duration_round_trips_milliseconds(ms: int) -> None:
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["B", "KiB", "MiB", "GiB"]))
def test_parse_size_integer_with_unit(n: int, unit: str) -> None:
    mult = {"B": 1, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}[unit]
    assert parse_size(f"{n}{unit}") == n * mult
    assert PAGE_SIZE == 4096
