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
    """Call every PFN kernel with each argument type production passes it: arrays built
    here (writable) and batches decoded from a frame (``np.frombuffer`` over the frame's
    bytes: read-only, a type of its own to Numba)."""
    state = np.zeros(8, dtype=np.uint8)
    scratch = np.zeros(8, dtype=np.uint8)
    pfns = np.array([1, 2, 5], dtype=np.uint32)
    runs = P.pfns_to_runs(pfns)
    decoded_pfns = P.as_pfns(P.pfns_to_wire(pfns))
    decoded_runs = P.as_runs(P.runs_to_wire(runs))
    P.pfns_to_runs(np.array([5, 1], dtype=np.uint32))  # unsorted path
    P.pfns_to_runs(np.array([1, 2], dtype=np.int64))
    P.validate_runs(runs, 8)
    P.validate_runs(decoded_runs, 8)
    P.coalesce_runs(runs)
    for p, r in ((pfns, runs), (decoded_pfns, decoded_runs)):
        P.pfns_to_runs(p)
        P.runs_to_pfns(r)
        P.check_pfns(p, 8, state, scratch, want_clear=False)
        P.check_runs(r, 8, state, scratch, want_clear=False)
        P.set_pfns(state, p, 1)
        P.set_runs(state, r, 1)
        P.first_page_not_in(p, state, 1)
        P.first_page_not_in(r, state, 1)
        P.count_set(state)
        P.runs_of_set(state)
        P.set_runs(state, r, 0)
        P.set_pfns(state, p, 0)
