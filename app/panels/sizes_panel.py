"""The sizes panel: parameters, FLOPs and memory of the current config, live.

Recomputes synchronously on every valid config (all arithmetic, microseconds). Each row's
tooltip gives the formula behind its number.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from unitscale_core.config import ModelConfig
from unitscale_core.sizing import format_bytes, format_count, size_report

from ..export import (
    EXPORT_ROLE,
    Item,
    Table,
    TableData,
    attach_context_menu,
    export_button,
    table_from_model,
)
from ..widgets.stale_banner import StaleBanner

# (key path in size_report, label, kind, formula tooltip)
ROWS: tuple[tuple[tuple[str, ...], str, str, str], ...] = (
    (("total",), "Parameters (P)", "count",
     "Sum of the components below; equals sum(p.numel()) of the built torch model. The memory "
     "rows count every one of them (P), not only the non-embedding N."),
    (("active",), "  active per token (MoE)", "count",
     "P − layers · (n_experts − experts_per_token) · expert: the router and the k experts a "
     "token runs (= P for a dense model). FLOPs use these."),
    (("components", "token_embedding"), "  token embedding", "count", "V · h"),
    (("components", "position"), "  positions", "count",
     "learned: max_len · h per stack; relative (T5): 32 buckets · heads per stack; else 0"),
    (("components", "attention"), "  self-attention", "count",
     "layers · (2h·a·d + 2h·kv·d + biases + q/k norms)  — Q, O of width a·d (heads · d_head), "
     "K, V of width kv·d (grouped-query: kv key/value heads)"),
    (("components", "cross_attention"), "  cross-attention", "count",
     "decoder layers · (2h·a·d + 2h·kv·d + biases), encoder-decoder only"),
    (("components", "ffn"), "  feed-forward", "count",
     "layers · (2hf + f + h)  — SwiGLU/GeGLU: layers · (3hf + 2f + h); MoE: layers · "
     "(h·E router + E experts)"),
    (("components", "norms"), "  norms", "count",
     "(2 per layer, 3 in a cross-attending layer, doubled for sandwich, + 1 final per stack) "
     "· (h + h bias); RMSNorm: h, never a bias"),
    (("components", "lm_head"), "  output head", "count", "V · h, or 0 when tied to the embedding"),
    (("non_embedding",), "Non-embedding (N)", "count",
     "Kaplan et al. 2020: attention + feed-forward + norms (no embedding or head)"),
    (("flops_per_token", "forward_palm"), "FLOPs / token, forward (PaLM, headline)", "count",
     "2·N_matmul + 4·L_attn·s·a·d  (Chowdhery et al. 2022 App. B: QKᵀ and A·V both counted, "
     "the convention of MFU figures); N_matmul = active weights + head V·h"),
    (("flops_per_token", "training_palm"), "FLOPs / token, training (PaLM, headline)", "count",
     "3 × forward = 6·N_matmul + 12·L_attn·s·a·d"),
    (("flops_per_token", "attention_palm"), "  of which attention (PaLM)", "count",
     "4·L_attn·s·a·d: QKᵀ and A·V, dense, every self- and cross-attention block"),
    (("flops_per_token", "forward"), "FLOPs / token, forward", "count",
     "Kaplan et al. 2020, Table 1: 2·N_matmul + 2·L_attn·s·a·d; N_matmul = active weights + "
     "head V·h"),
    (("flops_per_token", "training"), "FLOPs / token, training", "count",
     "Kaplan: 3 × forward = 6·N_matmul + 6·L_attn·s·a·d (backward costs twice the forward)"),
    (("flops_per_token", "attention"), "  of which attention", "count",
     "Kaplan: 2·L_attn·s·a·d, dense, every self- and cross-attention block"),
    (("memory_bytes", "weights"), "Memory: weights", "bytes",
     "p · P  (P = all parameters, the first row; p = bytes per element of the dtype)"),
    (("memory_bytes", "gradients"), "Memory: gradients", "bytes", "p · P"),
    (("memory_bytes", "optimizer"), "Memory: Adam state", "bytes",
     "8·P (two fp32 moments) + 4·P fp32 master weights unless fp32"),
    (("memory_bytes", "activations"), "Memory: activations", "bytes",
     "Korthikanti et al. 2022: per layer sbh(34 + 5as/h) at p=2, f=4h, with dropout; "
     "generalised to p, f, SwiGLU, MoE; K, V kept at the query width (repeated for GQA); "
     "RMSNorm 8 B/element (fp32 input and output); soft caps + their tanh outputs; + final "
     "norm + fp32 logits 4sbV"),
    (("memory_bytes", "total"), "Memory: training total", "bytes",
     "weights + gradients + Adam state + activations"),
    (("memory_bytes", "kv_cache"), "KV cache (inference)", "bytes",
     "2 · decoder layers · b · s · kv·d · p (kv·d = key/value heads · d_head; ×2 with "
     "cross-attention); 0 for an encoder"),
    (("memory_bytes", "kv_cache_per_token"), "  KV cache per token", "bytes",
     "2 · decoder layers · kv·d · p: one token of one sequence (grouped-query attention "
     "divides it by heads / kv heads)"),
)


def _cell(text: str, tooltip: str, right: bool = False,
          export: int | None = None) -> QTableWidgetItem:
    """One table cell: ``text`` with the row's formula as tooltip; numbers right-aligned;
    ``export`` is the value CSV export writes instead of the text."""
    item = QTableWidgetItem(text)
    item.setToolTip(tooltip)
    if right:
        item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    if export is not None:
        item.setData(EXPORT_ROLE, export)
    return item


class SizesPanel(QWidget):
    """A read-only table of :func:`unitscale_core.sizing.size_report`."""

    def __init__(self, config: ModelConfig, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("sizesPanel")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.caption = QLabel(objectName="sizesCaption")
        top = QHBoxLayout()
        top.addWidget(self.caption, 1)
        top.addWidget(export_button(self, "sizesExport", self.export_items))
        layout.addLayout(top)
        self.stale = StaleBanner("sizesStale")
        layout.addWidget(self.stale)
        self.table = QTableWidget(len(ROWS), 4, objectName="sizesTable")
        self.table.setHorizontalHeaderLabels(["Quantity", "Value", "Exact", "Formula"])
        self.table.verticalHeader().hide()
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setAlternatingRowColors(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.table.setWordWrap(False)
        for row, (_, label, _, formula) in enumerate(ROWS):
            self.table.setItem(row, 0, _cell(label, formula))
            self.table.setItem(row, 3, _cell(formula, formula))
        layout.addWidget(self.table, 1)
        attach_context_menu(self.table, self, self.export_items)
        self.report: dict = {}
        self.update_config(config)

    def value(self, label: str) -> str:
        """The shown value of the row whose label (stripped) is ``label`` (for tests)."""
        for row, (_, text, _, _) in enumerate(ROWS):
            if text.strip() == label:
                return self.table.item(row, 1).text()
        raise KeyError(label)

    def set_stale(self, reason: str) -> None:
        """Say that the rows are the last valid config's while the draft is invalid ("":
        they are the draft's again)."""
        self.stale.set_reason(reason)

    def update_config(self, config: ModelConfig) -> None:
        """Recompute every row for ``config``."""
        self.report = report = size_report(config)
        self.caption.setText(
            f"{config.architecture}, {config.dtype}, batch {config.batch_size} × "
            f"{config.seq_len} tokens — hover a row for its formula")
        for row, (path, _, kind, formula) in enumerate(ROWS):
            value = report
            for key in path:
                value = value[key]
            shown = format_bytes(value) if kind == "bytes" else format_count(value)
            self.table.setItem(row, 1, _cell(shown, formula, right=True))
            # CSV gets the integer, not "1,234"
            self.table.setItem(row, 2, _cell(f"{value:,}", formula, right=True,
                                             export=int(value)))

    # -- export --------------------------------------------------------------------------------
    def table_data(self) -> TableData:
        """The table as shown; the Exact column's values are integers (bytes or counts)."""
        return table_from_model(self.table.model())

    def export_items(self) -> list[Item]:
        return [Table("sizes", "sizes table", self.table_data)]
