"""``python -m app.training_figure --out docs/training_fp8.png``: the README's training figure.

Trains a tiny decoder on the bundled text (task ``lm``) for 80 steps in five configurations —
standard / unit / u-μP under simulated FP8 (E4M3 forward, E5M2 backward) and standard / unit
in FP32, none with loss scaling — through :mod:`unitscale_core.training` (the same trainer the
panel drives), then draws the loss curves with the training panel's own ``LossPlot`` and, beside
them, the share of gradient values that E5M2 flushes to zero, and saves the two as one PNG.
Prints one line per run: the final loss (mean of the last 10 steps) and the underflow.
Runs headless (offscreen Qt) on the CPU; a few minutes at most.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: The figure's model: a tiny decoder (2 layers, width 64) that trains on a CPU in seconds.
TINY_DECODER = dict(architecture="decoder", d_model=64, n_heads=4, d_ff=256, n_layers=2,
                    vocab_size=256, max_len=64, seq_len=64, batch_size=16, device="cpu", seed=0)
#: (parametrization, dtype, dashed) in legend order.
RUNS = (("standard", "fp8_e4m3", False), ("unit", "fp8_e4m3", False),
        ("umup", "fp8_e4m3", False), ("standard", "fp32", True), ("unit", "fp32", True))
COLOURS = {"standard": "#d62728", "unit": "#1f77b4", "umup": "#2ca02c"}
TAIL = 10  # final loss = mean of the last TAIL steps
UNDERFLOW_KIND = "grad_activation"


@dataclass
class Result:
    parametrization: str
    dtype: str
    dashed: bool
    steps: list[int]
    losses: list[float]
    logged_steps: list[int]
    underflow: list[float]  # fraction of UNDERFLOW_KIND values below E5M2's half-subnormal
    seconds: float

    @property
    def label(self) -> str:
        return f"{self.parametrization} · {self.dtype}"

    @property
    def final(self) -> float:
        tail = self.losses[-TAIL:]
        return sum(tail) / len(tail)


def run_all(steps: int, log_every: int, seed: int) -> list[Result]:
    """Train every configuration of :data:`RUNS` (same seed, same batches)."""
    from unitscale_core import ModelConfig
    from unitscale_core.training import TrainSettings, train

    config = ModelConfig(**{**TINY_DECODER, "seed": seed})
    results = []
    for param, dtype, dashed in RUNS:
        start = time.perf_counter()
        run = train(config, TrainSettings(parametrization=param, dtype=dtype, steps=steps,
                                          log_every=log_every, loss_scaling=False))
        logged = [r for r in run.records if r.underflow is not None]
        results.append(Result(
            param, dtype, dashed, [r.step for r in run.records], [r.loss for r in run.records],
            [r.step for r in logged],
            [r.underflow[UNDERFLOW_KIND]["fp8_e5m2"] for r in logged],
            time.perf_counter() - start))
    return results


def render(results: Sequence[Result], out: str, steps: int) -> None:
    """Both plots side by side, drawn by the panel's plot widgets, written atomically."""
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtWidgets import QApplication, QHBoxLayout, QWidget

    from unitscale_core.atomic import atomic_open

    from .widgets.training_plots import LossPlot, UnderflowPlot

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    figure = QWidget()
    figure.setStyleSheet("background: white")
    layout = QHBoxLayout(figure)
    loss = LossPlot(title=f"training loss, tiny decoder, {steps} steps, no loss scaling")
    loss.set_log_y(True)
    loss.plot_item.setLabel("left", "loss (nats / token, log scale)", color="k")
    under = UnderflowPlot()
    under.plot_item.setTitle("activation gradients flushed to zero in FP8 E5M2", color="k",
                             size="10pt")
    for i, r in enumerate(results):
        colour = COLOURS[r.parametrization]
        label = f"{r.label}: final {r.final:.2f}"
        loss.set_curve(str(i), label, r.steps, r.losses, colour, dashed=r.dashed)
        under.set_curve(str(i), r.label, r.logged_steps, [100 * u for u in r.underflow],
                        colour, dashed=r.dashed)
    layout.addWidget(loss, 3)
    layout.addWidget(under, 2)
    figure.resize(1500, 560)
    figure.show()
    for _ in range(5):
        app.processEvents()
    image = figure.grab().toImage()
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.save(buffer, "PNG"):
        raise OSError(f"could not encode {out} as PNG")
    buffer.close()
    with atomic_open(out, "wb") as handle:
        handle.write(bytes(data))
    figure.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.training_figure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/training_fp8.png", help="PNG to write")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--log-every", type=int, default=2,
                        help="record underflow every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    results = run_all(args.steps, args.log_every, args.seed)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    render(results, args.out, args.steps)
    print(f"{'run':<22} {'first':>7} {'final':>7} {'E5M2 grad-act underflow':>24} {'time':>7}")
    for r in results:
        first = sum(r.losses[:TAIL]) / len(r.losses[:TAIL])
        print(f"{r.label:<22} {first:7.3f} {r.final:7.3f} "
              f"{100 * r.underflow[-1]:23.2f}% {r.seconds:6.1f}s")
    print(f"final = mean loss of the last {TAIL} steps; first = of the first {TAIL}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
