"""``unitscale report --config FILE --out DIR``: a config's tables and figures, headless.

Writes, for one config:

- ``sizes.csv`` / ``sizes.md``: the sizes panel's table (parameters, FLOPs, memory);
- ``predicted_scales.csv`` / ``.md``: every tensor's predicted RMS at initialisation, its
  scale factors and its headroom in ``--format`` (the scaling panel's table);
- ``measured_scales.csv`` / ``.md``: one real forward+backward pass
  (:func:`unitscale_core.measure.measure`), each tensor's RMS beside the prediction
  (skipped with ``--no-measure``);
- ``scale_chart.png`` (predicted and measured), ``positional.png`` (the config's scheme as the
  positional panel shows it), ``attention_model_view.png`` (every layer × head of the
  configured model at initialisation, for one text);
- ``index.md`` linking them.

Everything is computed first and written to a temporary folder beside ``DIR``, which then
becomes ``DIR`` (or, when ``DIR`` exists, whose files replace theirs one by one): a bad config
or a failure part-way leaves ``DIR`` as it was.

The command is contributed to the core's ``unitscale`` CLI through the ``unitscale.commands``
entry-point group (see ``pyproject.toml``), so :mod:`unitscale_core` never imports Qt or this
package. This module imports Qt only when the command runs (``QT_QPA_PLATFORM=offscreen``
unless set).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unitscale_core import __version__
from unitscale_core.config import DEVICES, PARAMETRIZATIONS, ModelConfig, dumps_json, load
from unitscale_core.formatting import number
from unitscale_core.tensors import TensorRow

#: Logical size (pixels) of the positional and attention figures; PNGs are ``--scale``× that.
FIGURE_SIZE = (960, 720)
#: The scale chart is as tall as its tensors need: ROW_HEIGHT per tensor plus the axes.
CHART_WIDTH, CHART_ROW_HEIGHT, CHART_MARGIN, CHART_MAX_HEIGHT = 960, 16, 110, 4000
#: Columns of the scaling panel's table that a prediction fills (the rest need a measurement).
PREDICTED_COLUMNS = 12
FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp16", "bf16", "fp32")


class ReportError(ValueError):
    """A report that cannot be written (the output folder): one line, exit 2."""


@dataclass
class Output:
    name: str
    data: bytes
    caption: str


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``report`` to the ``unitscale`` CLI (the ``unitscale.commands`` entry point)."""
    p = sub.add_parser("report", help="write a config's size and scale tables (CSV, Markdown) "
                       "and the panels' figures (PNG) to a folder")
    p.add_argument("--config", required=True, metavar="FILE", help="a .json or .toml config")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write (created; files of the same name are replaced)")
    p.add_argument("--param", choices=PARAMETRIZATIONS,
                   help="override the file's parametrization")
    p.add_argument("--format", choices=FORMATS,
                   help="number format of the headroom columns and the chart's band "
                        "(default: the config's dtype; fp8_e4m3 for fp32)")
    p.add_argument("--no-measure", action="store_true",
                   help="skip the measured scales (no model run: seconds faster)")
    p.add_argument("--device", choices=DEVICES, help="override the device of the model runs")
    p.add_argument("--text", metavar="TEXT",
                   help="text for the attention figure (default: the panel's sample)")
    p.add_argument("--scale", type=float, default=2.0, metavar="S",
                   help="PNG pixels per screen pixel (default 2: sharp when zoomed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> str:
    """The ``report`` command: returns the line printed on success."""
    cfg = load(args.config)
    if args.param is not None:
        cfg = cfg.replace(parametrization=args.param)
    if args.device is not None:
        cfg = cfg.replace(device=args.device)
    if not (math.isfinite(args.scale) and 0.25 <= args.scale <= 8):
        raise ReportError(f"--scale={args.scale} must be between 0.25 and 8")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out: {out} exists and is not a folder")
    outputs = build(cfg, source=Path(args.config).name, fmt=args.format,
                    measure_scales=not args.no_measure, text=args.text, scale=args.scale)
    write_folder(out, outputs)
    return f"wrote {out}: " + ", ".join(o.name for o in outputs)


# -- building --------------------------------------------------------------------------------
def _qt_app():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import qInstallMessageHandler
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance()
    if app is None:
        app = QApplication(["unitscale report"])
        # the offscreen platform notes each window feature it lacks; not the user's concern
        qInstallMessageHandler(_quiet_platform_notes)
    return app


def _quiet_platform_notes(_mode, _context, message: str) -> None:
    if not message.startswith("This plugin does not support"):
        import logging

        logging.getLogger(__name__).warning("Qt: %s", message)


def _render(widget, size: tuple[int, int], scale: float, target=None) -> bytes:
    """``widget`` laid out at ``size`` off screen; ``target`` (default: ``widget``, else a
    child of it) as PNG bytes (``size × scale`` pixels for the whole widget)."""
    from PySide6.QtCore import QCoreApplication, Qt

    from .export import png_bytes, render_image

    widget.setAttribute(Qt.WidgetAttribute.WA_DontShowOnScreen, True)
    widget.resize(*size)
    widget.show()
    for _ in range(5):  # layouts and pyqtgraph's deferred updates
        QCoreApplication.processEvents()
    try:
        return png_bytes(render_image(target or widget, scale))
    finally:
        widget.close()
        widget.deleteLater()


def measured_table(predicted: list[TensorRow], measured: list[TensorRow]):
    """Each measured tensor: its RMS and log₂, the prediction and log₂(predicted/measured)."""
    from .export import TableData

    pred = {(r.name, r.kind): r.rms for r in predicted}
    header = ["tensor", "kind", "measured RMS", "log₂", "predicted RMS", "log₂ error"]
    cells, values = [], []
    for r in measured:
        p = pred.get((r.name, r.kind))
        log_m = math.log2(r.rms) if r.rms > 0 and math.isfinite(r.rms) else None
        err = math.log2(p / r.rms) if p and log_m is not None and p > 0 and \
            math.isfinite(p) else None
        row = [r.name, r.kind, r.rms, log_m, p, err]
        values.append(row)
        cells.append([r.name, r.kind, f"{r.rms:.4g}", _fixed(log_m),
                      "" if p is None else f"{p:.4g}", _fixed(err)])
    return TableData(header, cells, values)


def _fixed(x: float | None) -> str:
    return "" if x is None else number(x, ".2f")  # never "-0.00"


def build(cfg: ModelConfig, *, source: str = "config", fmt: str | None = None,
          measure_scales: bool = True, text: str | None = None,
          scale: float = 2.0) -> list[Output]:
    """Every file of the report, in memory (nothing is written)."""
    from unitscale_core.scaling.predict import predict, stream_collapse

    from .export import csv_text, markdown_text, table_from_model

    fmt = fmt or default_format(cfg)
    app = _qt_app()
    from .panels.attention_panel import DEFAULT_TEXT, compute_maps
    from .panels.sizes_panel import SizesPanel
    from .widgets.scale_table import ScaleTableModel

    text = DEFAULT_TEXT if text is None else text
    predicted = predict(cfg, formats=(fmt,))
    collapse = stream_collapse(cfg)
    measured: list[TensorRow] = []
    if measure_scales:
        from unitscale_core.measure import measure

        measured = measure(cfg)
    maps = compute_maps("configured", text, cfg, None, 512)

    outputs: list[Output] = []

    def tables(stem: str, table, caption: str) -> None:
        outputs.append(Output(f"{stem}.csv", csv_text(table).encode(), caption))
        outputs.append(Output(f"{stem}.md", markdown_text(table).encode(), caption))

    sizes = SizesPanel(cfg)
    tables("sizes", sizes.table_data(), "parameters, FLOPs per token and training memory")
    sizes.deleteLater()
    model = ScaleTableModel()
    model.set_rows(predicted, None, fmt)
    tables("predicted_scales", table_from_model(model, range(PREDICTED_COLUMNS)),
           f"predicted RMS at initialisation ({cfg.parametrization}), headroom in {fmt}")
    if measure_scales:
        tables("measured_scales", measured_table(predicted, measured),
               f"measured RMS in one training step ({cfg.parametrization}) beside the "
               "prediction")

    for name, make, caption in _figures(cfg, predicted, measured, fmt, maps, collapse):
        widget, size, target = make()
        outputs.append(Output(name, _render(widget, size, scale, target), caption))
    app.processEvents()
    warnings = [collapse.describe()] if collapse is not None else []
    outputs.append(Output("index.md", index_markdown(cfg, source, outputs, measure_scales,
                                                     text, warnings).encode(), "this page"))
    return outputs


def _figures(cfg, predicted, measured, fmt, maps, collapse=None
             ) -> list[tuple[str, Callable, str]]:
    from .panels.attention_panel import ModelView, _linear_levels, colour_values, model_view_title
    from .panels.positional_panel import SchemeView, spec_for_config
    from .widgets.scale_chart import ScaleChart

    def chart():
        widget = ScaleChart()
        widget.set_rows(predicted, measured)
        widget.set_formats([fmt])
        widget.set_collapse(collapse)
        n = max(len(widget.names), 1)
        widget.plot.setYRange(-0.5, n - 0.5, padding=0)  # every tensor, not the first 60
        widget.plot.setTitle(f"{cfg.parametrization}: log₂ RMS of every tensor "
                             f"({'predicted and measured' if measured else 'predicted'}), "
                             f"{fmt} range shaded", color="k")
        # every tensor labelled (the panel labels every k-th to fit the screen)
        widget.plot.getAxis("left").setTicks([list(enumerate(widget.names)), []])
        height = min(CHART_MAX_HEIGHT, CHART_MARGIN + CHART_ROW_HEIGHT * n)
        return widget, (CHART_WIDTH, height), None

    figures = [("scale_chart.png", chart, "log₂ RMS of every tensor: filled = predicted, "
                "hollow = measured; blue = forward, red = backward")]
    spec = spec_for_config(cfg)
    if spec is not None:
        from unitscale_core.positional_views import compute_view, model_position_table

        # a learned scheme: the model's own table at initialisation, as the panel shows it
        result = compute_view(spec, model_position_table(cfg) if spec.kind == "learned"
                              else None)

        def positional():
            view = SchemeView("reportPositional")
            view.show_result(result, spec.view)
            view.note.hide()  # in the caption instead
            view.heatmap.readout.hide()  # the hover read-out: nothing to hover in a file
            return view, FIGURE_SIZE, view.figure("positional", "").widget()

        figures.append(("positional.png", positional,
                        f"{result.title}" + (f" ({result.note})" if result.note else "")))
    for i, km in enumerate(maps.kinds.values()):
        def attention(km=km):
            view = ModelView(lambda _layer, _head: None)
            view.set_maps(colour_values(km.thumbs, km.thumb_allowed, False), _linear_levels)
            view.set_title(f"{maps.source} · {km.label} · {model_view_title(km)}")
            return view, FIGURE_SIZE, None

        name = "attention_model_view.png" if i == 0 else f"attention_model_view_{km.name}.png"
        figures.append((name, attention, f"{km.label}: every layer × head for "
                        f"{maps.n_tokens} tokens (grey: masked by the pattern)"))
    return figures


def default_format(cfg: ModelConfig) -> str:
    """The config's dtype; for fp32 (whose range dwarfs every tensor) the scaling panel's
    first format, FP8 E4M3, where headroom matters."""
    return cfg.dtype if cfg.dtype != "fp32" else "fp8_e4m3"


def index_markdown(cfg: ModelConfig, source: str, outputs: list[Output], measured: bool,
                   text: str, warnings: Sequence[str] = ()) -> str:
    """The report's front page: what each file is, figures inline; ``warnings`` (the
    collapse point, :mod:`unitscale_core.scaling.collapse`) under Scales."""
    from .export import markdown_escape

    names = {o.name: o for o in outputs}
    lines = [f"# Unit Scaling Explorer report: {markdown_escape(source)}", "",
             f"{cfg.architecture}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
             f"{cfg.n_heads} heads, {cfg.positional} positions, {cfg.attention} attention, "
             f"parametrization **{cfg.parametrization}**, {cfg.dtype}. "
             f"Written by `unitscale report` {__version__}.", ""]

    def links(stem: str) -> str:
        return f"[CSV]({stem}.csv) · [Markdown]({stem}.md)"

    lines += ["## Sizes", "", f"{names['sizes.csv'].caption}: {links('sizes')}", "",
              "## Scales", "",
              f"- Predicted: {names['predicted_scales.csv'].caption}: "
              f"{links('predicted_scales')}"]
    if measured:
        lines.append(f"- Measured: {names['measured_scales.csv'].caption}: "
                     f"{links('measured_scales')}")
    else:
        lines.append("- Measured: not run (`--no-measure`)")
    lines += [f"- ⚠ {markdown_escape(w)}" for w in warnings]
    lines += ["", "![scale chart](scale_chart.png)", "",
              f"*{names['scale_chart.png'].caption}*", "", "## Positions", ""]
    if "positional.png" in names:
        lines += ["![positional encoding](positional.png)", "",
                  f"*{markdown_escape(names['positional.png'].caption)}*", ""]
    else:
        lines += ["The model uses no positional encoding.", ""]
    lines += ["## Attention", "", f"Text: “{markdown_escape(text)}”", ""]
    for o in outputs:
        if o.name.startswith("attention_model_view"):
            lines += [f"![attention model view]({o.name})", "", f"*{o.caption}*", ""]
    lines += ["## Config", "", "```json", dumps_json(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


# -- writing -----------------------------------------------------------------------------------
def write_folder(out: Path, outputs: list[Output]) -> None:
    """Write ``outputs`` to a temporary folder beside ``out``, then move it into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as exc:
        raise ReportError(f"--out: cannot write in {out.parent}: "
                          f"{exc.strerror or exc}") from None
    try:
        for o in outputs:
            (tmp / o.name).write_bytes(o.data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the report is not
        if out.is_dir():
            for o in outputs:  # each replace is atomic; other files in ``out`` stay
                os.replace(tmp / o.name, out / o.name)
            tmp.rmdir()
        else:
            os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReportError(f"--out: cannot write {out}: {exc.strerror or exc}") from None
