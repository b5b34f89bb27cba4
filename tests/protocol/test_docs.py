"""docs/protocol.md documents everything the code defines (and its example runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol import messages as m
from protocol.errors import ErrorCode
from protocol.features import FEATURE_NAMES, Feature, StatTag

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _section(t: str) -> str:
    """The text under ``### `t``` up to the next heading."""
    mt = re.search(rf"^### `{re.escape(t)}`\n(.*?)(?=^#)", DOC + "\n#", re.S | re.M)
    assert mt, f"docs/protocol.md has no section for message type {t!r}"
    return mt.group(1)


@pytest.mark.parametrize("t", sorted(m.ALL_MESSAGE_TYPES))
def test_every_message_and_field_is_documented(t):
    sec = _section(t)
    for name, kind, required in m.ALL_MESSAGE_TYPES[t].SPEC:
        row = re.search(rf"^\| `{name}` \| ([^|]+) \| (yes|no) \|", sec, re.M)
        assert row, f"field {t}.{name} is not documented"
        assert row.group(1).strip() == kind.value, f"{t}.{name} documented with the wrong type"
        assert row.group(2) == ("yes" if required else "no"), f"{t}.{name}: required?"


def _table_rows(heading: str) -> str:
    mt = re.search(rf"^## {heading}\n(.*?)(?=^## )", DOC, re.S | re.M)
    assert mt, f"docs/protocol.md has no '## {heading}' section"
    return mt.group(1)


def test_every_error_code_is_documented():
    sec = _table_rows("Error codes")
    missing = [c.value for c in ErrorCode if f"| `{c.value}` |" not in sec]
    assert not missing, f"error codes missing from docs/protocol.md: {missing}"


def test_every_feature_is_documented():
    sec = _table_rows("Feature bits")
    names = {f: n for n, f in FEATURE_NAMES.items()}
    missing = [f.name for f in Feature
               if f"| {int(f)} | `{f.name}` | `{names[f]}` |" not in sec]
    assert not missing, f"features missing from docs/protocol.md: {missing}"


def test_every_stat_tag_is_documented_with_its_unit():
    sec = _table_rows("Stats tags")
    missing = [t.name for t in StatTag if f"| {int(t)} | `{t.name}` | {t.unit} |" not in sec]
    assert not missing, f"stats tags missing (or wrong unit) in docs/protocol.md: {missing}"


def test_documented_example_runs():
    code = re.search(r"```python\n(.*?)```", DOC, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "docs/protocol.md", "exec"), ns)
    assert ns["dev"].balloon_pages == 512 and ns["drv"].balloon_pages == 512
