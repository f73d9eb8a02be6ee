"""A one-line banner over a panel that shows the last valid config while the model panel's
draft is invalid (the window forwards ``ModelPanel.draft_invalid`` to each panel's
``set_stale``)."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QWidget

STALE_TEXT = "⚠ Showing the last valid config — the model panel has an invalid edit"
#: Characters of the reason shown in the banner (the whole reason is its tooltip).
MAX_REASON = 120


class StaleBanner(QLabel):
    """Hidden while the shown config is the draft; ``set_reason(text)`` shows it ("" hides)."""

    def __init__(self, object_name: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName(object_name)
        self.setWordWrap(True)
        self.setStyleSheet("QLabel { background: #fff3e0; color: #8a4b00; "
                           "border: 1px solid #ffb74d; border-radius: 3px; padding: 2px 6px; }")
        self.hide()

    def set_reason(self, reason: str) -> None:
        if not reason:
            self.clear()
            self.setToolTip("")
            self.hide()
            return
        short = reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"
        self.setText(f"{STALE_TEXT}: {short}")
        self.setToolTip(reason)
        self.show()

    def is_stale(self) -> bool:
        return bool(self.text())
