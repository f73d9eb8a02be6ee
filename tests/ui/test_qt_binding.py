"""The installed Qt binding does not leak references to None (PySide6 6.12.0 on Python < 3.12
drops one per call and the process aborts after enough calls; pyproject excludes it)."""

from __future__ import annotations

import sys

from PySide6.QtWidgets import QLabel


def test_calls_do_not_drop_references_to_none(qtbot):
    label = QLabel()
    qtbot.addWidget(label)
    before = sys.getrefcount(None)
    for _ in range(1000):
        label.setWordWrap(True)
    assert abs(sys.getrefcount(None) - before) < 50
