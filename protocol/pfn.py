"""PFN-set encodings used on the wire, and batch validation, as Numba kernels.

Units: a pfn is a guest page number (4 KiB pages). Two wire encodings (docs/protocol.md, "inflate"):

* ``pfns``: little-endian uint32 page numbers, virtio style, any order;
* ``runs``: little-endian uint64 pairs ``(first pfn, page count)``, with RANGES.

Kernels are small, array-in/array-out and private (``_name``); the public wrappers check
dtypes and shapes. Validation works in one pass over the batch against a per-page state
bitmap (uint8, 1 = in the set) plus a scratch bitmap the caller owns and that is left all
zero on return, so that checking a batch costs O(batch), never O(guest RAM).

Why one module of this size: it is the one family of PFN-set encodings and run validation
that host and guest share, each Numba kernel beside its typed wrapper (stumpy's shape).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, NamedTuple, NoReturn

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from .errors import ErrorCode, LocalProtocolError

RUN_DTYPE = np.dtype("<u8")
PFN_DTYPE = np.dtype("<u4")

# Kernel status codes (mapped to ErrorCode by the wrappers).
OK = 0
OUT_OF_RANGE = 1
DUPLICATE = 2
STATE = 3  # page already in the set (want_clear=False) / not in it (want_clear=True)
EMPTY_RUN = 4

_STATUS_CODES = {
    OUT_OF_RANGE: ErrorCode.PFN_OUT_OF_RANGE,
    DUPLICATE: ErrorCode.DUPLICATE_PFN,
    EMPTY_RUN: ErrorCode.BAD_FIELD,
}


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


# Word-at-a-time helpers: a byte map is read eight entries per uint64 load. ``_nz_hi`` sets
# the high bit of every byte of a word that is nonzero (and no other bit), exactly, with no
# carries between bytes; the scans then work on these masks and visit only the bytes where
# something changes (``trailing_zeros`` finds the next one), instead of branching per byte on
# data with short runs, which ran at branch-mispredict speed (1-2 ns per entry).
_LO7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HI = np.uint64(0x8080808080808080)
_U8 = np.uint64(8)
_U56 = np.uint64(56)
_HIGHEST = np.uint64(1) << np.uint64(63)  # keeps trailing_zeros defined on a zero word


@njit(cache=True, nogil=True, inline="always")
def _nz_hi(w: Any) -> Any:
    return (((w & _LO7) + _LO7) | w) & _HI


@njit(cache=True, nogil=True, inline="always")
def _load_word(a: np.ndarray, i: int, n: int) -> Any:
    """Bytes ``a[i:i+8]`` as a little-endian uint64, zero-padded beyond ``n``."""
    w = np.uint64(0)
    for b in range(min(8, n - i)):
        w |= np.uint64(a[i + b]) << np.uint64(8 * b)
    return w


@njit(cache=True, nogil=True)
def _runs_from_sorted(a: np.ndarray, out: np.ndarray) -> int:
    """Compress a sorted array (duplicates allowed) into runs; returns the run count."""
    n = a.shape[0]
    if n == 0:
        return 0
    k = 0
    start = np.uint64(a[0])
    prev = start
    for i in range(1, n):
        v = np.uint64(a[i])
        if v == prev:
            continue
        if v == prev + np.uint64(1):
            prev = v
            continue
        out[k, 0] = start
        out[k, 1] = prev - start + np.uint64(1)
        k += 1
        start = v
        prev = v
    out[k, 0] = start
    out[k, 1] = prev - start + np.uint64(1)
    return k + 1


@njit(cache=True, nogil=True)
def _run_breaks(a: np.ndarray, idx: np.ndarray) -> tuple[int, bool]:
    """For ascending ``a``: indices where a run starts go to ``idx`` (then ``len(a)``);
    returns (number of runs, whether ``a`` is strictly increasing).

    Branch-free: every index is stored and the cursor advances only at a break, so the loop
    costs the same whatever the run lengths (a per-element branch mispredicts on short runs).
    """
    n = a.shape[0]
    k = 1
    idx[0] = 0
    ok = True
    prev = np.int64(a[0])
    for i in range(1, n):
        v = np.int64(a[i])
        ok &= v > prev  # type: ignore[assignment]  # a numpy bool in Python, a bool in numba
        idx[k] = i
        k += v != prev + 1
        prev = v
    idx[k] = n
    return k, ok


@njit(cache=True, nogil=True)
def _runs_at_breaks(a: np.ndarray, idx: np.ndarray, k: int, out: np.ndarray) -> None:
    for r in range(k):
        out[r, 0] = np.uint64(a[idx[r]])
        out[r, 1] = np.uint64(idx[r + 1] - idx[r])


@njit(cache=True, nogil=True)
def _expand_runs(runs: np.ndarray, out: np.ndarray) -> Any:
    k = 0
    for r in range(runs.shape[0]):
        first = np.int64(runs[r, 0])
        cnt = np.int64(runs[r, 1])
        for j in range(cnt):
            out[k] = first + j
            k += 1
    return k


@njit(cache=True, nogil=True)
def _check_pfns(pfns: np.ndarray, limit: Any, state: np.ndarray, scratch: np.ndarray,
                want_clear: bool) -> Any:
    """Validate a pfn batch; returns (status, index of first bad entry).

    Range is checked first for the whole batch so that ``state``/``scratch`` are never
    indexed out of bounds; ``scratch`` is left all zero.
    """
    n = pfns.shape[0]
    for i in range(n):
        if np.int64(pfns[i]) >= limit:
            return OUT_OF_RANGE, i
    status = OK
    bad = -1
    end = n
    for i in range(n):
        p = np.int64(pfns[i])
        if scratch[p]:
            status = DUPLICATE
            bad = i
            end = i
            break
        scratch[p] = 1
        if (state[p] != 0) != want_clear:
            status = STATE
            bad = i
            end = i + 1
            break
    for j in range(end):
        scratch[np.int64(pfns[j])] = 0
    return status, bad


@njit(cache=True, nogil=True)
def _first_bad_state(state: np.ndarray, words: np.ndarray, a: Any, e: Any,
                     want_clear: bool) -> Any:
    """First index in ``[a, e)`` whose state is wrong (set when ``want_clear`` is false,
    clear when it is true), or -1: head and tail bytes one at a time, the aligned middle
    eight entries per load of ``words`` (``state``'s first ``len & ~7`` bytes as uint64)."""
    i = a
    if e - a < 24:  # short: bytes (a word loop would only add mispredicted exits)
        while i < e:
            if (state[i] != 0) != want_clear:
                return i
            i += 1
        return -1
    while i < e and (i & 7):
        if (state[i] != 0) != want_clear:
            return i
        i += 1
    wi = i >> 3
    we = e >> 3
    while wi < we:
        m = _nz_hi(words[wi])  # high bit of each nonzero byte
        if want_clear:
            m = ~m & _HI  # ... of each zero byte
        if m:
            return (wi << 3) + (trailing_zeros(m) >> 3)  # type: ignore[call-arg]
        wi += 1
    i = max(i, wi << 3)
    while i < e:
        if (state[i] != 0) != want_clear:
            return i
        i += 1
    return -1


@njit(cache=True, nogil=True)
def _check_run_bounds(runs: np.ndarray, limit: np.int64) -> Any:
    """The first run, in batch order, that is empty or reaches beyond ``limit``: returns
    (status, its index, whether the runs are ascending and disjoint). Overflow-safe for
    counts up to 2**64 - 1; O(runs)."""
    n = runs.shape[0]
    lim = np.uint64(limit)
    for r in range(n):
        if runs[r, 1] == 0:
            return EMPTY_RUN, r, False
        if runs[r, 0] >= lim or runs[r, 1] > lim - runs[r, 0]:
            return OUT_OF_RANGE, r, False
    for r in range(1, n):
        if runs[r, 0] < runs[r - 1, 0] + runs[r - 1, 1]:
            return OK, -1, False
    return OK, -1, True


@njit(cache=True, nogil=True)
def _check_runs(runs: np.ndarray, limit: Any, state: np.ndarray, scratch: np.ndarray,
                want_clear: bool) -> Any:
    """Validate a run batch; returns (status, index of first bad run)."""
    n = runs.shape[0]
    status, bad, disjoint = _check_run_bounds(runs, limit)
    if status != OK:
        return status, bad
    # Ascending, disjoint runs (what every producer here emits) cannot hold a duplicate:
    # the first bad run is the first with a page in the wrong state, found a word at a
    # time with no scratch marks to set and clear.
    if disjoint:
        words = state[: state.shape[0] & ~7].view(np.uint64)
        for r in range(n):
            first = np.int64(runs[r, 0])
            if _first_bad_state(state, words, first, first + np.int64(runs[r, 1]),
                                want_clear) >= 0:
                return STATE, r
        return OK, -1
    status = OK
    bad = -1
    r_done = n
    p_done = 0
    for r in range(n):
        first = np.int64(runs[r, 0])
        cnt = np.int64(runs[r, 1])
        for j in range(cnt):
            p = first + j
            if scratch[p]:
                status = DUPLICATE
                p_done = j
                break
            scratch[p] = 1
            if (state[p] != 0) != want_clear:
                status = STATE
                p_done = j + 1
                break
        if status != OK:
            bad = r
            r_done = r
            break
    for r in range(r_done):
        first = np.int64(runs[r, 0])
        cnt = np.int64(runs[r, 1])
        for j in range(cnt):
            scratch[first + j] = 0
    if status != OK:
        first = np.int64(runs[r_done, 0])
        for j in range(p_done):
            scratch[first + j] = 0
    return status, bad


@njit(cache=True, nogil=True)
def _first_pfn_not_in(pfns: np.ndarray, state: np.ndarray, value: np.uint8) -> Any:
    for i in range(pfns.shape[0]):
        p = np.int64(pfns[i])
        if state[p] != value:
            return p
    return -1


@njit(cache=True, nogil=True)
def _first_run_page_not_in(runs: np.ndarray, state: np.ndarray, value: np.uint8) -> Any:
    for r in range(runs.shape[0]):
        first = np.int64(runs[r, 0])
        for p in range(first, first + np.int64(runs[r, 1])):
            if state[p] != value:
                return p
    return -1


@njit(cache=True, nogil=True)
def _set_pfns(state: np.ndarray, pfns: np.ndarray, value: Any) -> None:
    for i in range(pfns.shape[0]):
        state[np.int64(pfns[i])] = value


@njit(cache=True, nogil=True)
def _set_runs(state: np.ndarray, runs: np.ndarray, value: Any) -> None:
    for r in range(runs.shape[0]):
        first = np.int64(runs[r, 0])
        state[first : first + np.int64(runs[r, 1])] = value


@njit(cache=True, nogil=True)
def _count_nonzero(a: np.ndarray) -> Any:
    c = 0
    for i in range(a.shape[0]):
        if a[i] != 0:
            c += 1
    return c


@njit(cache=True, nogil=True)
def _runs_of_set(state: np.ndarray, words: np.ndarray, out: np.ndarray) -> Any:
    """Runs of nonzero entries of a byte map, in order; returns the run count.

    ``words`` is the map's first ``len(state) // 8 * 8`` bytes viewed as uint64. Word at a
    time: ``t`` marks the bytes whose nonzero-ness differs from the byte before (a run starts
    or ends there); their positions are written to ``out`` flat, as alternating starts and
    ends, and turned into (start, length) pairs at the end. The first two boundaries of a
    word are stored unconditionally (the cursor advances only when they exist), so a word
    with zero, one or two boundaries, the common cases, takes no data-dependent branch.
    """
    n = state.shape[0]
    nw = words.shape[0]
    flat = out.reshape(-1)
    j = 0
    carry = np.uint64(0)  # high bit of the last byte of the previous word, at bit 7
    one = np.uint64(1)
    for wi in range(nw + 1):
        i = wi * 8
        if wi < nw:
            w = words[wi]
        elif i < n:
            w = _load_word(state, i, n)
        else:
            break
        hi = _nz_hi(w)
        t = hi ^ ((hi << _U8) | carry)
        carry = hi >> _U56
        flat[j] = i + (trailing_zeros(t | _HIGHEST) >> 3)  # type: ignore[call-arg]
        j += t != 0
        t &= t - one
        flat[j] = i + (trailing_zeros(t | _HIGHEST) >> 3)
        j += t != 0
        t &= t - one
        while t != 0:
            flat[j] = i + (trailing_zeros(t) >> 3)
            j += 1
            t &= t - one
    if j & 1:  # the last run reaches the end of the map
        flat[j] = n
        j += 1
    k = j >> 1
    for r in range(k):
        flat[2 * r + 1] -= flat[2 * r]
    return k



# --------------------------------------------------------------------------------------
# public wrappers
# --------------------------------------------------------------------------------------


class RunError(LocalProtocolError, ValueError):
    """A batch names pages it may not. ``code`` is the wire's :class:`ErrorCode`,
    ``index`` the offending entry of the batch (a run or a pfn), ``pfn`` the first offending
    page when it is known (else -1). Host and guest raise and answer with the same codes."""

    def __init__(self, code: ErrorCode, message: str, *, index: int = -1, pfn: int = -1) -> None:
        super().__init__(code, message, index=index, pfn=pfn)
        self.index = index
        self.pfn = pfn

    @property
    def gpfn(self) -> int:
        """The first offending page (the guest's name for :attr:`pfn`)."""
        return self.pfn


class BatchCheck(NamedTuple):
    """Result of validating a batch: ``ok``, an error ``code`` and the offending index."""

    ok: bool
    code: ErrorCode | None = None
    index: int = -1  # type: ignore[assignment]  # shadows tuple.index on purpose
    message: str = ""

    def error(self, pfn: int = -1) -> RunError | None:
        """The failure as a :class:`RunError` (None when the batch is fine)."""
        if self.ok:
            return None
        assert self.code is not None
        return RunError(self.code, self.message, index=self.index, pfn=pfn)


def as_pfns(pfns: np.ndarray | bytes | list[int]) -> np.ndarray:
    """A 1-D uint32 array view of pfns (bytes are read as little-endian uint32)."""
    if isinstance(pfns, (bytes, bytearray, memoryview)):
        return np.frombuffer(pfns, dtype=PFN_DTYPE)
    a = np.asarray(pfns)
    if a.ndim != 1:
        raise ValueError(f"pfns must be 1-D, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF):
        raise ValueError("pfns must fit in uint32")
    return np.ascontiguousarray(a, dtype=PFN_DTYPE)


def as_runs(runs: np.ndarray | bytes | list[tuple[int, int]]) -> np.ndarray:
    """A (k, 2) uint64 array view of runs (bytes are read as little-endian uint64 pairs)."""
    if isinstance(runs, (bytes, bytearray, memoryview)):
        return np.frombuffer(runs, dtype=RUN_DTYPE).reshape(-1, 2)
    a = np.asarray(runs)
    if a.size == 0:
        return np.empty((0, 2), dtype=RUN_DTYPE)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"runs must have shape (k, 2), got {a.shape}")
    if a.min() < 0:
        raise ValueError("runs must be non-negative")
    return np.ascontiguousarray(a, dtype=RUN_DTYPE)


def pfns_to_wire(pfns: np.ndarray | list[int]) -> bytes:
    return as_pfns(pfns).tobytes()


def runs_to_wire(runs: np.ndarray | list[tuple[int, int]]) -> bytes:
    return as_runs(runs).tobytes()


def pfns_to_runs(pfns: np.ndarray | bytes | list[int]) -> np.ndarray:
    """Sorted, de-duplicated, maximal runs covering ``pfns``: shape (k, 2) uint64."""
    a = pfns if isinstance(pfns, np.ndarray) and pfns.dtype == np.int64 else as_pfns(pfns)
    if a.shape[0] == 0:
        return np.empty((0, 2), dtype=RUN_DTYPE)
    idx = np.empty(a.shape[0] + 1, dtype=np.int64)
    k, ok = _run_breaks(a, idx)
    if ok:  # the common case: already sorted, no repeats (one pass, no sort)
        out = np.empty((k, 2), dtype=RUN_DTYPE)
        _runs_at_breaks(a, idx, k, out)
        return out
    a = np.sort(a, kind="stable")
    out = np.empty((a.shape[0], 2), dtype=RUN_DTYPE)
    k = _runs_from_sorted(a, out)
    return out[:k].copy() if k < a.shape[0] // 2 else out[:k]


def runs_to_pfns(runs: np.ndarray | bytes | list[tuple[int, int]]) -> np.ndarray:
    """Every page the runs name, in run order: 1-D uint32."""
    r = as_runs(runs)
    total = int(r[:, 1].sum()) if r.shape[0] else 0
    out = np.empty(total, dtype=PFN_DTYPE)
    if total:
        _expand_runs(r, out)
    return out


def runs_total(runs: np.ndarray | bytes) -> int:
    r = as_runs(runs)
    return int(r[:, 1].sum()) if r.shape[0] else 0


def split_runs(runs: np.ndarray, max_pages: int) -> list[np.ndarray]:
    """Split runs into consecutive chunks of at most ``max_pages`` pages each."""
    if max_pages < 1:
        # A zero-page chunk can never make progress: refuse instead of looping forever.
        raise ValueError(f"max_pages must be at least 1, got {max_pages}")
    r = as_runs(runs)
    chunks: list[np.ndarray] = []
    cur: list[tuple[int, int]] = []
    room = max_pages
    for first, count in r.tolist():
        while count:
            take = min(count, room)
            cur.append((first, take))
            first += take
            count -= take
            room -= take
            if room == 0:
                chunks.append(np.array(cur, dtype=RUN_DTYPE))
                cur, room = [], max_pages
    if cur:
        chunks.append(np.array(cur, dtype=RUN_DTYPE))
    return chunks


def _result(status: int, index: int, want_clear: bool, what: str) -> BatchCheck:
    if status == OK:
        return BatchCheck(True)
    if status == STATE:
        code = ErrorCode.NOT_BALLOONED if want_clear else ErrorCode.ALREADY_BALLOONED
        text = f"{what} {index}: page is {'not ' if want_clear else 'already '}in the set"
        return BatchCheck(False, code, index, text)
    code = _STATUS_CODES[status]
    text = {
        OUT_OF_RANGE: f"{what} {index} lies beyond guest RAM",
        DUPLICATE: f"{what} {index} repeats a page named earlier in the batch",
        EMPTY_RUN: f"{what} {index} has a page count of zero",
    }[status]
    return BatchCheck(False, code, index, text)


def check_pfns(
    pfns: np.ndarray, limit: int, state: np.ndarray, scratch: np.ndarray, *, want_clear: bool
) -> BatchCheck:
    """Validate a pfn batch: all < ``limit``, no duplicates, and every page's ``state``
    nonzero when ``want_clear`` (deflate: must be in the set) or zero otherwise (inflate).
    ``scratch`` is a zeroed uint8 array of at least ``limit`` entries, left zeroed."""
    status, idx = _check_pfns(as_pfns(pfns), np.int64(limit), state, scratch, want_clear)
    return _result(int(status), int(idx), want_clear, "pfn at index")


def check_runs(
    runs: np.ndarray, limit: int, state: np.ndarray, scratch: np.ndarray, *, want_clear: bool
) -> BatchCheck:
    """Validate a run batch (non-empty runs inside ``limit``, no overlap, state as in
    :func:`check_pfns`)."""
    status, idx = _check_runs(as_runs(runs), np.int64(limit), state, scratch, want_clear)
    return _result(int(status), int(idx), want_clear, "run at index")


def _first_overlap(runs: np.ndarray) -> int:
    """Index (batch order) of the first run that shares a page with an earlier one, or -1.
    The runs are in bounds and non-empty; O(k log k) plus list inserts, error path only."""
    starts: list[int] = []
    ends: list[int] = []
    for r, (first, count) in enumerate(runs.tolist()):
        end = first + count
        i = bisect_right(starts, first)
        if (i and ends[i - 1] > first) or (i < len(starts) and starts[i] < end):
            return r
        starts.insert(i, first)
        ends.insert(i, end)
    return -1


def _raise(status: int, index: int, pfn: int) -> NoReturn:
    err = _result(status, index, False, "run at index").error(pfn)
    assert err is not None
    raise err


def validate_runs(runs: np.ndarray | bytes | list[tuple[int, int]], limit: int) -> np.ndarray:
    """Check a run batch that has no state map to check against: shape (k, 2), every run
    non-empty and inside ``limit`` pages, no page named twice. Codes, indices and messages
    are those of :func:`check_runs`.

    Returns the runs as int64 (k, 2) in batch order; raises :class:`RunError`. Costs O(k)
    for ascending disjoint runs (what every producer emits), O(k log k) otherwise, never
    O(limit).
    """
    a = runs if isinstance(runs, np.ndarray) else np.asarray(
        as_runs(runs) if isinstance(runs, (bytes, bytearray, memoryview)) else runs)
    if a.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise RunError(ErrorCode.BAD_FIELD, f"runs must have shape (k, 2), got {a.shape}")
    if a.dtype.kind not in "iu":
        raise RunError(ErrorCode.BAD_FIELD, f"runs must be integers, got {a.dtype}")
    # negative entries wrap to huge values: reported as beyond guest RAM, like the wire's
    r = np.ascontiguousarray(a.astype(RUN_DTYPE, copy=False))
    status, idx, ascending = _check_run_bounds(r, np.int64(limit))
    if status != OK:
        _raise(int(status), int(idx), int(r[idx, 0]))
    out = r.astype(np.int64)
    if not ascending:
        s = np.sort(out[:, 0])
        ends = out[np.argsort(out[:, 0], kind="stable")].sum(axis=1)
        if s.shape[0] > 1 and np.any(s[1:] < np.maximum.accumulate(ends)[:-1]):
            bad = _first_overlap(out)
            _raise(DUPLICATE, bad, int(out[bad, 0]))
    return out


def coalesce_runs(runs: np.ndarray) -> np.ndarray:
    """Disjoint runs (a validated batch) as ascending maximal runs: int64 (k, 2). Sorts only
    when the runs are out of order; O(k)."""
    r = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    if r.shape[0] < 2:
        return r.copy()
    if np.any(r[1:, 0] < r[:-1, 0]):
        r = r[np.argsort(r[:, 0], kind="stable")]
    starts = np.flatnonzero(np.concatenate(([True], r[1:, 0] != r[:-1, 0] + r[:-1, 1])))
    if starts.shape[0] == r.shape[0]:
        return r.copy()
    out = np.empty((starts.shape[0], 2), dtype=np.int64)
    out[:, 0] = r[starts, 0]
    out[:, 1] = np.add.reduceat(r[:, 1], starts)
    return out


def first_page_not_in(batch: np.ndarray, state: np.ndarray, value: int) -> int:
    """The first page of ``batch`` (1-D pfns, or (k, 2) runs; in batch order) whose entry
    in the byte map ``state`` is not ``value``, or -1. The batch must lie inside ``state``
    (check it first); costs O(batch pages), never O(len(state))."""
    if batch.ndim == 1:
        return int(_first_pfn_not_in(batch, state, np.uint8(value)))
    return int(_first_run_page_not_in(as_runs(batch), state, np.uint8(value)))


def set_pfns(state: np.ndarray, pfns: np.ndarray, value: int) -> None:
    _set_pfns(state, as_pfns(pfns), np.uint8(value))


def set_runs(state: np.ndarray, runs: np.ndarray, value: int) -> None:
    _set_runs(state, as_runs(runs), np.uint8(value))


def count_set(state: np.ndarray) -> int:
    return int(_count_nonzero(state))


def runs_of_set(state: np.ndarray) -> np.ndarray:
    """Runs of the nonzero entries of a byte map (e.g. the pages of a balloon)."""
    state = np.ascontiguousarray(state)
    # flat boundary slots: at most one per entry, plus the end of a run reaching the end
    out = np.empty(((state.shape[0] + 4) // 2, 2), dtype=RUN_DTYPE)
    k = _runs_of_set(state, state[: state.shape[0] & ~7].view(np.uint64), out)
    return out[:k].copy()
