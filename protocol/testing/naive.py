"""Plain-Python twins of the kernels in protocol/pfn.py (the reference they are checked
against). Lists and sets only: no numpy, no cleverness. Status codes are pfn.py's."""

from __future__ import annotations

OK, OUT_OF_RANGE, DUPLICATE, STATE, EMPTY_RUN = 0, 1, 2, 3, 4


def pfns_to_runs(pfns: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in sorted(set(pfns)):
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def runs_to_pfns(runs: list[tuple[int, int]]) -> list[int]:
    return [first + j for first, count in runs for j in range(count)]


def check_pfns(pfns: list[int], limit: int, state: list[int], want_clear: bool) -> tuple[int, int]:
    for i, p in enumerate(pfns):
        if p >= limit:
            return OUT_OF_RANGE, i
    seen: set[int] = set()
    for i, p in enumerate(pfns):
        if p in seen:
            return DUPLICATE, i
        seen.add(p)
        if (state[p] != 0) != want_clear:
            return STATE, i
    return OK, -1


def check_runs(runs: list[tuple[int, int]], limit: int, state: list[int],
               want_clear: bool) -> tuple[int, int]:
    for r, (first, count) in enumerate(runs):
        if count == 0:
            return EMPTY_RUN, r
        if first >= limit or first + count > limit:
            return OUT_OF_RANGE, r
    seen: set[int] = set()
    for r, (first, count) in enumerate(runs):
        for p in range(first, first + count):
            if p in seen:
                return DUPLICATE, r
            seen.add(p)
            if (state[p] != 0) != want_clear:
                return STATE, r
    return OK, -1


def set_runs(state: list[int], runs: list[tuple[int, int]], value: int) -> list[int]:
    out = list(state)
    for first, count in runs:
        for p in range(first, first + count):
            out[p] = value
    return out


def runs_of_set(state: list[int]) -> list[tuple[int, int]]:
    return pfns_to_runs([i for i, v in enumerate(state) if v])


def split_runs(runs: list[tuple[int, int]], max_pages: int) -> list[list[tuple[int, int]]]:
    """Page by page: start a new chunk whenever the current one holds max_pages pages;
    adjacent pages of one run stay in one piece within a chunk."""
    chunks: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    used = 0
    for first, count in runs:
        for p in range(first, first + count):
            if used == max_pages:
                chunks.append(cur)
                cur, used = [], 0
            if cur and cur[-1][0] + cur[-1][1] == p and _same_run(cur[-1], first, count):
                cur[-1] = (cur[-1][0], cur[-1][1] + 1)
            else:
                cur.append((p, 1))
            used += 1
    if cur:
        chunks.append(cur)
    return chunks


def _same_run(piece: tuple[int, int], first: int, count: int) -> bool:
    return first <= piece[0] < first + count
