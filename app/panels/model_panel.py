"""The model panel: one editor per ModelConfig field, presets, and inline validation.

Every editor's objectName is its field's name; its error label is ``<field>_error``. An edit
that makes a valid config emits ``edited(config)``; an invalid one marks the offending editors,
shows the reasons next to them and emits nothing, so nothing downstream runs. While the draft
is invalid ``draft_invalid(reason)`` says so (``""`` once it is valid again), so the window
can mark the panels that still show the last valid config.

Typed numbers are never silently altered: a character a number box cannot take (a minus sign
where the value cannot be negative, a decimal point in a whole number, a letter, a digit
other than 0-9) stays visible with the reason under the box, and Enter then keeps the last
valid value and says so, instead of applying what is left once the character is dropped
("-1" used to apply 1, "256.5" 2565). An invalid editor keeps its native look (spin arrows
included): only its cell's frame and background change, through the ``invalid`` property.
"""

from __future__ import annotations

import functools
from typing import Any

from PySide6.QtCore import QPoint, Qt, Signal
from PySide6.QtGui import QPalette, QValidator
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from unitscale_core.config import CHOICES, DEFAULTS, FIELD_HELP, ConfigError, ModelConfig
from unitscale_core.presets import PRESETS, load_preset, preset_notes

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
#: The modern-architecture fields (issue 21), in collapsible sections so the panel stays
#: readable at 1366×768; a section opens by itself when the config uses one of its fields
#: (or one of them is invalid).
SECTIONS: dict[str, tuple[str, ...]] = {
    "Attention heads and caps": (
        "n_kv_heads", "head_dim", "qk_norm", "qkv_bias", "attn_softcap", "logit_softcap",
    ),
    "Norms and residual": ("norm_type", "parallel_residual"),
    "Rotary positions": ("rotary_fraction", "rope_base"),
    "Mixture of experts": ("n_experts", "experts_per_token"),
}
LABELS = {
    "n_layers": "layers", "n_decoder_layers": "decoder layers", "d_model": "d_model",
    "n_heads": "heads", "d_ff": "d_ff", "vocab_size": "vocabulary", "max_len": "max length",
    "seq_len": "sequence length", "batch_size": "batch size", "tie_embeddings": "tie embeddings",
    "n_kv_heads": "kv heads", "head_dim": "head size", "qk_norm": "qk norm",
    "qkv_bias": "qkv bias", "attn_softcap": "attention cap", "logit_softcap": "logit cap",
    "norm_type": "norm type", "parallel_residual": "parallel", "rotary_fraction":
    "rotary fraction", "rope_base": "rope base θ", "n_experts": "experts",
    "experts_per_token": "experts per token",
}
SAME_AS_LAYERS = "same as layers"
#: Optional whole numbers: 0 (shown as this text) is "empty", the field's default None.
OPTIONAL_INT_TEXT = {"n_decoder_layers": SAME_AS_LAYERS, "n_kv_heads": "same as heads",
                     "head_dim": "d_model / heads"}
#: Optional soft caps: 0 (shown as "none") is empty, no cap.
OPTIONAL_FLOATS = ("attn_softcap", "logit_softcap")
FLOAT_RANGES = {"rotary_fraction": (0.0, 1.0, 0.05, 3), "rope_base": (0.0, 1e12, 1000.0, 1),
                "attn_softcap": (0.0, 1e6, 5.0, 2), "logit_softcap": (0.0, 1e6, 5.0, 2)}
#: qkv_bias: None follows ``bias``.
QKV_BIAS_ITEMS = (("same as bias", None), ("on", True), ("off", False))
CHECKBOX_TEXT = {
    "bias": "linear and norm biases",
    "tie_embeddings": "head = embedding",
    "parallel_residual": "attention ‖ FFN",  # short: it must fit the sections' column
}
MODIFIED = " — modified"
#: An invalid field's cell: a red frame and a pale background. Set through a property
#: selector on the cell and the editor, so the editor keeps its own style (a style sheet set
#: on a spin box itself replaces the whole box's drawing and loses its arrows).
INVALID_STYLE = (
    'QFrame#fieldCell[invalid="true"] { border: 1px solid #c62828; border-radius: 3px; }'
    'QFrame#fieldCell { border: 1px solid transparent; }'
    'QSpinBox[invalid="true"], QDoubleSpinBox[invalid="true"], QComboBox[invalid="true"] '
    '{ background: #ffebee; }'
)
#: Least width of a number box (px): room for about ten digits and the arrows.
NUMBER_MIN_WIDTH = 100
#: Characters a number box takes, besides ASCII digits (the locale's separators are C's).
NUMBER_EXTRA = set(" ,.+-eE")


def typed_problem(text: str, box: QAbstractSpinBox, label: str) -> str:
    """Why ``text`` cannot be the value of ``box`` (a QSpinBox or QDoubleSpinBox named
    ``label``): the first thing wrong, in words. Empty when nothing specific is (e.g. an
    empty box)."""
    body = text.strip()
    special = box.specialValueText()
    if not body or (special and body == special):
        return ""
    whole = isinstance(box, QSpinBox)
    if any(c.isdigit() and not c.isascii() for c in body):
        return f"'{text}': type the digits 0-9"
    if any(not (c.isascii() and c.isdigit()) and c not in NUMBER_EXTRA for c in body):
        return f"'{text}' is not a number"
    if "-" in body and box.minimum() >= 0 and (whole or "e-" not in body.lower()):
        return f"'{text}': {label} cannot be negative"
    if whole and ("." in body or "e" in body.lower()):
        return f"'{text}' is not a whole number"
    if whole and "," in body and not box.isGroupSeparatorShown():
        return f"'{text}': type the number without separators"
    try:
        value = float(body.replace(",", ""))
    except ValueError:
        return f"'{text}' is not a number"
    if value > box.maximum():
        return f"'{text}' is above {box.maximum():g}, the largest {label}"
    if value < box.minimum():
        return f"'{text}' is below {box.minimum():g}, the smallest {label}"
    return f"'{text}' is not a valid {label}"


def _native_spin_height() -> int:
    """A spin box's height in the application's own style, no style sheet applied."""
    probe = QSpinBox()
    probe.setSpecialValueText("d_model / heads")
    try:
        return probe.sizeHint().height()
    finally:
        probe.deleteLater()


class _Checked:
    """What the panel's number boxes add to Qt's: input the box cannot take is kept visible
    as typed (the validator answers Intermediate, not Invalid) and explained through
    ``typing(reason)`` as it is typed (``typing("")`` once the user's text is fine again); on
    Enter or focus loss Qt keeps the previous value and ``refused(reason)`` says what was not
    applied. That reason stays until the user edits the box again."""

    label = ""

    def _watch_typing(self) -> None:
        self.lineEdit().textEdited.connect(self._on_text_edited)

    def validate(self, text: str, pos: int):  # noqa: D102 - Qt's
        state, fixed, pos = super().validate(text, pos)
        if state == QValidator.State.Invalid:
            self.typing.emit(typed_problem(text, self, self.label) or f"'{text}' is not valid")
            return QValidator.State.Intermediate, text, pos
        return state, fixed, pos

    def _on_text_edited(self, text: str) -> None:
        if super().validate(text, len(text))[0] != QValidator.State.Invalid:
            self.typing.emit("")

    def fixup(self, text: str) -> str:  # noqa: D102 - Qt's; called with the refused input
        reason = typed_problem(text, self, self.label)
        if reason:
            special = self.specialValueText()
            kept = special if special and self.value() == self.minimum() else \
                self.textFromValue(self.value())
            self.refused.emit(f"{reason}; {self.label} stays {kept}")
        return super().fixup(text)


class CheckedSpinBox(_Checked, QSpinBox):
    typing = Signal(str)
    refused = Signal(str)


class CheckedDoubleSpinBox(_Checked, QDoubleSpinBox):
    typing = Signal(str)
    refused = Signal(str)


@functools.lru_cache(maxsize=1)
def _preset_configs() -> dict[str, ModelConfig]:
    """Every preset's config by key, read once (the package's own files)."""
    return {key: load_preset(key) for key in PRESETS}


class ModelPanel(QWidget):
    """Edits a draft of the config; emits ``edited`` with each new valid config."""

    edited = Signal(object)  # ModelConfig
    #: the draft's first error while it is invalid, "" when it is valid again
    draft_invalid = Signal(str)

    def __init__(self, config: ModelConfig, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("modelPanel")
        self._editors: dict[str, QWidget] = {}
        self._errors: dict[str, QLabel] = {}
        self._draft: dict[str, Any] = config.to_dict()
        self._loading = False
        self._cells: dict[str, QFrame] = {}
        self._config_errors: dict[str, str] = {}  # the draft's, by field
        self._typed: dict[str, str] = {}  # typed input not taken, by field
        self._invalid_reason = ""  # what draft_invalid last said
        self._preset: tuple[int, ModelConfig] | None = None  # the last preset chosen
        self._row_labels: dict[str, QLabel] = {}
        self.setStyleSheet(INVALID_STYLE)

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
        # what the chosen preset computes differently from the published model
        # (unitscale_core.presets.PRESET_NOTES), while the fields are the preset's
        self.preset_note = QLabel(objectName="presetNote")
        self.preset_note.setWordWrap(True)
        # the theme's placeholder-text grey, readable in light and dark themes (palette(mid),
        # tried first, was too faint to read)
        self.preset_note.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.preset_note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.preset_note.hide()
        outer.addWidget(self.preset_note)

        body = QWidget()
        body_layout = QVBoxLayout(body)
        body_layout.setContentsMargins(0, 0, 0, 0)
        self.sections: dict[str, QCollapsible] = {}
        groups = list(GROUPS.items())
        for title, names in groups[:-1] + [(t, None) for t in SECTIONS] + groups[-1:]:
            if names is None:  # a collapsible section of the modern fields
                section = QCollapsible(title)
                section.setObjectName("section_" + title.split()[0].lower())
                section.setDuration(0)  # no animation: a form must not slide under the cursor
                inner = QWidget()
                form = QFormLayout(inner)
                section.addWidget(inner)
                self.sections[title] = section
                names, widget = SECTIONS[title], section
            else:
                widget = QGroupBox(title)
                form = QFormLayout(widget)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            for name in names:
                self._add_row(form, name)
            body_layout.addWidget(widget)
        body_layout.addStretch(1)
        self._body = body
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(body)
        outer.addWidget(scroll, 1)
        self._align_columns()
        self.set_config(config)

    def _align_columns(self) -> None:
        """One editor column for the groups and one for the (indented) sections: each form
        sized its label column to its own labels, so the editors started at five different
        x positions. Every label of a kind gets the width of the widest of that kind (the
        forms of a kind sit at the same offset with the same margins). One column for all
        would widen the groups by the sections' indent, past the dock's 340 px."""
        in_sections = {n for names in SECTIONS.values() for n in names}
        for kind in (in_sections, set(self._row_labels) - in_sections):
            labels = [lab for n, lab in self._row_labels.items() if n in kind]
            width = max(lab.sizeHint().width() for lab in labels)
            for label in labels:
                label.setMinimumWidth(width)

    def editor_columns(self) -> dict[str, int]:
        """Each field's editor cell's left edge in the panel's body (a test's view)."""
        return {n: cell.mapTo(self._body, QPoint(0, 0)).x() for n, cell in self._cells.items()}

    # -- editors ---------------------------------------------------------------------------
    def _add_row(self, form: QFormLayout, name: str) -> None:
        editor = self._make_editor(name)
        error = QLabel(objectName=f"{name}_error")
        error.setWordWrap(True)
        error.setStyleSheet("color: #c62828;")
        error.hide()
        cell = QFrame(objectName="fieldCell")
        cell_layout = QVBoxLayout(cell)
        cell_layout.setContentsMargins(1, 1, 1, 1)
        cell_layout.setSpacing(1)
        cell_layout.addWidget(editor)
        cell_layout.addWidget(error)
        label = QLabel(LABELS.get(name, name.replace("_", " ")))
        label.setToolTip(FIELD_HELP[name])
        # as tall as the editor in its cell (1 px margin and 1 px frame above and below), so
        # the label's text is centred on the editor's, not 5 px above it
        label.setMinimumHeight(editor.sizeHint().height() + 4)
        form.addRow(label, cell)
        self._row_labels[name] = label
        self._editors[name] = editor
        self._errors[name] = error
        self._cells[name] = cell

    def _make_editor(self, name: str) -> QWidget:
        editor: QWidget
        if name == "qkv_bias":
            editor = QComboBox()
            for text, data in QKV_BIAS_ITEMS:
                editor.addItem(text, data)
            editor.currentIndexChanged.connect(
                lambda i, n=name, e=editor: self._on_edit(n, e.itemData(i)))
        elif name in CHOICES:
            editor = QComboBox()
            editor.addItems(list(CHOICES[name]))
            editor.currentTextChanged.connect(lambda v, n=name: self._on_edit(n, v))
        elif name in CHECKBOX_TEXT:
            editor = QCheckBox(CHECKBOX_TEXT[name])
            editor.toggled.connect(lambda v, n=name: self._on_edit(n, bool(v)))
        elif name in FLOAT_RANGES:
            editor = CheckedDoubleSpinBox()
            lo, hi, step, decimals = FLOAT_RANGES[name]
            editor.setRange(lo, hi)
            editor.setSingleStep(step)
            editor.setDecimals(decimals)
            editor.setKeyboardTracking(False)
            if name in OPTIONAL_FLOATS:  # 0 is "none": no cap (a cap must be positive)
                editor.setSpecialValueText("none")
                editor.valueChanged.connect(lambda v, n=name: self._on_edit(n, float(v) or None))
            else:
                editor.valueChanged.connect(lambda v, n=name: self._on_edit(n, float(v)))
        elif name == "dropout":
            editor = CheckedDoubleSpinBox()
            editor.setRange(0.0, 1.0)
            editor.setSingleStep(0.05)
            editor.setDecimals(3)
            editor.setKeyboardTracking(False)
            editor.valueChanged.connect(lambda v, n=name: self._on_edit(n, float(v)))
        else:
            editor = CheckedSpinBox()
            # 0 is reachable so that "must be positive" can be shown rather than silently
            # clamped; n_decoder_layers uses 0 for "same as layers".
            editor.setRange(0, INT_MAX)
            editor.setGroupSeparatorShown(name in ("vocab_size",))
            # A typed number commits on Enter, Tab or focus loss (arrows and wheel at once), so
            # typing 4096 does not pass through 4, 40 and 409 as configs of their own.
            editor.setKeyboardTracking(False)
            if name in OPTIONAL_INT_TEXT:
                editor.setSpecialValueText(OPTIONAL_INT_TEXT[name])
                editor.valueChanged.connect(lambda v, n=name: self._on_edit(n, v or None))
            else:
                editor.valueChanged.connect(lambda v, n=name: self._on_edit(n, int(v)))
        if isinstance(editor, _Checked):
            # the panel's style sheet (the invalid-cell rules) has Qt's style-sheet style
            # size the number boxes 4 px below their native height, a line edit shorter than
            # a line of text: the descenders of "d_model / heads" and "same as layers" were cut
            editor.setMinimumHeight(_native_spin_height())
            # Qt's least width fits the largest value (2147483647, 1e12 for rope_base): wider
            # than the dock gives a box in the sections' column, so the panel scrolled
            # sideways at its default 340 px; the form still grows them to the dock's width
            editor.setMinimumWidth(min(editor.minimumSizeHint().width(), NUMBER_MIN_WIDTH))
            editor.label = LABELS.get(name, name.replace("_", " "))
            editor._watch_typing()
            editor.typing.connect(lambda reason, n=name: self._on_typed(n, reason))
            editor.refused.connect(lambda reason, n=name: self._on_typed(n, reason))
        editor.setObjectName(name)
        editor.setToolTip(FIELD_HELP[name])
        return editor

    def _show_value(self, name: str, value: Any) -> None:
        editor = self._editors[name]
        if name == "qkv_bias":
            editor.setCurrentIndex([d for _, d in QKV_BIAS_ITEMS].index(value))
        elif isinstance(editor, QComboBox):
            editor.setCurrentText(str(value))
        elif isinstance(editor, QCheckBox):
            editor.setChecked(bool(value))
        elif isinstance(editor, QDoubleSpinBox):
            editor.setValue(0.0 if value is None else float(value))
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
        self._typed.clear()
        self._mark({})
        self._update_enabled()
        for title, names in SECTIONS.items():  # a config using a section's fields shows them
            if any(self._draft[n] != DEFAULTS[n] for n in names):
                self.sections[title].expand(animate=False)
        if self._preset is not None and config != self._preset[1]:
            self._forget_preset()  # another file or config: the preset no longer applies
        if self._preset is None:
            self._recognise_preset(config)

    def _recognise_preset(self, config: ModelConfig) -> None:
        """A config equal to a preset (a saved preset opened, undo back to it, the README's
        Llama-3-8B screenshot) shows that preset chosen, with its note."""
        for index in range(1, self.preset.count()):
            key = self.preset.itemData(index)
            if _preset_configs().get(key) == config:
                self.preset.setCurrentIndex(index)
                self._preset = (index, config)
                self._show_note(self._preset_note_text())
                return

    def errors(self) -> dict[str, str]:
        """The reasons currently shown, by field (empty when the draft is valid)."""
        return {n: lab.text() for n, lab in self._errors.items() if lab.text()}

    def _on_preset(self, index: int) -> None:
        key = self.preset.itemData(index)
        if key is None:
            return
        config = load_preset(key)
        self._forget_preset()
        self.preset.setCurrentIndex(index)
        self._preset = (index, config)
        self.set_config(config)
        self._show_note(self._preset_note_text())
        self.edited.emit(config)

    def _forget_preset(self) -> None:
        """Back to "Choose a preset…", the chosen preset's label restored, its note gone."""
        if self._preset is not None:
            index = self._preset[0]
            self.preset.setItemText(index, PRESETS[self.preset.itemData(index)])
            self._preset = None
        self.preset.setCurrentIndex(0)
        self._show_note("")

    def preset_key(self) -> str | None:
        """The preset the fields are now (its key), or None: none chosen, or edited since."""
        if self._preset is None:
            return None
        index, preset = self._preset
        try:
            same = ModelConfig(**self._draft) == preset
        except ConfigError:
            return None
        return self.preset.itemData(index) if same else None

    def note(self) -> str:
        """The preset note shown ("" when none is)."""
        return self.preset_note.text() if not self.preset_note.isHidden() else ""

    def _show_note(self, text: str) -> None:
        self.preset_note.setText(text)
        self.preset_note.setToolTip(text)
        self.preset_note.setVisible(bool(text))

    def _preset_note_text(self) -> str:
        """The chosen preset's notes, one line each ("" when it has none)."""
        if self._preset is None:
            return ""
        notes = preset_notes(self.preset.itemData(self._preset[0]))
        return "\n".join(f"Note: {n}" for n in notes)

    def _show_preset_state(self, config: ModelConfig | None) -> None:
        """"GPT-2 small (124M) — modified" while the fields differ from the chosen preset
        (``config`` None: the draft is invalid, so it differs too)."""
        if self._preset is None:
            return
        index, preset = self._preset
        label = PRESETS[self.preset.itemData(index)]
        self.preset.setItemText(index, label if config == preset else label + MODIFIED)
        # the note describes the preset as published: edited away, it may no longer hold
        self._show_note(self._preset_note_text() if config == preset else "")

    def _on_typed(self, name: str, reason: str) -> None:
        """Typed input a number box did not take (``reason``), or "" once it is fine."""
        if self._loading or self._typed.get(name, "") == reason:
            return
        if reason:
            self._typed[name] = reason
        else:
            self._typed.pop(name, None)
        self._mark(self._config_errors)

    def _on_edit(self, name: str, value: Any) -> None:
        if self._loading:
            return
        self._draft[name] = value
        self._update_enabled()
        self._typed.pop(name, None)  # a value was taken: what was typed before is gone
        try:
            config = ModelConfig(**self._draft)
        except ConfigError as exc:
            self._mark(exc.errors)
            self._show_preset_state(None)
            return
        self._mark({})
        self._show_preset_state(config)
        self.edited.emit(config)

    def _mark(self, errors: dict[str, str]) -> None:
        """Show the draft's ``errors`` and the typed input not taken next to their fields,
        mark those fields invalid, and tell the window whether the draft is invalid."""
        self._config_errors = dict(errors)
        shown = {**errors, **self._typed}
        for name, label in self._errors.items():
            reason = shown.get(name, "")
            label.setText(reason)
            label.setVisible(bool(reason))
            for widget in (self._editors[name], self._cells[name]):
                if bool(widget.property("invalid")) != bool(reason):
                    widget.setProperty("invalid", bool(reason))
                    widget.style().unpolish(widget)  # the property selector applies anew
                    widget.style().polish(widget)
        for title, names in SECTIONS.items():  # never hide a reason in a closed section
            if any(shown.get(n) for n in names):
                self.sections[title].expand(animate=False)
        self._update_enabled()
        unplaced = {k: v for k, v in errors.items() if k not in self._errors}
        if unplaced:  # not expected from the editors, but never lose a reason
            first = self._errors["architecture"]
            first.setText("; ".join(unplaced.values()))
            first.show()
        self._say_invalid(errors, unplaced)

    def _say_invalid(self, errors: dict[str, str], unplaced: dict[str, str]) -> None:
        """Emit ``draft_invalid`` when what it would say changed: the first error's field and
        reason, or "" when the draft is valid. Typed input not yet taken counts too: the
        fields then show something other than the config the other panels show."""
        reason = ""
        for name in self._errors:
            text = errors.get(name) or self._typed.get(name)
            if text:
                reason = f"{LABELS.get(name, name.replace('_', ' '))}: {text}"
                break
        if not reason and unplaced:
            reason = next(iter(unplaced.values()))
        if reason != self._invalid_reason:
            self._invalid_reason = reason
            self.draft_invalid.emit(reason)

    def invalid_reason(self) -> str:
        """What ``draft_invalid`` last said ("" while the draft is valid)."""
        return self._invalid_reason

    def _update_enabled(self) -> None:
        """Grey the fields that do not apply to the draft; a field whose value is invalid
        stays editable, so it can always be put right (parallel_residual checked, then norm
        set to post: the box must be unticked)."""
        d = self._draft
        applies = {
            "n_decoder_layers": d["architecture"] == "encoder-decoder",
            "window": d["attention"] in ("local", "strided"),
            "rotary_fraction": d["positional"] == "rope",
            "rope_base": d["positional"] == "rope",
            "parallel_residual": d["norm"] == "pre",
            "experts_per_token": d["n_experts"] != 1,
        }
        shown = {**self._config_errors, **self._typed}
        for name, ok in applies.items():
            self._editors[name].setEnabled(ok or bool(shown.get(name)))
