"""Shared UI fixtures: a shown MainWindow, closed (worker stopped) after the test."""

from __future__ import annotations

import pytest

from app.main_window import MainWindow


@pytest.fixture
def make_window(qtbot):
    """``make_window(config=None)`` → a shown, exposed MainWindow that is closed afterwards."""
    windows = []

    def make(config=None):
        win = MainWindow(config)
        qtbot.addWidget(win)
        win.show()
        qtbot.waitExposed(win)
        windows.append(win)
        return win

    yield make
    for win in windows:
        win.close()


@pytest.fixture(autouse=True)
def _fresh_export_folder():
    """Each test starts with no remembered export folder and no settings store for it (the
    module keeps the last export's folder for the session)."""
    from app import export

    saved = dict(export._export_state)
    export._export_state.update(folder="", store=None)
    yield
    export._export_state.clear()
    export._export_state.update(saved)
