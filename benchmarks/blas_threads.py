"""A program's first prediction with numpy's default BLAS threads against one
(``unitscale_core.blas_threads``, what ``unitscale`` and ``unitscale-explorer`` apply).

Each sample is a fresh process (as a launch is) that predicts the Llama-3-8B preset (32
layers, 2048 tokens, GQA, RoPE) once, with ``use_one_blas_thread()`` called first or not;
wall and CPU time of that first prediction, the two settings alternated, medians. Run it
without ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` set, as on a user's machine (the
script clears them for its children).

    python benchmarks/blas_threads.py [--repeats 5] [--json]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from _common import parser, report

_CHILD = """
import json, sys, time
from unitscale_core.blas_threads import blas_thread_counts, use_one_blas_thread
from unitscale_core.presets import load_preset
from unitscale_core.scaling.predict import predict
if sys.argv[1] == "one":
    use_one_blas_thread()
threads = max(blas_thread_counts())
cfg = load_preset("llama-3-8b")
t, c = time.perf_counter(), time.process_time()
predict(cfg)
print(json.dumps([time.perf_counter() - t, time.process_time() - c, threads]))
"""


def _sample(mode: str) -> tuple[float, float, int]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "UNITSCALE_BLAS_THREADS")}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, check=True,
                         capture_output=True, text=True).stdout
    wall, cpu, threads = json.loads(out.strip().splitlines()[-1])
    return wall, cpu, threads


def run(repeats: int = 5) -> dict:
    """``first_predict_one_blas_thread_vs_default``: ``{"one_ms", "default_ms", "ratio",
    "one_cpu_ms", "default_cpu_ms", "cpu_ratio", "default_threads"}`` (one / default)."""
    got: dict[str, list[tuple[float, float, int]]] = {"default": [], "one": []}
    for _ in range(max(1, repeats)):
        for mode in ("default", "one"):
            got[mode].append(_sample(mode))

    def med(mode: str, i: int) -> float:
        return statistics.median(s[i] for s in got[mode]) * 1e3

    return {"first_predict_one_blas_thread_vs_default": {
        "one_ms": round(med("one", 0), 1), "default_ms": round(med("default", 0), 1),
        "ratio": round(med("one", 0) / med("default", 0), 3),
        "one_cpu_ms": round(med("one", 1), 1), "default_cpu_ms": round(med("default", 1), 1),
        "cpu_ratio": round(med("one", 1) / med("default", 1), 3),
        "default_threads": got["default"][0][2]}}


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    report(run(args.repeats), args.json)
