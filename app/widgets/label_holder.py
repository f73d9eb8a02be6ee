"""A word-wrapped label whose text changes do not relayout the panel around it."""

from __future__ import annotations

from PySide6.QtCore import QEvent, QSize, QTimer
from PySide6.QtWidgets import QLabel, QSizePolicy, QWidget


class LabelHolder(QWidget):
    """Holds a word-wrapped label outside any layout, at the height its text needs.

    A label in a layout invalidates it on every new text; the request climbs to the tab
    widget, which then repaints the whole panel (table and chart included), twice, on every
    config change. Here the label's request stops at this widget, which changes its own
    (fixed) height, and so asks its layout, only when the text needs more lines — at once —
    or fewer, once the text has stayed shorter for :data:`SHRINK_MS` (a summary that loses
    and regains a line while the user edits, as a warning waits for its prediction, would
    otherwise relayout the panel on every edit: a 40 ms stall with a 96-layer chart).
    """

    SHRINK_MS = 1500

    def __init__(self, label: QLabel, parent: QWidget | None = None):
        super().__init__(parent)
        self.label = label
        label.setParent(self)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        self._shrink = QTimer(self, singleShot=True, interval=self.SHRINK_MS)
        self._shrink.timeout.connect(lambda: self._fit(shrink=True))
        self._fit(shrink=True)

    def _fit(self, shrink: bool = False) -> None:
        wraps = self.label.wordWrap() and self.width() > 0  # (not laid out yet: one line)
        height = self.label.heightForWidth(self.width()) if wraps else -1
        if height < 0:
            height = self.label.sizeHint().height()
        if height < self.maximumHeight() and not shrink:
            self._shrink.start()  # (restarted by every shorter text)
            return
        if height != self.minimumHeight() or height != self.maximumHeight():
            self.setFixedHeight(height)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(self.label.sizeHint().width(), self.minimumHeight())

    def minimumSizeHint(self) -> QSize:  # noqa: N802
        return QSize(0, self.minimumHeight())

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.LayoutRequest:  # the label's text or font changed
            self._fit()
        return super().event(event)

    def resizeEvent(self, event) -> None:  # noqa: N802
        self.label.setGeometry(self.rect())
        self._fit()
