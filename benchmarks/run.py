"""Every benchmark of issue 7, each side by side with what a user would otherwise use.

    python benchmarks/run.py [--quick] [--json] [--only KEY ...]

Prints the machine (CPU, cores, OS, Python, torch, PySide6, device) and a table: ours, theirs,
ratio (ours / theirs), goal, met. ``--json`` prints one object with the keys below plus
``machine``; each entry carries ``goal`` and ``met``. ``--quick`` uses fewer repeats (about
3 minutes on 2 CPU cores). Each benchmark also runs alone: ``python benchmarks/<module>.py``.

| key | ours | theirs | goal |
|---|---|---|---|
| attention_vs_transformers_128/512 | MiniLM maps, ``pretrained.attention_probs`` | transformers eager, ``output_attentions=True`` | ratio ≤ 1.0 |
| heatmaps_vs_matplotlib | ``ModelView`` 6 × 12 × 128² update + repaint | matplotlib's faster of ``set_data`` + ``draw`` and blitting | ratio ≤ 0.1 |
| measure_vs_track_scales | ``measure`` (fwd+bwd, every tensor) | ``unit_scaling.transforms.track_scales`` | ratio ≤ 1.0 |
| ui_max_stall_ms | longest 5 ms-heartbeat gap, measure + attention jobs | (idle heartbeat) | ≤ 50 ms |
| predict_96_layers_ms | GPT-3-shaped analytic prediction | (one frame) | ≤ 16 ms |
| sweep_24_layers_8_widths_ms | 24-layer decoder at 8 widths × 3 parametrizations, predicted (issue 22) | (one second) | ≤ 1000 ms |
| cold_start_s | launch to first paint | (bare PySide6 window) | ≤ 3 s |
| scaling_panel_96_layers_ms | scaling panel update + paint, GPT-3-shaped (issue 22) | (one frame) | ≤ 50 ms |
| scaling_panel_dtype_or_format_ms | the same for another dtype or format of that model | (one frame) | ≤ 16 ms |
| training_panel_vs_cli | the panel's three default training runs, steps/s | the same runs through ``unitscale_core.training`` | ratio ≥ 0.8 |
| training_gui_thread_cpu | the GUI thread's CPU share while they train | (an idle window) | ≤ 15 % |
| measure_peak_rss_vs_estimate | peak RSS of ``unitscale measure``, GPT-2 small at 1 × 1024 (issue 19) | the budget's estimate (``memory_budget``) | ratio ≤ 1.25 |
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, machine_line  # noqa: E402

#: key → (module, goal, what "met" compares: "ratio" or "value"), in run order.
GOALS: dict[str, tuple[str, float, str]] = {
    "attention_vs_transformers_128": ("attention_speed", 1.0, "ratio"),
    "attention_vs_transformers_512": ("attention_speed", 1.0, "ratio"),
    "heatmaps_vs_matplotlib": ("heatmaps", 0.1, "ratio"),  # issue 22's goal
    "measure_vs_track_scales": ("measure_speed", 1.0, "ratio"),
    "ui_max_stall_ms": ("ui_stall", 50.0, "value"),
    "predict_96_layers_ms": ("predict_speed", 16.0, "value"),
    # issue 22: a width × parametrization sweep of analytic predictions within a second
    "sweep_24_layers_8_widths_ms": ("sweep_speed", 1000.0, "value"),
    "cold_start_s": ("cold_start", 3.0, "value"),
    # issue 3: the scaling panel's whole update (predict + redraw + paint), not an issue-7 key
    "scaling_panel_96_layers_ms": ("scaling_panel_update", 50.0, "value"),
    "scaling_panel_dtype_or_format_ms": ("scaling_panel_update", 16.0, "value"),
    # issue 19: a measurement's peak memory against the estimate its budget check uses
    "measure_peak_rss_vs_estimate": ("measure_memory", 1.25, "ratio"),
    # issue 19: the training lab's three default runs in the panel against the same headless
    # (steps per second, higher is better) and the GUI thread's CPU share meanwhile (%)
    "training_panel_vs_cli": ("training_panel", 0.8, "ratio"),
    "training_gui_thread_cpu": ("training_panel", 15.0, "value"),
}
#: keys whose goal is a floor (met when the figure is at least the goal), not a ceiling.
AT_LEAST = {"training_panel_vs_cli"}
#: repeats per module: (full, quick).
REPEATS = {"attention_speed": (7, 3), "heatmaps": (15, 7), "measure_speed": (5, 3),
           "ui_stall": (3, 2), "predict_speed": (7, 3), "sweep_speed": (3, 1),
           "cold_start": (5, 3),
           "scaling_panel_update": (5, 3), "measure_memory": (1, 1),
           "training_panel": (2, 1)}


def _run_module(name: str, repeats: int) -> dict:
    module = __import__(name)
    if name == "predict_speed":
        return module.run(repeats, compare_measure=False)
    return module.run(repeats)


def run_all(quick: bool, only: list[str] | None = None, log=sys.stderr) -> dict:
    """Run the benchmarks (each module once), add ``goal`` and ``met`` to each entry."""
    keys = [k for k in GOALS if not only or k in only]
    modules = list(dict.fromkeys(GOALS[k][0] for k in keys))
    results: dict = {}
    for name in modules:
        repeats = REPEATS[name][1 if quick else 0]
        t0 = time.perf_counter()
        print(f"running {name} ({repeats} repeats)…", file=log, flush=True)
        try:
            results.update(_run_module(name, repeats))
        except Exception as exc:  # one broken benchmark must not hide the others
            traceback.print_exc(file=log)
            for key in keys:
                if GOALS[key][0] == name:
                    results[key] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=log, flush=True)
    out: dict = {}
    for key in keys:
        entry = dict(results.get(key, {"error": "not produced"}))
        _, goal, field = GOALS[key]
        entry["goal"] = goal
        entry["met"] = bool(field in entry and (entry[field] >= goal if key in AT_LEAST
                                                else entry[field] <= goal))
        out[key] = entry
    return out


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def table(results: dict) -> str:
    """A Markdown table: benchmark, ours, theirs, ratio, goal, met."""
    lines = ["| benchmark | ours | theirs | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for key, e in results.items():
        if "error" in e:
            lines.append(f"| {key} | error: {e['error']} | | | {e['goal']} | no |")
            continue
        if "ours_ms" in e:
            ours, theirs, ratio = f"{_fmt(e['ours_ms'])} ms", f"{_fmt(e['theirs_ms'])} ms", \
                _fmt(e["ratio"])
            goal = f"ratio ≤ {e['goal']}"
        elif "ours_steps_per_s" in e:  # speed: steps per second, higher is better
            ours, theirs = f"{e['ours_steps_per_s']} steps/s", f"{e['theirs_steps_per_s']} steps/s"
            ratio, goal = _fmt(e["ratio"]), f"ratio ≥ {e['goal']}"
        elif "peak_rss_mib" in e:  # memory: peak against an estimate
            ours, theirs = f"{e['peak_rss_mib']} MiB peak", f"{e['estimate_mib']} MiB estimate"
            ratio, goal = _fmt(e["ratio"]), f"ratio ≤ {e['goal']}"
        else:
            unit = e.get("unit", "s" if key.endswith("_s") else "ms")
            ours = f"{_fmt(e['value'])} {unit}"
            base = e.get("bare_qt_s", e.get("idle_baseline_ms", e.get("idle_baseline_pct")))
            theirs = f"{_fmt(base)} {unit}" if base is not None else "—"
            ratio = _fmt(e.get("ratio"))
            goal = f"≤ {e['goal']} {unit}"
        lines.append(f"| {key} | {ours} | {theirs} | {ratio} | {goal} | "
                     f"{'yes' if e['met'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats (a few minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--only", nargs="+", choices=list(GOALS), metavar="KEY",
                   help="run only these benchmarks")
    args = p.parse_args(argv)
    info = machine()
    t0 = time.perf_counter()
    results = run_all(args.quick, args.only)
    took = time.perf_counter() - t0
    if args.json:
        print(json.dumps({**results, "machine": {**info, "total_s": round(took, 1)}}, indent=2))
    else:
        print(machine_line(info))
        print(table(results))
        print(f"({'quick, ' if args.quick else ''}{took:.0f} s in all; "
              "ratio = ours / theirs; details with --json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
