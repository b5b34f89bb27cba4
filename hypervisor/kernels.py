"""Numba kernels for the host's frame ledger and host swap.

Units: frame numbers, swap slot numbers and guest page numbers (gpfns) are page indices
(4096-byte pages). Every kernel is a small array-in/array-out function compiled with
``@njit(cache=True)``; each has a thin typed Python wrapper below that validates input and
chooses dtypes, and a plain-Python naive twin in ``hypervisor/testing/naive.py``.

Maps are *byte maps* rather than packed bitmaps: one ``uint8`` per frame (or swap slot). At
the sizes this emulator runs (a few hundred thousand frames) the 8x space is negligible, and a
byte per entry lets one map carry three states without a second array:

- ``FREE`` (0): not allocated;
- ``USED`` (1): allocated and eligible for reclaim;
- ``LOCKED`` (2): allocated but pinned: being revoked (shootdown in flight) or being backed
  (fault not yet resumed). The clock scan never picks a locked frame.

The clock scan works over the whole ledger in frame order, as Linux's old global clock did:
the reverse map (frame -> vm index, gpfn) leads to the accessed byte of that guest page in the
VM's shared accessed-bit array. The per-VM accessed arrays are passed as a
``numba.typed.List`` of ``uint8`` arrays indexed by vm index (the ledger keeps that list and
rebuilds it only when a VM is added or removed, because building it costs milliseconds).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.typed import List as TypedList

FREE = np.uint8(0)
USED = np.uint8(1)
LOCKED = np.uint8(2)


@njit(cache=True)
def _map_alloc(state: np.ndarray, n: int, hint: int, mark: int) -> tuple[np.ndarray, int]:
    # First fit from a rotating hint (like a next-fit allocator): successive allocations
    # sweep the map instead of always re-scanning the low, busy end.
    size = state.shape[0]
    out = np.empty(n, dtype=np.int64)
    got = 0
    if size == 0 or n == 0:
        return out[:0], hint
    i = hint % size
    for _ in range(size):
        if state[i] == 0:
            state[i] = mark
            out[got] = i
            got += 1
            if got == n:
                i += 1
                if i == size:
                    i = 0
                break
        i += 1
        if i == size:
            i = 0
    return out[:got], i


@njit(cache=True)
def _map_free(state: np.ndarray, idx: np.ndarray) -> int:
    # Two passes so a bad batch changes nothing: mark each entry 255 while validating (a
    # second sighting of 255 is a duplicate), then either roll back or clear.
    size = state.shape[0]
    bad = -1
    k = 0
    saved = np.empty(idx.shape[0], dtype=np.uint8)
    for k in range(idx.shape[0]):
        j = idx[k]
        if j < 0 or j >= size or state[j] == 0 or state[j] == 255:
            bad = k
            break
        saved[k] = state[j]
        state[j] = 255
    if bad >= 0:
        for m in range(bad):
            state[idx[m]] = saved[m]
        return bad
    for m in range(idx.shape[0]):
        state[idx[m]] = 0
    return -1


@njit(cache=True)
def _map_count(state: np.ndarray, value: int) -> int:
    c = 0
    for i in range(state.shape[0]):
        if state[i] == value:
            c += 1
    return c


@njit(cache=True)
def _clock_scan(
    state: np.ndarray,
    owner_vm: np.ndarray,
    owner_gpfn: np.ndarray,
    accessed,
    hand: int,
    want: int,
) -> tuple[np.ndarray, int]:
    # Second chance: a USED frame whose guest page was accessed since the last pass has its
    # accessed byte cleared and is skipped; one that was not becomes a victim and is LOCKED
    # at once so a concurrent scan cannot pick it again. Two full sweeps suffice: the first
    # clears every accessed byte it passes, so the second finds victims unless the guest
    # re-touched everything in between.
    size = state.shape[0]
    out = np.empty(want, dtype=np.int64)
    got = 0
    if size == 0 or want == 0:
        return out[:0], hand
    i = hand % size
    # The accessed array is fetched from the typed list only when the owning VM changes
    # (a typed-list fetch per frame cost more than the scan itself), and the verdict is
    # branch-free (the accessed byte is random, so a branch on it mispredicts half the time):
    # the byte is cleared unconditionally, the frame becomes LOCKED (2) exactly when it was
    # cold, and the victim slot is written always but kept only for a cold frame.
    last_vm = -1
    acc = accessed[0] if len(accessed) > 0 else np.zeros(0, dtype=np.uint8)
    for _ in range(2 * size):
        if state[i] == 1:
            vm = owner_vm[i]
            if vm != last_vm:
                acc = accessed[vm]
                last_vm = vm
            g = owner_gpfn[i]
            cold = acc[g] == 0
            acc[g] = 0
            state[i] = np.uint8(1 + cold)
            out[got] = i
            got += cold
        i += 1
        if i == size:
            i = 0
        if got == want:
            break
    return out[:got], i


@njit(cache=True)
def _runs_first_locked(p2m: np.ndarray, runs: np.ndarray, state: np.ndarray) -> int:
    # The first page of the runs (in run order) backed by a LOCKED frame, or -1.
    for r in range(runs.shape[0]):
        first = runs[r, 0]
        for g in range(first, first + runs[r, 1]):
            f = p2m[g]
            if f >= 0 and state[f] == LOCKED:
                return g
    return -1


@njit(cache=True)
def _release_runs(
    p2m: np.ndarray,
    runs: np.ndarray,
    state: np.ndarray,
    owner_vm: np.ndarray,
    owner_gpfn: np.ndarray,
    swap_state: np.ndarray,
    swap_owner_vm: np.ndarray,
    swap_owner_gpfn: np.ndarray,
    slots_out: np.ndarray,
) -> tuple[int, int]:
    # One pass over the pages of the runs: a frame or slot found in the P2M goes back to
    # its map (reverse map cleared), the P2M entry becomes NONE. Freed slots are written
    # to slots_out in page order while it has room; the counts are returned either way.
    nf = 0
    ns = 0
    room = slots_out.shape[0]
    for r in range(runs.shape[0]):
        first = runs[r, 0]
        for g in range(first, first + runs[r, 1]):
            v = p2m[g]
            if v >= 0:
                state[v] = FREE
                owner_vm[v] = -1
                owner_gpfn[v] = -1
                nf += 1
            elif v <= -2:
                s = -(v + 2)
                swap_state[s] = FREE
                swap_owner_vm[s] = -1
                swap_owner_gpfn[s] = -1
                if ns < room:
                    slots_out[ns] = s
                ns += 1
            p2m[g] = -1
    return nf, ns


def _check_map(state: np.ndarray) -> None:
    if not isinstance(state, np.ndarray) or state.dtype != np.uint8 or state.ndim != 1:
        raise TypeError("state map must be a 1-d uint8 numpy array")


def map_alloc(state: np.ndarray, n: int, hint: int = 0, mark: int = 1) -> tuple[np.ndarray, int]:
    """Allocate up to ``n`` FREE entries first-fit from ``hint``; mark them ``mark``.

    Returns (int64 indices in allocation order, next hint). Fewer than ``n`` come back when
    the map runs out; the caller decides whether that is an error.
    """
    _check_map(state)
    if n < 0:
        raise ValueError(f"cannot allocate a negative number of entries ({n})")
    if mark not in (1, 2):
        raise ValueError(f"mark must be USED (1) or LOCKED (2), not {mark}")
    return _map_alloc(state, int(n), int(hint), int(mark))


def map_free(state: np.ndarray, idx: np.ndarray) -> None:
    """Free every index in ``idx`` (all or nothing).

    Raises ValueError naming the first offending index (out of range, already free, or a
    duplicate inside the batch); the map is then unchanged.
    """
    _check_map(state)
    arr = np.ascontiguousarray(idx, dtype=np.int64)
    bad = _map_free(state, arr)
    if bad >= 0:
        j = int(arr[bad])
        if j < 0 or j >= state.shape[0]:
            why = f"out of range 0..{state.shape[0] - 1}"
        elif bad > 0 and j in arr[:bad]:
            why = "duplicated in the batch"
        else:
            why = "not allocated"
        raise ValueError(f"cannot free entry {j}: {why}; nothing freed")


def map_count(state: np.ndarray, value: int = 1) -> int:
    """Count entries equal to ``value``."""
    _check_map(state)
    return int(_map_count(state, int(value)))


def clock_scan(
    state: np.ndarray,
    owner_vm: np.ndarray,
    owner_gpfn: np.ndarray,
    accessed: TypedList,
    hand: int,
    want: int,
) -> tuple[np.ndarray, int]:
    """Pick up to ``want`` reclaim victims among USED frames, second-chance style.

    ``accessed[v]`` is VM ``v``'s accessed byte array (indexed by gpfn). Victims are set
    LOCKED in ``state``; accessed bytes of skipped frames are cleared. Returns (victim frame
    numbers, new clock hand).
    """
    _check_map(state)
    if want < 0:
        raise ValueError(f"want must be >= 0, not {want}")
    return _clock_scan(state, owner_vm, owner_gpfn, accessed, int(hand), int(want))


def make_accessed_list(arrays: list[np.ndarray]) -> TypedList:
    """Build the typed list ``clock_scan`` expects (one uint8 array per vm index)."""
    tl = TypedList()
    for a in arrays:
        if a.dtype != np.uint8 or a.ndim != 1:
            raise TypeError("accessed arrays must be 1-d uint8")
        tl.append(a)
    return tl


def _check_runs_in(runs: np.ndarray, size: int) -> np.ndarray:
    r = np.ascontiguousarray(runs, dtype=np.int64).reshape(-1, 2)
    if r.shape[0] and (np.any(r[:, 1] < 0) or np.any(r[:, 0] < 0)
                       or np.any(r[:, 0] > size - r[:, 1])):
        raise ValueError(f"runs must lie inside 0..{size - 1}")
    return r


def runs_first_locked(p2m: np.ndarray, runs: np.ndarray, state: np.ndarray) -> int:
    """The first gpfn of ``runs`` (run order) whose frame is LOCKED in ``state``, or -1.

    ``p2m`` is one VM's P2M (frame >= 0, else not backed); O(pages of the runs)."""
    return int(_runs_first_locked(p2m, _check_runs_in(runs, p2m.shape[0]), state))


def release_runs(
    p2m: np.ndarray,
    runs: np.ndarray,
    state: np.ndarray,
    owner_vm: np.ndarray,
    owner_gpfn: np.ndarray,
    swap_state: np.ndarray,
    swap_owner_vm: np.ndarray,
    swap_owner_gpfn: np.ndarray,
    max_slots: int,
) -> tuple[int, np.ndarray]:
    """Drop the backing of every page of ``runs`` (disjoint, inside ``p2m``): frames and
    host swap slots the P2M names become FREE with their reverse maps cleared, and the P2M
    entries become NONE (-1). No check of LOCKED frames here (see
    :func:`runs_first_locked`). ``max_slots`` bounds the swapped pages among the runs (the
    VM's swapped count will do): the slot array is the only allocation, never O(guest RAM).
    Returns (frames freed, the freed slots in page order)."""
    r = _check_runs_in(runs, p2m.shape[0])
    total = int(r[:, 1].sum()) if r.shape[0] else 0
    slots = np.empty(max(0, min(int(max_slots), total)), dtype=np.int64)
    nf, ns = _release_runs(p2m, r, state, owner_vm, owner_gpfn, swap_state, swap_owner_vm,
                           swap_owner_gpfn, slots)
    if ns > slots.shape[0]:
        raise AssertionError(f"{ns} swapped pages in the runs but max_slots was {max_slots}")
    return int(nf), slots[:ns]
