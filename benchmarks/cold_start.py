"""Launch to first painted window: ``unitscale-explorer`` against a bare PySide6 window.

Both are timed the same way in the same run: wall time of a fresh interpreter from start to
the window's first paint event (then exit). Medians, and the ratio ours / bare Qt; the goal
(issue 7) is ≤ 3 s absolute on this machine.

    python benchmarks/cold_start.py [--repeats 5] [--json]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from _common import parser, report

BARE_QT = """
import sys
from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtWidgets import QApplication, QMainWindow, QLabel
app = QApplication(sys.argv[:1])
w = QMainWindow(); w.setCentralWidget(QLabel("hello")); w.resize(1600, 1000)
class F(QObject):
    def eventFilter(self, o, e):
        if e.type() == QEvent.Type.Paint:
            QTimer.singleShot(0, app.quit)
        return False
f = F(); w.installEventFilter(f); w.show(); app.exec()
"""
GOAL_S = 3.0


def _time(cmd: list[str]) -> float:
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def run(repeats: int = 5) -> dict:
    """``cold_start_s``: ``{"value"`` (ours, s), ``"bare_qt_s"``, ``"ratio"}``."""
    ours_cmd = [sys.executable, "-m", "app", "--exit-on-first-paint"]
    bare_cmd = [sys.executable, "-c", BARE_QT]
    _time(bare_cmd), _time(ours_cmd)  # warm the file cache for both
    ours, bare = [], []
    for _ in range(max(1, repeats)):  # alternate, so a busy spell hits both
        ours.append(_time(ours_cmd))
        bare.append(_time(bare_cmd))
    o, b = statistics.median(ours), statistics.median(bare)
    return {"cold_start_s": {"value": round(o, 3), "bare_qt_s": round(b, 3),
                             "ratio": round(o / b, 2)}}


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    report(run(args.repeats), args.json)
