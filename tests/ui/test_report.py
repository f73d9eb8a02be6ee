"""``unitscale report``: end to end on the tiny preset through the core CLI (the command comes
from the app's ``unitscale.commands`` entry point), and bad input writes nothing."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
from PySide6.QtGui import QImage

from app import report
from unitscale_core import cli
from unitscale_core.config import load
from unitscale_core.measure import measure
from unitscale_core.scaling.predict import predict

TINY = Path(__file__).resolve().parents[2] / "resources" / "presets" / "tiny.json"
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def check_markdown_table(path: Path, n_rows: int) -> list[str]:
    """Header, alignment row, ``n_rows`` rows, every line with the header's cell count."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == n_rows + 2, path
    width = len(UNESCAPED_PIPE.split(lines[0]))
    assert all(len(UNESCAPED_PIPE.split(line)) == width for line in lines), path
    assert all(re.fullmatch(r":---|---:", c.strip()) for c in lines[1].split("|")[1:-1])
    return lines


def test_report_on_the_tiny_preset(capsys, tmp_path):
    out = tmp_path / "report"
    assert cli.main(["report", "--config", str(TINY), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: ") and printed.count("\n") == 1
    cfg = load(TINY)
    fmt = report.default_format(cfg)
    expected = {"sizes.csv", "sizes.md", "predicted_scales.csv", "predicted_scales.md",
                "measured_scales.csv", "measured_scales.md", "scale_chart.png",
                "positional.png", "attention_model_view.png", "index.md"}
    assert {p.name for p in out.iterdir()} == expected
    assert not list(tmp_path.glob(".*"))  # the temporary folder became ``out``

    # predicted: the rows predict() gives, exact values
    rows = predict(cfg, formats=(fmt,))
    got = read_csv(out / "predicted_scales.csv")
    assert [(g["tensor"], g["kind"]) for g in got] == [(r.name, r.kind) for r in rows]
    assert [float(g["predicted RMS"]) for g in got] == [r.rms for r in rows]
    # (an exactly zero tensor loses nothing: 0, where its Gaussian-limit fraction reads 1)
    assert [float(g["underflow"]) for g in got] == [
        0.0 if r.rms == 0 else r.formats[fmt]["underflow"] for r in rows]
    check_markdown_table(out / "predicted_scales.md", len(rows))
    # measured: an independent run of measure() (same seed) gives the same rows
    measured = measure(cfg)
    got = read_csv(out / "measured_scales.csv")
    assert [(g["tensor"], g["kind"]) for g in got] == [(r.name, r.kind) for r in measured]
    for g, r in zip(got, measured):
        assert math.isclose(float(g["measured RMS"]), r.rms, rel_tol=1e-5)
    check_markdown_table(out / "measured_scales.md", len(measured))
    sizes = read_csv(out / "sizes.csv")
    from unitscale_core.sizing import size_report

    assert int(sizes[0]["Exact"]) == size_report(cfg)["total"]
    check_markdown_table(out / "sizes.md", len(sizes))

    # figures decode at their documented sizes (scale 2)
    n_names = len({r.name for r in rows if r.kind in ("activation", "weight")})
    chart_h = min(report.CHART_MAX_HEIGHT, report.CHART_MARGIN + report.CHART_ROW_HEIGHT * n_names)
    sizes_px = {"scale_chart.png": (report.CHART_WIDTH, chart_h),
                "positional.png": report.FIGURE_SIZE,
                "attention_model_view.png": report.FIGURE_SIZE}
    for name, (w, h) in sizes_px.items():
        image = QImage(str(out / name))
        assert not image.isNull(), name
        assert (image.width(), image.height()) == (2 * w, 2 * h), name
        assert len({image.pixel(x, y) for x in range(0, image.width(), 37)
                    for y in range(0, image.height(), 37)}) > 8, name  # not blank

    index = (out / "index.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", index)
    assert set(links) == expected - {"index.md"}
    assert all((out / link).is_file() for link in links)
    assert index.startswith("# Unit Scaling Explorer report: tiny.json")


@pytest.mark.parametrize("content, needle", [
    ('{"d_model": 100, "n_heads": 12}', "d_model=100 is not divisible by n_heads=12"),
    ('{"d_model": 2', "is not valid JSON"),
])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "out"
    assert cli.main(["report", "--config", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unitscale report: error:") and needle in err
    assert err.count("\n") == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    out = tmp_path / "taken"
    out.write_text("keep")
    assert cli.main(["report", "--config", str(TINY), "--out", str(out), "--no-measure"]) == 2
    assert "is not a folder" in capsys.readouterr().err and out.read_text() == "keep"


def test_write_folder_replaces_files_and_keeps_others(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "index.md").write_text("old")
    report.write_folder(out, [report.Output("index.md", b"new", "")])
    assert (out / "index.md").read_text() == "new" and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_report_names_where_a_unit_stack_collapses():
    """index.md lists the collapse warning under Scales (and the tiny preset has none)."""
    from unitscale_core import ModelConfig
    from unitscale_core.scaling.predict import stream_collapse

    cfg = ModelConfig(d_model=64, n_heads=2, d_ff=256, n_layers=32, seq_len=32, max_len=32,
                      batch_size=2, vocab_size=500, parametrization="unit")
    outputs = {o.name: o for o in report.build(cfg, measure_scales=False, scale=1.0)}
    index = outputs["index.md"].data.decode()
    want = stream_collapse(cfg)
    assert f"- ⚠ tokens' own parts fall below fp32 resolution from {want.norm}" in \
        index.replace("\\", "")
    assert "⚠" not in report.index_markdown(load(TINY), "tiny", list(outputs.values()),
                                            False, "text")
