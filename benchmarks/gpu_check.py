"""GPU check: measurement and attention capture on CUDA match the CPU run's tensors.

A mid-sized config (12 layers, d_model 768, seq 1024) is measured on the CPU and on CUDA; the
check asserts the same tensor names, finite values and RMS within 5% of each other (the two
devices use different kernels), captures every layer's attention probabilities on CUDA, and
prints both wall times and their ratio. Without a CUDA device it says so and exits 0.

    python benchmarks/gpu_check.py [--batch 4] [--seq 1024]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from unitscale_core import ModelConfig, build_model
from unitscale_core.measure import measure, measurement_batch


def timed_measure(cfg: ModelConfig, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    rows = measure(cfg, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return rows, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: skipped — no CUDA device on this machine (torch "
              f"{torch.__version__})")
        return 0
    print(f"CUDA device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    failures = 0
    for param in ("standard", "unit", "umup"):
        cfg = ModelConfig(architecture="decoder", d_model=768, n_heads=12, d_ff=3072,
                          n_layers=12, vocab_size=50257, max_len=args.seq, seq_len=args.seq,
                          batch_size=args.batch, parametrization=param)
        timed_measure(cfg, "cuda")  # warm-up: CUDA context, kernels
        gpu_rows, gpu_s = timed_measure(cfg, "cuda")
        cpu_rows, cpu_s = timed_measure(cfg, "cpu")
        gpu = {(r.name, r.kind): r.rms for r in gpu_rows}
        cpu = {(r.name, r.kind): r.rms for r in cpu_rows}
        same_names = set(gpu) == set(cpu)
        finite = all(math.isfinite(v) for v in gpu.values())
        off = [k for k in cpu if cpu[k] > 1e-12 and abs(gpu[k] / cpu[k] - 1) > 0.05]
        ok = same_names and finite and not off
        failures += not ok
        print(f"{param:8s} measure: CPU {cpu_s:6.2f} s, GPU {gpu_s:6.3f} s, CPU/GPU "
              f"{cpu_s / gpu_s:5.1f}×; names equal: {same_names}; finite: {finite}; "
              f"RMS differing by >5%: {len(off)} {off[:3]}")
    model = build_model(cfg, device="cuda").eval()
    for _, m in model.attention_modules():
        m.capture = True
    ids = measurement_batch(cfg, torch.device("cuda"))["ids"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids)
    torch.cuda.synchronize()
    probs = [m.probs for _, m in model.attention_modules()]
    ok = len(probs) == 12 and all(torch.isfinite(p).all() for p in probs)
    failures += not ok
    print(f"attention capture on CUDA: {len(probs)} layers × {probs[0].shape[1]} heads × "
          f"{probs[0].shape[2]}² in {time.perf_counter() - t0:.3f} s; finite: {ok}")
    print("gpu_check:", "OK" if failures == 0 else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
