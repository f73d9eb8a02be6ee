"""Background threads give way to the GUI thread for the CPU.

A measurement or an attention job keeps every core busy (torch's intra-op threads, one per
core, plus the worker's own Python thread). At equal priority the GUI thread then gets its
fair share only — on 2 cores about half of one — so a 30 ms repaint took 60–120 ms of wall
time (``benchmarks/ui_stall.py``: main-thread CPU time was half of each long gap). Lowered,
the background threads run at full speed while the GUI is idle and step aside while it paints.

* Linux: threads have their own nice value (``setpriority`` on the thread id); threads a
  lowered thread starts — torch's OpenMP team, created by the worker on its first parallel
  op — inherit it.
* Windows and macOS: ``QThread.start(QThread.LowPriority)`` sets it (Qt ignores the priority
  on Linux under the default scheduler, hence the call above).
"""

from __future__ import annotations

import os
import sys
import threading

#: How far background threads are lowered (nice steps; the kernel's weight falls ~1.25× per
#: step, so 10 gives the GUI thread ~9× their share when both want a core). The environment
#: variable ``UNITSCALE_BACKGROUND_NICE`` overrides it (0: leave them at the GUI's priority).
BACKGROUND_NICE = 10


def _steps_from_environment(default: int) -> int:
    try:
        return int(os.environ.get("UNITSCALE_BACKGROUND_NICE", default))
    except ValueError:
        return default


def lower_this_thread(steps: int | None = None) -> bool:
    """Lower the calling thread's CPU priority by ``steps`` nice levels (default
    :data:`BACKGROUND_NICE` or the environment's; capped at 19); True when it was lowered.
    Raising nice needs no privilege; failures leave it as it was."""
    steps = _steps_from_environment(BACKGROUND_NICE) if steps is None else steps
    if steps <= 0 or not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return False
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + steps))
    except OSError:
        return False
    return True


def thread_nice(native_id: int) -> int | None:
    """The nice value of thread ``native_id`` (Linux), else None."""
    if not sys.platform.startswith("linux") or not hasattr(os, "getpriority"):
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, native_id)
    except OSError:
        return None
