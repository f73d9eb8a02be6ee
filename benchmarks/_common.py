"""Shared benchmark plumbing: timing medians and the common command-line flags."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], repeats: int,
              before: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs; ``before()`` runs
    untimed ahead of each (e.g. clearing caches for cold runs)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """``--repeats N`` (default 5) and ``--json``."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    return p
