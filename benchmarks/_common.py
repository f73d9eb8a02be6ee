"""Shared benchmark plumbing: timing medians, the machine's description, goals, flags.

Every benchmark module exposes ``run(repeats) -> dict`` mapping its result keys (those of
issue 7's ``benchmarks/run.py --json``) to plain dicts of figures, and stays runnable alone
(``python benchmarks/<name>.py [--repeats N] [--json]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], repeats: int,
              before: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs; ``before()`` runs
    untimed ahead of each (e.g. clearing caches for cold runs)."""
    times = []
    for _ in range(max(1, repeats)):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def paired_medians_ms(ours: Callable[[], object], theirs: Callable[[], object],
                      repeats: int) -> tuple[float, float]:
    """Medians (ms) of ``ours`` and ``theirs`` timed alternately, one of each per round, so
    a slow spell of a shared machine hits both sides alike."""
    a, b = [], []
    for _ in range(max(1, repeats)):
        for fn, out in ((ours, a), (theirs, b)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(a), statistics.median(b)


def ratio_entry(ours_ms: float, theirs_ms: float, **extra: float) -> dict:
    """``{"ours_ms", "theirs_ms", "ratio"}`` (ratio = ours / theirs) plus ``extra``."""
    return {"ours_ms": round(ours_ms, 2), "theirs_ms": round(theirs_ms, 2),
            "ratio": round(ours_ms / theirs_ms, 4) if theirs_ms > 0 else float("inf"),
            **extra}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on: CPU, cores, OS, Python, torch, PySide6, device."""
    import torch

    try:
        import PySide6
        pyside = PySide6.__version__
    except ImportError:  # pragma: no cover - the app's own dependency
        pyside = "not installed"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads(),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__,
            "pyside6": pyside, "device": device}


def machine_line(info: dict | None = None) -> str:
    m = info or machine()
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['os']}, "
            f"Python {m['python']}, torch {m['torch']}, PySide6 {m['pyside6']}, "
            f"device {m['device']}")


def parser(doc: str | None, repeats: int = 5) -> argparse.ArgumentParser:
    """``--repeats N`` and ``--json``."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--json", action="store_true")
    return p


def report(results: dict, as_json: bool) -> None:
    """Print one benchmark's results alone: JSON, or one line per key, machine first."""
    if as_json:
        print(json.dumps({**results, "machine": machine()}, indent=2))
        return
    print(machine_line())
    for key, value in results.items():
        print(f"{key:32s} {value}")
    sys.stdout.flush()
