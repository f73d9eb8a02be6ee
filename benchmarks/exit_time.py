"""Window close → process exit of the real program, against the 2 s goal (issues 19 and 20 #13).

Each case starts ``python -m app`` in a fresh interpreter with a throw-away settings folder
(the program's own session: settings restored and saved), drives it through
``app.__main__.main(ready=...)`` to the state named below, closes the window as the user would
(``window.close()``, what the title bar's × and File → Quit do) and times from that moment to
the end of the process, as the parent sees it. The prompts (unsaved changes, work running) are
switched off: the time a user spends answering is not the program's.

    tiny         the tiny preset, idle (predictions drawn, the worker idle)
    gpt3         a GPT-3-shaped config (96 layers, d_model 12288, 96 heads), idle
    training     the tiny preset, closed while its three default training runs train
    attention    the tiny preset, closed while the attention of a long text is computed
    screenshot   ``--screenshot`` of a 96-layer config: from "saved" to the process's end

Prints seconds per case, the worst, its ratio to the goal (≤ 1 meets it) and each case's exit
status (a negative one is the signal that killed it: -11 is SIGSEGV).

    python benchmarks/exit_time.py [--repeats 1] [--json] [--cases tiny training ...]
                                   [--tree DIR]

``--tree DIR`` runs the program from another checkout instead (e.g. the baseline before the
fix: ``git archive 2a3ea7c | tar -x -C DIR``), with this script's driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parser, report

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 2.0
CASES = ("tiny", "gpt3", "training", "attention", "screenshot")
GPT3 = {"d_model": 12288, "n_heads": 96, "d_ff": 49152, "n_layers": 96, "vocab_size": 50257,
        "max_len": 2048, "seq_len": 2048, "batch_size": 1}
DEEP = {"n_layers": 96}  # the tiny preset 96 layers deep (the screenshot case)

# Runs in the child: drive the program to the case's state, print the moment of the close.
DRIVER = r"""
import json, sys, time
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
import app.__main__ as program
import app.main_window as main_window

case, config, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
t0 = time.perf_counter()
state = {"since": None}


def ready(app, window):
    window._confirm = False  # no prompts: answering them is not the program's time

    def idle():
        return not window.worker.busy() and not window.scaling_panel.predictions.isRunning()

    def close(reason):
        timer.stop()
        print(json.dumps({"closed_at": time.time(), "reason": reason,
                          "after_s": round(time.perf_counter() - t0, 2)}), flush=True)
        window.close()

    def poll():
        now = time.perf_counter()
        if now - t0 > limit:
            return close("time limit")
        if case == "training":
            panel = window.training_panel
            if state["since"] is None:
                if now - t0 > 2 and idle():
                    panel.start()
                    state["since"] = now
            elif any(len(s.records) >= 2 for s in panel.slots):
                return close("training")
        elif case == "attention":
            panel = window.attention_panel
            if state["since"] is None:
                if now - t0 > 2 and idle():
                    panel.text.setText(" ".join(["the scale of every tensor"] * 350))
                    panel.recompute()
                    state["since"] = now
            elif now - state["since"] > 1.0 and window.worker.busy():
                return close("attention running")
        elif now - t0 > 2 and idle():  # idle cases: a second more for the last paint
            if state["since"] is None:
                state["since"] = now
            elif now - state["since"] > 1.0:
                return close("idle")

    timer = QTimer(window)
    timer.timeout.connect(poll)
    timer.start(50)


show = main_window.MainWindow.show


def shown(window):  # the program shows its window once, just before its event loop
    show(window)
    if not state.get("driven"):
        state["driven"] = True
        ready(QApplication.instance(), window)


main_window.MainWindow.show = shown
code = program.main(["--config", config])
# an older tree (--tree, the baseline) has no leave(): it ends as it always did
getattr(program, "leave", sys.exit)(code)
"""


def _config_file(folder: Path, changes: dict) -> Path:
    base = json.loads((ROOT / "resources" / "presets" / "tiny.json").read_text())
    path = folder / "config.json"
    path.write_text(json.dumps({**base, **changes}))
    return path


def _env(folder: Path) -> dict:
    return {**os.environ, "XDG_CONFIG_HOME": str(folder / "config"),
            "PYTHONPATH": str(ROOT),  # the tree under test before the installed one
            "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}


def _driven(case: str, folder: Path, limit_s: float) -> dict:
    config = _config_file(folder, GPT3 if case == "gpt3" else {})
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, case, str(config), str(limit_s)],
                            cwd=ROOT, env=_env(folder), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    closed, reason = None, ""
    for line in proc.stdout:  # the driver's one line comes at the close
        if line.startswith("{"):
            info = json.loads(line)
            closed, reason = info["closed_at"], info["reason"]
            break
    try:
        proc.wait(timeout=limit_s + 600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    end = time.time()
    stderr = proc.stderr.read()
    return {"exit_s": round(end - closed, 3) if closed else None, "returncode": proc.returncode,
            "state": reason, "stderr": stderr.strip().splitlines()[-1:] if proc.returncode
            else []}


def _screenshot(folder: Path) -> dict:
    config = _config_file(folder, DEEP)
    proc = subprocess.Popen([sys.executable, "-m", "app", "--config", str(config),
                             "--screenshot", str(folder / "shot.png")], cwd=ROOT,
                            env=_env(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    saved = None
    for line in proc.stdout:
        if "saved" in line:
            saved = time.time()
    proc.wait(timeout=900)
    end = time.time()
    return {"exit_s": round(end - saved, 3) if saved else None, "returncode": proc.returncode,
            "state": "screenshot saved", "stderr": []}


def run(repeats: int = 1, cases: tuple[str, ...] = CASES, limit_s: float = 600) -> dict:
    """``exit_time_s``: ``{"value"`` (worst seconds), ``"ratio"`` (worst / 2 s), per case
    ``"<case>_s"`` (the worst of ``repeats``) and ``"returncodes"}``."""
    out: dict = {}
    codes: dict[str, list[int]] = {}
    for case in cases:
        times = []
        for _ in range(max(1, repeats)):
            with tempfile.TemporaryDirectory(prefix="exit-time-") as tmp:
                got = (_screenshot(Path(tmp)) if case == "screenshot"
                       else _driven(case, Path(tmp), limit_s))
            codes.setdefault(case, []).append(got["returncode"])
            if got["exit_s"] is not None:
                times.append(got["exit_s"])
            if got["stderr"]:
                print(f"{case}: {got['stderr'][0]}", file=sys.stderr)
        out[f"{case}_s"] = max(times) if times else None
    worst = max((v for v in out.values() if v is not None), default=float("nan"))
    return {"exit_time_s": {"value": worst, "ratio": round(worst / GOAL_S, 2), **out,
                            "returncodes": codes}}


if __name__ == "__main__":
    p = parser(__doc__, repeats=1)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--tree", type=Path, help="run the program from this checkout instead")
    args = p.parse_args()
    if args.tree:
        ROOT = args.tree.resolve()
    report(run(args.repeats, tuple(args.cases)), args.json)
