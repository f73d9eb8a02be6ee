"""The seed document's own "unit scaling" formula, live, in a tab of its own.

``d_e = log P_t / log α``, ``Parameters = β · d_e`` (seed §4.3 / §5.3). This is not Unit
Scaling (Blake, Orr, Luschi 2023); the tab says so, and shows negative or zero results with the
reason instead of hiding them.
"""

from __future__ import annotations

from PySide6.QtWidgets import QDoubleSpinBox, QFormLayout, QLabel, QVBoxLayout, QWidget

from unitscale_core.scaling.seed_formula import SeedFormulaError, seed_formula

EXPLANATION = (
    "<b>The seed document's formula</b> (§4.3, §5.3), exactly as written: "
    "d<sub>e</sub> = log P<sub>t</sub> / log α, Parameters = β · d<sub>e</sub>. "
    "It is <i>not</i> Unit Scaling (Blake, Orr &amp; Luschi 2023), which the Scales tab "
    "computes; it is shown here because the document the product grew from states it."
)


class SeedFormulaTab(QWidget):
    """Three inputs and the result, recomputed as the user types."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("seedFormulaTab")
        layout = QVBoxLayout(self)
        intro = QLabel(EXPLANATION)
        intro.setWordWrap(True)
        layout.addWidget(intro)
        form = QFormLayout()
        self.inputs: dict[str, QDoubleSpinBox] = {}
        for field, label, value, tip in (
            ("target", "target performance P_t", 0.85, "P_t > 0"),
            ("alpha", "scaling coefficient α", 1.2, "α > 0 and α ≠ 1"),
            ("beta", "parameters per unit β", 1e6, "β > 0"),
        ):
            # Wide ranges so a non-positive value can be typed and then explained.
            box = QDoubleSpinBox(objectName=f"seed_{field}")
            box.setRange(-1e12, 1e12)
            box.setDecimals(6)
            box.setValue(value)
            box.setToolTip(tip)
            box.valueChanged.connect(self.recompute)
            form.addRow(label, box)
            self.inputs[field] = box
        layout.addLayout(form)
        self.result = QLabel(objectName="seedResult")
        self.result.setTextFormat(self.result.textFormat())
        self.warning = QLabel(objectName="seedWarning")
        self.warning.setWordWrap(True)
        self.warning.setStyleSheet("color: #b71c1c;")
        layout.addWidget(self.result)
        layout.addWidget(self.warning)
        layout.addStretch(1)
        self.recompute()

    def recompute(self) -> None:
        values = {name: box.value() for name, box in self.inputs.items()}
        for box in self.inputs.values():
            box.setStyleSheet("")
        try:
            out = seed_formula(**values)
        except SeedFormulaError as exc:
            for field, _reason in exc.errors:
                self.inputs[field].setStyleSheet("border: 1px solid #c62828;")
            self.result.setText("—")
            self.warning.setText(str(exc))
            return
        self.result.setText(f"d_e = {out.d_e:.6g}    Parameters = β · d_e = {out.parameters:.4g}")
        self.warning.setText(out.warning)
