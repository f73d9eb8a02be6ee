"""pytest-qt: the attention panel's sources, views, selection, masks, errors and exports."""

from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest
from PySide6.QtCore import QPointF, Qt

from app.panels.attention_panel import CHANNEL, LOG_FLOOR, AttentionPanel, model_view_title
from app.worker import Worker
from unitscale_core import ModelConfig
from unitscale_core.attention_views import checkpoint_attentions
from unitscale_core.pretrained import minilm

TEXT = "The quick brown fox jumps over the lazy dog."
TOKENS = ["[CLS]", "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", ".",
          "[SEP]"]
SMALL = dict(d_model=32, n_heads=4, d_ff=64, n_layers=2, vocab_size=500, max_len=64,
             seq_len=16)
TIMEOUT = 30_000


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.stop(2000)


@pytest.fixture
def make_panel(qtbot, worker):
    """``make_panel(config)`` → a shown 1200×800 panel whose first result is drawn."""

    def make(config: ModelConfig | None = None) -> AttentionPanel:
        panel = AttentionPanel(config or ModelConfig(**SMALL), worker)
        qtbot.addWidget(panel)
        panel.resize(1200, 800)
        panel.show()
        with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):
            pass  # the result crosses to the GUI thread only inside the wait
        return panel

    return make


def choose(panel, qtbot, combo, data) -> None:
    with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):
        combo.setCurrentIndex(combo.findData(data))


@pytest.fixture(scope="module")
def minilm_attention():
    return checkpoint_attentions(minilm(), TEXT)


def test_minilm_head_view_matches_the_checkpoint(qtbot, make_panel, minilm_attention):
    panel = make_panel()
    choose(panel, qtbot, panel.source, "minilm")
    want = minilm_attention.attentions
    np.testing.assert_allclose(panel.head_view.data, want[0, 0], rtol=1e-5, atol=1e-7)
    assert panel.axis_labels() == (TOKENS, TOKENS)
    assert (panel.layer.maximum(), panel.head.maximum()) == (5, 11)
    panel.layer.setValue(3)
    panel.head.setValue(7)
    np.testing.assert_allclose(panel.head_view.data, want[3, 7], rtol=1e-5, atol=1e-7)
    assert panel.head_view.describe(2, 4) == (
        f"query 'quick' (2) → key 'fox' (4): weight {want[3, 7, 2, 4]:.3g}")
    assert panel.entropy_view.data.shape == (6, 12)
    assert "12 tokens" in panel.status.text()
    assert not panel.kind.isVisibleTo(panel)  # one kind of attention only


def test_model_view_click_selects_layer_and_head(qtbot, make_panel, minilm_attention):
    panel = make_panel()
    choose(panel, qtbot, panel.source, "minilm")
    box = panel.model_view.boxes[4][9]
    centre = panel.model_view.mapFromScene(box.sceneBoundingRect().center())
    qtbot.mouseClick(panel.model_view.viewport(), Qt.MouseButton.LeftButton, pos=centre)
    assert (panel.layer.value(), panel.head.value()) == (4, 9)
    np.testing.assert_allclose(panel.head_view.data, minilm_attention.attentions[4, 9],
                               rtol=1e-5, atol=1e-7)
    assert box.pen().color().name() == "#d62728"  # outlined as selected
    panel.view.setCurrentIndex(panel.view.findData("average"))
    np.testing.assert_allclose(panel.head_view.data, minilm_attention.attentions[4].mean(0),
                               rtol=1e-5, atol=1e-7)
    panel.select(1, 2)  # back to the head view
    assert panel.view.currentData() == "head"
    np.testing.assert_allclose(panel.head_view.data, minilm_attention.attentions[1, 2],
                               rtol=1e-5, atol=1e-7)


def test_configured_causal_model_blanks_the_masked_cells(qtbot, make_panel):
    panel = make_panel(ModelConfig(architecture="decoder", attention="causal", **SMALL))
    shown = panel.head_view.data
    t = len(TOKENS)
    upper = np.triu(np.ones((t, t), dtype=bool), 1)
    assert shown.shape == (t, t)
    assert np.isnan(shown[upper]).all() and np.isfinite(shown[~upper]).all()
    assert (panel.matrix()[upper] == 0).all()  # the data itself: zero probability
    np.testing.assert_allclose(panel.matrix().sum(-1), 1.0, rtol=1e-5)
    assert "masked" in panel.head_view.describe(0, 5)
    assert "folded" in panel.status.text() and f"{t} tokens" in panel.status.text()
    # thumbnails show the pattern too
    thumb = panel.model_view.images[1][3].image
    assert np.isnan(thumb[upper]).all()


def test_local_pattern_in_an_encoder(qtbot, make_panel):
    panel = make_panel(ModelConfig(architecture="encoder", attention="local", window=2,
                                   **SMALL))
    shown = panel.head_view.data
    i, j = np.indices(shown.shape)
    assert np.isnan(shown[abs(i - j) >= 2]).all() and np.isfinite(shown[abs(i - j) < 2]).all()


def test_encoder_decoder_kinds(qtbot, make_panel):
    panel = make_panel(ModelConfig(architecture="encoder-decoder", **SMALL))
    assert panel.kind.isVisibleTo(panel)
    assert [panel.kind.itemData(i) for i in range(panel.kind.count())] == \
        ["self", "encoder", "cross"]
    panel.kind.setCurrentIndex(panel.kind.findData("cross"))
    t = len(TOKENS)
    assert panel.head_view.data.shape == (t, t)
    assert np.isfinite(panel.head_view.data).all()  # cross-attention sees every source token
    panel.view.setCurrentIndex(panel.view.findData("rollout"))
    assert "rollout needs self-attention" in panel.status.text()
    panel.kind.setCurrentIndex(panel.kind.findData("encoder"))
    assert np.isfinite(panel.head_view.data).all()  # the encoder is bidirectional
    panel.kind.setCurrentIndex(panel.kind.findData("self"))
    assert "rollout needs" not in panel.status.text()
    np.testing.assert_allclose(panel.matrix().sum(-1), 1.0, rtol=1e-5)  # rollout rows
    assert panel.matrix()[0, 1] == 0  # nothing flows backwards in a causal decoder
    panel.select(1, 2)
    assert np.isnan(panel.head_view.data[0, 1])  # the decoder's mask, drawn blank


def test_bogus_folder_is_reported_in_the_status(qtbot, make_panel, tmp_path):
    panel = make_panel()
    with qtbot.waitSignal(panel.failed, timeout=TIMEOUT) as blocker:
        panel.open_checkpoint(tmp_path)
    assert "safetensors" in blocker.args[0]
    assert panel.status.text().startswith("⚠ could not open the checkpoint")
    assert "Traceback" not in panel.status.text()
    assert panel.source.currentData() == "configured"
    assert panel.source.findData("checkpoint") == -1
    with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):  # still working afterwards
        panel.recompute()


def test_checkpoint_folder_from_the_dialog(qtbot, make_panel, monkeypatch, tmp_path,
                                          minilm_attention):
    """The source menu's "Open checkpoint folder…": cancel keeps the source; a real folder
    (the bundled MiniLM's) loads in the worker; a bad one afterwards restores that one."""
    from PySide6.QtWidgets import QFileDialog

    folder = str(minilm().folder)
    panel = make_panel()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: "")
    panel.source.setCurrentIndex(panel.source.findData("open"))
    assert panel.source.currentData() == "configured"
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: folder)
    choose(panel, qtbot, panel.source, "open")
    assert panel.source.currentData() == "checkpoint"
    assert panel.source.currentText() == f"checkpoint: {minilm().folder.name}"
    np.testing.assert_allclose(panel.head_view.data, minilm_attention.attentions[0, 0],
                               rtol=1e-5, atol=1e-7)
    with qtbot.waitSignal(panel.failed, timeout=TIMEOUT):
        panel.open_checkpoint(tmp_path)
    assert panel.source.currentData() == "checkpoint"
    assert panel.source.itemData(panel.source.currentIndex(), Qt.ItemDataRole.ToolTipRole) \
        == folder
    with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):  # the text still goes there
        panel.text.setText("hello")
    assert panel.axis_labels()[0] == ["[CLS]", "hello", "[SEP]"]


def test_log_scale_changes_the_levels(qtbot, make_panel):
    panel = make_panel()
    linear = panel.head_view.image.getLevels()
    assert linear[0] == 0 and 0 < linear[1] <= 1
    panel.log.setChecked(True)
    assert tuple(panel.head_view.image.getLevels()) == pytest.approx((np.log10(LOG_FLOOR), 0))
    finite = panel.head_view.data[np.isfinite(panel.head_view.data)]
    np.testing.assert_allclose(finite, np.log10(np.maximum(
        panel.matrix()[np.isfinite(panel.head_view.data)], LOG_FLOOR)), rtol=1e-6)
    assert "weight" in panel.head_view.describe(3, 1)  # hover still gives the probability
    thumb_levels = panel.model_view.images[0][0].getLevels()
    assert tuple(thumb_levels) == pytest.approx((np.log10(LOG_FLOOR), 0))


def test_text_change_is_debounced_and_truncation_reported(qtbot, make_panel):
    panel = make_panel()
    with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):
        panel.text.setText("hello")
        panel.text.setText("hello world " * 40)  # one request for both edits
    assert panel.maps.n_tokens == 64
    assert "text cut by 18 tokens to fit 64 positions" in panel.status.text()
    assert len(panel.axis_labels()[0]) < 64  # every k-th token labelled
    assert panel.axis_labels()[0][0] == "0 [CLS]"


def test_long_maps_are_block_averaged_for_display(qtbot, make_panel):
    panel = make_panel()
    panel.max_side = 16
    with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):
        panel.text.setText("word " * 100)
    assert panel.head_view.data.shape == (16, 16)
    assert panel.current().factor == 4
    assert "block-averaged 4×4" in panel.status.text()
    assert panel.head_view.describe(0, 0).startswith("queries '[CLS]'… (0–3)")


def test_update_config_recomputes_and_stale_results_are_dropped(qtbot, make_panel):
    panel = make_panel()
    with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):
        panel.update_config(ModelConfig(**{**SMALL, "n_heads": 2, "n_layers": 3}))
    assert panel.entropy_view.data.shape == (3, 2)
    maps = panel.maps
    panel._on_result(CHANNEL, panel._request_id - 1, object())  # stale: ignored
    panel._on_result("positional", panel._request_id, object())  # another channel
    assert panel.maps is maps


def test_exports(qtbot, make_panel, tmp_path):
    panel = make_panel()
    panel.export_png(tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panel.export_npy(tmp_path / "a.npy")
    data = np.load(tmp_path / "a.npy", allow_pickle=False)
    np.testing.assert_array_equal(data, panel.matrix())
    assert data.shape == (len(TOKENS), len(TOKENS))
    panel.export_csv(tmp_path / "a.csv")
    with open(tmp_path / "a.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][2:] == TOKENS and [r[1] for r in rows[1:]] == TOKENS
    np.testing.assert_allclose(np.array([r[2:] for r in rows[1:]], dtype=float), data,
                               rtol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries



def test_long_encoder_decoder_text_reduced_on_the_device(qtbot, make_panel):
    panel = make_panel(ModelConfig(**{**SMALL, "architecture": "encoder-decoder"}))
    panel.max_side = 16
    with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):
        panel.text.setText("word " * 60)
    assert panel.current().factor == 4
    for kind in ("self", "encoder", "cross"):
        assert panel.maps.kinds[kind].att.shape[-1] == 16
    assert panel.maps.kinds["cross"].rollout is None


def test_entropy_tab_shows_values_where_a_cell_can_hold_them(qtbot, make_panel):
    """The grid and the entropy heatmap are tabs, each with the column's full height; the
    values show at 8 or 7 pt where "0.00" fits a cell, and hide where it cannot."""
    panel = make_panel()
    choose(panel, qtbot, panel.source, "minilm")  # 6 layers × 12 heads
    tabs = panel.right_tabs
    assert [tabs.tabText(i) for i in range(tabs.count())] == ["All heads", "Entropy"]
    tabs.setCurrentIndex(1)
    qtbot.waitUntil(lambda: panel.entropy_view.isVisible())
    labels = panel._entropy_labels
    km = panel.current()
    assert len(labels) == km.layers * km.heads
    qtbot.waitUntil(lambda: all(item.isVisible() for item in labels))
    assert panel._entropy_label_points in (7.0, 8.0)
    sizes = panel.splitter.sizes()
    panel.splitter.setSizes([sum(sizes) - 90, 90])  # a column a few pixels per head wide
    qtbot.waitUntil(lambda: not any(item.isVisible() for item in labels))
    panel.splitter.setSizes(sizes)
    qtbot.waitUntil(lambda: all(item.isVisible() for item in labels))


def _painted_outside(item) -> int:
    """Pixels ``item.paint`` covers outside its own bounding rectangle (Qt never repaints
    there for the item, so on a real screen they stay after the item changes)."""
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtWidgets import QStyleOptionGraphicsItem

    rect = item.boundingRect()
    pad = 10
    image = QImage(math.ceil(rect.width()) + 2 * pad, math.ceil(rect.height()) + 2 * pad,
                   QImage.Format.Format_ARGB32)
    image.fill(0)
    painter = QPainter(image)
    painter.translate(pad - rect.left(), pad - rect.top())
    item.paint(painter, QStyleOptionGraphicsItem(), None)
    painter.end()
    alpha = np.frombuffer(image.constBits(), np.uint8).reshape(
        image.height(), image.bytesPerLine() // 4, 4)[:, : image.width(), 3].copy()
    alpha[pad:pad + math.ceil(rect.height()), pad:pad + math.ceil(rect.width())] = 0
    return int(np.count_nonzero(alpha))


def test_selection_frame_moves_without_leaving_a_trace(qtbot, make_panel):
    """The selected thumbnail's red frame is drawn inside the grid item's bounding rectangle
    (one item draws every cell, so moving the frame repaints the old one away); the previous
    selection has none (ViewBox.setBorder painted half of a frame outside its box, where a
    real screen kept it after the selection moved)."""
    panel = make_panel()
    choose(panel, qtbot, panel.source, "minilm")
    grid = panel.model_view.grid
    old, new = panel.model_view.boxes[0][0], panel.model_view.boxes[2][3]
    panel.select(0, 0)
    assert _painted_outside(grid) == 0
    panel.select(2, 3)  # an outer cell's frame too
    assert _painted_outside(grid) == 0
    panel.select(5, 11)
    assert _painted_outside(grid) == 0
    panel.select(2, 3)
    assert old.pen() is None
    assert new.pen().color().name() == "#d62728"
    panel.view.setCurrentIndex(panel.view.findData("average"))  # the whole layer, orange
    assert all(b.pen() is not None for b in panel.model_view.boxes[2])
    assert new.pen().color().name() != "#d62728"
    assert all(b.pen() is None for b in panel.model_view.boxes[1])


@pytest.mark.parametrize("width", [560, 700, 1000])
def test_head_view_fits_its_column(qtbot, make_panel, width):
    """At any panel width the head view's scene fits its view: the last key ("[SEP]"), the
    colour bar and the title are inside it (the title on two lines, or elided, when
    narrow), and the thumbnail grid shows every head."""
    panel = make_panel()
    choose(panel, qtbot, panel.source, "minilm")
    panel.resize(width, 460)
    hv = panel.head_view

    def fits() -> bool:
        qtbot.wait(20)
        right = hv.view.viewport().width() + 0.5
        return (hv.view.ci.geometry().width() <= right
                and hv.colorbar.sceneBoundingRect().right() <= right
                and hv.plot.vb.sceneBoundingRect().right() <= right  # the map
                and hv.plot.titleLabel.sceneBoundingRect().right() <= right
                and panel.model_view.ci.geometry().width()
                <= panel.model_view.viewport().width() + 0.5)

    qtbot.waitUntil(fits, timeout=5000)
    assert hv.colorbar.isVisible() and hv.colorbar.sceneBoundingRect().width() > 10
    keys = panel.axis_labels()[1]
    assert keys[-1] == "[SEP]" or keys[0] == "0 [CLS]"  # every token, or every k-th
    title = hv.title_text()
    assert "…" in title or title.replace("\n", " · ") == "all-MiniLM-L6-v2 · layer 0, head 0"
    if width >= 1000:
        assert title == "all-MiniLM-L6-v2 · layer 0, head 0"  # room for one line


def test_hover_readout_never_describes_the_previous_view(qtbot, make_panel):
    panel = make_panel()
    hv = panel.head_view
    rows = hv.data.shape[0]  # the last query's first key: allowed when causal
    hv._on_mouse(hv.plot.vb.mapViewToScene(QPointF(0.5, rows - 0.5)))
    assert "weight" in hv.readout.text()
    panel.view.setCurrentIndex(panel.view.findData("rollout"))
    assert "weight" not in hv.readout.text()  # cleared, or the rollout's "share"


def test_closing_the_views_after_fitting_is_safe(qtbot):
    """GraphicsView.close clears the scene (the fitted labels are deleted) and then resizes
    the view: fitting must not touch the deleted labels (it crashed the report's renders)."""
    from app.panels.attention_panel import ModelView
    from app.widgets.heatmap import Heatmap

    for _ in range(3):
        grid = ModelView(lambda _layer, _head: None)
        grid.set_shape(2, 3)
        grid.set_title("2 layers × 3 heads (weight) · click to select")
        heat = Heatmap()
        heat.set_matrix(np.eye(3), title="a title")
        for widget in (grid, heat):
            qtbot.addWidget(widget)
            widget.resize(300, 200)
            widget.show()
        qtbot.wait(10)
        grid.close()
        heat.view.close()
        heat.close()
        qtbot.wait(10)
    assert grid.closed and heat.view.closed


def test_gqa_heads_are_labelled_with_their_kv_group(qtbot, make_panel):
    panel = make_panel(ModelConfig(**SMALL, n_kv_heads=2))
    panel.select(1, 3)
    assert panel.head_view.title_text().replace("\n", " · ").endswith("layer 1, head 3 · kv 1")
    assert panel.model_view.boxes[0][1].toolTip() == "layer 0, head 1 · kv 0"
    assert panel.model_view.boxes[1][2].toolTip() == "layer 1, head 2 · kv 1"
    assert "(2 K/V heads)" in model_view_title(panel.current())
    plain = make_panel(ModelConfig(**SMALL))
    plain.select(1, 3)
    assert plain.head_view.title_text().replace("\n", " · ").endswith("layer 1, head 3")
    assert plain.model_view.boxes[1][2].toolTip() == "layer 1, head 2"


def test_gqa_checkpoint_folder_shows_each_query_head_with_its_kv_head(qtbot, make_panel,
                                                                       tmp_path):
    """A random Llama checkpoint (4 query heads over 2 K/V heads) saved by transformers: the
    panel shows transformers' eager map of each query head, titled with its K/V head — or,
    while the torch model does not build the family, a one-line refusal naming the fields."""
    transformers = pytest.importorskip("transformers")
    from ..core.test_pretrained_modern import _save_family, _unbuilt

    transformers.logging.set_verbosity_error()
    folder, ref = _save_family(transformers, "llama", tmp_path / "llama")
    panel = make_panel()
    unbuilt = _unbuilt(folder)
    if unbuilt:
        with qtbot.waitSignal(panel.failed, timeout=TIMEOUT) as blocker:
            panel.open_checkpoint(folder)
        assert all(f in blocker.args[0] for f in unbuilt) and "\n" not in blocker.args[0]
        assert "Traceback" not in panel.status.text()
        return
    with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):
        panel.open_checkpoint(folder)
    panel.select(1, 3)
    assert panel.head_view.title_text().replace("\n", " · ").endswith("layer 1, head 3 · kv 1")
    assert panel.model_view.boxes[0][1].toolTip() == "layer 0, head 1 · kv 0"
    assert "(2 K/V heads)" in model_view_title(panel.current())
    import torch

    from unitscale_core.pretrained import encode, load_checkpoint

    ids = encode(load_checkpoint(folder), TEXT).ids
    with torch.no_grad():
        theirs = ref(input_ids=ids, output_attentions=True).attentions[1][0, 3].numpy()
    shown = panel.head_view.data
    assert np.isnan(shown[np.triu_indices(len(ids[0]), 1)]).all()  # causal: later keys blank
    np.testing.assert_allclose(np.nan_to_num(shown, nan=0.0), theirs, atol=1e-4, rtol=0)


def test_exported_model_view_has_no_click_hint(qtbot, make_panel, tmp_path, monkeypatch):
    """The grid's title ends "click to select" on screen only: the PNG, SVG and clipboard
    pictures of it (and the report's) are titled without it, and the screen keeps it."""
    from app import export

    panel = make_panel()
    items = {i.key: i for i in panel.export_items()}
    grid = panel.model_view
    assert "click to select" in grid.title.text
    export.save_item(items["attentionModelView"], tmp_path / "grid.svg")
    svg = (tmp_path / "grid.svg").read_text(encoding="utf-8")
    assert "layers" in svg and "heads" in svg  # the title is drawn as text
    assert "click to select" not in svg
    painted = []
    original = export._paint_widget
    monkeypatch.setattr(export, "_paint_widget",
                        lambda w, d: (painted.append(w.title.text), original(w, d)))
    export.save_item(items["attentionModelView"], tmp_path / "grid.png")
    export.copy_image(grid)
    assert len(painted) == 2 and all("layers" in t and "click" not in t for t in painted)
    assert "click to select" in grid.title.text  # back on screen


def _sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: BPE over "▁"-marked words with byte fallback ("<0x0A>")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(["the quick the quick the quick dog"] * 8, trainer)
    return tok


def _raw_byte_level_tokenizer():
    """GPT-2's byte-level BPE behind a Sequence decoder: the core labels its pieces as they
    are ("Ġthe"), so readable text is the panel's to make."""
    from tokenizers import decoders

    from ..core.test_pretrained import _byte_level_tokenizer

    tok = _byte_level_tokenizer()
    tok.decoder = decoders.Sequence([decoders.ByteLevel()])
    return tok


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level"])
def test_checkpoint_tokens_are_shown_readable_with_the_raw_piece_in_the_tooltip(
        qtbot, make_panel, tmp_path, kind):
    """Axes and the exported table show " the", "⏎", "\\xe2" — not "▁the", "Ġthe",
    "<0x0A>" — and the hover text keeps the tokenizer's piece."""
    from ..core.test_pretrained import _write_tiny_gpt2

    folder = _write_tiny_gpt2(tmp_path / kind)
    tok = _sentencepiece_tokenizer() if kind == "sentencepiece" else _raw_byte_level_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    text = "the quick the\n€ dog"
    pieces = tok.encode(text).tokens
    marker = "▁" if kind == "sentencepiece" else "Ġ"
    assert any(marker in p for p in pieces)  # the raw pieces the panel must not show
    assert kind != "sentencepiece" or {"<0x0A>", "<0xE2>"} <= set(pieces)
    panel = make_panel()
    panel.text.setText(text)
    with qtbot.waitSignal(panel.computed, timeout=TIMEOUT):
        panel.open_checkpoint(folder)
    queries, keys = panel.axis_labels()
    assert queries == keys and len(queries) == len(pieces)
    assert not any(marker in q or "<0x" in q for q in queries), queries
    assert "⏎" in queries  # the newline, visible
    assert " the" in queries  # the word after a space: the space kept, no marker
    if kind == "sentencepiece":
        assert "\\xe2" in queries  # one byte of "€": its escape
    else:
        assert "€" in "".join(queries) or "\\xe2" in "".join(queries)
    header = panel.matrix_table().header[2:]
    assert len(header) == len(pieces) and not any(marker in h or "<0x" in h for h in header)
    assert "".join(header).replace("\\xe2\\x82\\xac", "€").lstrip() == text
    at = pieces.index(marker + "the")
    hover = panel.head_view.describe(at, at)  # what hovering the cell shows
    assert f"' the' (piece '{marker}the')" in hover, hover


def test_model_view_hover_names_the_gqa_head_and_a_click_selects_it(qtbot, make_panel):
    """The atlas maps the mouse to (layer, head): the tooltip names the K/V group, a click
    shows that head and the accessible description says what is selected."""
    panel = make_panel(ModelConfig(**SMALL, n_kv_heads=2))  # 2 layers × 4 heads, 2 K/V heads
    grid = panel.model_view.grid
    for layer, head in [(0, 1), (1, 2), (1, 3)]:
        name = f"layer {layer}, head {head} · kv {head // 2}"
        pos = panel.model_view.mapFromScene(
            panel.model_view.boxes[layer][head].sceneBoundingRect().center())
        qtbot.wait(30)  # pyqtgraph drops mouse moves closer than 10 ms to the previous one
        with qtbot.waitSignal(panel.model_view.hovered, timeout=2000) as hovered:
            qtbot.mouseMove(panel.model_view.viewport(), pos)
        assert hovered.args == [layer, head]
        assert grid.toolTip() == name
        qtbot.mouseClick(panel.model_view.viewport(), Qt.MouseButton.LeftButton, pos=pos)
        assert (panel.layer.value(), panel.head.value()) == (layer, head)
        assert panel.head_view.title_text().replace("\n", " · ").endswith(name)
        assert panel.model_view.boxes[layer][head].pen().color().name() == "#d62728"
        assert f"selected: {name}" in panel.model_view.accessibleDescription()


def test_model_view_png_and_svg_draw_the_atlas(qtbot, make_panel, tmp_path):
    """The exported picture is the atlas drawn at the export's pixels: a cell's colour is
    the per-cell ImageItem's for that map; the SVG holds it as an image, the labels as text."""
    from PySide6.QtGui import QImage

    from app import export
    from app.panels.attention_panel import _linear_levels, colour_values

    from .test_model_view_atlas import _argb, _reference

    panel = make_panel()
    km = panel.current()
    view, grid = panel.model_view, panel.model_view.grid
    items = {i.key: i for i in panel.export_items()}
    export.save_item(items["attentionModelView"], tmp_path / "grid.png")
    picture = _argb(QImage(str(tmp_path / "grid.png")))
    scale = picture.shape[1] / view.width()
    thumbs = colour_values(km.thumbs, km.thumb_allowed, False)
    rows, cols = thumbs.shape[-2:]
    for layer, head in [(0, 0), (1, 3)]:
        data = thumbs[layer, head]
        want = _reference(data, _linear_levels(data))
        rect = grid.cell_rect(layer, head, grid.geometry_for(scale))
        for i, j in [(rows - 1, 0), (rows // 2, cols // 3)]:
            at = grid.mapToScene(QPointF(rect.left() + (j + 0.5) * rect.width() / cols,
                                         rect.top() + (i + 0.5) * rect.height() / rows))
            point = view.viewport().mapTo(view, view.mapFromScene(at))
            assert picture[round(point.y() * scale), round(point.x() * scale)] == want[i, j]
    export.save_item(items["attentionModelView"], tmp_path / "grid.svg")
    svg = (tmp_path / "grid.svg").read_text(encoding="utf-8")
    sizes = re.findall(r'<image x="[^"]*" y="[^"]*" width="(\d+)" height="(\d+)"', svg)
    whole = (str(view.width()), str(view.height()))  # the view's background
    assert len([s for s in sizes if s != whole]) == 1  # one atlas, not an image per head
    assert all(f">{label}<" in svg for label in ("H0", "H3", "L0", "L1"))
