"""balloonlab.transcript: the demo runs over a real socket pair and shows every step."""

from __future__ import annotations

import io
import re

import pytest

from balloonlab.transcript import run_transcript


@pytest.mark.timeout(60)
def test_transcript_shows_every_step():
    out = io.StringIO()
    n = run_transcript(out)
    text = out.getvalue()
    lines = [ln for ln in text.splitlines() if re.match(r"\s*\d+\s+(driver|device) -> ", ln)]
    assert n == len(lines) >= 15
    expect_in_order = [
        r"driver -> device\s+hello version=1 vm='demo'",
        r"device -> driver\s+welcome features=\[.*'ranges'.*\] num_pages=0 actual=0",
        r"device -> driver\s+config num_pages=96",
        r"driver -> device\s+inflate id=1 pfns=\[0,2,4",
        r"device -> driver\s+ack id=1 ok=true",
        r"driver -> device\s+inflate id=2 runs=\[128\+32,512\+32\] \(64 pages in 2 runs\)",
        r"driver -> device\s+actual actual=96",
        r"device -> driver\s+stats_request",
        r"driver -> device\s+stats id=3 \{.*MEMTOT=4194304.*BALLOON_PAGES=96\}",
        r"device -> driver\s+config num_pages=64",
        r"driver -> device\s+deflate id=4 runs=\[512\+32\]",
        r"device -> driver\s+ack id=4 ok=true",
        r"driver -> device\s+actual actual=64",
        r"device -> driver\s+welcome .* num_pages=64 actual=64",
        r"REJECTED code=already_ballooned",
        r"device -> driver\s+ack id=1 ok=false code=already_ballooned",
    ]
    pos = 0
    for pat in expect_in_order:
        mt = re.compile(pat).search(text, pos)
        assert mt, f"missing (in order): {pat}\n{text}"
        pos = mt.end()
    assert "ballooned pages on the host: 64" in text
