"""The training lab's speed: the panel's three default runs against the same runs headless,
and the GUI thread's CPU share while they train (issue 19, "the training lab crawls").

    python benchmarks/training_panel.py [--steps N] [--repeats R] [--json]

* ``training_panel_vs_cli``: steps per second of the panel's three default runs
  (``DEFAULT_RUNS``: standard·fp8_e4m3, unit·fp8_e4m3, standard·fp32) on the app's default
  config (the tiny preset, ``ModelConfig(device="cpu")``), trained together in the panel (the
  worker's chunks, the redraws, an attention snapshot every 10 steps and at the end), over
  the same three runs trained one after the other through ``unitscale_core.training
  .TrainingRun`` in one thread of this process, as ``unitscale train`` does. Both sides
  include building the models; ratio = panel / headless, goal ≥ 0.8. The headless thread is
  lowered as the worker is (``app.thread_priority.lower_this_thread``), so on a busy machine
  both get the same share of it and the ratio measures what the panel adds.
* ``training_gui_thread_cpu``: the GUI thread's CPU time (``time.thread_time()`` read on that
  thread) over the wall time from Start to the last run's end, in % of one core; goal ≤ 15.
  Beside it: the same share over an idle second of the same window (the baseline), and the
  GUI thread's CPU milliseconds per training step.

An untimed one-step round of each side pays torch's one-time costs first; then rounds
alternate headless and panel, and each figure is the median over rounds.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import parser, report  # noqa: E402

STEPS = 12  # per run: an attention refresh at step 10 and one at the end, as with 80 steps
TIMEOUT_S = 1800.0


def _config():
    from unitscale_core import ModelConfig

    return ModelConfig(device="cpu")  # the app's default config; the panel trains on it


class Headless:
    """One long-lived thread, lowered as the worker is, that trains the three default runs
    one after the other (a fresh thread pays for its own allocator arena and OpenMP team; the
    app's worker lives as long as the window, so this one lives as long as the benchmark)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from app.thread_priority import lower_this_thread

        self.pool = ThreadPoolExecutor(1, "headless-training", initializer=lower_this_thread)

    def seconds(self, steps: int) -> float:
        return self.pool.submit(self._train, steps).result()

    @staticmethod
    def _train(steps: int) -> float:
        from app.panels.training_panel import DEFAULT_RUNS
        from unitscale_core.training import TrainingRun, TrainSettings

        cfg = _config()
        t0 = time.perf_counter()
        for param, dtype in DEFAULT_RUNS:
            run = TrainingRun(cfg, TrainSettings(parametrization=param, dtype=dtype,
                                                 steps=steps))
            run.run(steps)
        return time.perf_counter() - t0


def panel_figures(steps: int, worker) -> dict[str, float]:
    """Start the panel's three default runs in a 1366×768 window and wait for their end:
    wall seconds, the GUI thread's CPU seconds, steps done, attention snapshots drawn."""
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from app.panels import training_panel as tp

    app = QApplication.instance() or QApplication([])
    panel = tp.TrainingPanel(_config(), worker)
    panel.resize(1366, 768)
    panel.show()
    panel.steps.setValue(steps)
    snapshots = []
    panel.attention_ready.connect(lambda: snapshots.append(panel.attention.step))
    loop = QEventLoop()
    idle = {}

    def idle_start() -> None:
        idle["t"], idle["cpu"] = time.perf_counter(), time.thread_time()

    def idle_end() -> None:
        idle["share"] = (time.thread_time() - idle["cpu"]) / (time.perf_counter() - idle["t"])
        loop.quit()

    QTimer.singleShot(200, idle_start)  # the window's idle share, the baseline
    QTimer.singleShot(1200, idle_end)
    loop.exec()

    poll = QTimer(interval=250)  # the poll's own cost counts as the GUI thread's: keep it rare
    poll.timeout.connect(lambda: None if panel.is_active() else loop.quit())
    t0, cpu0 = time.perf_counter(), time.thread_time()
    panel.start()
    poll.start()
    QTimer.singleShot(int(TIMEOUT_S * 1e3), loop.quit)
    loop.exec()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    poll.stop()
    done = sum(len(s.records) for s in panel.slots)
    states = [s.state for s in panel.slots]
    panel.shutdown()
    panel.close()
    panel.deleteLater()
    app.processEvents()
    if states != [tp.DONE] * tp.SLOTS:
        raise RuntimeError(f"the panel's runs ended as {states}, not done")
    return {"seconds": wall, "gui_cpu_s": cpu, "steps": done, "snapshots": len(snapshots),
            "idle_share": idle["share"]}


def run(repeats: int = 1, steps: int = STEPS) -> dict:
    ours, theirs, shares, per_step, idle = [], [], [], [], []
    snapshots = 0
    from PySide6.QtWidgets import QApplication

    from app.worker import Worker

    QApplication.instance() or QApplication([])
    worker, headless = Worker(), Headless()
    headless.seconds(1)  # untimed: torch's one-time costs, on each side
    panel_figures(1, worker)
    for _ in range(max(1, repeats)):
        theirs.append(3 * steps / headless.seconds(steps))
        fig = panel_figures(steps, worker)
        ours.append(fig["steps"] / fig["seconds"])
        shares.append(100.0 * fig["gui_cpu_s"] / fig["seconds"])
        per_step.append(1e3 * fig["gui_cpu_s"] / fig["steps"])
        idle.append(100.0 * fig["idle_share"])
        snapshots = fig["snapshots"]
    worker.stop(10_000)
    headless.pool.shutdown()
    panel_rate, cli_rate = statistics.median(ours), statistics.median(theirs)
    return {
        "training_panel_vs_cli": {
            "ours_steps_per_s": round(panel_rate, 3), "theirs_steps_per_s": round(cli_rate, 3),
            "ratio": round(panel_rate / cli_rate, 3), "steps_per_run": steps,
            "rounds": len(ours), "attention_snapshots": snapshots},
        "training_gui_thread_cpu": {
            "value": round(statistics.median(shares), 2), "unit": "%",
            "idle_baseline_pct": round(statistics.median(idle), 2),
            "gui_cpu_ms_per_step": round(statistics.median(per_step), 2),
            "rounds": len(shares)},
    }


if __name__ == "__main__":
    p = parser(__doc__, repeats=1)
    p.add_argument("--steps", type=int, default=STEPS, help="steps per run")
    args = p.parse_args()
    report(run(args.repeats, args.steps), args.json)
