"""docs/client.md's examples run as written, in order, against a live host."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from balloonlab.cli import cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "client.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture
def xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bl-"))  # short: socket paths are limited to 108 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(REPO / "build" / "numba-cache"))
    yield d
    if (d / "balloonlab" / "small" / "hypervisor.pid").exists():
        CliRunner().invoke(cli, ["down", "--all", "--timeout", "10s"])
    shutil.rmtree(d, ignore_errors=True)


def test_the_guide_has_examples() -> None:
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 4
    assert "ControlClient.find" in blocks[0]


def test_client_guide_examples_run(xdg: Path) -> None:
    res = CliRunner().invoke(cli, ["up", "two-vms-small", "--detach", "--boot-timeout", "90s"])
    assert res.exit_code == 0, res.output
    scope: dict[str, object] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in python_blocks(DOC.read_text()):
            exec(compile(block, str(DOC), "exec"), scope)  # the doc's own code
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("host small: ") and "frames free" in printed[0]
    assert printed[1].startswith("a running current memory 32768 KiB")
    assert "unknown_vm - no VM named 'nosuch' (VMs: a, b)" in printed
    assert "small" in printed
    assert printed[-1] == "set_balloon 0 -> 1024 pages"
    res = CliRunner().invoke(cli, ["down"])
    assert res.exit_code == 0, res.output
