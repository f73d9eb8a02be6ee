"""GUI reliability: 1,000 rapid config changes, worker faults through the measurement path,
and closing while a job runs."""

from __future__ import annotations

import gc
import math
import random
import sys
import threading
import time

import pytest
import torch
from PySide6.QtCore import Qt

from app.panels import scaling_panel as SP
from app.widgets.scale_table import COLUMNS
from unitscale_core import ModelConfig
from unitscale_core import measure as M
from unitscale_core.model import build_model
from unitscale_core.scaling.predict import predict

TINY = ModelConfig(d_model=8, n_heads=2, d_ff=16, n_layers=1, vocab_size=32, max_len=16,
                   seq_len=8, batch_size=2, device="cpu")


def _configs(n: int, seed: int = 0) -> list[ModelConfig]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        heads = rng.choice([1, 2, 4])
        out.append(TINY.replace(
            n_heads=heads, d_model=heads * rng.choice([2, 4]), n_layers=rng.randint(1, 2),
            seq_len=rng.randint(1, 16), batch_size=rng.randint(1, 3),
            parametrization=rng.choice(["standard", "unit", "umup"]),
            activation=rng.choice(["gelu", "relu", "swiglu"]), seed=rng.randint(0, 9)))
    return out


def _wait_idle(qtbot, win, timeout=20_000) -> None:
    qtbot.waitUntil(lambda: not win.worker.busy(), timeout=timeout)
    for _ in range(5):  # queued results reach their panels
        qtbot.wait(10)


def test_thousand_rapid_config_changes(qtbot, make_window):
    """Each change auto-measures; results arriving for an older config are never shown, the
    worker never holds more than one running plus one pending job per channel, and memory
    does not grow with the number of changes. Once idle, the panel shows exactly the final
    config's prediction and a measurement equal to an independent ``measure`` of it."""
    win = make_window(TINY)
    panel = win.scaling_panel
    panel.auto.setChecked(True)
    _wait_idle(qtbot, win)  # a job started before the counters connect would end uncounted
    in_flight = {"n": 0, "max": 0}

    def started(*_):
        in_flight["n"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["n"])

    def ended(*_):
        in_flight["n"] -= 1

    win.worker.started_job.connect(started)
    for sig in (win.worker.finished_job, win.worker.failed_job, win.worker.cancelled_job):
        sig.connect(ended)
    shown: list[tuple] = []

    def on_measured():  # what is displayed must be the measurement of what is configured
        cfg = panel.shown_config()
        head = {r.name: r.shape for r in panel.measured if r.kind == "activation"}["head"]
        assert head == (cfg.batch_size, cfg.seq_len, cfg.vocab_size)
        shown.append((cfg, head))

    panel.measured_ready.connect(on_measured)
    configs = _configs(1000)
    for cfg in configs[:50]:  # warm caches before measuring memory
        win.set_config(cfg)
        qtbot.wait(0)
    _wait_idle(qtbot, win)
    gc.collect()
    before = sys.getallocatedblocks()  # Python's live memory blocks (tracemalloc: 3× slower)
    channels = set()
    for i, cfg in enumerate(configs[50:]):
        win.set_config(cfg)
        with win.worker._lock:  # noqa: SLF001 - the queue itself is the invariant
            channels |= set(win.worker._pending)  # noqa: SLF001
            assert len(win.worker._pending) <= len(channels)  # noqa: SLF001
            assert len(set(win.worker._pending)) == len(win.worker._pending)  # noqa: SLF001
        if i % 7 == 0:
            qtbot.wait(1)  # let some results arrive mid-stream
    _wait_idle(qtbot, win)
    gc.collect()
    grown = sys.getallocatedblocks() - before
    assert in_flight["max"] <= 1 and in_flight["n"] == 0
    assert shown, "no measurement was ever displayed"
    final = configs[-1]
    assert win.config == final and panel.config == final
    expected = {(r.name, r.kind): r.rms for r in predict(final, formats=(
        panel.format.currentData(),))}
    assert {(r.name, r.kind): r.rms for r in panel.predicted} == expected
    assert panel._measured_for == final  # noqa: SLF001
    reference = {(r.name, r.kind): r.rms for r in M.measure(final)}
    assert {(r.name, r.kind) for r in panel.measured} == set(reference)
    for r in panel.measured:
        assert r.rms == pytest.approx(reference[(r.name, r.kind)], rel=1e-5, abs=1e-12)
    # 950 changes × hundreds of rows each would be millions of blocks if anything were kept
    assert grown < 100_000, f"{grown} more Python memory blocks after 950 changes"


def _measured_rms(panel) -> dict:
    return {(r.name, r.kind): r.rms for r in panel.measured}


def test_measurement_faults_then_a_good_measurement(qtbot, make_window, monkeypatch):
    """Out of memory, NaN weights and a failure after progress each come back as a message
    (or as visibly non-finite values), and the next measurement succeeds."""
    win = make_window(TINY)
    panel = win.scaling_panel
    real_cached = M.cached_model

    def oom(cfg, device):
        raise MemoryError()

    monkeypatch.setattr(M, "cached_model", oom)
    with qtbot.waitSignal(win.worker.failed_job, timeout=10_000) as failed:
        panel.measure()
    assert failed.args[2] == "out of memory"
    qtbot.waitUntil(lambda: "measurement failed: out of memory" in panel.summary.text())
    assert "cancelled" not in panel.summary.text()  # a failure is not a cancel

    def poisoned(cfg, device):  # a fresh model (the cache stays clean) with one NaN weight
        model = build_model(cfg, device=device)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = math.nan
        return model

    monkeypatch.setattr(M, "cached_model", poisoned)
    with qtbot.waitSignal(panel.measured_ready, timeout=10_000):
        panel.measure()
    bad = [k for k, v in _measured_rms(panel).items() if not math.isfinite(v)]
    assert bad, "NaN weights must show as non-finite measurements"
    col = COLUMNS.index("measured RMS")
    shown = [panel.proxy.index(r, col).data() for r in range(panel.proxy.rowCount())]
    assert "nan" in shown  # the table shows it as non-finite, not as a number

    progress: list[float] = []
    win.worker.progress.connect(lambda ch, rid, frac, text: progress.append(frac))

    def fails_midway():
        win.worker.report(0.5, "halfway")
        raise RuntimeError("device lost after step 3\ntraceback detail")

    with qtbot.waitSignal(win.worker.failed_job, timeout=10_000) as failed:
        win.worker.submit(SP.CHANNEL, fails_midway)
    assert failed.args[2] == "device lost after step 3" and progress == [0.5]

    monkeypatch.setattr(M, "cached_model", real_cached)
    with qtbot.waitSignal(panel.measured_ready, timeout=20_000):
        panel.measure()
    good = _measured_rms(panel)
    assert good and all(math.isfinite(v) for v in good.values())
    assert "failed" not in panel.summary.text()


def test_close_while_busy_is_quick(qtbot, make_window):
    win = make_window(TINY)
    started: list[int] = []
    win.worker.started_job.connect(lambda ch, rid: started.append(rid))

    def long_job():
        while True:
            win.worker.check_cancelled()
            time.sleep(0.01)

    win.worker.submit("long", long_job)
    win.scaling_panel.measure()  # and a pending measurement
    qtbot.waitUntil(lambda: bool(started))
    t0 = time.perf_counter()
    win.close()
    assert time.perf_counter() - t0 < 2.0
    assert not win.worker.isRunning()


def test_quitting_while_torch_still_loads_exits_cleanly(tmp_path):
    """A deep config's summary shown and the window closed in the first seconds, while the
    start-up thread is still importing and warming up torch: the process ends normally (it
    aborted in C++, "terminate called without an active exception", when that thread was a
    daemon stopped mid-warm-up: 3 of 3 runs)."""
    import os
    import subprocess

    script = tmp_path / "quit_early.py"
    script.write_text(
        "import time\n"
        "from PySide6.QtCore import QSettings\n"
        "from PySide6.QtWidgets import QApplication\n"
        "app = QApplication([])\n"
        "from app.main_window import MainWindow\n"
        "from unitscale_core import ModelConfig\n"
        "cfg = ModelConfig(d_model=64, n_heads=2, d_ff=256, n_layers=32, seq_len=32,\n"
        "                  max_len=32, batch_size=2, vocab_size=500)\n"
        f"settings = QSettings({str(tmp_path / 's.ini')!r}, QSettings.Format.IniFormat)\n"
        "win = MainWindow(cfg, settings=settings)\n"
        "win.show()\n"
        "t0 = time.time()\n"
        "while not win.scaling_panel.summary_complete() and time.time() - t0 < 60:\n"
        "    app.processEvents()\n"
        "    time.sleep(0.01)\n"
        "win.close()\n"
        "print('closed', flush=True)\n")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=os.getcwd())
    assert "closed" in done.stdout
    assert done.returncode == 0, done.stderr[-2000:]


# -- the busy indicator follows the worker (issue 19: busy state that never clears) ----------

def _indicator(win) -> tuple[bool, bool]:
    busy = win.findChild(type(win.busy), "busyIndicator")
    cancel = win.findChild(type(win.cancel_button), "cancelButton")
    return busy.isVisible(), cancel.isVisible()


def _waits_for_idle_indicator(qtbot, win) -> None:
    """Hidden within 1 s of the last job ending, and the 'running …' message gone."""
    qtbot.waitUntil(lambda: _indicator(win) == (False, False), timeout=1000)
    assert not win.statusBar().currentMessage().startswith("running")


def _held_job(worker, gate):
    def job():
        while not gate.is_set():
            worker.check_cancelled()
            time.sleep(0.005)
        return "done"
    return job


def _fail_a_job(qtbot, win) -> None:
    """Submit a job that raises "broken" and wait for its failure, then for an idle
    indicator (the job can end before the indicator ever shows, so waiting for an idle
    indicator alone may return before the queued failure arrives)."""
    def fails():
        raise RuntimeError("broken")
    with qtbot.waitSignal(win.worker.failed_job):
        win.worker.submit("job", fails)
    _waits_for_idle_indicator(qtbot, win)


def test_a_failure_covered_by_a_later_jobs_running_text_comes_back(qtbot, make_window):
    """A job that starts within a failure's 10 s shows "running …" over it; when it ends the
    failure is shown again, not an empty status bar (in CI a panel's own job, started late
    under load, wiped "job failed: broken" that way)."""
    win = make_window(TINY)
    worker = win.worker
    _waits_for_idle_indicator(qtbot, win)
    _fail_a_job(qtbot, win)
    assert win.statusBar().currentMessage() == "job failed: broken"
    gate = threading.Event()
    with qtbot.waitSignal(worker.started_job):
        worker.submit("other", _held_job(worker, gate))
    qtbot.waitUntil(lambda: win.statusBar().currentMessage().startswith("running"),
                    timeout=1000)
    gate.set()
    _waits_for_idle_indicator(qtbot, win)
    assert win.statusBar().currentMessage() == "job failed: broken"


def test_busy_indicator_clears_by_every_route(qtbot, make_window):
    """finished, failed, cancelled by the Cancel button (running and pending), replaced before
    it started, dropped by a panel's cancel, and a training run's Stop: each time the last job
    ends the busy bar and Cancel are hidden within 1 s. (Before: the window counted signals
    and asked ``busy()`` while the worker still held the ending job, so a cancel or a
    dequeued request left them shown for good.)"""
    win = make_window(TINY)
    worker = win.worker
    _waits_for_idle_indicator(qtbot, win)
    gate = threading.Event()

    # finished
    with qtbot.waitSignal(worker.started_job):
        worker.submit("job", _held_job(worker, gate))
    assert _indicator(win) == (True, True)
    assert win.statusBar().currentMessage() == "running job…"
    gate.set()
    _waits_for_idle_indicator(qtbot, win)

    # failed (the failure's message stays after the indicator goes)
    _fail_a_job(qtbot, win)
    assert "job failed: broken" in win.statusBar().currentMessage()

    # the Cancel button: the running job and a pending one it names, both ended
    gate.clear()
    with qtbot.waitSignal(worker.started_job):
        worker.submit("one", _held_job(worker, gate))
    worker.submit("two", lambda: 2)
    qtbot.waitUntil(lambda: "two" in win.cancel_button.toolTip(), timeout=1000)
    assert "one" in win.cancel_button.toolTip()
    ran: list[object] = []
    worker.finished_job.connect(lambda ch, rid, res: ran.append(res))
    qtbot.mouseClick(win.cancel_button, Qt.MouseButton.LeftButton)
    _waits_for_idle_indicator(qtbot, win)
    assert not worker.busy() and ran == []  # "two" was dequeued, never run

    # replaced before it started, then the replacement dropped by a channel's cancel
    with qtbot.waitSignal(worker.started_job):
        worker.submit("hold", _held_job(worker, gate))
    worker.submit("calc", lambda: 1)
    worker.submit("calc", lambda: 2)
    worker.cancel("calc")
    worker.cancel("hold")
    _waits_for_idle_indicator(qtbot, win)
    assert ran == []

    # a training run stopped by its panel (the route of the issue)
    panel = win.training_panel
    win.set_config(ModelConfig(architecture="decoder", d_model=16, n_heads=2, d_ff=32,
                               n_layers=1, vocab_size=260, max_len=32, seq_len=16,
                               batch_size=4, device="cpu"))  # the training lab's bytes
    _waits_for_idle_indicator(qtbot, win)
    for slot in panel.slots:
        slot.enabled.setChecked(slot.index == 1)
    panel.steps.setValue(100_000)
    panel.attn_every.setValue(0)
    panel.start()
    qtbot.waitUntil(lambda: len(panel.slots[1].records) >= 1 or "⚠" in panel.status.text(),
                    timeout=60_000)
    assert panel.slots[1].records, panel.status.text()
    assert _indicator(win) == (True, True)
    panel.stop()
    _waits_for_idle_indicator(qtbot, win)
    assert not worker.busy()


def test_warm_up_shows_no_indicator_but_a_user_job_behind_it_does(qtbot, make_window):
    from app.main_window import WARM_UP_CHANNEL

    win = make_window(TINY)
    worker = win.worker
    gate = threading.Event()
    with qtbot.waitSignal(worker.started_job):
        worker.submit(WARM_UP_CHANNEL, _held_job(worker, gate))
    qtbot.wait(20)
    assert _indicator(win) == (False, False)
    worker.submit("measure", lambda: 1)
    qtbot.waitUntil(lambda: _indicator(win) == (True, True), timeout=1000)
    qtbot.mouseClick(win.cancel_button, Qt.MouseButton.LeftButton)  # names only measure
    assert worker.activity() == (WARM_UP_CHANNEL,)
    _waits_for_idle_indicator(qtbot, win)
    gate.set()
    qtbot.waitUntil(lambda: not worker.busy(), timeout=5000)


# -- the model panel under hostile typing (issue 20 #12, issue 19 model-panel minors) -------

def _model_panel(qtbot, config=None):
    from app.panels.model_panel import ModelPanel

    panel = ModelPanel(config or ModelConfig())
    qtbot.addWidget(panel)
    panel.show()
    qtbot.waitExposed(panel)
    return panel


def _type(qtbot, box, text: str, commit: bool = True) -> None:
    """Type ``text`` key by key (non-ASCII characters as key events carrying the text)."""
    from PySide6.QtCore import QEvent
    from PySide6.QtGui import QKeyEvent
    from PySide6.QtWidgets import QApplication

    box.setFocus()
    box.selectAll()
    for ch in text:
        if ch.isascii():
            qtbot.keyClicks(box.lineEdit(), ch)
        else:
            QApplication.sendEvent(box, QKeyEvent(QEvent.Type.KeyPress, Qt.Key.Key_unknown,
                                                  Qt.KeyboardModifier.NoModifier, ch))
    if commit:
        qtbot.keyClick(box.lineEdit(), Qt.Key.Key_Return)


@pytest.mark.parametrize("field, typed, live, kept, valid", [
    ("seed", "-1", "seed cannot be negative", "seed stays 0", 5),
    ("d_model", "256.5", "is not a whole number", "d_model stays", 512),
    ("n_layers", "4x", "is not a number", "layers stays 4", 5),
    ("vocab_size", "٣", "type the digits 0-9", "vocabulary stays", 1000),
    ("dropout", "٣", "type the digits 0-9", "dropout stays", 0.25),
    ("dropout", "1.5", "above 1", "dropout stays", 0.25),
])
def test_typed_input_a_box_cannot_take_stays_visible_with_its_reason(qtbot, field, typed,
                                                                     live, kept, valid):
    """'-1' into seed used to apply 1, '256.5' 2565; a rejected character vanished silently.
    Now what was typed stays in the box with the reason under it, Enter keeps the last valid
    value and says so, nothing is applied, and the next valid edit clears the message."""
    panel = _model_panel(qtbot)
    edited: list = []
    panel.edited.connect(edited.append)
    box = panel._editors[field]
    error = panel._errors[field]
    before = box.value()
    _type(qtbot, box, typed, commit=False)
    assert box.lineEdit().text() == typed  # nothing dropped
    assert live in error.text() and error.isVisible()
    assert panel.invalid_reason()  # the other panels are told they show the last config
    qtbot.keyClick(box.lineEdit(), Qt.Key.Key_Return)
    assert box.value() == before and edited == []
    assert live in error.text() and kept in error.text()
    box.setValue(valid)  # a valid edit: applied, message gone
    assert edited and not error.text() and panel.invalid_reason() == ""


def test_invalid_editor_keeps_its_spin_arrows(qtbot):
    """The invalid mark is a property selector on the cell and editor: the editor has no
    style sheet of its own and its arrows are drawn exactly as before (an inline border style
    sheet replaced them with plain lines)."""
    from PySide6.QtWidgets import QStyle, QStyleOptionSpinBox

    panel = _model_panel(qtbot)
    box = panel._editors["d_model"]

    def arrows():
        opt = QStyleOptionSpinBox()
        box.initStyleOption(opt)
        style = box.style()
        rect = style.subControlRect(QStyle.ComplexControl.CC_SpinBox, opt,
                                    QStyle.SubControl.SC_SpinBoxUp, box).united(
            style.subControlRect(QStyle.ComplexControl.CC_SpinBox, opt,
                                 QStyle.SubControl.SC_SpinBoxDown, box))
        img = box.grab(rect).toImage()
        light = [[img.pixelColor(i, j).lightness() for i in range(img.width())]
                 for j in range(img.height())]
        median = sorted(v for row in light for v in row)[img.width() * img.height() // 2]
        return [[v < median - 60 for v in row] for row in light]  # the arrows' dark pixels

    valid = arrows()
    box.setValue(102)  # not divisible by 4 heads
    qtbot.wait(50)  # the error label laid out under it
    assert box.property("invalid") is True and panel._cells["d_model"].property("invalid")
    assert box.styleSheet() == ""
    assert sum(map(sum, valid)) > 10 and arrows() == valid


def test_stale_mark_and_preset_modified(qtbot, make_window):
    """An invalid edit marks Sizes and Scaling as showing the last valid config until it is
    fixed; the preset box says "— modified" after an edit and is plain again when the fields
    match the preset; 100,000 layers are refused next to the field and nothing runs."""
    from app.panels.model_panel import MODIFIED

    win = make_window(TINY)
    panel = win.model_panel
    changes: list = []
    win.config_changed.connect(changes.append)
    panel._editors["d_model"].setValue(9)  # not divisible by 2 heads
    for p in (win.sizes_panel, win.scaling_panel):
        assert p.stale.is_stale() and "d_model" in p.stale.text()
        assert "last valid config" in p.stale.text()
    panel._editors["d_model"].setValue(8)
    assert not win.sizes_panel.stale.is_stale() and not win.scaling_panel.stale.is_stale()

    panel._editors["n_layers"].setValue(100_000)
    assert "1,024" in panel._errors["n_layers"].text()
    assert win.sizes_panel.stale.is_stale() and win.config == TINY and changes == []
    assert win.worker.activity() == ()
    panel._editors["n_layers"].setValue(1)

    index = panel.preset.findData("gpt2-small")
    panel.preset.setCurrentIndex(index)
    panel.preset.activated.emit(index)
    label = panel.preset.currentText()
    assert label == "GPT-2 small (124M)"
    panel._editors["n_layers"].setValue(6)
    assert panel.preset.currentText() == label + MODIFIED
    panel._editors["n_layers"].setValue(12)
    assert panel.preset.currentText() == label
    win.set_config(TINY)  # another config (a file opened): no preset applies
    assert panel.preset.currentIndex() == 0 and panel.preset.itemText(index) == label


@pytest.mark.parametrize("typed, reason", [
    ("٣", "lr='٣' is not a number"),  # float() took it as 3.0
    ("1_0", "lr='1_0' is not a number"),
    ("nan", "lr='nan' is not a number"),
    ("1e30", "lr=1e30 must be between 1e-08 and 100"),  # trained to NaN without a word
    ("0", "lr=0 must be between 1e-08 and 100"),
])
def test_training_lr_field_refuses_odd_numbers_and_absurd_rates(qtbot, make_window, typed,
                                                                 reason):
    win = make_window(TINY)
    panel = win.training_panel
    panel.lr.setText(typed)
    with qtbot.waitSignal(panel.failed, timeout=10_000) as blocker:
        panel.start()
    assert blocker.args[0].startswith(reason)
    assert not panel.is_active() and win.worker.activity() == ()
