"""Plain-Python twins of hypervisor/kernels.py, the reference every kernel is checked against."""

from __future__ import annotations


def map_alloc(state: list[int], n: int, hint: int, mark: int) -> tuple[list[int], int]:
    size = len(state)
    if size == 0 or n == 0:
        return [], hint
    out: list[int] = []
    i = hint % size
    for _ in range(size):
        if state[i] == 0:
            state[i] = mark
            out.append(i)
            if len(out) == n:
                i = (i + 1) % size
                break
        i = (i + 1) % size
    return out, i


def map_free(state: list[int], idx: list[int]) -> bool:
    """Free all or nothing; False when the batch is invalid."""
    if len(set(idx)) != len(idx):
        return False
    if any(j < 0 or j >= len(state) or state[j] == 0 for j in idx):
        return False
    for j in idx:
        state[j] = 0
    return True


def map_count(state: list[int], value: int) -> int:
    return sum(1 for s in state if s == value)


def clock_scan(state: list[int], owner_vm: list[int], owner_gpfn: list[int],
               accessed: list[list[int]], hand: int, want: int) -> tuple[list[int], int]:
    size = len(state)
    if size == 0 or want == 0:
        return [], hand
    out: list[int] = []
    i = hand % size
    for _ in range(2 * size):
        if state[i] == 1:
            acc = accessed[owner_vm[i]]
            g = owner_gpfn[i]
            if acc[g]:
                acc[g] = 0
            else:
                state[i] = 2
                out.append(i)
        i = (i + 1) % size
        if len(out) == want:
            break
    return out, i


def runs_first_locked(p2m: list[int], runs: list[tuple[int, int]], state: list[int]) -> int:
    for first, count in runs:
        for g in range(first, first + count):
            if p2m[g] >= 0 and state[p2m[g]] == 2:
                return g
    return -1


def release_runs(p2m: list[int], runs: list[tuple[int, int]], state: list[int],
                 owner_vm: list[int], owner_gpfn: list[int], swap_state: list[int],
                 swap_owner_vm: list[int], swap_owner_gpfn: list[int]) -> tuple[int, list[int]]:
    """Page by page: frames and slots named by the P2M freed, P2M entries set to -1."""
    frames = 0
    slots: list[int] = []
    for first, count in runs:
        for g in range(first, first + count):
            v = p2m[g]
            if v >= 0:
                state[v], owner_vm[v], owner_gpfn[v] = 0, -1, -1
                frames += 1
            elif v <= -2:
                s = -(v + 2)
                swap_state[s], swap_owner_vm[s], swap_owner_gpfn[s] = 0, -1, -1
                slots.append(s)
            p2m[g] = -1
    return frames, slots
