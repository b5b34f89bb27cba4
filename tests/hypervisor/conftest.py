"""Fixtures for the hypervisor tests; loads the helper modules under unique names.

``naive.py`` (plain-Python twins of hypervisor/kernels.py) and ``peers.py`` (in-test guest
kernel and balloon driver peers speaking the real wire protocol over real sockets) are
registered as ``hv_naive`` and ``hv_peers`` so their basenames cannot clash with other
packages' test helpers (the tests directories have no ``__init__.py``).
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
    if name in sys.modules or not (_HERE / filename).exists():
        return
    spec = importlib.util.spec_from_file_location(name, _HERE / filename)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)


_load("hv_naive", "naive.py")
_load("hv_peers", "peers.py")
