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
