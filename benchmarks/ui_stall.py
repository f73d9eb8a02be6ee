"""The longest main-thread stall while the worker runs the default measurement and attention.

A 5 ms ``QTimer`` heartbeat on the GUI thread; the figure is the largest gap between two ticks
while the worker measures the default config (one forward+backward) and computes the
configured model's attention maps for the default text (the attention tab raised, as a user
would have it). The window is opened as the program opens it: once the device is known the
worker warms torch up (``unitscale_core/warmup.py``) while the window is idle; the largest gap
during that is ``warm_up_ms``. Baseline in the same run: the same heartbeat with the worker
idle. Issue 4 / 7 goal: ≤ 50 ms.

    QT_QPA_PLATFORM=offscreen python benchmarks/ui_stall.py [--repeats 3] [--no-warm-up] [--json]

``--no-warm-up`` opens the window without it (the first round then pays torch's one-time
costs); ``UNITSCALE_BACKGROUND_NICE=0`` in the environment leaves the worker threads at the
GUI thread's priority (``app/thread_priority.py``): the two comparisons in the README.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from _common import parser, report  # noqa: E402
from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402


def heartbeat_gaps(app: QApplication, seconds: float, start=None, until=None) -> float:
    """Largest gap (ms) between 5 ms timer ticks over ``seconds`` (or until ``until()``)."""
    stamps: list[float] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: stamps.append(time.perf_counter()))
    timer.start()
    if start is not None:
        start()
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end and not (until is not None and until()):
        app.processEvents()
        time.sleep(0.001)
    timer.stop()
    return max((b - a) * 1e3 for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else 0.0


def run(repeats: int = 1, warm_up: bool = True) -> dict:
    """``ui_max_stall_ms``: ``{"value", "rounds_ms", "idle_baseline_ms", "ratio", "jobs_s",
    "warm_up_ms"}``.

    ``value`` is the worst of ``repeats`` rounds, the first included: it pays what the warm-up
    leaves to the first request (the attention panel's first full-size draw; until the
    warm-up froze the start-up heap, also the first full garbage collection, ~230 ms);
    ``rounds_ms`` lists every round's largest gap."""
    app = QApplication.instance() or QApplication([])
    from app.main_window import MainWindow

    window = MainWindow(warm_up=warm_up)
    window.resize(1600, 1000)
    window.show()
    window.wait_for_background()  # torch imported, device known
    warm_gap = heartbeat_gaps(app, 60.0, until=lambda: (
        window.device_label.text() != "device: looking…" and not window.worker.busy()))
    for _ in range(20):
        app.processEvents()
    idle = heartbeat_gaps(app, 1.0)
    measured: list[bool] = []
    shown: list[bool] = []
    window.scaling_panel.measured_ready.connect(lambda: measured.append(True))
    window.attention_panel.computed.connect(lambda: shown.append(True))
    window.docks["Attention"].raise_()  # an on-screen attention tab computes
    app.processEvents()

    def start() -> None:
        window.attention_panel.recompute()
        window.scaling_panel.measure()

    gaps, took = [], 0.0
    for _ in range(max(1, repeats)):
        measured.clear(), shown.clear()
        window.scaling_panel._measured_for = None  # noqa: SLF001 - measure afresh each round
        t0 = time.perf_counter()
        gap = heartbeat_gaps(app, 120.0, start, until=lambda: bool(measured and shown))
        took = max(took, time.perf_counter() - t0)
        gaps.append(round(gap, 1))
        if not (measured and shown):
            raise RuntimeError("the measurement or attention job did not finish in 120 s")
    window.close()
    worst = max(gaps)
    return {"ui_max_stall_ms": {"value": worst, "rounds_ms": gaps,
                                "idle_baseline_ms": round(idle, 1),
                                "ratio": round(worst / max(idle, 1e-3), 2),
                                "jobs_s": round(took, 2), "warm_up_ms": round(warm_gap, 1)}}


if __name__ == "__main__":
    p = parser(__doc__, repeats=1)
    p.add_argument("--no-warm-up", action="store_true", help="open the window without it")
    args = p.parse_args()
    report(run(args.repeats, warm_up=not args.no_warm_up), args.json)
