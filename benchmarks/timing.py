"""Timing and statistics shared by the benchmarks: one timed call, interleaved rounds over variants,
quartiles and paired ratios.

Imports only the standard library, so the pyreft worker can use it inside pyreft's own venv.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

# Sleep before each timed call: lets the other process's OpenMP threads go idle. Read at call time, so a
# caller that wants back-to-back calls (profile_core.py) can set ``timing.GAP_S = 0.0``.
GAP_S = 0.03


def timed_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one ``fn()`` call, after a garbage collection and a short sleep."""
    gc.collect()
    time.sleep(GAP_S)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(variants: dict[str, Callable[[], float]], rounds: int, warmup: int, pbar) -> dict[str, list[float]]:
    """Each round runs every variant once, order rotated per round; warm-up rounds are dropped.

    Rotating the order makes drift on a shared machine hit every variant alike."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            ms = variants[name]()
            if r >= warmup:
                times[name].append(ms)
            pbar.set_postfix_str(f"{name} {ms:.1f} ms")
            pbar.update(1)
    return times


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); a single value is all three."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float] | None:
    """Quartiles of the per-round ratios ``a / b`` (None when either variant was not run)."""
    if a not in times or b not in times:
        return None
    return quartiles([x / y for x, y in zip(times[a], times[b])])
