"""Shared test set-up.

Numba's on-disk cache goes to the project's ignored ``build/`` folder (as `make test` sets
it). The test helper modules — in-test peers that speak the real wire protocol — are
registered under unique names, because the test directories have no ``__init__.py``. The
plain-Python twins of the kernels ship with the packages (``protocol.testing.naive``,
``guest.testing.naive``, ``hypervisor.testing.naive``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from hypothesis import settings

_TESTS = Path(__file__).resolve().parent
os.environ.setdefault("NUMBA_CACHE_DIR", str(_TESTS.parent / "build" / "numba-cache"))

HELPERS = {
    "guest_hostpeer": "guest/hostpeer.py",
    "hv_peers": "hypervisor/peers.py",
}


def _load(name: str, relpath: str) -> None:
    path = _TESTS / relpath
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)


for _name, _rel in HELPERS.items():
    _load(_name, _rel)

# No hypothesis test runs against a per-example deadline: the first example of a test that
# calls a Numba kernel loads it from the cache, and a loaded machine is slow; a test's own
# @settings inherit this.
settings.register_profile("balloonlab", deadline=None)
settings.load_profile("balloonlab")
