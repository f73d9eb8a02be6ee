"""Launch to first painted window: ``unitscale-explorer`` against a bare PySide6 window.

Both are timed the same way in the same run: wall time of a fresh interpreter from start to
the window's first paint event (then exit). Medians, and the ratio ours / bare Qt; the goal
(issue 7) is ≤ 3 s absolute on this machine.

    python benchmarks/cold_start.py [--repeats 5] [--json]
    python benchmarks/cold_start.py --fresh-venv [--repeats 3]

``--fresh-venv`` is the newcomer's launch: a new venv (``python -m venv``), the README's
``pip install -c constraints-cpu.txt .`` of a copy of this tree into it (its own time is
reported as ``install_s``), then the installed ``unitscale-explorer --exit-on-first-paint``
from that venv — the first launch alone (``first_s``: nothing of it run before) and the
median of the next ``--repeats`` — each beside the same command from the existing venv, timed
alternately in the same run. The venv is deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
ROOT = Path(__file__).resolve().parents[1]
#: Not copied into the tree pip installs: caches, virtual environments, build output.
SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                              "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
                              "out")


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


def _entry_point(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / "unitscale-explorer"


def run_fresh_venv(repeats: int = 3) -> dict:
    """``cold_start_fresh_venv_s``: ``{"first_s"`` (the new venv's first launch), ``"value"``
    (its median over ``repeats`` more), ``"existing_first_s"``, ``"existing_venv_s"`` (the
    existing venv's, alternated with them), ``"ratio"`` (value / existing), ``"install_s"``
    (venv creation + pip install)}."""
    existing = _entry_point(Path(sys.prefix))
    if not existing.is_file():
        raise SystemExit(f"cold_start: {existing} is missing: run from an installed venv")
    with tempfile.TemporaryDirectory(prefix="unitscale-fresh-") as tmp:
        src, venv = Path(tmp) / "src", Path(tmp) / "venv"
        shutil.copytree(ROOT, src, ignore=SKIP)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       capture_output=True, timeout=300)
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "-c", str(src / "constraints-cpu.txt"), str(src)],
                             capture_output=True, text=True, timeout=1800)
        install = time.perf_counter() - t0
        if pip.returncode != 0:
            tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:]
            raise SystemExit(f"cold_start: pip install failed: {' '.join(tail)}")
        fresh = _entry_point(venv)
        # the first launch of each: the fresh venv's has never run (no torch/Qt import of its
        # files yet); the existing one's is measured the same way for comparison
        fresh_first = _time([str(fresh), "--exit-on-first-paint"])
        existing_first = _time([str(existing), "--exit-on-first-paint"])
        ours, theirs = [], []
        for _ in range(max(1, repeats)):
            ours.append(_time([str(fresh), "--exit-on-first-paint"]))
            theirs.append(_time([str(existing), "--exit-on-first-paint"]))
    o, e = statistics.median(ours), statistics.median(theirs)
    return {"cold_start_fresh_venv_s": {
        "first_s": round(fresh_first, 3), "value": round(o, 3),
        "existing_first_s": round(existing_first, 3), "existing_venv_s": round(e, 3),
        "ratio": round(o / e, 2), "install_s": round(install, 1)}}


if __name__ == "__main__":
    cli = parser(__doc__)
    cli.add_argument("--fresh-venv", action="store_true",
                     help="also install into a new venv and time its launches (minutes)")
    args = cli.parse_args()
    results = run(args.repeats)
    if args.fresh_venv:
        results.update(run_fresh_venv(args.repeats))
    report(results, args.json)
