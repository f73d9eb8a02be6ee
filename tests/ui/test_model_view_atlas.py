"""pytest-qt: the model view's texture atlas (app/widgets/atlas.py) against the per-cell
pyqtgraph ImageItem it replaced: the same colours pixel for pixel, on screen and in exports;
levels computed for every map at once equal the per-map rule; the mouse maps to the right
cell."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
import pytest
from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QColor, QImage

from app import export
from app.panels.attention_panel import (
    CMAP,
    MASKED_COLOUR,
    ModelView,
    _linear_levels,
    _log_levels,
    colour_values,
)


def _argb(image: QImage) -> np.ndarray:
    """An image's pixels as uint32 0xAARRGGBB, ``[height, width]``."""
    image = image.convertToFormat(QImage.Format.Format_ARGB32)
    rows = np.frombuffer(image.constBits(), np.uint32).reshape(
        image.height(), image.bytesPerLine() // 4)
    return rows[:, : image.width()].copy()


def _reference(data: np.ndarray, levels: tuple[float, float]) -> np.ndarray:
    """What one pyqtgraph ImageItem per cell drew for ``data`` (the old model view): its
    rendered image, the masked (transparent) pixels grey as the old view's box background."""
    item = pg.ImageItem()
    item.setColorMap(pg.colormap.get(CMAP))
    item.setImage(data, autoLevels=False, levels=levels)
    item.render()
    argb = _argb(item.qimage)
    grey = np.uint32(QColor(MASKED_COLOUR).rgba())
    return np.where((argb >> 24) == 0, grey, argb | np.uint32(0xFF000000))


def _maps(rng, layers, heads, side, causal=True) -> np.ndarray:
    """Softmax rows of random logits, each head scaled differently (so each map has levels
    of its own), the upper triangle NaN when ``causal`` (masked cells)."""
    logits = rng.standard_normal((layers, heads, side, side)).astype(np.float32) * 2
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p *= np.linspace(0.2, 1.0, heads, dtype=np.float32)[None, :, None, None]
    mask = np.tril(np.ones((side, side), bool)) if causal else None
    return colour_values(p, mask, False)


def _shown(qtbot, maps, size=(700, 420), levels=_linear_levels) -> ModelView:
    view = ModelView(lambda _layer, _head: None)
    qtbot.addWidget(view)
    view.resize(*size)
    view.show()
    view.set_maps(maps, levels)
    view.set_title(f"{maps.shape[0]} layers × {maps.shape[1]} heads (weight)")
    qtbot.waitExposed(view)
    return view


def _cell_pixels(view: ModelView, image: np.ndarray, layer: int, head: int,
                 scale: float = 1.0) -> np.ndarray:
    """The pixels of one cell in a picture of the whole widget drawn at ``scale``."""
    grid = view.grid
    rect = grid.cell_rect(layer, head, grid.geometry_for(scale))
    top_left = view.viewport().mapTo(view, view.mapFromScene(grid.mapToScene(rect.topLeft())))
    x0, y0 = round(top_left.x() * scale), round(top_left.y() * scale)
    w, h = round(rect.width() * scale), round(rect.height() * scale)
    return image[y0:y0 + h, x0:x0 + w]


def _nearest(reference: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``reference`` stretched over ``shape`` pixels, each showing the value under its
    centre (nearest neighbour, how Qt draws an image scaled without smoothing)."""
    (a, b), (h, w) = reference.shape, shape
    rows = np.minimum(((np.arange(h) + 0.5) * a / h).astype(int), a - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * b / w).astype(int), b - 1)
    return reference[rows][:, cols]


@pytest.mark.parametrize("side", [12, 128])  # maps smaller and larger than their cells
def test_atlas_cells_show_the_per_cell_image_items_colours(qtbot, side):
    maps = _maps(np.random.default_rng(side), 3, 4, side)
    view = _shown(qtbot, maps)
    shown = _argb(view.grab().toImage())
    for layer, head in [(0, 0), (1, 2), (2, 3)]:
        data = maps[layer, head]
        cell = _cell_pixels(view, shown, layer, head)
        want = _nearest(_reference(data, _linear_levels(data)), cell.shape)
        assert cell.shape[0] > 40 and cell.shape[1] > 40
        np.testing.assert_array_equal(cell, want)
    # between two cells: the background, not a map's edge
    grid = view.grid
    left, right = grid.cell_rect(0, 0), grid.cell_rect(0, 1)
    gap = view.viewport().mapTo(view, view.mapFromScene(grid.mapToScene(
        QPointF((left.right() + right.left()) / 2, left.center().y()))))
    assert QColor(int(shown[gap.y(), gap.x()])).name() == "#ffffff"


def test_log_levels_and_the_exported_picture_at_twice_the_pixels(qtbot):
    """Log colours (one level pair for every map) and ``render_image(scale=2)``: the
    atlas is built again at the export's pixels, each the reference colour of the value
    under it (a screen-sized atlas scaled up would be off by a pixel at cell edges)."""
    maps = _maps(np.random.default_rng(3), 2, 3, 12)
    logs = colour_values(np.nan_to_num(maps), np.tril(np.ones((12, 12), bool)), True)
    view = _shown(qtbot, logs, size=(500, 300), levels=_log_levels)
    picture = _argb(export.render_image(view, 2.0))
    for layer, head in [(0, 1), (1, 2)]:
        data = logs[layer, head]
        cell = _cell_pixels(view, picture, layer, head, scale=2.0)
        np.testing.assert_array_equal(
            cell, _nearest(_reference(data, _log_levels(data)), cell.shape))


def test_batched_levels_equal_the_per_map_rule():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 4, 5, 5)).astype(np.float32)
    maps[0, 0] = np.nan  # all masked
    maps[0, 1, 0, 0] = np.inf
    maps[0, 2] = 0.0  # nothing positive
    maps[0, 3, :2] = np.nan
    maps[1, 0] -= 2.0  # all negative
    lo, hi = _linear_levels.batch(maps)
    want = np.array([[_linear_levels(m) for m in row] for row in maps])
    np.testing.assert_array_equal(np.stack([lo, hi], -1), want)
    lo, hi = _log_levels.batch(maps)
    assert (lo == _log_levels(maps[0, 0])[0]).all() and (hi == 0).all()


def test_a_levels_function_without_a_batch_is_called_per_map(qtbot):
    maps = np.random.default_rng(1).random((2, 3, 6, 6)).astype(np.float32)
    seen = []

    def levels(data):
        seen.append(data.shape)
        return float(data.min()), float(data.max())

    view = _shown(qtbot, maps, levels=levels)
    assert len(seen) == 6
    np.testing.assert_allclose(view.images[1][2].getLevels(),
                               [maps[1, 2].min(), maps[1, 2].max()])
    assert view.images[1][2].image is maps[1, 2] or \
        np.array_equal(view.images[1][2].image, maps[1, 2])


def test_every_cell_centre_maps_back_to_its_layer_and_head(qtbot):
    view = _shown(qtbot, np.zeros((5, 7, 4, 4), np.float32))
    grid = view.grid
    for layer in range(5):
        for head in range(7):
            rect = grid.cell_rect(layer, head)
            assert grid.cell_at(rect.center()) == (layer, head)
            assert grid.cell_at(rect.topLeft() + QPointF(0.1, 0.1)) == (layer, head)
            assert grid.cell_at(rect.bottomRight() + QPointF(0.5, 0.5)) is None  # the gap
    assert grid.cell_at(QPointF(1, 1)) is None  # the labels' corner


def test_clicks_and_hover_reach_the_cell_under_the_mouse(qtbot):
    clicks = []
    view = ModelView(lambda layer, head: clicks.append((layer, head)))
    qtbot.addWidget(view)
    view.resize(600, 400)
    view.show()
    view.set_maps(np.random.default_rng(2).random((3, 4, 8, 8)).astype(np.float32),
                  _linear_levels)
    view.set_head_names(lambda h: f"head {h} · kv {h // 2}")
    qtbot.waitExposed(view)

    def at(layer, head):
        return view.mapFromScene(view.boxes[layer][head].sceneBoundingRect().center())

    for layer, head in [(0, 0), (2, 3), (1, 2)]:
        qtbot.wait(30)  # pyqtgraph drops mouse moves closer than 10 ms to the previous one
        with qtbot.waitSignal(view.hovered, timeout=2000) as hovered:
            qtbot.mouseMove(view.viewport(), at(layer, head))
        assert hovered.args == [layer, head]
        assert view.grid.toolTip() == f"layer {layer}, head {head} · kv {head // 2}"
        qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=at(layer, head))
        assert clicks[-1] == (layer, head)
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.RightButton, pos=at(0, 1))
    assert len(clicks) == 3  # only the left button selects


def test_cleared_view_draws_again(qtbot):
    """The training view clears the grid (pyqtgraph's clear() removes the title and the
    grid item) and sets an empty shape before its next snapshot."""
    view = _shown(qtbot, np.ones((2, 2, 3, 3), np.float32))
    view.clear()
    view.set_shape(0, 0)
    assert view.boxes == []
    maps = _maps(np.random.default_rng(5), 2, 3, 12, causal=False)
    view.set_maps(maps, _linear_levels)
    view.set_title("again")
    assert view.grid in view.ci.items and view.title.text == "again"
    shown = _argb(view.grab().toImage())
    cell = _cell_pixels(view, shown, 1, 2)
    np.testing.assert_array_equal(
        cell, _nearest(_reference(maps[1, 2], _linear_levels(maps[1, 2])), cell.shape))
