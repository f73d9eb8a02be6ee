"""The longest main-thread stall while the worker measures (a 5 ms heartbeat's largest gap).

Baseline in the same run: the same heartbeat with the worker idle. Issue 4/7 goal: ≤ 50 ms.

    QT_QPA_PLATFORM=offscreen python benchmarks/ui_stall.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    app = QApplication.instance() or QApplication([])
    from app.main_window import MainWindow

    window = MainWindow()
    window.show()
    window.wait_for_background()  # torch imported, device known
    app.processEvents()
    idle = heartbeat_gaps(app, 1.0)
    done: list[bool] = []
    window.scaling_panel.measured_ready.connect(lambda: done.append(True))
    t0 = time.perf_counter()
    busy = heartbeat_gaps(app, 60.0, window.scaling_panel.measure, until=lambda: bool(done))
    result = {"ui_max_stall_ms": {"value": round(busy, 1), "idle_baseline_ms": round(idle, 1),
                                  "ratio": round(busy / max(idle, 1e-3), 2), "goal": 50.0},
              "measurement_finished": bool(done),
              "window_s": round(time.perf_counter() - t0, 2)}
    window.close()
    print(json.dumps(result, indent=2) if args.json else result)


if __name__ == "__main__":
    main()
