"""pytest-qt: the scaling panel's Measure path (issue 19): the memory budget's offer, progress
by layer, and Cancel within a pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PySide6.QtWidgets import QLabel, QWidget

from app.panels.scaling_panel import CHANNEL
from unitscale_core import ModelConfig
from unitscale_core import memory_budget as MB

SMALL = dict(d_model=64, n_heads=4, d_ff=128, n_layers=2, vocab_size=256, max_len=64,
             seq_len=32, batch_size=8, device="cpu")


@pytest.fixture
def window(make_window):
    return make_window(ModelConfig(**SMALL))


def fake_free(monkeypatch, available: int) -> None:
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=available, total=64 * 2**30))


def free_for_batch_4(cfg: ModelConfig) -> int:
    """Free bytes in which batch 4 of ``cfg`` fits and batch 8 does not (weights held)."""
    need4 = MB.measurement_memory(cfg.replace(batch_size=4), resident=True).needed
    need8 = MB.measurement_memory(cfg, resident=True).needed
    return int(need4 / MB.BUDGET_SHARE) + (need8 - need4) // 4


def test_over_budget_says_both_numbers_and_measures_a_smaller_batch(qtbot, window,
                                                                     monkeypatch):
    import torch

    from unitscale_core import measure as M

    panel = window.scaling_panel
    cfg = panel.shown_config()
    M.cached_model(cfg, torch.device("cpu"))  # its weights are held (as the estimate says)
    fake_free(monkeypatch, free_for_batch_4(cfg))
    with qtbot.waitSignal(window.worker.finished_job, timeout=30_000):
        panel.findChild(QWidget, "measureButton").click()
    box = panel.findChild(QWidget, "memoryBudgetBox")
    text = panel.findChild(QLabel, "memoryBudget").text()
    qtbot.waitUntil(lambda: box.isVisible())
    assert "needs about" in text and "of host RAM is free" in text
    assert "batch 8 × sequence 32" in text and "At batch × sequence 4 × 32" in text
    assert "weight gradients" in text  # which rows the smaller batch changes
    assert not panel.measured  # nothing ran
    smaller = panel.findChild(QWidget, "measureSmaller")
    assert smaller.isVisible() and smaller.text() == "Measure at 4 × 32"
    with qtbot.waitSignal(panel.measured_ready, timeout=60_000):
        smaller.click()
    assert not box.isVisible()
    left_out = set(MB.changed_rows(cfg, cfg.replace(batch_size=4)))
    shown = {(r.name, r.kind) for r in panel.measured}
    assert {kind for _, kind in left_out} == {"grad_activation", "grad_weight"}  # standard
    assert not shown & left_out and any(kind == "activation" for _, kind in shown)
    assert len(shown) + len(left_out) == len(M.measure(cfg.replace(batch_size=4)))
    assert "at batch × sequence 4 × 32 to fit in memory" in panel.summary.text()


def test_measure_anyway_ignores_the_budget(qtbot, window, monkeypatch):
    panel = window.scaling_panel
    fake_free(monkeypatch, free_for_batch_4(panel.shown_config()))  # batch 8 does not fit
    with qtbot.waitSignal(window.worker.finished_job, timeout=30_000):
        panel.measure()
    qtbot.waitUntil(lambda: panel.findChild(QWidget, "memoryBudgetBox").isVisible())
    anyway = panel.findChild(QWidget, "measureAnyway")
    assert anyway.isEnabled()
    with qtbot.waitSignal(panel.measured_ready, timeout=60_000):
        anyway.click()
    assert any(r.kind == "grad_weight" for r in panel.measured)
    assert "to fit in memory" not in panel.summary.text()  # measured at batch 8 as shown


def test_a_run_whose_weights_alone_do_not_fit_is_not_offered(qtbot, window, monkeypatch):
    """Even batch 1 × sequence 1 over the budget (a Llama-3-8B preset on a laptop: 64 GB of
    fp32 weights and gradients): the run could not finish, so 'Measure anyway' is disabled
    and says why, instead of swapping until the system kills the program."""
    panel = window.scaling_panel
    fake_free(monkeypatch, 1024)  # nothing fits
    with qtbot.waitSignal(window.worker.finished_job, timeout=30_000):
        panel.measure()
    qtbot.waitUntil(lambda: panel.findChild(QWidget, "memoryBudgetBox").isVisible())
    assert not panel.findChild(QWidget, "measureSmaller").isVisible()  # no batch would fit
    assert "Even batch 1 × sequence 1 would not fit" in panel.budget_label.text()
    assert "fewer layers or a narrower width" in panel.budget_label.text()
    anyway = panel.findChild(QWidget, "measureAnyway")
    assert not anyway.isEnabled() and "could not finish" in anyway.toolTip()
    assert not panel.measured


def test_a_config_change_withdraws_the_offer(qtbot, window, monkeypatch):
    panel = window.scaling_panel
    fake_free(monkeypatch, 1024)
    with qtbot.waitSignal(window.worker.finished_job, timeout=30_000):
        panel.measure()
    qtbot.waitUntil(lambda: panel.budget_box.isVisible())
    panel.update_config(panel.config.replace(seq_len=16))
    assert not panel.budget_box.isVisible()


def test_progress_shows_layers_forward_then_backward_and_clears(qtbot, window):
    panel = window.scaling_panel
    shown = []  # the panel's progress text as each report arrives (its slot runs first)
    window.worker.progress.connect(
        lambda ch, rid, f, text: shown.append(panel.measure_progress.text()))
    with qtbot.waitSignal(panel.measured_ready, timeout=60_000):
        panel.measure()
    assert any("forward: 2 of 2 layers" in t for t in shown)
    assert any("backward: " in t for t in shown)
    assert shown[-1] == "measuring… done (100%)"
    assert not panel.findChild(QWidget, "measureStatus").isVisible()


def test_cancel_during_the_backward_pass_stops_inside_it(qtbot, window, monkeypatch):
    """The worker's cancel, asked for after N recorded tensors (N past the forward's), ends
    the job from inside the backward pass: Cancelled, no result, the panel idle again."""
    panel = window.scaling_panel
    worker = window.worker
    forward = 40  # the 2-layer model records 33 tensors forward, as many gradients
    calls, texts = [], []
    real = worker.check_cancelled

    def tripping():
        calls.append(1)
        if len(calls) == forward:
            worker.cancel(CHANNEL)
        real()

    monkeypatch.setattr(worker, "check_cancelled", tripping)
    worker.progress.connect(lambda ch, rid, f, text: texts.append(text))
    results = []
    worker.finished_job.connect(lambda ch, rid, res: results.append(res))
    with qtbot.waitSignal(worker.cancelled_job, timeout=60_000):
        panel.measure()
    assert len(calls) == forward  # stopped at the very check that saw the cancel
    qtbot.wait(50)
    assert texts[-1].startswith("backward") and not results
    assert panel.findChild(QWidget, "measureButton").isEnabled()
    assert not panel.findChild(QWidget, "measureStatus").isVisible()
    assert "measurement cancelled" in panel.summary.text()
