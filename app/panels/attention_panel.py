"""The attention panel: a model's attention maps for a text, per head, per layer, summarised.

Sources: the configured model (at initialisation, any parametrization), the bundled
all-MiniLM-L6-v2, or a Hugging Face checkpoint folder (:mod:`unitscale_core.pretrained`).
Everything that touches a model runs in the worker on channel ``"attention"`` (latest wins;
a result whose request id is not the newest is dropped). The job returns display-sized arrays
only: maps longer than ``max_side`` tokens are block-averaged with
:func:`~unitscale_core.attention_views.reduce_for_display` in the worker, so the GUI never holds
more than ``max_side²`` floats per head.

Views: one head (queries down, keys across, token labels), the layer's head average, or
attention rollout (Abnar & Zuidema 2020); a layers × heads grid of thumbnails (click one to
select it) and each head's mean attention entropy in nats beside the uniform maximum. Cells
the configured pattern forbids (causal, local, strided) are drawn grey, not as zeros.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
import shiboken6
from PySide6.QtCore import (
    QPointF,
    QRectF,
    Qt,
    QTimer,
    Signal,
)
from PySide6.QtGui import QFont, QFontMetrics, QPen
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from unitscale_core.attention_views import (
    AttentionResult,
    entropy,
    head_average,
    head_label,
    reduce_for_display,
    rollout,
    uniform_entropy,
)
from unitscale_core.config import ModelConfig

from ..export import (
    Figure,
    Item,
    Table,
    TableData,
    attach_context_menu,
    export_button,
    save_npy,
    save_png,
    save_table,
)
from ..widgets.atlas import AtlasGrid
from ..widgets.controls_state import restore_controls, save_controls
from ..widgets.heatmap import Heatmap, fit_label
from ..widgets.label_holder import LabelHolder
from ..worker import Worker

CHANNEL = "attention"
DEBOUNCE_MS = 250
MAX_SIDE = 512  # longest side of a map drawn as is; longer maps are block-averaged
THUMB_SIDE = 64  # longest side of a model-view thumbnail
LOG_FLOOR = 1e-4  # log colour scale: log10(max(p, LOG_FLOOR))
MAX_LABEL = 14  # characters of a token shown on an axis
DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."
MASKED_COLOUR = "#cfcfcf"
SELECTED_PEN = pg.mkPen("#d62728", width=3)
LAYER_PEN = pg.mkPen("#ff7f0e", width=2)
CMAP = "viridis"
ENTROPY_CMAP = "magma"
#: The model view's title ends with this on screen, never in an exported picture.
SELECT_HINT = "click to select"

SOURCES = [("configured model", "configured"), ("all-MiniLM-L6-v2 (bundled)", "minilm"),
           ("Open checkpoint folder…", "open")]
VIEWS = [("head view", "head"), ("head average", "average"), ("attention rollout", "rollout")]
KIND_LABELS = {"self": "decoder self-attention", "encoder": "encoder self-attention",
               "cross": "cross-attention (decoder → encoder)"}
KIND_SHORT = {"self": "decoder self-attention", "encoder": "encoder self-attention",
              "cross": "cross-attention"}


def _tick_font() -> QFont:
    font = QFont()
    font.setPointSizeF(8.0)
    return font


def _label_font(points: float) -> QFont:
    font = QFont()
    font.setPointSizeF(points)
    return font


# -- data computed in the worker -------------------------------------------------------------
@dataclass
class KindMaps:
    """One kind of attention (self, encoder self, cross), at display size.

    ``att`` ``[layers, heads, t, s]``, ``average`` ``[layers, t, s]`` and ``rollout``
    ``[layers, t, t]`` (None for cross-attention) are block-averaged by ``factor`` when the
    text is longer than the panel's ``max_side``; ``thumbs`` by ``thumb_factor``.
    ``allowed``/``thumb_allowed``: blocks holding at least one allowed cell (None: all).
    ``entropy`` ``[layers, heads]`` and ``uniform`` are computed on the full maps.
    """

    name: str
    label: str
    att: np.ndarray
    average: np.ndarray
    rollout: np.ndarray | None
    thumbs: np.ndarray
    allowed: np.ndarray | None
    thumb_allowed: np.ndarray | None
    entropy: np.ndarray
    uniform: float
    factor: int
    thumb_factor: int
    query_tokens: list[str]
    key_tokens: list[str]
    #: K/V heads under grouped-query attention (None: one per query head); maps stay one
    #: per query head, labelled "head 5 · kv 1"
    kv_heads: int | None = None
    #: The tokenizer's own pieces ("▁the", "Ġthe", "<0x0A>") behind the readable
    #: ``query_tokens``/``key_tokens`` (None: the same); shown in the hover text only
    query_pieces: list[str] | None = None
    key_pieces: list[str] | None = None

    def query_piece(self, i: int) -> str:
        return (self.query_pieces or self.query_tokens)[i]

    def key_piece(self, j: int) -> str:
        return (self.key_pieces or self.key_tokens)[j]

    def head_name(self, head: int) -> str:
        return head_label(head, self.heads, self.kv_heads)

    @property
    def layers(self) -> int:
        return self.att.shape[0]

    @property
    def heads(self) -> int:
        return self.att.shape[1]


@dataclass
class AttentionMaps:
    """What one request shows: every kind's maps plus the status facts."""

    source: str
    kinds: dict[str, KindMaps]
    n_tokens: int
    truncated: int
    limit: int
    note: str
    seconds: float


def _reduced_mask(allowed: np.ndarray | None, side: int) -> np.ndarray | None:
    if allowed is None:
        return None
    return reduce_for_display(allowed.astype(np.float32), side)[0] > 0


def kind_maps(name: str, label: str, att: np.ndarray, allowed: np.ndarray | None,
              query_tokens: list[str], key_tokens: list[str], max_side: int,
              check: Callable[[], None] | None = None) -> KindMaps:
    """Summaries and display-sized maps of one ``[layers, heads, T, S]`` attention stack."""
    check = check or (lambda: None)
    _, _, t, s = att.shape
    ent = entropy(att)
    if allowed is not None or t == s:
        uniform = uniform_entropy(allowed, t)
    else:
        uniform = math.log(s) if s else 0.0
    check()
    roll = rollout(att) if t == s and name != "cross" else None  # self-attention only
    check()
    shown, factor = reduce_for_display(att, max_side)
    average, _ = reduce_for_display(head_average(att), max_side)
    if roll is not None:
        roll, _ = reduce_for_display(roll, max_side)
    thumbs, thumb_factor = reduce_for_display(att, THUMB_SIDE)
    check()
    return KindMaps(
        name=name, label=label, att=np.ascontiguousarray(shown, dtype=np.float32),
        average=np.asarray(average, dtype=np.float32), rollout=roll,
        thumbs=np.asarray(thumbs, dtype=np.float32), allowed=_reduced_mask(allowed, max_side),
        thumb_allowed=_reduced_mask(allowed, THUMB_SIDE), entropy=ent.astype(np.float64),
        uniform=float(uniform), factor=factor, thumb_factor=thumb_factor,
        query_tokens=list(query_tokens), key_tokens=list(key_tokens))


@functools.lru_cache(maxsize=1)
def _checkpoint(folder: str):
    """The last checkpoint folder opened, kept loaded (worker thread only)."""
    from unitscale_core.pretrained import load_checkpoint

    return load_checkpoint(folder)


def compute_maps(source: str, text: str, config: ModelConfig, folder: str | None,
                 max_side: int, check: Callable[[], None] | None = None) -> AttentionMaps:
    """The worker job: capture attention for ``text`` from ``source`` and summarise it."""
    from unitscale_core import attention_views as av
    from unitscale_core import pretrained

    start = time.perf_counter()
    if source == "configured":
        result = av.configured_attentions(config, text, check_cancelled=check,
                                          max_side=max_side)
        limit = min(config.max_len, pretrained.minilm().config.max_len)
        name = f"configured model ({config.parametrization}, at init)"
    else:
        loaded = pretrained.minilm() if source == "minilm" else _checkpoint(str(folder))
        if check is not None:
            check()
        result = av.checkpoint_attentions(loaded, text)
        limit = loaded.config.max_len
        name = "all-MiniLM-L6-v2" if source == "minilm" else _short(Path(folder).name)
    if not result.tokens:
        raise ValueError("the text has no tokens")
    pieces = None if source == "configured" else token_pieces(loaded, text, result.tokens)
    kinds = _kinds(result, config if source == "configured" else None, max_side, check)
    for km in kinds.values():
        km.kv_heads = result.kv_heads
        if pieces is not None:  # a checkpoint's one stack: queries and keys are the text
            readable = readable_tokens(pieces, result.tokens, _byte_level(loaded.tokenizer))
            km.query_tokens, km.key_tokens = list(readable), list(readable)
            km.query_pieces, km.key_pieces = list(pieces), list(pieces)
    return AttentionMaps(source=name, kinds=kinds,
                         n_tokens=len(result.tokens), truncated=result.truncated, limit=limit,
                         note=result.note, seconds=time.perf_counter() - start)


#: A SentencePiece byte-fallback token: one byte of text the vocabulary has no piece for.
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
#: SentencePiece's word-start mark (Llama 2, Mistral, Gemma, Phi-3), a space in the text.
METASPACE = "\u2581"


def readable_token(piece: str) -> str:
    """The text a SentencePiece piece stands for: "▁the" → " the"; a byte-fallback token
    "<0x0A>" → its character when it is printable ASCII, a tab or a newline, else the
    escape "\\x0d" (one byte of a multi-byte character such as "<0xE2>" is no character of
    its own). Other pieces (WordPiece "##ing", specials "[CLS]", "<s>") are left as they are."""
    match = BYTE_TOKEN.fullmatch(piece)
    if match:
        byte = int(match.group(1), 16)
        return chr(byte) if 0x20 <= byte < 0x7F or byte in (0x09, 0x0A) else f"\\x{byte:02x}"
    return piece.replace(METASPACE, " ")


def byte_level_text(piece: str) -> str:
    """A byte-level BPE piece (GPT-2's "Ġthe", "Ċ", "Ã©") as the text of its bytes (" the",
    a newline, "é"); bytes that end mid-character as "\\xc3" escapes; a piece outside the
    byte alphabet (an added special token such as "<|endoftext|>") as it is."""
    from unitscale_core.pretrained import _byte_decoder  # GPT-2's alphabet, the core's own

    table = _byte_decoder()
    if not piece or not all(ch in table for ch in piece):
        return piece
    return bytes(table[ch] for ch in piece).decode("utf-8", "backslashreplace")


def readable_tokens(pieces: list[str], labels: list[str], byte_level: bool) -> list[str]:
    """Axis and export labels for a checkpoint's ``pieces``: byte-level tokenizers' pieces
    decoded to text (whatever the core's ``labels`` did), SentencePiece pieces through
    :func:`readable_token`; ``labels`` where the pieces do not line up with them."""
    if len(pieces) != len(labels):
        return [readable_token(t) for t in labels]
    if byte_level:
        return [byte_level_text(p) for p in pieces]
    return [readable_token(p) for p in pieces]


def _byte_level(tokenizer: Any) -> bool:
    """Whether a ``tokenizers`` tokenizer maps bytes to GPT-2's alphabet (a ByteLevel
    pre-tokenizer or decoder, alone or in a Sequence)."""
    for part in (getattr(tokenizer, "pre_tokenizer", None), getattr(tokenizer, "decoder", None)):
        try:
            state = part.__getstate__() if part is not None else b""
        except Exception:  # noqa: BLE001 - a tokenizer part without a serialised form
            continue
        if b'"ByteLevel"' in (state if isinstance(state, bytes) else str(state).encode()):
            return True
    return False


def token_pieces(loaded: Any, text: str, labels: list[str]) -> list[str] | None:
    """The tokenizer's own pieces for ``text`` as the checkpoint saw it (its ids, again
    through :func:`unitscale_core.pretrained.encode`); None when they do not line up with
    the ``labels`` the attention came with."""
    from unitscale_core import pretrained

    ids = pretrained.encode(loaded, text).ids[0].tolist()
    pieces = [loaded.tokenizer.id_to_token(int(i)) for i in ids]
    if len(pieces) != len(labels) or any(p is None for p in pieces):
        return None
    return pieces


def reduced_kind_maps(result: AttentionResult, kind: str = "self",
                      allowed_full: np.ndarray | None = None) -> KindMaps:
    """KindMaps from a result already block-averaged on the device (long configured-model
    texts): its entropy, head average and rollout were computed from the full maps."""
    summary = result.summaries.get(kind) or {"att": result.attentions,
                                             "entropy": result.entropy,
                                             "average": result.average,
                                             "rollout": result.rollout}
    att, factor = summary["att"], result.factor
    queries = result.tokens
    keys = (result.source_tokens or result.tokens) if kind in ("cross", "encoder") else queries
    if kind == "encoder":
        queries = keys
    thumbs, thumb_factor = reduce_for_display(att, THUMB_SIDE)
    allowed = _reduced_mask(allowed_full, att.shape[-1])  # at the maps' resolution
    return KindMaps(
        name=kind, label=KIND_LABELS[kind], att=np.ascontiguousarray(att, np.float32),
        average=summary["average"], rollout=summary["rollout"], thumbs=thumbs,
        allowed=allowed, thumb_allowed=_reduced_mask(allowed, THUMB_SIDE),
        entropy=np.asarray(summary["entropy"], dtype=np.float64),
        uniform=uniform_entropy(allowed_full, len(queries)) if kind != "cross"
        else (math.log(len(keys)) if keys else 0.0),
        factor=factor, thumb_factor=factor * thumb_factor, query_tokens=list(queries),
        key_tokens=list(keys))


def _kinds(result: AttentionResult, config: ModelConfig | None, max_side: int,
           check: Callable[[], None] | None) -> dict[str, KindMaps]:
    tokens = result.tokens
    if result.factor > 1 and result.cross_attentions is None:
        return {"self": reduced_kind_maps(result, "self", result.allowed)}
    if result.cross_attentions is None:
        return {"self": kind_maps("self", "self-attention", result.attentions, result.allowed,
                                  tokens, tokens, max_side, check)}
    from unitscale_core.model.masks import allowed as allowed_mask

    source = result.source_tokens or tokens
    s = len(source)
    mask = None
    if config is not None:  # the encoder's own pattern: bidirectional unless "causal"
        m = allowed_mask(s, s, config.attention, config.window, causal=False)
        mask = None if m is None else m.numpy()
    if result.factor > 1:  # reduced on the device: summaries came with the maps
        return {"self": reduced_kind_maps(result, "self", result.allowed),
                "encoder": reduced_kind_maps(result, "encoder", mask),
                "cross": reduced_kind_maps(result, "cross", None)}
    out = {"self": kind_maps("self", KIND_LABELS["self"], result.attentions, result.allowed,
                             tokens, tokens, max_side, check)}
    if result.encoder_attentions is not None:
        out["encoder"] = kind_maps("encoder", KIND_LABELS["encoder"], result.encoder_attentions,
                                   mask, source, source, max_side, check)
    out["cross"] = kind_maps("cross", KIND_LABELS["cross"], result.cross_attentions, None,
                             tokens, source, max_side, check)
    return out


# -- widgets ---------------------------------------------------------------------------------
class TokenAxis(pg.AxisItem):
    """An axis labelled with tokens. Bottom/top labels are drawn rotated 90° (reading upwards)
    so that long tokens never overlap; left/right labels are horizontal."""

    def __init__(self, orientation: str, **kwargs):
        super().__init__(orientation, **kwargs)
        self.rotated = orientation in ("bottom", "top")
        self._labels: list[tuple[float, str]] = []
        self._extent = 0
        self.setStyle(tickFont=_tick_font(), tickLength=4)
        if self.rotated:
            self.setStyle(showValues=False)
        self.setTextPen("k")
        self.setPen("k")

    def set_tokens(self, ticks: list[tuple[float, str]]) -> None:
        """``[(position, label), …]``: one tick mark and label each."""
        self._labels = list(ticks)
        if not self.rotated:
            self.setTicks([ticks, []])
            return
        self.setTicks([[(v, "") for v, _ in ticks], []])
        metrics = QFontMetrics(self.style["tickFont"])
        self._extent = max((metrics.horizontalAdvance(s) for _, s in ticks), default=0) + 4
        self._updateHeight()
        self.picture = None
        self.update()

    def labels(self) -> list[str]:
        """The labels shown, in axis order."""
        return [text for _, text in self._labels]

    def _updateHeight(self) -> None:
        super()._updateHeight()
        if getattr(self, "rotated", False) and self.isVisible() and self.fixedHeight is None:
            h = self.maximumHeight() + self._extent + 2
            self.setMaximumHeight(h)
            self.setMinimumHeight(h)

    def generateDrawSpecs(self, p):
        axis_spec, tick_specs, text_specs = super().generateDrawSpecs(p)
        if not self.rotated:
            return axis_spec, tick_specs, text_specs
        bounds = self.mapRectFromParent(self.geometry())
        lo, hi = self.range
        if hi == lo:
            return axis_spec, tick_specs, []
        scale = bounds.width() / (hi - lo)
        xs = [((v - lo) * scale, s) for v, s in self._labels]
        return axis_spec, tick_specs, [(x, s) for x, s in xs if 0 <= x <= bounds.width()]

    def drawPicture(self, p, axisSpec, tickSpecs, textSpecs):
        if not self.rotated:
            super().drawPicture(p, axisSpec, tickSpecs, textSpecs)
            return
        super().drawPicture(p, axisSpec, tickSpecs, [])
        p.setClipping(False)  # the first label may reach into the empty corner on its left
        p.setFont(self.style["tickFont"])
        p.setPen(self.textPen())
        metrics = QFontMetrics(self.style["tickFont"])
        h = metrics.height()
        top = max(0, self.style["tickLength"]) + 2
        flags = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        for x, text in textSpecs:
            p.save()
            p.translate(QPointF(x, top))
            p.rotate(-90)
            p.drawText(QRectF(-self._extent, -h / 2, self._extent, h), int(flags), text)
            p.restore()


class _Cell:
    """One model-view cell as a handle (the grid draws every cell itself): its layer and
    head, tooltip, scene rectangle and selection frame."""

    def __init__(self, view: ModelView, layer: int, head: int):
        self._view, self.layer, self.head = view, layer, head

    def toolTip(self) -> str:  # noqa: N802 (Qt's name, as the old per-cell items had)
        return self._view.grid.cell_tooltip(self.layer, self.head)

    def setToolTip(self, text: str) -> None:  # noqa: N802
        self._view.grid.tooltips[(self.layer, self.head)] = text

    def sceneBoundingRect(self) -> QRectF:  # noqa: N802
        grid = self._view.grid
        return grid.mapRectToScene(grid.cell_rect(self.layer, self.head))

    def pen(self) -> QPen | None:
        """The selection frame drawn around the cell (None: none)."""
        return self._view.grid.outline_pen(self.layer, self.head)


class _CellImage:
    """One cell's map and levels, as the old per-cell ``ImageItem``'s ``image`` and
    ``getLevels()`` gave them."""

    def __init__(self, grid: AtlasGrid, layer: int, head: int):
        self._grid, self._at = grid, (layer, head)

    @property
    def image(self) -> np.ndarray | None:
        maps = self._grid.maps
        return None if maps is None else maps[self._at]

    def getLevels(self) -> np.ndarray | None:  # noqa: N802 (pyqtgraph's name)
        if self._grid.lo is None:
            return None
        return np.array([self._grid.lo[self._at], self._grid.hi[self._at]])


class ModelView(pg.GraphicsLayoutWidget):
    """Every layer × head as a thumbnail: one texture atlas drawn by one item
    (:class:`~app.widgets.atlas.AtlasGrid`) under a fitted title. A left click on a cell
    calls ``on_click(layer, head)``; hovering one names it in the tooltip and emits
    ``hovered(layer, head)``."""

    hovered = Signal(int, int)

    def __init__(self, on_click: Callable[[int, int], None], parent: QWidget | None = None,
                 hint: str = ""):
        """``hint``: a last title part for the screen only ("click to select"), left out
        of exported pictures (:meth:`exporting`)."""
        super().__init__(parent)
        self.setObjectName("attnModelView")
        self.setAccessibleName("attention model view")
        self.hint = hint
        self._hint_shown = True
        self.setBackground("w")
        self.ci.layout.setSpacing(2)
        self.ci.setContentsMargins(2, 2, 2, 2)
        self._on_click = on_click
        self.grid = AtlasGrid(CMAP, MASKED_COLOUR)
        self.grid.clicked.connect(lambda layer, head: self._on_click(layer, head))
        self.grid.hovered.connect(self.hovered)
        self.title = None
        self._title_parts: list[str] = []
        self._selected: tuple[int, int | None] | None = None
        self._ensure_items()

    def _ensure_items(self) -> bool:
        """The title and the grid in the layout (``clear()`` removes them: the training view
        clears the view before an empty ``set_shape``); False once the view is closed."""
        if getattr(self, "closed", False) or not shiboken6.isValid(self.grid):
            return False
        if self.grid not in self.ci.items:
            self.title = self.ci.addLabel("", row=0, col=0, color="k", size="9pt")
            self.ci.addItem(self.grid, row=1, col=0)
            self._title_parts = []
        return True

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(layers, heads) shown."""
        return self.grid.grid_shape

    @property
    def boxes(self) -> list[list[_Cell]]:
        """Per layer, per head: a handle on each cell (tooltip, scene rectangle, frame)."""
        layers, heads = self.grid.grid_shape
        return [[_Cell(self, layer, h) for h in range(heads)] for layer in range(layers)]

    @property
    def images(self) -> list[list[_CellImage]]:
        """Per layer, per head: each cell's map (``.image``) and levels (``.getLevels()``)."""
        layers, heads = self.grid.grid_shape
        return [[_CellImage(self.grid, layer, h) for h in range(heads)]
                for layer in range(layers)]

    def set_shape(self, layers: int, heads: int) -> None:
        """An empty grid of ``layers`` × ``heads`` grey cells (nothing when unchanged)."""
        if not self._ensure_items():
            return
        if (layers, heads) != self.grid.grid_shape:
            self._selected = None
            self.grid.set_shape(layers, heads)
            self._describe()
        self._fit()

    def set_head_names(self, name: Callable[[int], str]) -> None:
        """How a cell's tooltip names its head (``name(5)`` → "head 5 · kv 1")."""
        self.grid.head_name = name
        self.grid.tooltips.clear()
        self.grid.hovered_cell = None  # the tooltip is renamed on the next hover

    def set_title(self, text: str) -> None:
        """The grid's title, fitted to the width (one line, or its " · " parts on lines of
        their own): wider than the grid, it widened the scene past the view, which then
        cut off the last heads."""
        if not self._ensure_items():
            return
        self._title_parts = text.split(" · ")
        self._fit()
        self._describe()

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().resizeEvent(event)
        if hasattr(self, "_title_parts"):  # (pyqtgraph calls this inside __init__)
            self._fit()

    @contextlib.contextmanager
    def exporting(self):
        """The grid as a picture (PNG, SVG, clipboard, report): its title without the
        screen's hint; restored afterwards."""
        self._hint_shown = False
        self._fit()
        try:
            yield
        finally:
            self._hint_shown = True
            self._fit()

    def _fit(self) -> None:
        if getattr(self, "closed", False) or self.title is None:
            return  # GraphicsView.close cleared the scene (its labels are gone), then resizes
        if self._title_parts:
            hint = [self.hint] if self.hint and self._hint_shown else []
            fit_label(self.title, self._title_parts + hint, self.width() - 12, "9pt")
        # the grid's own least width (the title fits any): the "L5" column, then per head
        # a cell of at least 8 px and 2 px between cells (the head labels thin out)
        wanted = math.ceil(self.grid.minimumWidth() + 4 + 2 * self.frameWidth() + 2)
        if self.grid.grid_shape[1] and self.minimumWidth() != wanted:
            self.setMinimumWidth(wanted)

    def set_maps(self, thumbs: np.ndarray, levels: Callable[[np.ndarray], tuple[float, float]]):
        """``thumbs`` ``[layers, heads, a, b]`` (NaN: masked), each map coloured by
        ``levels(map)``; a ``levels`` with a ``batch(thumbs)`` attribute gives every map's
        (lo, hi) ``[layers, heads]`` arrays at once."""
        if not self._ensure_items():
            return
        thumbs = np.ascontiguousarray(thumbs, dtype=np.float32)
        layers, heads = thumbs.shape[:2]
        batch = getattr(levels, "batch", None)
        if batch is not None:
            lo, hi = batch(thumbs)
        else:
            pairs = np.array([levels(thumbs[layer, h]) for layer in range(layers)
                              for h in range(heads)], dtype=np.float64).reshape(layers, heads, 2)
            lo, hi = pairs[..., 0], pairs[..., 1]
        self.set_shape(layers, heads)
        self.grid.set_maps(thumbs, lo, hi)

    def highlight(self, layer: int, head: int | None) -> None:
        """Outline the selected head (``head`` None: the whole layer)."""
        layers, heads = self.grid.grid_shape
        if not 0 <= layer < layers:
            return
        if head is None:
            self.grid.set_outline([(layer, h) for h in range(heads)], LAYER_PEN)
        else:
            self.grid.set_outline([(layer, head)], SELECTED_PEN)
        if self._selected != (layer, head):
            self._selected = (layer, head)
            self._describe()

    def _describe(self) -> None:
        """The accessible description: the title, and what is selected."""
        parts = [" · ".join(self._title_parts)] if self._title_parts else []
        if self._selected is not None:
            layer, head = self._selected
            parts.append(f"selected: layer {layer}" if head is None else
                         f"selected: {self.grid.cell_tooltip(layer, head)}")
        self.setAccessibleDescription("; ".join(parts))


def _label(token: str) -> str:
    """A token as an axis shows it: newline and tab as ⏎ and ⇥, a token of spaces only as
    "␣" each (other blank text quoted), at most MAX_LABEL characters."""
    token = token.replace("\n", "⏎").replace("\t", "⇥")
    if not token.strip():
        token = token.replace(" ", "␣")
    if not token.strip():
        token = repr(token)
    return token if len(token) <= MAX_LABEL else token[: MAX_LABEL - 1] + "…"


def _hover_token(token: str, piece: str) -> str:
    """A token in the hover text: quoted as read, the tokenizer's raw piece beside it when
    that differs ("' the' (piece 'Ġthe')")."""
    return f"'{token}'" if piece == token else f"'{token}' (piece '{piece}')"


def _data(combo: QComboBox) -> str | None:
    """``combo.currentData()``, never asking Qt for a missing item's data: PySide6 6.12
    drops a reference to None each time it converts an invalid QVariant (on Python < 3.12
    enough of them crash the interpreter with "deallocating None")."""
    return combo.currentData() if combo.currentIndex() >= 0 else None


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def colour_values(matrix: np.ndarray, mask: np.ndarray | None, log: bool) -> np.ndarray:
    """What is coloured: the weights (or log10 with a floor), masked cells NaN (grey)."""
    shown = np.array(matrix, dtype=np.float32)
    if log:
        shown = np.log10(np.maximum(shown, LOG_FLOOR))
    if mask is not None:
        shown[..., ~mask] = np.nan
    return shown


def model_view_title(km: KindMaps, log: bool = False) -> str:
    kv = f" ({km.kv_heads} K/V heads)" if km.kv_heads and km.kv_heads < km.heads else ""
    return (f"{km.layers} layers × {km.heads} heads{kv} "
            f"({'log₁₀ ' if log else ''}weight)")


def _linear_levels(data: np.ndarray) -> tuple[float, float]:
    """0 to the largest finite value (1 when there is none, or it is not positive)."""
    finite = data[np.isfinite(data)]
    hi = float(finite.max()) if finite.size else 1.0
    return 0.0, hi if hi > 0 else 1.0


def _linear_levels_batch(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_linear_levels` of every ``maps[l, h]`` at once: ``(lo, hi)`` ``[L, H]``.
    ``np.fmax`` skips NaN (masked cells); a map whose maximum is not finite (all masked, or
    an infinity) takes the per-map rule."""
    layers, heads = maps.shape[:2]
    if maps.size == 0:
        return np.zeros((layers, heads)), np.ones((layers, heads))
    hi = np.fmax.reduce(maps.reshape(layers, heads, -1), axis=2).astype(np.float64)
    for layer, head in zip(*np.nonzero(~np.isfinite(hi))):
        hi[layer, head] = _linear_levels(maps[layer, head])[1]
    hi[~(hi > 0)] = 1.0
    return np.zeros_like(hi), hi


def _log_levels(_data: np.ndarray) -> tuple[float, float]:
    return math.log10(LOG_FLOOR), 0.0


def _log_levels_batch(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shape = maps.shape[:2]
    return np.full(shape, math.log10(LOG_FLOOR)), np.zeros(shape)


# ModelView.set_maps colours every map at once with these
_linear_levels.batch = _linear_levels_batch
_log_levels.batch = _log_levels_batch


# -- the panel -------------------------------------------------------------------------------
class AttentionPanel(QWidget):
    """Controls and status on top; head view on the left, model view and entropy on the right.

    Public: ``update_config``, ``recompute``, ``open_checkpoint``, ``select(layer, head)``,
    ``matrix()`` (the current view's values), ``export_png/npy/csv``; ``computed`` is emitted
    after a worker result is drawn, ``failed(message)`` after a request fails.
    """

    computed = Signal()
    failed = Signal(str)

    def __init__(self, config: ModelConfig, worker: Worker, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("attentionPanel")
        self.config = config
        self.worker = worker
        self.max_side = MAX_SIDE
        self.maps: AttentionMaps | None = None
        self._request_id = 0
        self._folder: str | None = None  # the checkpoint source's folder
        self._previous_source = "configured"  # restored when the folder dialog is cancelled
        self._requested: tuple[str, str | None] = ("configured", None)
        self._shown: tuple[str, str | None] = ("configured", None)  # what the maps are of
        self._drawn: dict[str, object] = {}  # what the model and entropy views show now
        self._updating = False
        self._matrix = np.zeros((0, 0), dtype=np.float32)  # the current view's values
        self._mask: np.ndarray | None = None  # its allowed cells (None: all)
        self._view = "head"  # the view drawn (rollout falls back to the average)
        self._fallback = ""
        self._entropy_labels: list[pg.TextItem] = []
        self._entropy_label_points = 8.0  # the labels' font size now

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        controls = QGridLayout()
        self.source = QComboBox(objectName="attnSource")
        for label, data in SOURCES:
            self.source.addItem(label, data)
        self.source.setToolTip("Whose attention: the configured model at initialisation, the "
                               "bundled all-MiniLM-L6-v2, or a Hugging Face checkpoint folder "
                               "(safetensors: BERT family, GPT-2, GPT-NeoX, Llama, Mistral, "
                               "Qwen 2, Gemma 2, OLMo 2, Phi-3, Mixtral)")
        self.source.currentIndexChanged.connect(self._on_source)
        self.text = QLineEdit(DEFAULT_TEXT, objectName="attnText")
        self.text.setToolTip("Text to run through the model (recomputed as you type)")
        self._debounce = QTimer(self, singleShot=True, interval=DEBOUNCE_MS)
        self._debounce.timeout.connect(self.recompute)
        self.text.textChanged.connect(self._debounce.start)
        self.view = QComboBox(objectName="attnView")
        for label, data in VIEWS:
            self.view.addItem(label, data)
        self.view.setToolTip("One head; the mean over the layer's heads; or attention rollout "
                             "(Abnar & Zuidema 2020: head averages mixed with the residual "
                             "identity, multiplied up to this layer)")
        self.view.currentIndexChanged.connect(self._redraw)
        self.kind = QComboBox(objectName="attnKind")
        self.kind.setToolTip("Encoder-decoder models: which attention to show")
        self.kind.currentIndexChanged.connect(self._on_kind)
        self.layer = self._spin("attnLayer", "Layer shown (0 = first)")
        self.head = self._spin("attnHead", "Head shown by the head view")
        self.log = QCheckBox("log colour scale", objectName="attnLog")
        self.log.setToolTip(f"Colour by log₁₀ of the weight (floor {LOG_FLOOR:g}), which shows "
                            "the small weights a linear scale hides")
        self.log.toggled.connect(self._redraw)
        self.kind_label = QLabel("attention")

        controls.addWidget(QLabel("source"), 0, 0, Qt.AlignmentFlag.AlignRight)
        controls.addWidget(self.source, 0, 1)
        controls.addWidget(QLabel("text"), 0, 2, Qt.AlignmentFlag.AlignRight)
        controls.addWidget(self.text, 0, 3, 1, 6)
        row = QHBoxLayout()
        for label, widget in (("view", self.view), ("layer", self.layer), ("head", self.head)):
            lab = QLabel(label)
            lab.setToolTip(widget.toolTip())
            row.addWidget(lab)
            row.addWidget(widget)
        row.addWidget(self.kind_label)
        row.addWidget(self.kind)
        row.addWidget(self.log)
        row.addStretch(1)
        controls.addLayout(row, 1, 0, 1, 9)
        controls.setColumnStretch(3, 1)
        layout.addLayout(controls)

        bar = QHBoxLayout()
        self.status = QLabel(objectName="attnStatus")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # held outside the layout: "computing…" and the result's line (its timing changes
        # every time) relayouted the panel and re-fitted the head view's token axes on every
        # job, 10-30 ms of the GUI thread while the worker still runs
        bar.addWidget(LabelHolder(self.status), 1)
        bar.addWidget(export_button(self, "attnExport", self.export_items))
        layout.addLayout(bar)

        self.head_view = Heatmap(cmap=CMAP)
        self.head_view.setObjectName("attnHeadView")
        plot = self.head_view.plot
        self.query_axis, self.key_axis = TokenAxis("left"), TokenAxis("bottom")
        plot.setAxisItems({"left": self.query_axis, "bottom": self.key_axis})
        plot.vb.setBackgroundColor(MASKED_COLOUR)
        plot.vb.sigResized.connect(self._update_ticks)
        _black_colorbar(self.head_view)
        self.model_view = ModelView(self.select, hint=SELECT_HINT)
        self.entropy_view = Heatmap(cmap=ENTROPY_CMAP)
        self.entropy_view.setObjectName("attnEntropy")
        _black_colorbar(self.entropy_view)
        self.entropy_view.plot.scene().sigMouseClicked.connect(self._on_entropy_click)
        self.entropy_view.plot.vb.sigResized.connect(self._fit_entropy_labels)

        # the thumbnail grid and the entropy heatmap each take the column's full height, as
        # tabs: stacked, a docked panel (~370 px in a 1700 × 1000 window) left the entropy
        # cells a few pixels tall or clipped a 6 × 12 grid
        self.right_tabs = QTabWidget(objectName="attnRightTabs")
        self.right_tabs.setDocumentMode(True)
        self.right_tabs.addTab(self.model_view, "All heads")
        self.right_tabs.addTab(self.entropy_view, "Entropy")
        self.right_tabs.setTabToolTip(0, "Every layer × head as a thumbnail: click one to show "
                                         "it in the head view")
        self.right_tabs.setTabToolTip(1, "Each head's mean attention entropy in nats, "
                                         "H = −Σ_j p_ij ln p_ij averaged over queries; the "
                                         "title gives the uniform maximum (mean ln of each "
                                         "query's allowed keys). Click a cell to select it")
        self.splitter = QSplitter(Qt.Orientation.Horizontal, objectName="attnSplitter")
        self.splitter.addWidget(self.head_view)
        self.splitter.addWidget(self.right_tabs)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 1)
        layout.addWidget(self.splitter, 1)
        for view in (self.head_view.view, self.model_view, self.entropy_view.view):
            attach_context_menu(view, self, self.export_items)
        # the entropy view's value labels (a TextItem per layer and head, ~1 ms each) are
        # built in the first idle moment for the shape the first result will most likely
        # have, not when that result arrives while the worker is still busy
        QTimer.singleShot(0, self._prebuild_grid)

        worker.finished_job.connect(self._on_result)
        worker.failed_job.connect(self._on_failure)
        self._set_kinds(["self"])
        self._stale = False
        self._active: bool | None = None  # unknown until a dock reports it
        self.update_config(config)

    def _spin(self, name: str, tip: str) -> QSpinBox:
        spin = QSpinBox(objectName=name)
        spin.setRange(0, 0)
        spin.setKeyboardTracking(False)
        spin.setToolTip(tip)
        spin.valueChanged.connect(self._redraw)
        return spin

    # -- requests ------------------------------------------------------------------------------
    def update_config(self, config: ModelConfig) -> None:
        """A new model config; recomputes when the source is the configured model — at once
        if the panel is on screen, else when it is next shown (a hidden tab costs nothing)."""
        self.config = config
        if self.source.currentData() == "configured":
            if self._on_screen():
                self.recompute()
            else:
                self._stale = True

    def _on_screen(self) -> bool:
        return self._active if self._active is not None else self.isVisible()

    def set_active(self, active: bool) -> None:
        """Whether the panel is on screen (its dock's tab selected): a stale result is
        recomputed when it becomes active. Connected to ``QDockWidget.visibilityChanged``."""
        self._active = active
        if active and self._stale:
            self._stale = False
            self.recompute()

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self._active is None and self._stale:  # a panel not in a dock
            self._stale = False
            QTimer.singleShot(0, self.recompute)

    def _prebuild_grid(self) -> None:
        """The thumbnail grid and the entropy labels for the current source's likely shape
        (configured model: its self-attention layers × heads; the bundled MiniLM: 6 × 12)."""
        source = self.source.currentData()
        cfg = self.config
        if source == "configured" and cfg.architecture != "encoder-decoder":
            shape = (cfg.n_layers, cfg.n_heads)
        elif source == "minilm":
            shape = (6, 12)
        else:
            return
        self.model_view.set_shape(*shape)
        self._entropy_cells(shape[0] * shape[1])

    def recompute(self) -> None:
        """Send the current source and text to the worker (latest wins)."""
        self._debounce.stop()
        source = self.source.currentData()
        if source == "open":
            return
        folder = self._folder if source == "checkpoint" else None
        args = (source, self.text.text(), self.config, folder, self.max_side)
        self._requested = (source, folder)
        self.status.setText(f"computing attention ({self.source.currentText()})…")
        self._request_id = self.worker.submit(
            CHANNEL, lambda: compute_maps(*args, check=self.worker.check_cancelled))

    def open_checkpoint(self, folder: str | Path) -> None:
        """Load a checkpoint folder in the worker and show its attention; a folder that
        cannot be loaded is reported in the status line (``failed`` is emitted)."""
        self._show_checkpoint_item(str(folder))
        self.recompute()

    def _show_checkpoint_item(self, folder: str) -> None:
        """The "checkpoint: name" source item (created when missing), selected."""
        self._folder = folder
        index = self.source.findData("checkpoint")
        self._updating = True
        if index < 0:
            index = self.source.count() - 1  # before "Open checkpoint folder…"
            self.source.insertItem(index, "", "checkpoint")
        self.source.setItemText(index, f"checkpoint: {_short(Path(folder).name)}")
        self.source.setItemData(index, folder, Qt.ItemDataRole.ToolTipRole)
        self.source.setCurrentIndex(index)
        self._updating = False
        self._previous_source = "checkpoint"

    def _select_source(self, data: str) -> None:
        self._updating = True
        self.source.setCurrentIndex(max(0, self.source.findData(data)))
        self._updating = False
        self._previous_source = self.source.currentData()

    def _on_source(self, index: int) -> None:
        if self._updating:
            return
        if self.source.itemData(index) == "open":
            folder = QFileDialog.getExistingDirectory(self, "Open a checkpoint folder")
            if folder:
                self.open_checkpoint(folder)
            else:
                self._select_source(self._previous_source)
            return
        self._previous_source = self.source.itemData(index)
        self.recompute()

    def _on_result(self, channel: str, request_id: int, maps) -> None:
        if channel != CHANNEL or request_id != self._request_id:
            return  # another panel's, or stale
        self._shown = self._requested
        self.show_maps(maps)

    def show_maps(self, maps: AttentionMaps) -> None:
        """Draw ``maps`` (a :func:`compute_maps` result) in every view."""
        self.maps = maps
        self._drawn.clear()
        self._set_kinds(list(maps.kinds))
        self._redraw()
        self.computed.emit()

    def _on_failure(self, channel: str, request_id: int, message: str) -> None:
        if channel != CHANNEL or request_id != self._request_id:
            return
        if self._requested[0] == "checkpoint":  # the source control goes back to what is shown
            message = f"could not open the checkpoint: {message}"
            source, folder = self._shown
            if source == "checkpoint":
                self._show_checkpoint_item(folder)
            else:
                self._updating = True
                self.source.removeItem(self.source.findData("checkpoint"))
                self._updating = False
                self._folder = None
                self._select_source(source)
        self.status.setText(f"⚠ {message}")
        self.status.setToolTip(message)
        self.failed.emit(message)

    # -- selection -----------------------------------------------------------------------------
    def _set_kinds(self, names: list[str]) -> None:
        current = _data(self.kind)
        self._updating = True
        self.kind.clear()
        for name in names:
            label = KIND_LABELS[name] if len(names) > 1 else "self-attention"
            self.kind.addItem(label, name)
        index = self.kind.findData(current)
        self.kind.setCurrentIndex(max(index, 0))
        self._updating = False
        self.kind.setVisible(len(names) > 1)
        self.kind_label.setVisible(len(names) > 1)

    def _on_kind(self, *_args) -> None:
        if not self._updating:
            self._redraw()

    def current(self) -> KindMaps | None:
        """The maps of the selected attention kind (None before the first result)."""
        if self.maps is None:
            return None
        return self.maps.kinds.get(_data(self.kind)) or next(iter(self.maps.kinds.values()))

    def select(self, layer: int, head: int) -> None:
        """Show ``layer``, ``head`` in the head view (the model view's and entropy's click)."""
        self._updating = True
        self.layer.setValue(layer)
        self.head.setValue(head)
        self.view.setCurrentIndex(self.view.findData("head"))
        self._updating = False
        self._redraw()

    def _on_entropy_click(self, ev) -> None:
        plot = self.entropy_view.plot
        if ev.button() != Qt.MouseButton.LeftButton or \
                not plot.sceneBoundingRect().contains(ev.scenePos()):
            return
        point = plot.vb.mapSceneToView(ev.scenePos())
        cell = self.entropy_view.cell_at(point.x(), point.y())
        if cell is not None and self.maps is not None:
            self.select(*cell)

    # -- drawing -------------------------------------------------------------------------------
    def _redraw(self, *_args) -> None:
        if self._updating:
            return
        km = self.current()
        if km is None:
            return
        self._updating = True
        self.layer.setMaximum(km.layers - 1)
        self.head.setMaximum(km.heads - 1)
        self._updating = False
        view = self.view.currentData()
        layer, head = self.layer.value(), self.head.value()
        self._fallback = ""
        if view == "rollout" and km.rollout is None:
            view = "average"
            self._fallback = "rollout needs self-attention: showing the head average"
        self.head.setEnabled(view == "head")
        if view == "head":
            matrix, mask = km.att[layer, head], km.allowed
            what = f"layer {layer}, {km.head_name(head)}"
        elif view == "average":
            matrix, mask = km.average[layer], km.allowed
            what = f"layer {layer}, mean of {km.heads} heads"
        else:
            matrix, mask = km.rollout[layer], None
            what = f"rollout to layer {layer}"
        self._matrix = matrix
        self._mask = mask
        self._view = view
        log = self.log.isChecked()
        shown = self._colour_values(matrix, mask)
        levels = _log_levels(shown) if log else _linear_levels(shown)
        rows, cols = matrix.shape
        n_q, n_k = len(km.query_tokens), len(km.key_tokens)
        scale = "log₁₀ weight" if log else ("rollout share" if view == "rollout" else "weight")
        kind = "" if len(self.maps.kinds) == 1 else f"{KIND_SHORT[km.name]} · "
        self.head_view.set_matrix(
            shown, xlabel="input token" if view == "rollout" else "key",
            ylabel="query", levels=levels,
            row_coords=_coords(rows, km.factor, n_q), col_coords=_coords(cols, km.factor, n_k),
            formatter=self._describe)
        title = (self.maps.source, f"{kind}{what}")
        if self._drawn.get("title") != title:  # (every PySide6 call counts: see _data)
            self._drawn["title"] = title
            self.head_view.set_title(title)  # one line, or two, fitted to the width
        if self._drawn.get("scale") != scale:
            self._drawn["scale"] = scale
            self.head_view.colorbar.axis.setLabel(scale, color="k")
        self._update_ticks()
        if self._drawn.get("thumbs") != (km.name, log):  # not redrawn per layer or head
            self._drawn["thumbs"] = (km.name, log)
            thumbs = self._colour_values(km.thumbs, km.thumb_allowed)
            self.model_view.set_maps(thumbs, _log_levels if log else _linear_levels)
            self.model_view.set_title(model_view_title(km, log))
            self.model_view.set_head_names(km.head_name)  # "layer 2, head 5 · kv 1"
        self.model_view.highlight(layer, head if view == "head" else None)
        if self._drawn.get("entropy") != km.name:
            self._drawn["entropy"] = km.name
            self._draw_entropy(km)
        self._update_status(km)

    def _colour_values(self, matrix: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        return colour_values(matrix, mask, self.log.isChecked())

    def _describe(self, row: int, col: int, _value: float) -> str:
        """Hover text: the query and key tokens and the weight (the probability, even when
        the colours are logarithmic)."""
        km = self.current()
        if km is None:
            return ""
        f = km.factor
        i, j = min(row // f, self._matrix.shape[0] - 1), min(col // f, self._matrix.shape[1] - 1)
        weight = float(self._matrix[i, j])
        noun = "share" if self._view == "rollout" else "weight"
        if f > 1:
            q0, k0 = i * f, j * f
            q1 = min(q0 + f, len(km.query_tokens)) - 1
            k1 = min(k0 + f, len(km.key_tokens)) - 1
            where = (f"queries {_hover_token(km.query_tokens[q0], km.query_piece(q0))}… "
                     f"({q0}–{q1}) → keys {_hover_token(km.key_tokens[k0], km.key_piece(k0))}… "
                     f"({k0}–{k1})")
            noun = f"mean {noun}"
        else:
            key = "input" if self._view == "rollout" else "key"
            where = (f"query {_hover_token(km.query_tokens[row], km.query_piece(row))} "
                     f"({row}) → {key} {_hover_token(km.key_tokens[col], km.key_piece(col))} "
                     f"({col})")
        if self._mask is not None and not self._mask[i, j]:
            return f"{where}: masked by the attention pattern"
        return f"{where}: {noun} {weight:.3g}"

    def _update_ticks(self, *_args) -> None:
        """Token labels on both axes; every k-th token when they would not fit."""
        km = self.current()
        if km is None:
            return
        vb = self.head_view.plot.vb
        key = (km.name, round(vb.width()), round(vb.height()))
        if self._drawn.get("ticks") == key:
            return
        self._drawn["ticks"] = key
        line = QFontMetrics(_tick_font()).height()
        for axis, tokens, pixels in ((self.query_axis, km.query_tokens, vb.height()),
                                     (self.key_axis, km.key_tokens, vb.width())):
            n = len(tokens)
            step = max(1, math.ceil(n * line * 1.05 / max(pixels, 40.0)))
            if step > 1:  # round numbers read better: 2, 5, 10, 20, 50, …
                step = next(s for s in _nice_steps() if s >= step)
                labels = [(i + 0.5, f"{i} {_label(tokens[i])}") for i in range(0, n, step)]
            else:
                labels = [(i + 0.5, _label(tokens[i])) for i in range(n)]
            axis.set_tokens(labels)

    def _draw_entropy(self, km: KindMaps) -> None:
        view = self.entropy_view
        umax = km.uniform
        view.set_matrix(
            km.entropy, xlabel="head", ylabel="layer", levels=(0.0, umax if umax > 0 else 1.0),
            formatter=lambda r, c, v: (f"layer {r}, {km.head_name(c)}: entropy {v:.3f} nats "
                                       f"(uniform {umax:.3f})"))
        # fitted to the column (a title wider than the plot pushed the colour bar out of a
        # docked panel's column)
        view.set_title(["mean entropy", f"uniform max {umax:.2f}"])
        view.colorbar.axis.setLabel("nats", color="k")
        for axis, n in (("left", km.layers), ("bottom", km.heads)):
            view.plot.getAxis(axis).setTicks([[(i + 0.5, str(i)) for i in range(n)], []])
        self._entropy_cells(km.layers * km.heads)
        for i, item in enumerate(self._entropy_labels):
            r, c = divmod(i, km.heads)
            value = float(km.entropy[r, c])
            item.setText(f"{value:.2f}", color="k" if umax > 0 and value > 0.6 * umax else "w")
            item.setPos(c + 0.5, r + 0.5)
        self._fit_entropy_labels()

    def _fit_entropy_labels(self, *_args) -> None:
        """Show the entropy values only where a cell can hold one: in a short dock the cells
        are a few pixels tall and the labels would pile up over each other."""
        labels = self._entropy_labels
        km = self.current()
        if not labels or km is None:
            return
        box = self.entropy_view.plot.vb.size()
        cell_w, cell_h = box.width() / max(km.heads, 1), box.height() / max(km.layers, 1)
        size = None  # the largest of 8 and 7 pt at which "0.00" fits a cell, with a margin
        for points, margin in ((8.0, 4), (7.0, 2)):
            metrics = QFontMetrics(_label_font(points))
            if cell_w >= metrics.horizontalAdvance("0.00") + margin and \
                    cell_h >= metrics.height():
                size = points
                break
        if size is not None and size != self._entropy_label_points:
            font = _label_font(size)
            for item in labels:
                item.setFont(font)
            self._entropy_label_points = size
        for item in labels:
            item.setVisible(size is not None)

    def _entropy_cells(self, cells: int) -> None:
        """One value label per entropy cell (none past 24 × 24), kept and re-texted while the
        grid keeps its size: making a TextItem costs about a millisecond."""
        cells = cells if cells <= 24 * 24 else 0
        if len(self._entropy_labels) == cells:
            return
        plot = self.entropy_view.plot
        for item in self._entropy_labels:
            plot.removeItem(item)
        self._entropy_labels = []
        self._entropy_label_points = 8.0
        for _ in range(cells):
            item = pg.TextItem("", anchor=(0.5, 0.5))
            item.setFont(_label_font(8.0))
            plot.addItem(item)
            self._entropy_labels.append(item)

    def _update_status(self, km: KindMaps) -> None:
        maps = self.maps
        parts = [f"{maps.source}: {maps.n_tokens} tokens"]
        if maps.truncated:
            parts.append(f"text cut by {maps.truncated} tokens to fit {maps.limit} positions")
        if km.factor > 1:
            rows, cols = km.att.shape[-2:]
            parts.append(f"maps block-averaged {km.factor}×{km.factor} to {rows} × {cols} "
                         f"for display (more than {self.max_side} tokens)")
        if self._fallback:
            parts.append(self._fallback)
        if maps.note:
            parts.append(maps.note)
        parts.append(f"{maps.seconds:.2f} s")
        text = " · ".join(parts)
        self.status.setText(text)
        self.status.setToolTip(text)

    def axis_labels(self) -> tuple[list[str], list[str]]:
        """The head view's token labels: (queries, down the left; keys, along the bottom)."""
        return self.query_axis.labels(), self.key_axis.labels()

    def matrix(self) -> np.ndarray:
        """The current view's values (weights, head average or rollout; masked cells as the
        model gives them, i.e. 0), at display size."""
        return np.array(self._matrix, dtype=np.float32)

    # -- export --------------------------------------------------------------------------------
    def export_items(self) -> list[Item]:
        """Head view (its matrix as NPY), model view (every map of the kind shown,
        ``[layers, heads, queries, keys]``), entropy (``[layers, heads]``), and the head
        view's matrix with token labels as a table."""
        return [
            Figure("attention", "head view", lambda: self.head_view.view,
                   data=self.matrix),
            Figure("attentionModelView", "model view", lambda: self.model_view,
                   data=lambda: self._kind_array("att")),
            self.entropy_view.figure("attentionEntropy", "entropy",
                                     data=lambda: self._kind_array("entropy")),
            Table("attentionMatrix", "head view's weights (table)", self.matrix_table),
        ]

    def _kind_array(self, name: str) -> np.ndarray:
        km = self.current()
        if km is None:
            raise ValueError("nothing to export yet")
        return np.asarray(getattr(km, name))

    def export_png(self, path: str | Path, scale: float = 2.0) -> None:
        """The head view (map, token axes, colour bar) as a PNG: the on-screen layout drawn
        again at ``scale``× the pixels (text and cells stay sharp)."""
        save_png(self.head_view.view, path, scale)

    def export_npy(self, path: str | Path) -> None:
        """The current view's matrix, float32 ``[queries, keys]`` (no pickle)."""
        save_npy(self.matrix(), path)

    def matrix_table(self) -> TableData:
        """The current view's matrix with token labels: a header row of keys, then one row
        per query (``index, token, weights…``)."""
        km = self.current()
        if km is None:
            raise ValueError("nothing to export yet")
        matrix = self.matrix()
        f = km.factor
        header = ["index", "query \\ key", *(km.key_tokens[j * f] for j in range(matrix.shape[1]))]
        cells, values = [], []
        for i, row in enumerate(matrix):
            lead = [i * f, km.query_tokens[i * f]]
            values.append(lead + [np.float32(v) for v in row])
            cells.append([str(lead[0]), lead[1], *(f"{v:.3g}" for v in row)])
        return TableData(header, cells, values)

    def export_csv(self, path: str | Path) -> None:
        """:meth:`matrix_table` as CSV (``.md``: Markdown)."""
        save_table(self.matrix_table(), path)

    # -- state ---------------------------------------------------------------------------------
    def _state_controls(self) -> list[QWidget]:
        return [self.text, self.view, self.log, self.splitter, self.right_tabs]

    def state(self) -> dict[str, Any]:
        """The panel's choices: source (configured model or MiniLM), text, view, colour
        scale and the splitter. A checkpoint folder is not reopened on the next launch."""
        source = self.source.currentData()
        return {"attnSource": source if source in ("configured", "minilm") else "configured",
                **save_controls(self._state_controls())}

    def restore_state(self, state: Any) -> list[str]:
        """Apply :meth:`state`'s output; the maps are recomputed when the panel is shown."""
        self._updating = True
        try:
            problems = []
            if isinstance(state, dict) and "attnSource" in state:
                source = state["attnSource"]
                if source in ("configured", "minilm"):
                    self._select_source(source)
                else:
                    problems.append(f"attnSource: {str(source)[:40]!r} is not a saved source")
                state = {k: v for k, v in state.items() if k != "attnSource"}
            problems += restore_controls(self._state_controls(), state)
        finally:
            self._updating = False
        self._debounce.stop()  # the restored text is not an edit to wait for
        if self._on_screen():
            self.recompute()
        else:
            self._stale = True
        return problems


def _coords(n_shown: int, factor: int, n: int) -> np.ndarray | None:
    """Original index of each shown row (block start; the last is n − 1 so the map spans
    all n positions)."""
    if factor == 1:
        return None
    coords = np.arange(n_shown) * factor
    coords[-1] = n - 1
    return coords


def _nice_steps():
    base = 1
    while True:
        for m in (1, 2, 5):
            yield m * base
        base *= 10


def _black_colorbar(heatmap: Heatmap) -> None:
    axis = heatmap.colorbar.axis
    axis.setTextPen("k")
    axis.setPen("k")
    axis.setStyle(tickFont=_tick_font())
    axis.setWidth(None)  # room for the axis label too
    axis.enableAutoSIPrefix(False)
