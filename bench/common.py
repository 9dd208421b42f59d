"""What the benchmark scripts share (light: the controller's benchmarks import no torch)."""

from __future__ import annotations

import math
import os


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list: a value that was measured, and, with fewer than
    100 values, the p99 is the slowest (every script reports its tails the same way)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident memory now."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
