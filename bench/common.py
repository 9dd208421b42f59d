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


def syncs_per_call(function, calls: int = 3) -> float:
    """Host-device synchronizations per call of `function` on a GPU, as CUDA's sync debug mode reports them (a
    warning each: `.item()`, `bool()` and `nonzero` of device tensors, copies from ordinary host memory, ...)."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / calls
