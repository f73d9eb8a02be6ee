"""The scaling panel's overview: layers × roles, coloured by log₂ RMS, status marked, click to
open a tensor in the chart and table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PySide6.QtCore import QPointF, Qt

from app.widgets.scale_overview import (
    BACKWARD_MARK,
    GROUPS,
    STREAM,
    ScaleOverview,
    overview_grid,
    statuses,
)
from app.widgets.scale_table import row_status
from unitscale_core import ModelConfig
from unitscale_core.scaling.predict import predict

SMALL = dict(d_model=64, n_heads=4, d_ff=128, n_layers=3, vocab_size=256, max_len=64,
             seq_len=32, batch_size=4)
CONFIGS = {
    "decoder": ModelConfig(**SMALL),
    "encoder-decoder swiglu relative": ModelConfig(
        **{**SMALL, "architecture": "encoder-decoder", "n_decoder_layers": 2,
           "activation": "swiglu", "positional": "relative", "attention": "full"}),
    "encoder post-norm no bias": ModelConfig(**{**SMALL, "architecture": "encoder",
                                                "norm": "post", "bias": False,
                                                "attention": "full"}),
}


@pytest.mark.parametrize("label", list(CONFIGS))
@pytest.mark.parametrize("group", list(GROUPS))
def test_every_row_maps_to_one_cell_or_the_strip(label, group):
    cfg = CONFIGS[label]
    rows = predict(cfg)
    grid = overview_grid([r.name for r in rows], [r.kind for r in rows], group)
    wanted = [i for i, r in enumerate(rows) if r.kind in GROUPS[group]]
    placed = np.concatenate([grid.cells[grid.cells >= 0], grid.strip[grid.strip >= 0]])
    assert sorted(placed.tolist()) == wanted  # each row of the group exactly once
    assert len(grid.layers) == cfg.encoder_layers + cfg.decoder_layers
    fwd, bwd = GROUPS[group]
    for y, role in enumerate(grid.roles):  # a row's role is its name after the layer
        kind = fwd if y < grid.n_forward else bwd
        bare = role.removeprefix(BACKWARD_MARK)
        assert role.startswith(BACKWARD_MARK) == (y >= grid.n_forward)
        for x in range(len(grid.layers)):
            i = grid.cells[y, x]
            if i >= 0:
                r = rows[i]
                assert r.kind == kind
                assert r.name.endswith("." + bare) or (bare == STREAM and
                                                       r.name.split(".")[-1].isdigit())
    for j, name in enumerate(grid.strip_names):
        assert "layers." not in name
        assert all(rows[i].name == name for i in grid.strip[j] if i >= 0)


def test_layer_and_role_of_named_tensors():
    cfg = CONFIGS["encoder-decoder swiglu relative"]
    rows = predict(cfg)
    names, kinds = [r.name for r in rows], [r.kind for r in rows]
    grid = overview_grid(names, kinds, "activations")
    assert grid.layers == ("enc 0", "enc 1", "enc 2", "dec 0", "dec 1")

    def at(name, kind):
        i = next(k for k, r in enumerate(rows) if r.name == name and r.kind == kind)
        y, x = (int(v[0]) for v in np.nonzero(grid.cells == i))
        return grid.layers[x], grid.roles[y]

    assert at("encoder.layers.1.attn.q", "activation") == ("enc 1", "attn.q")
    assert at("decoder.layers.1.cross_attn.probs", "grad_activation") == \
        ("dec 1", BACKWARD_MARK + "cross_attn.probs")
    assert at("decoder.layers.0", "activation") == ("dec 0", STREAM)
    # op-graph order within a layer: the decoder's cross-attention after its self-attention
    roles = list(grid.roles[:grid.n_forward])
    assert roles.index("after_attn") < roles.index("cross_norm") < \
        roles.index("cross_attn.q") < roles.index("after_cross") < roles.index("norm2")
    assert roles.index("ffn.up") < roles.index("ffn.gate") < roles.index("ffn.act")
    assert {"tok_emb", "head", "loss"} <= set(grid.strip_names)


def test_statuses_match_the_tables_rule_and_zero_is_not_lost():
    rows = predict(CONFIGS["decoder"], formats=("fp8_e4m3",))
    rms = np.array([r.rms for r in rows])
    got = statuses(rms, "fp8_e4m3")
    for r, status in zip(rows, got):
        if r.rms > 0:
            assert status == row_status(r, "fp8_e4m3"), r.name
    assert list(statuses(np.array([0.0, 1.0, 1e-9]), "fp8_e4m3")) == ["zero", "fine", "lost"]


@pytest.fixture
def overview(qtbot):
    widget = ScaleOverview()
    qtbot.addWidget(widget)
    widget.resize(900, 600)
    widget.show()
    qtbot.waitExposed(widget)
    return widget


def test_cell_colour_is_the_log2_rms_of_its_tensor(qtbot, overview):
    rows = predict(CONFIGS["decoder"], formats=("fp8_e4m3",))
    overview.set_rows(rows, "fp8_e4m3")
    grid = overview.grid
    shown = overview.image.image
    checked = 0
    for y, x in zip(*np.nonzero(grid.cells >= 0)):
        r = rows[grid.cells[y, x]]
        if r.rms > 0:
            assert shown[y, x] == pytest.approx(math.log2(r.rms), abs=1e-12)
            checked += 1
    assert checked > 50
    assert np.isnan(shown[grid.cells < 0]).all()
    # the drawn colour is the colour map's at that value, within the bar's levels
    lo, hi = overview.image.getLevels()
    assert (lo, hi) == tuple(overview.bar.levels()) and lo == -hi
    y, x = (int(v[0]) for v in np.nonzero(grid.cells >= 0))
    value = shown[y, x]
    expected = overview.colour_map.map((value - lo) / (hi - lo), mode="qcolor")
    overview.image.render()  # (made on first paint otherwise)
    qimage = overview.image.qimage
    pixel = qimage.pixelColor(x, y)
    assert abs(pixel.red() - expected.red()) <= 3 and abs(pixel.blue() - expected.blue()) <= 3


def test_lost_cells_are_marked_and_hover_reads_out(qtbot, overview):
    rows = predict(CONFIGS["decoder"], formats=("fp8_e4m3",))
    overview.set_rows(rows, "fp8_e4m3")
    lost = overview.marks["lost"][0]
    ys, xs = np.nonzero(overview.status == "lost")
    assert ys.size and sorted(zip(lost.x.tolist(), lost.y.tolist())) == \
        sorted(zip(xs.astype(float).tolist(), ys.astype(float).tolist()))
    y, x = int(ys[0]), int(xs[0])
    r = overview.row_at("grid", x, y)
    vb = overview.plot.getViewBox()
    overview._on_hover(vb.mapViewToScene(QPointF(x, y)))
    assert overview.readout.text() == (f"{r.name} ({r.kind}): log₂ RMS "
                                       f"{math.log2(r.rms):.2f}, lost in fp8_e4m3")


def test_weights_group(qtbot, overview):
    rows = predict(CONFIGS["decoder"], formats=("fp8_e5m2",))
    overview.set_rows(rows, "fp8_e5m2")
    overview.set_group("weights")
    assert "attn.q.weight" in overview.grid.roles
    assert BACKWARD_MARK + "ffn.down.bias" in overview.grid.roles
    assert "tok_emb.weight" in overview.grid.strip_names
    with pytest.raises(ValueError, match="group"):
        overview.set_group("everything")


def _click(qtbot, overview, where, x, y):
    plot = overview.plot if where == "grid" else overview.strip_plot
    scene = plot.getViewBox().mapViewToScene(QPointF(x, y))
    pos = overview.view.mapFromScene(scene)
    qtbot.mouseClick(overview.view.viewport(), Qt.MouseButton.LeftButton, pos=pos)


def test_a_click_opens_the_tensor_in_the_chart_and_table(qtbot, make_window):
    win = make_window(CONFIGS["decoder"])
    win.resize(1366, 768)
    panel = win.scaling_panel
    panel.filter.setText("ffn")  # a filter that hides the tensor picked: cleared
    panel.show_overview()
    qtbot.waitUntil(lambda: panel.overview.isVisible())
    overview = panel.overview
    grid = overview.grid
    y = grid.roles.index(BACKWARD_MARK + "attn.k")
    x = 2
    want = overview.row_at("grid", x, y)
    assert (want.name, want.kind) == ("layers.2.attn.k", "grad_activation")
    with qtbot.waitSignal(overview.picked) as signal:
        _click(qtbot, overview, "grid", x, y)
    assert signal.args == ["layers.2.attn.k", "grad_activation"]
    assert panel.views.currentIndex() == 0 and panel.chart.isVisible()
    selected = panel.table.selectionModel().selectedRows()
    assert len(selected) == 1
    row = panel.model.rows[selected[0].row()]
    assert (row.name, row.kind) == ("layers.2.attn.k", "grad_activation")
    assert panel.filter.text() == ""
    # the chart shows that row, marked, with every row in view named
    index = panel.chart.names.index("layers.2.attn.k")
    y0, y1 = panel.chart.plot.getViewBox().viewRange()[1]
    assert y0 < index < y1
    assert panel.chart.marked_name == "layers.2.attn.k"
    assert panel.chart.marked.getRegion() == (index - 0.5, index + 0.5)
    # a strip tensor: the head's forward activation
    panel.show_overview()
    qtbot.waitUntil(lambda: overview.isVisible())
    j = overview.grid.strip_names.index("head")
    with qtbot.waitSignal(overview.picked) as signal:
        _click(qtbot, overview, "strip", 0, j)
    assert signal.args == ["head", "activation"]
    row = panel.model.rows[panel.table.selectionModel().selectedRows()[0].row()]
    assert (row.name, row.kind) == ("head", "activation")


def test_hidden_overview_is_drawn_when_shown(qtbot, make_window):
    win = make_window(CONFIGS["decoder"])
    panel = win.scaling_panel
    assert not panel.overview.isVisible() and panel.overview.grid is None  # never drawn
    panel.format.setCurrentIndex(panel.format.findData("fp16"))
    panel.show_overview()
    qtbot.waitUntil(lambda: panel.overview.grid is not None)
    assert panel.overview.fmt == "fp16"
    assert panel.overview_group.isVisible() and not panel.filter.isVisible()
    assert panel.state()["scaleView"] == 1
