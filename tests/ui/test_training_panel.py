"""pytest-qt: the training panel drives real TrainingRuns through the worker in chunks.

References are independent of the panel: the same settings trained headless with
:func:`unitscale_core.training.train` (bit-identical on CPU for a seed), and the records
themselves for the plots and the CSV.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PySide6.QtGui import QImage

from app.panels import training_panel as tp
from app.panels.training_jobs import Chunk
from app.worker import Worker
from unitscale_core import ModelConfig
from unitscale_core import training as core
from unitscale_core.training import TrainSettings, train

TINY = dict(architecture="decoder", d_model=16, n_heads=2, d_ff=32, n_layers=1, vocab_size=260,
            max_len=32, seq_len=16, batch_size=4, device="cpu")
TIMEOUT = 60_000


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.stop(5000) or w.wait()


@pytest.fixture
def panel(qtbot, worker):
    p = tp.TrainingPanel(ModelConfig(**TINY), worker)
    qtbot.addWidget(p)
    p.resize(1100, 700)
    p.show()
    yield p
    p.shutdown()


def enable(panel, *slots: int) -> None:
    for slot in panel.slots:
        slot.enabled.setChecked(slot.index in slots)


def settle(qtbot, panel) -> None:
    """Wait until no request of the panel (a run's chunk or an attention snapshot) is in
    flight."""
    qtbot.waitUntil(lambda: all(s.request is None for s in panel.slots)
                    and panel._attention_request is None, timeout=TIMEOUT)


def test_constants_mirror_the_trainer():
    assert tp.TASKS == core.TASKS
    assert tp.TRAIN_DTYPES == core.TRAIN_DTYPES
    assert tp.KINDS == core.KINDS
    assert tp.UNDERFLOW_FORMATS == core.UNDERFLOW_FORMATS


def test_start_trains_every_enabled_run_like_a_headless_run(qtbot, panel, tmp_path):
    panel.steps.setValue(5)
    panel.attn_every.setValue(2)
    assert [(s.param.currentData(), s.dtype.currentData()) for s in panel.slots] == \
        list(tp.DEFAULT_RUNS)  # standard-FP8, unit-FP8, standard-FP32
    panel.start()
    assert panel.stop_button.isEnabled() and not panel.slots[0].param.isEnabled()
    qtbot.waitUntil(lambda: all(s.state == tp.DONE for s in panel.slots), timeout=TIMEOUT)
    qtbot.waitUntil(lambda: panel.attention is not None and panel.attention.step == 5,
                    timeout=TIMEOUT)
    cfg = ModelConfig(**TINY)
    for slot, (param, dtype) in zip(panel.slots, tp.DEFAULT_RUNS):
        # chunked in the worker, interleaved with the other runs and attention snapshots,
        # the run equals one trained in a single call
        ref = train(cfg, TrainSettings(parametrization=param, dtype=dtype, steps=5))
        assert [r.step for r in slot.records] == [1, 2, 3, 4, 5]
        assert [r.loss for r in slot.records] == ref.losses
        x, y = panel.loss_plot.curve_data(slot.name)  # drawn when the run ended
        assert list(x) == [1, 2, 3, 4, 5]
        np.testing.assert_allclose(y, ref.losses, rtol=1e-6)
        assert slot.progress.value() == 5 and slot.progress.format().startswith("5 / 5")
        assert slot.status.text() == f"{ref.losses[-1]:.3f}"
        if slot.index == 0:
            ref_slot0 = ref
    assert "done" in panel.status.text()
    assert panel.start_button.isEnabled() and panel.slots[0].param.isEnabled()

    # views of the shown run (A): log2 RMS per tensor and step, underflow per kind
    assert panel.shown.currentData() == 0
    shown = panel.scales_view.data
    rms = np.stack([r.tensor_rms for r in ref_slot0.records], axis=1).astype(np.float64)
    want = np.full(rms.shape, np.nan)
    np.log2(rms, out=want, where=rms > 0)  # an RMS of 0 is drawn blank
    np.testing.assert_allclose(shown, want, rtol=1e-5)
    assert len(panel.scales_view.labels()) == len(ref_slot0.tensor_names)
    panel.views.setCurrentWidget(panel.underflow_view)  # a view draws when it is shown
    _, y = panel.underflow_view.plot.curve_data("grad_weight")  # E5M2 for weight gradients
    np.testing.assert_allclose(
        y, [100 * r.underflow["grad_weight"]["fp8_e5m2"] for r in ref_slot0.records])
    panel.scales_view.kind.setCurrentIndex(panel.scales_view.kind.findData("weight"))
    assert panel.scales_view.data.shape[0] == ref_slot0.tensor_kinds.count("weight")

    # attention at the last step: the headless run's maps, the causal mask blank
    att, tokens = ref_slot0.attention()
    snap = panel.attention
    assert snap.tokens == tokens and snap.factor == 1
    upper = np.triu(np.ones(att.shape[-2:], dtype=bool), 1)
    assert np.isnan(snap.att[..., upper]).all()
    np.testing.assert_allclose(snap.att[..., ~upper], att[..., ~upper], rtol=1e-5, atol=1e-7)
    assert panel.attention_view.model_view.images[0][1].image is not None

    # export: CSV rows are the records; PNGs are images
    path = tmp_path / "runs.csv"
    panel.export_csv(path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15
    for slot in panel.slots:
        mine = [r for r in rows if r["run"] == slot.name]
        assert [int(r["step"]) for r in mine] == [1, 2, 3, 4, 5]
        for row, rec in zip(mine, slot.records):
            assert row["dtype"] == slot.info.dtype
            assert float(row["loss"]) == rec.loss
            assert float(row["loss_scale"]) == rec.loss_scale
            for kind in tp.KINDS:
                assert float(row[f"rms_{kind}"]) == rec.kind_rms[kind]
                for fmt in tp.UNDERFLOW_FORMATS:
                    assert float(row[f"underflow_{kind}_{fmt}"]) == rec.underflow[kind][fmt]
    for export, name in ((panel.export_loss_png, "loss.png"), (panel.export_view_png, "v.png")):
        export(tmp_path / name)
        image = QImage(str(tmp_path / name))
        assert not image.isNull() and image.width() >= 600


def test_pause_holds_progress_resume_continues_stop_ends(qtbot, panel, worker):
    enable(panel, 1)
    panel.steps.setValue(2000)
    panel.attn_every.setValue(0)
    panel.start()
    slot = panel.slots[1]
    qtbot.waitUntil(lambda: len(slot.records) >= 2, timeout=TIMEOUT)
    panel.pause()
    assert panel.pause_button.text() == "Resume" and slot.progress.format().endswith("paused")
    settle(qtbot, panel)
    held = len(slot.records)
    assert slot.state == tp.PAUSED and not worker.busy()  # nothing queued: nothing can run
    qtbot.wait(300)
    assert len(slot.records) == held
    panel.resume()
    qtbot.waitUntil(lambda: len(slot.records) > held + 1, timeout=TIMEOUT)
    panel.stop()
    assert slot.state == tp.STOPPED and panel.start_button.text() == "Start"
    qtbot.waitUntil(lambda: not worker.busy(), timeout=TIMEOUT)
    ended = len(slot.records)
    qtbot.wait(300)
    assert len(slot.records) == ended < 2000
    assert [r.step for r in slot.records] == list(range(1, ended + 1))
    assert "stopped" in slot.progress.format()


def test_cancel_all_pauses_the_runs_without_losing_steps(qtbot, panel, worker):
    """The window's Cancel (Esc) cancels the running chunk or drops a pending one."""
    enable(panel, 0)
    panel.steps.setValue(2000)
    panel.attn_every.setValue(0)
    panel.start()
    slot = panel.slots[0]
    qtbot.waitUntil(lambda: len(slot.records) >= 1, timeout=TIMEOUT)
    worker.cancel()
    qtbot.waitUntil(lambda: slot.state == tp.PAUSED and slot.request is None, timeout=TIMEOUT)
    assert "cancelled" in panel.status.text() and panel.pause_button.text() == "Resume"
    held = len(slot.records)
    panel.resume()
    qtbot.waitUntil(lambda: len(slot.records) > held, timeout=TIMEOUT)
    panel.stop()
    settle(qtbot, panel)
    assert [r.step for r in slot.records] == list(range(1, len(slot.records) + 1))


def test_a_dropped_chunk_pauses_the_run_by_signal_without_polling(qtbot, panel, worker):
    """The worker's dropped_job signal is how the panel learns of a chunk Cancel dequeued:
    no repeating timer but the 1 s ETA clock polls while runs train (a watchdog used to look
    for dropped requests every 600 ms), and a cancel still pauses the run."""
    from PySide6.QtCore import QTimer

    enable(panel, 0)
    panel.steps.setValue(2000)
    panel.attn_every.setValue(0)
    panel.start()
    slot = panel.slots[0]
    qtbot.waitUntil(lambda: len(slot.records) >= 1, timeout=TIMEOUT)
    polling = [t for t in panel.findChildren(QTimer) if t.isActive() and not t.isSingleShot()]
    assert [t.interval() for t in polling] == [1000]
    worker.cancel()  # the running chunk (cancelled_job) or a pending one (dropped_job)
    qtbot.waitUntil(lambda: slot.state == tp.PAUSED and slot.request is None, timeout=TIMEOUT)
    settle(qtbot, panel)


def test_bad_settings_name_the_field_without_a_traceback(qtbot, panel):
    panel.update_config(ModelConfig(**{**TINY, "vocab_size": 100}))  # lm needs 256 bytes
    enable(panel, 0)
    with qtbot.waitSignal(panel.failed, timeout=TIMEOUT) as blocker:
        panel.start()
    assert "vocab_size" in blocker.args[0] and "Traceback" not in blocker.args[0]
    assert "vocab_size=100" in panel.status.text()
    assert panel.slots[0].state == tp.FAILED and panel.slots[0].status.text() == "⚠ failed"
    assert panel.start_button.isEnabled() and not panel.is_active()

    panel.lr.setText("fast")
    with qtbot.waitSignal(panel.failed, timeout=TIMEOUT) as blocker:
        panel.start()
    assert blocker.args[0] == "lr='fast' is not a number"

    panel.lr.setText("")  # fixed: the worker still serves
    panel.update_config(ModelConfig(**TINY))
    panel.steps.setValue(2)
    panel.start()
    qtbot.waitUntil(lambda: panel.slots[0].state == tp.DONE, timeout=TIMEOUT)
    assert panel.slots[0].message == "" and "⚠" not in panel.status.text()


def test_stale_results_are_dropped(qtbot, panel, worker):
    enable(panel, 2)
    panel.steps.setValue(3)
    panel.start()
    slot = panel.slots[2]
    first = slot.request
    panel.start()  # restart before the first request's result arrives: that one is stale
    assert slot.request != first
    fake = core.StepRecord(step=1, loss=123.0, loss_scale=1.0, skipped=False, kind_rms=None,
                           underflow=None, tensor_rms=None)
    worker.finished_job.emit(slot.channel, first, Chunk([fake], 1, False, 0.0))
    qtbot.waitUntil(lambda: slot.state == tp.DONE, timeout=TIMEOUT)
    ref = train(ModelConfig(**TINY), TrainSettings(parametrization="standard", dtype="fp32",
                                                  steps=3))
    assert [r.loss for r in slot.records] == ref.losses
    assert all(math.isfinite(r.loss) and r.loss != 123.0 for r in slot.records)


def test_runs_go_on_while_hidden_and_closing_stops_them(qtbot, make_window):
    win = make_window(ModelConfig(**TINY))
    panel = win.training_panel
    assert win.findChild(tp.TrainingPanel, "trainingPanel") is panel
    dock = win.docks["Training"]
    with qtbot.waitSignal(dock.visibilityChanged, check_params_cb=lambda v: v):
        dock.raise_()
    enable(panel, 1)
    panel.steps.setValue(4)
    panel.start()
    with qtbot.waitSignal(dock.visibilityChanged, check_params_cb=lambda v: not v):
        win.docks["Positional"].raise_()  # the training tab goes behind
    qtbot.waitUntil(lambda: panel.slots[1].state == tp.DONE, timeout=TIMEOUT)
    assert [r.step for r in panel.slots[1].records] == [1, 2, 3, 4]

    win.set_config(ModelConfig(**{**TINY, "d_model": 32}))  # applies at the next Start
    assert panel.config.d_model == 32 and panel.run_config.d_model == 16
    panel.steps.setValue(100_000)
    panel.start()
    qtbot.waitUntil(lambda: len(panel.slots[1].records) >= 1, timeout=TIMEOUT)
    assert panel.slots[1].info.config.d_model == 32
    win.close()  # stops the runs and the worker thread
    assert not win.worker.isRunning() and not panel.is_active()


def test_attention_shows_a_head_while_three_runs_train(qtbot, panel):
    """Issue 19: with three runs and "attention every 10" no head ever appeared mid-run (each
    run result re-asked for the snapshot, which cancelled the running one or sent the queued
    one behind the runs' next chunks)."""
    panel.steps.setValue(400)
    panel.attn_every.setValue(10)
    seen: list[tuple[int, bool]] = []  # (snapshot step, runs still active)
    panel.attention_ready.connect(lambda: seen.append((panel.attention.step,
                                                       panel.is_active())))
    panel.start()
    qtbot.waitUntil(lambda: len([s for s, active in seen if active]) >= 2, timeout=TIMEOUT)
    panel.stop()
    mid_run = [s for s, active in seen if active]
    assert mid_run == sorted(mid_run) and 0 < mid_run[0] < 400
    head = panel.attention_view.head_view.data  # the enlarged head, layer 0 head 0
    assert head.shape == (TINY["seq_len"], TINY["seq_len"])
    lower = np.tril(np.ones(head.shape, dtype=bool))  # causal: the rest is masked (NaN)
    assert np.isfinite(head[lower]).all() and np.isnan(head[~lower]).all()
    np.testing.assert_allclose(np.nansum(head, axis=1), 1.0, rtol=1e-4)  # softmax rows
    assert panel.attention_view.model_view.images[0][0].image is not None
    assert f"step {panel.attention.step}" in panel.attention_view.status.text()


def test_a_diverging_run_stops_and_says_why(qtbot, panel):
    """Issue 20 #12: a run whose loss became NaN went on with no warning. The trainer stops it
    and the panel shows its reason (step, learning rate, what to change); the others go on."""
    enable(panel, 0, 2)
    panel.slots[0].dtype.setCurrentIndex(panel.slots[0].dtype.findData("fp16"))
    panel.steps.setValue(30)
    panel.lr.setText("10")  # fp16 overflows after one update at this rate
    with qtbot.waitSignal(panel.failed, timeout=TIMEOUT) as blocker:
        panel.start()
    qtbot.waitUntil(lambda: not panel.is_active(), timeout=TIMEOUT)
    bad, fine = panel.slots[0], panel.slots[2]
    assert bad.state == tp.FAILED and fine.state == tp.DONE and len(fine.records) == 30
    assert len(bad.records) < 30 and not math.isfinite(bad.records[-1].loss)
    step = bad.records[-1].step
    assert blocker.args[0].startswith(f"run A: loss became NaN at step {step} ")
    assert "learning rate 10 is too large" in blocker.args[0]
    assert bad.message in panel.status.text() and panel.status.text().startswith("⚠")
    assert bad.status.text() == "⚠ failed" and bad.status.toolTip() == bad.message
    assert bad.progress.format() == f"{step} / 30 · failed"
    assert panel.start_button.isEnabled() and panel.start_button.text() == "Start"


def test_views_before_start_say_what_to_do_and_plots_keep_curves_visible(qtbot, panel):
    """Issue 19 minors: an empty grey heatmap before Start; the legend over the curves and run
    A hidden under C; the progress text clipped."""
    for view in (panel.scales_view, panel.underflow_view, panel.attention_view):
        panel.views.setCurrentWidget(view)
        assert view.placeholder.isVisible() and view.placeholder.text().startswith("Start a run")
    assert not panel.attention_view.model_view.isVisible()
    panel.views.setCurrentWidget(panel.scales_view)
    assert not panel.scales_view.heatmap.isVisible()

    panel.steps.setValue(6)
    panel.start()
    qtbot.waitUntil(lambda: not panel.is_active(), timeout=TIMEOUT)
    assert panel.scales_view.heatmap.isVisible() and not panel.scales_view.placeholder.isVisible()
    plot = panel.loss_plot
    legend = plot.legend.sceneBoundingRect()
    assert legend.height() > 0 and not legend.intersects(plot.plot_item.vb.sceneBoundingRect())
    a, b, c = (plot.curves[n] for n in "ABC")
    assert a.zValue() > b.zValue() > c.zValue()  # A on top of C, whose losses it equals
    assert c.opts["pen"].widthF() > a.opts["pen"].widthF()  # C wide, A visible inside it
    assert c.opts["pen"].color().alpha() < 255
    assert b.opts["pen"].style() != a.opts["pen"].style()
    for slot in panel.slots:
        bar = slot.progress
        assert bar.fontMetrics().horizontalAdvance(tp.WIDEST_PROGRESS) < bar.width()
    assert tp._duration(425) == "7:05" and tp._duration(3723) == "1:02:03"


def test_hidden_views_are_drawn_when_shown_not_per_chunk(qtbot, panel):
    """The GUI thread draws only what is on screen: the tab behind and a hidden panel catch up
    when shown."""
    enable(panel, 2)
    panel.shown.setCurrentIndex(2)
    panel.steps.setValue(4)
    panel.views.setCurrentWidget(panel.scales_view)
    panel.start()
    qtbot.waitUntil(lambda: not panel.is_active(), timeout=TIMEOUT)
    assert panel.scales_view.steps == [1, 2, 3, 4]
    assert panel.underflow_view._stale and not panel.underflow_view.plot.curves
    panel.views.setCurrentWidget(panel.underflow_view)
    assert not panel.underflow_view._stale
    assert list(panel.underflow_view.plot.curve_data("weight")[0]) == [1, 2, 3, 4]

    panel.hide()
    panel.start()
    qtbot.waitUntil(lambda: not panel.is_active(), timeout=TIMEOUT)
    assert panel._dirty and "C" not in panel.loss_plot.curves  # Start cleared; not redrawn
    panel.show()
    assert not panel._dirty
    x, y = panel.loss_plot.curve_data("C")
    assert list(x) == [1, 2, 3, 4] and list(y) == [r.loss for r in panel.slots[2].records]


def test_heatmap_step_tick_sits_at_the_centre_of_its_steps_column(qtbot):
    """Issue 19: the heatmap's step ticks were one column off. Each tick (x, "k") must name
    the step of the column whose centre is x, and hovering there describes step k."""
    from types import SimpleNamespace

    from app.widgets.training_views import ScalesView

    view = ScalesView()
    qtbot.addWidget(view)
    view.resize(900, 500)
    view.show()
    steps = [5, 10, 15, 20, 25, 30]
    records = [SimpleNamespace(step=s, tensor_rms=[2.0 ** -(s / 5), 1.0]) for s in steps]
    view.show_run("run A", ["w", "x"], ["weight", "activation"], records)
    ticks = view.heatmap.plot.getAxis("bottom")._tickLevels[0]
    assert [label for _, label in ticks] == [str(s) for s in steps]  # 900 px: room for all
    heatmap = view.heatmap
    for x, label in ticks:
        row, col = heatmap.cell_at(x, 0.5)
        assert steps[col] == int(label)
        assert x == col + 0.5  # the column spans [col, col + 1]
        assert f"step {label}:" in heatmap.describe(row, col)
    thinned = view.step_ticks(60.0)
    assert 0 < len(thinned) < len(steps)  # thinned when narrow, each still centred
    assert all(x == int(x) + 0.5 and steps[int(x)] == int(label) for x, label in thinned)


def test_loss_plot_before_start_says_what_will_appear_not_a_0_1_frame(qtbot, panel):
    """Issue 19: the empty loss plot showed meaningless 0–1 axes. Before Start it says what
    will appear and shows no axes; with a curve the axes return, fitted to the losses."""
    plot = panel.loss_plot
    item = plot.plot_item
    assert plot.is_empty() and plot.empty_text.isVisible()
    assert plot.empty_text.scene() is not None and "Press Start" in plot.empty_text.toPlainText()
    assert not item.getAxis("left").isVisible() and not item.getAxis("bottom").isVisible()
    enable(panel, 0)
    panel.steps.setValue(3)
    panel.start()
    qtbot.waitUntil(lambda: not panel.is_active(), timeout=TIMEOUT)
    settle(qtbot, panel)
    assert not plot.is_empty() and plot.empty_text.scene() is None
    assert item.getAxis("left").isVisible() and item.getAxis("bottom").isVisible()
    losses = [r.loss for r in panel.slots[0].records]
    qtbot.waitUntil(lambda: item.vb.viewRange()[1][0] <= min(losses) <= max(losses)
                    <= item.vb.viewRange()[1][1] and item.vb.viewRange()[1][1] > 1.5)
    plot.clear_curves()
    assert plot.is_empty() and plot.empty_text.scene() is not None
