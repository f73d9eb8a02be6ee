"""The model panel: one editor per ModelConfig field, presets, and inline validation.

Every editor's objectName is its field's name; its error label is ``<field>_error``. An edit
that makes a valid config emits ``edited(config)``; an invalid one marks the offending editors,
shows the reasons next to them and emits nothing, so nothing downstream runs.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from unitscale_core.config import CHOICES, FIELD_HELP, ConfigError, ModelConfig
from unitscale_core.presets import PRESETS, load_preset

INT_MAX = 2**31 - 1
GROUPS: dict[str, tuple[str, ...]] = {
    "Architecture": (
        "architecture", "n_layers", "n_decoder_layers", "d_model", "n_heads", "d_ff",
        "vocab_size", "activation", "norm", "bias", "tie_embeddings", "dropout",
    ),
    "Sequence and attention": (
        "max_len", "seq_len", "batch_size", "positional", "attention", "window",
    ),
    "Run": ("parametrization", "dtype", "device", "seed"),
}
LABELS = {
    "n_layers": "layers", "n_decoder_layers": "decoder layers", "d_model": "d_model",
    "n_heads": "heads", "d_ff": "d_ff", "vocab_size": "vocabulary", "max_len": "max length",
    "seq_len": "sequence length", "batch_size": "batch size", "tie_embeddings": "tie embeddings",
}
SAME_AS_LAYERS = "same as layers"
CHECKBOX_TEXT = {
    "bias": "linear and norm biases",
    "tie_embeddings": "head = embedding",
}


class ModelPanel(QWidget):
    """Edits a draft of the config; emits ``edited`` with each new valid config."""

    edited = Signal(object)  # ModelConfig

    def __init__(self, config: ModelConfig, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("modelPanel")
        self._editors: dict[str, QWidget] = {}
        self._errors: dict[str, QLabel] = {}
        self._draft: dict[str, Any] = config.to_dict()
        self._loading = False

        outer = QVBoxLayout(self)
        outer.setContentsMargins(4, 4, 4, 4)
        preset_row = QHBoxLayout()
        preset_row.addWidget(QLabel("Preset"))
        self.preset = QComboBox(objectName="preset")
        self.preset.addItem("Choose a preset…", None)
        for key, label in PRESETS.items():
            self.preset.addItem(label, key)
        self.preset.setToolTip("Replace every field with a known model's shape.")
        self.preset.activated.connect(self._on_preset)
        preset_row.addWidget(self.preset, 1)
        outer.addLayout(preset_row)

        body = QWidget()
        body_layout = QVBoxLayout(body)
        body_layout.setContentsMargins(0, 0, 0, 0)
        for title, names in GROUPS.items():
            box = QGroupBox(title)
            form = QFormLayout(box)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            for name in names:
                editor = self._make_editor(name)
                error = QLabel(objectName=f"{name}_error")
                error.setWordWrap(True)
                error.setStyleSheet("color: #c62828;")
                error.hide()
                cell = QWidget()
                cell_layout = QVBoxLayout(cell)
                cell_layout.setContentsMargins(0, 0, 0, 0)
                cell_layout.setSpacing(1)
                cell_layout.addWidget(editor)
                cell_layout.addWidget(error)
                label = QLabel(LABELS.get(name, name.replace("_", " ")))
                label.setToolTip(FIELD_HELP[name])
                form.addRow(label, cell)
                self._editors[name] = editor
                self._errors[name] = error
            body_layout.addWidget(box)
        body_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(body)
        outer.addWidget(scroll, 1)
        self.set_config(config)

    # -- editors ---------------------------------------------------------------------------
    def _make_editor(self, name: str) -> QWidget:
        editor: QWidget
        if name in CHOICES:
            editor = QComboBox()
            editor.addItems(list(CHOICES[name]))
            editor.currentTextChanged.connect(lambda v, n=name: self._on_edit(n, v))
        elif name in ("bias", "tie_embeddings"):
            editor = QCheckBox(CHECKBOX_TEXT[name])
            editor.toggled.connect(lambda v, n=name: self._on_edit(n, bool(v)))
        elif name == "dropout":
            editor = QDoubleSpinBox()
            editor.setRange(0.0, 1.0)
            editor.setSingleStep(0.05)
            editor.setDecimals(3)
            editor.setKeyboardTracking(False)
            editor.valueChanged.connect(lambda v, n=name: self._on_edit(n, float(v)))
        else:
            editor = QSpinBox()
            # 0 is reachable so that "must be positive" can be shown rather than silently
            # clamped; n_decoder_layers uses 0 for "same as layers".
            editor.setRange(0, INT_MAX)
            editor.setGroupSeparatorShown(name in ("vocab_size",))
            # A typed number commits on Enter, Tab or focus loss (arrows and wheel at once), so
            # typing 4096 does not pass through 4, 40 and 409 as configs of their own.
            editor.setKeyboardTracking(False)
            if name == "n_decoder_layers":
                editor.setSpecialValueText(SAME_AS_LAYERS)
                editor.valueChanged.connect(lambda v, n=name: self._on_edit(n, v or None))
            else:
                editor.valueChanged.connect(lambda v, n=name: self._on_edit(n, int(v)))
        editor.setObjectName(name)
        editor.setToolTip(FIELD_HELP[name])
        return editor

    def _show_value(self, name: str, value: Any) -> None:
        editor = self._editors[name]
        if isinstance(editor, QComboBox):
            editor.setCurrentText(str(value))
        elif isinstance(editor, QCheckBox):
            editor.setChecked(bool(value))
        elif isinstance(editor, QDoubleSpinBox):
            editor.setValue(float(value))
        elif isinstance(editor, QSpinBox):
            editor.setValue(0 if value is None else int(value))

    # -- state -----------------------------------------------------------------------------
    def set_config(self, config: ModelConfig) -> None:
        """Show ``config`` in every editor without emitting ``edited``."""
        self._loading = True
        try:
            self._draft = config.to_dict()
            for name, value in self._draft.items():
                self._show_value(name, value)
        finally:
            self._loading = False
        self._mark({})
        self._update_enabled()

    def errors(self) -> dict[str, str]:
        """The reasons currently shown, by field (empty when the draft is valid)."""
        return {n: lab.text() for n, lab in self._errors.items() if lab.text()}

    def _on_preset(self, index: int) -> None:
        key = self.preset.itemData(index)
        if key is None:
            return
        config = load_preset(key)
        self.set_config(config)
        self.edited.emit(config)

    def _on_edit(self, name: str, value: Any) -> None:
        if self._loading:
            return
        self._draft[name] = value
        self._update_enabled()
        try:
            config = ModelConfig(**self._draft)
        except ConfigError as exc:
            self._mark(exc.errors)
            return
        self._mark({})
        self.edited.emit(config)

    def _mark(self, errors: dict[str, str]) -> None:
        for name, label in self._errors.items():
            reason = errors.get(name, "")
            label.setText(reason)
            label.setVisible(bool(reason))
            editor = self._editors[name]
            editor.setProperty("invalid", bool(reason))
            editor.setStyleSheet("border: 1px solid #c62828;" if reason else "")
        unplaced = {k: v for k, v in errors.items() if k not in self._errors}
        if unplaced:  # not expected from the editors, but never lose a reason
            first = self._errors["architecture"]
            first.setText("; ".join(unplaced.values()))
            first.show()

    def _update_enabled(self) -> None:
        d = self._draft
        self._editors["n_decoder_layers"].setEnabled(d["architecture"] == "encoder-decoder")
        self._editors["window"].setEnabled(d["attention"] in ("local", "strided"))
