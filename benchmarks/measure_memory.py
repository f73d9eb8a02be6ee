"""Peak memory of ``unitscale measure`` on the GPT-2-small preset against the estimate.

Issue 19: Measure on GPT-2 small (batch 8 × 1024) took resident memory from 3.7 to 20.7 GB,
past what a training step needs. This runs ``unitscale measure`` on the ``gpt2-small`` preset
at a batch that fits a shared machine (default 1 × 1024: the preset's sequence, batch 1) in a
child process on the CPU, and compares the child's peak resident set (``ru_maxrss`` of that
child alone, from ``os.wait4``; where that is missing, psutil polled every 10 ms) with the
estimate the budget check uses before a run
(``unitscale_core.memory_budget.measurement_memory(cfg).total``: the sizing model's weights,
gradients and activations, the loss's two fp32 gradients and the statistics' workspace).

The peak includes the interpreter, torch and the CLI itself (~0.3 GB), which the estimate
leaves out (it is already spent in the app's process), so the ratio is slightly pessimistic at
small batches. Goal: ``measure_peak_rss_vs_estimate`` ratio ≤ 1.25.

    python benchmarks/measure_memory.py [--batch 1] [--seq 1024] [--json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parser, report

from unitscale_core.memory_budget import measurement_memory
from unitscale_core.presets import load_preset

BATCH, SEQ = 1, 1024
MIB = 2**20


def _child_peak(cmd: list[str], env: dict) -> tuple[int, float, int]:
    """Run ``cmd``; (peak RSS in bytes, seconds, exit status)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    polled = 0
    watch = psutil.Process(proc.pid)
    wait4 = getattr(os, "wait4", None)
    while True:
        try:
            polled = max(polled, watch.memory_info().rss)
        except psutil.Error:
            pass
        if wait4 is not None:
            pid, status, usage = wait4(proc.pid, os.WNOHANG)
            if pid:
                seconds = time.perf_counter() - t0
                proc.returncode = os.waitstatus_to_exitcode(status)
                # ru_maxrss: KiB on Linux, bytes on macOS
                scale = 1 if sys.platform == "darwin" else 1024
                peak = max(polled, usage.ru_maxrss * scale)
                break
        elif proc.poll() is not None:
            seconds, peak = time.perf_counter() - t0, polled
            break
        time.sleep(0.01)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"unitscale measure exited {proc.returncode}: {err.strip()}")
    return peak, seconds, proc.returncode


def run(repeats: int = 1, batch: int = BATCH, seq: int = SEQ) -> dict:
    """``measure_peak_rss_vs_estimate``: peak RSS / estimate, with both figures."""
    cfg = load_preset("gpt2-small").replace(batch_size=batch, seq_len=seq, device="cpu")
    estimate = measurement_memory(cfg).total
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2-small.json"
        path.write_text(json.dumps(cfg.to_dict()))
        cmd = [sys.executable, "-m", "unitscale_core.cli", "measure", "--config", str(path),
               "--json"]
        env = {**os.environ}
        peaks, times = [], []
        for _ in range(max(1, repeats)):
            peak, seconds, _ = _child_peak(cmd, env)
            peaks.append(peak)
            times.append(seconds)
    peak = max(peaks)
    ratio = peak / estimate
    return {"measure_peak_rss_vs_estimate": {
        "value": round(ratio, 3), "ratio": round(ratio, 3),
        "peak_rss_mib": round(peak / MIB), "estimate_mib": round(estimate / MIB),
        "batch": batch, "seq_len": seq, "seconds": round(max(times), 1),
        "preset": "gpt2-small"}}


def main() -> None:
    p = parser(__doc__, repeats=1)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--seq", type=int, default=SEQ)
    args = p.parse_args()
    report(run(args.repeats, args.batch, args.seq), args.json)


if __name__ == "__main__":
    main()
