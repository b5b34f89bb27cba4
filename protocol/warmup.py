"""Load every PFN kernel before it is needed on a hot path.

Numba compiles (or loads from its on-disk cache) a kernel on its first call for each
argument type, which costs tens of milliseconds per kernel. Processes call
:func:`warm_up` at start-up, with the dtypes production uses, so that the first inflate a
benchmark times measures the protocol, not the JIT.
"""

from __future__ import annotations

import numpy as np

from . import pfn as P


def warm_up() -> None:
    state = np.zeros(8, dtype=np.uint8)
    scratch = np.zeros(8, dtype=np.uint8)
    pfns = np.array([1, 2, 5], dtype=np.uint32)
    runs = P.pfns_to_runs(pfns)
    P.pfns_to_runs(np.array([5, 1], dtype=np.uint32))  # unsorted path
    P.pfns_to_runs(np.array([1, 2], dtype=np.int64))
    P.runs_to_pfns(runs)
    P.check_pfns(pfns, 8, state, scratch, want_clear=False)
    P.check_runs(runs, 8, state, scratch, want_clear=False)
    P.set_pfns(state, pfns, 1)
    P.set_runs(state, runs, 1)
    P.count_set(state)
    P.runs_of_set(state)
    P.set_runs(state, runs, 0)
    P.set_pfns(state, pfns, 0)
