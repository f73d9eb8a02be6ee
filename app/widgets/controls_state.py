"""Save and restore a panel's controls (combo boxes, check boxes, spin boxes, line edits,
splitters) as plain JSON-able values keyed by ``objectName``.

What comes back from settings may be stale or hostile: every value is checked against the
control (a combo's value must be one of its items, a number must be within the spin box's
range, text is capped), and what does not fit is skipped with a one-line reason, never
raised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import QByteArray
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QLineEdit,
    QSpinBox,
    QSplitter,
    QTabBar,
    QTabWidget,
    QToolTip,
    QWidget,
)

MAX_TEXT = 10_000  # characters of a line edit restored (a text box, not a file)
MAX_SPLITTER_STATE = 4096  # bytes: a splitter's state is a few dozen


def control_value(widget: QWidget) -> Any:
    """The control's value: a combo's item data (its text when the item has none)."""
    if isinstance(widget, QComboBox):
        data = widget.currentData() if widget.currentIndex() >= 0 else None
        return widget.currentText() if data is None else data
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        return widget.value()
    if isinstance(widget, QLineEdit):
        return widget.text()
    if isinstance(widget, (QTabWidget, QTabBar)):
        return widget.currentIndex()
    if isinstance(widget, QSplitter):
        return bytes(widget.saveState().toHex()).decode("ascii")
    raise TypeError(f"{type(widget).__name__} has no saved state")


def set_control_value(widget: QWidget, value: Any) -> str | None:
    """Show ``value`` in ``widget``; the reason it cannot (None when it did)."""
    name = widget.objectName()
    if isinstance(widget, QComboBox):
        index = widget.findData(value) if isinstance(value, (str, int, float)) and \
            not isinstance(value, bool) else -1
        if index < 0 and isinstance(value, str):
            index = widget.findText(value)
        if index < 0:
            return f"{name}: {str(value)[:40]!r} is not one of its choices"
        widget.setCurrentIndex(index)
    elif isinstance(widget, QCheckBox):
        if not isinstance(value, bool):
            return f"{name}: {str(value)[:40]!r} is not true or false"
        widget.setChecked(value)
    elif isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        integral = isinstance(widget, QSpinBox)
        ok = isinstance(value, int) if integral else isinstance(value, (int, float))
        # an int is compared as it is: math.isfinite(10**401) raises OverflowError
        if not ok or isinstance(value, bool) or \
                (isinstance(value, float) and not math.isfinite(value)) or \
                not widget.minimum() <= value <= widget.maximum():
            return (f"{name}: {str(value)[:40]!r} is not a number between "
                    f"{widget.minimum()} and {widget.maximum()}")
        widget.setValue(value)
    elif isinstance(widget, QLineEdit):
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            return f"{name}: not a text of at most {MAX_TEXT} characters"
        widget.setText(value)
    elif isinstance(widget, (QTabWidget, QTabBar)):
        if not isinstance(value, int) or isinstance(value, bool) or \
                not 0 <= value < widget.count():
            return f"{name}: no tab {str(value)[:40]!r}"
        widget.setCurrentIndex(value)
    elif isinstance(widget, QSplitter):
        try:
            if not isinstance(value, str) or len(value) > 2 * MAX_SPLITTER_STATE:
                raise ValueError
            state = QByteArray.fromHex(value.encode("ascii"))
        except (UnicodeEncodeError, ValueError):
            return f"{name}: not a splitter state"
        if not widget.restoreState(state):
            return f"{name}: not a splitter state"
    else:
        return f"{name}: {type(widget).__name__} cannot be restored"
    return None


def save_controls(widgets: Sequence[QWidget]) -> dict[str, Any]:
    """``{objectName: value}`` of each control."""
    return {w.objectName(): control_value(w) for w in widgets}


def restore_controls(widgets: Sequence[QWidget], state: Any) -> list[str]:
    """Apply ``state`` (from :func:`save_controls`) in ``widgets``' order; unknown names and
    values that do not fit are skipped. Returns the reasons for what was skipped."""
    if not isinstance(state, dict):
        return [f"saved panel state is {type(state).__name__}, not a table of controls"]
    by_name = {w.objectName(): w for w in widgets}
    problems = [f"unknown control {str(k)[:40]!r}" for k in state if k not in by_name]
    for name, widget in by_name.items():
        if name in state:
            reason = set_control_value(widget, state[name])
            if reason:
                problems.append(reason)
    return problems


def limit_text_inputs(root: QWidget) -> list[QLineEdit]:
    """Give every text box under ``root`` (not the editors inside spin and combo boxes) the
    limit :func:`set_control_value` restores, :data:`MAX_TEXT` characters, so that whatever
    is saved comes back. Typing or pasting past it keeps the first ``MAX_TEXT`` characters and
    says so in a tooltip at the box. Returns the boxes limited."""
    limited = []
    for edit in root.findChildren(QLineEdit):
        if isinstance(edit.parentWidget(), (QAbstractSpinBox, QComboBox)):
            continue
        if edit.maxLength() > MAX_TEXT:
            edit.setMaxLength(MAX_TEXT)
        edit.setProperty("textLimitReason", f"at most {MAX_TEXT:,} characters are kept "
                         "(the session saves this text and restores at most that many)")
        edit.inputRejected.connect(lambda e=edit: _say_limit(e))
        limited.append(edit)
    return limited


def _say_limit(edit: QLineEdit) -> None:
    if len(edit.text()) >= edit.maxLength():
        text = edit.property("textLimitReason")
        QToolTip.showText(edit.mapToGlobal(edit.rect().bottomLeft()), text, edit)
