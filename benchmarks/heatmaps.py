"""Updating the 6 × 12 model view of 128 × 128 attention maps and repainting it.

Ours: the attention panel's ``ModelView`` (one texture atlas for every layer × head,
``app/widgets/atlas.py``) at 960 × 540 pixels, offscreen: ``set_maps`` with a new
``[6, 12, 128, 128]`` array, then a synchronous repaint into a pixmap (``grab()``; every
cell recoloured and drawn) and the event loop's own repaint. Theirs: what a user would
otherwise write, a matplotlib (Agg) figure of the same pixel size with 72 ``imshow`` axes
(axes off, viridis), redrawn by matplotlib's faster of its two update paths, both timed and
named in ``theirs_path``: ``set_data`` + ``set_clim`` on each image and ``canvas.draw()``
(``theirs_draw_ms``), or blitting (``theirs_blit_ms``: the images animated, the figure's
background restored with ``restore_region``, each image drawn with ``draw_artist``, then
``blit``). For fairness the naive full redraw (``fig.clear()``, 72 new subplots and
``imshow`` calls, ``draw()``) is reported too. Alternate timing, medians.

    QT_QPA_PLATFORM=offscreen python benchmarks/heatmaps.py [--repeats 5] [--json]
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
from _common import median_ms, parser, ratio_entry, report  # noqa: E402

LAYERS, HEADS, SIDE = 6, 12, 128
SIZE = (960, 540)  # pixels, both sides
DPI = 100


def _maps(rng: np.random.Generator) -> np.ndarray:
    """Attention-like maps: softmax rows of random logits, ``[6, 12, 128, 128]`` float32."""
    logits = rng.standard_normal((LAYERS, HEADS, SIDE, SIDE), dtype=np.float32) * 2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def alternate_medians_ms(fns, repeats: int) -> list[float]:
    """Median wall time (ms) of each of ``fns``, timed in turn, one of each per round, so a
    slow spell of a shared machine hits every side alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def run(repeats: int = 5) -> dict:
    """``heatmaps_vs_matplotlib``: ``{"ours_ms", "theirs_ms", "ratio", "theirs_path",
    "theirs_draw_ms", "theirs_blit_ms", "theirs_full_ms", "ratio_full"}`` (theirs: the
    faster of ``set_data`` + ``draw`` and blitting; full: a fresh figure's draw)."""
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

    def grid_figure(animated: bool):
        fig, axes = plt.subplots(LAYERS, HEADS, figsize=(SIZE[0] / DPI, SIZE[1] / DPI),
                                 dpi=DPI)
        first = next_frame()
        images = []
        for layer in range(LAYERS):
            for h in range(HEADS):
                ax = axes[layer, h]
                ax.set_axis_off()
                images.append(ax.imshow(first[layer, h], cmap="viridis",
                                        interpolation="nearest", animated=animated))
        fig.canvas.draw()
        return fig, images

    def update(images) -> None:
        maps = next_frame()
        for k, image in enumerate(images):
            data = maps[k // HEADS, k % HEADS]
            image.set_data(data)
            image.set_clim(*_linear_levels(data))

    fig, images = grid_figure(animated=False)

    def theirs():
        update(images)
        fig.canvas.draw()

    # blitting (matplotlib's animation recipe): the figure without the images drawn once,
    # then per update its pixels restored and only the images drawn over them
    blit_fig, blit_images = grid_figure(animated=True)
    background = blit_fig.canvas.copy_from_bbox(blit_fig.bbox)

    def theirs_blit():
        update(blit_images)
        blit_fig.canvas.restore_region(background)
        for image in blit_images:
            image.axes.draw_artist(image)
        blit_fig.canvas.blit(blit_fig.bbox)

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

    ours(), theirs(), theirs_blit(), theirs_full()  # warm: layout, colour tables, fonts
    o, draw, blit = alternate_medians_ms([ours, theirs, theirs_blit], repeats)
    full = median_ms(theirs_full, max(1, (repeats + 1) // 2))
    plt.close(fig), plt.close(blit_fig), plt.close(full_fig)
    view.close()
    path, th = min((("set_data + draw", draw), ("blit", blit)), key=lambda p: p[1])
    return {"heatmaps_vs_matplotlib": ratio_entry(
        o, th, theirs_path=path, theirs_draw_ms=round(draw, 2), theirs_blit_ms=round(blit, 2),
        theirs_full_ms=round(full, 1), ratio_full=round(o / full, 4))}


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    report(run(args.repeats), args.json)
