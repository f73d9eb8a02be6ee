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
