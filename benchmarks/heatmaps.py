"""Updating the 6 × 12 model view of 128 × 128 attention maps and repainting it.

Ours: the attention panel's ``ModelView`` (pyqtgraph, one ``ImageItem`` per layer × head) at
960 × 540 pixels, offscreen: ``set_maps`` with a new ``[6, 12, 128, 128]`` array, then a
synchronous repaint into a pixmap (``grab()``; every cell's image is recoloured and drawn).
Theirs: what a user would otherwise write, a matplotlib (Agg) figure of the same pixel size
with 72 ``imshow`` axes (axes off, viridis), updated with ``set_data`` + ``set_clim`` on each
image and ``canvas.draw()``. For fairness the naive full redraw (``fig.clear()``, 72 new
subplots and ``imshow`` calls, ``draw()``) is reported too. Alternate timing, medians.

    QT_QPA_PLATFORM=offscreen python benchmarks/heatmaps.py [--repeats 5] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
from _common import median_ms, paired_medians_ms, parser, ratio_entry, report  # noqa: E402

LAYERS, HEADS, SIDE = 6, 12, 128
SIZE = (960, 540)  # pixels, both sides
DPI = 100


def _maps(rng: np.random.Generator) -> np.ndarray:
    """Attention-like maps: softmax rows of random logits, ``[6, 12, 128, 128]`` float32."""
    logits = rng.standard_normal((LAYERS, HEADS, SIDE, SIDE), dtype=np.float32) * 2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def run(repeats: int = 5) -> dict:
    """``heatmaps_vs_matplotlib``: ``{"ours_ms", "theirs_ms", "ratio", "theirs_full_ms",
    "ratio_full"}`` (theirs: ``set_data`` + ``draw``; full: a fresh figure's draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PySide6.QtWidgets import QApplication

    from app.panels.attention_panel import ModelView, _linear_levels

    app = QApplication.instance() or QApplication([])
    rng = np.random.default_rng(0)
    frames = [_maps(rng) for _ in range(4)]  # a new array each update, as from the worker
    state = {"i": 0}

    def next_frame() -> np.ndarray:
        state["i"] += 1
        return frames[state["i"] % len(frames)]

    view = ModelView(lambda layer, head: None)
    view.resize(*SIZE)
    view.show()
    app.processEvents()

    def ours():
        view.set_maps(next_frame(), _linear_levels)
        pixmap = view.grab()  # paints every item now
        app.processEvents()
        return pixmap

    fig, axes = plt.subplots(LAYERS, HEADS, figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    first = next_frame()
    images = []
    for layer in range(LAYERS):
        for h in range(HEADS):
            ax = axes[layer, h]
            ax.set_axis_off()
            images.append(ax.imshow(first[layer, h], cmap="viridis", interpolation="nearest"))
    fig.canvas.draw()

    def theirs():
        maps = next_frame()
        for k, image in enumerate(images):
            data = maps[k // HEADS, k % HEADS]
            image.set_data(data)
            image.set_clim(*_linear_levels(data))
        fig.canvas.draw()

    full_fig = plt.figure(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)

    def theirs_full():
        maps = next_frame()
        full_fig.clear()
        grid = full_fig.subplots(LAYERS, HEADS)
        for layer in range(LAYERS):
            for h in range(HEADS):
                grid[layer, h].set_axis_off()
                grid[layer, h].imshow(maps[layer, h], cmap="viridis", interpolation="nearest")
        full_fig.canvas.draw()

    ours(), theirs(), theirs_full()  # warm: layout, colour tables, fonts
    o, th = paired_medians_ms(ours, theirs, repeats)
    full = median_ms(theirs_full, max(1, (repeats + 1) // 2))
    plt.close(fig), plt.close(full_fig)
    view.close()
    return {"heatmaps_vs_matplotlib": ratio_entry(
        o, th, theirs_full_ms=round(full, 1), ratio_full=round(o / full, 4))}


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    report(run(args.repeats), args.json)
