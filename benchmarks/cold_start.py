"""Launch to first painted window: ``unitscale-explorer`` against a bare PySide6 window.

Both are timed the same way in the same run: wall time of a fresh interpreter from start to
the window's first paint event (then exit). Prints medians and the ratio ours / bare Qt; the
goal (issue 7) is ≤ 3 s absolute on this machine.

    python benchmarks/cold_start.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

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


def _time(cmd: list[str]) -> float:
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ours_cmd = [sys.executable, "-m", "app", "--exit-on-first-paint"]
    bare_cmd = [sys.executable, "-c", BARE_QT]
    _time(bare_cmd), _time(ours_cmd)  # warm the file cache for both
    ours = statistics.median(_time(ours_cmd) for _ in range(args.repeats))
    bare = statistics.median(_time(bare_cmd) for _ in range(args.repeats))
    result = {
        "cold_start_s": {"ours_s": round(ours, 3), "bare_qt_s": round(bare, 3),
                         "ratio": round(ours / bare, 2), "goal_s": 3.0},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}, {platform.system()}",
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result["cold_start_s"]
        print(f"{result['machine']}\nlaunch to first paint: ours {r['ours_s']:.2f} s, bare Qt "
              f"{r['bare_qt_s']:.2f} s, ratio {r['ratio']:.2f} (goal ≤ {r['goal_s']} s)")


if __name__ == "__main__":
    main()
