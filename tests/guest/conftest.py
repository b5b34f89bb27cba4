"""Fixtures for the guest tests; loads the helper modules under unique names.

``naive.py`` (plain-Python twins of the kernels) and ``hostpeer.py`` (an in-test hypervisor
peer speaking the real machine protocol) are registered as ``guest_naive`` and
``guest_hostpeer`` so that their basenames cannot clash with other packages' test helpers.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "build"
                                              / "numba-cache"))

_HERE = Path(__file__).resolve().parent


def _load(name: str, filename: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, _HERE / filename)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)


_load("guest_naive", "naive.py")
if (_HERE / "hostpeer.py").exists():
    _load("guest_hostpeer", "hostpeer.py")
