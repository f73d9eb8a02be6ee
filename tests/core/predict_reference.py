"""The analytic predictor's answers on every developed and held-out config, pinned.

``tests/core/test_predict_hash.py`` compares today's predictions against
``tests/core/data/predict_reference.json``, made by this module. The configs are those the
agreement tests develop and hold out (``test_predict.py``'s ``DEVELOPED``, ``HELD_OUT``,
``HELD_OUT_TIED``, ``HELD_OUT_WIDE``; ``test_predict_modern.py``'s ``HELD_OUT_MODERN``,
``EVERY_FIELD``, ``PARALLEL_ENC_DEC``), every shipped preset (at most 128 tokens × 2
sequences, so the whole set runs in seconds; their stacks, widths and fields as shipped) and
the GPT-3 shape of ``benchmarks/predict_speed.py`` at its full 2048 tokens but 4 layers (the
binned, map-scaled grid), each under every parametrization. Per case it records every row
(sorted by name and kind: the order rows are listed in is not pinned): its name, kind, RMS,
parametrization scales and formula text (names and formulas as SHA-256 digests, the scales
as one of their values at 12 significant digits; every other number stored at 12
significant digits and compared within 1e-9 relative), its headroom status in
:data:`FORMATS`; and the stream's own shares (the collapse) and its anisotropy at each norm.

Regenerate the reference only in a commit that changes predictions on purpose, and say so
in its message (a speed change must leave it as it is)::

    .venv/bin/python -m tests.core.predict_reference --write     # from the repository root
    .venv/bin/python -m tests.core.predict_reference             # compare, print differences
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from unitscale_core import ModelConfig
from unitscale_core.config import PARAMETRIZATIONS
from unitscale_core.presets import PRESETS, load_preset
from unitscale_core.scaling import predict as P
from unitscale_core.scaling.formats import headroom_status_array

REFERENCE = Path(__file__).resolve().parent / "data" / "predict_reference.json"
#: the formats whose statuses are pinned (the tables themselves are functions of the RMS)
FORMATS = ("fp8_e4m3", "fp16")
#: status → one letter of the pinned status string
_STATUS = {"zero": "z", "fine": "f", "at_risk": "r", "lost": "l"}
#: relative tolerance of every pinned number
RTOL = 1e-9
#: presets are pinned at most this many tokens and sequences
PRESET_SEQ, PRESET_BATCH = 128, 2


def configs() -> dict[str, dict]:
    """case name → config fields (parametrization left out: each is run under all three)."""
    from . import test_predict as tp
    from . import test_predict_modern as tm

    out: dict[str, dict] = {}
    for i, change in enumerate(tp.DEVELOPED):
        out[f"developed-{i}"] = {**tp.BASE, **change}
    for name, fields in tp.HELD_OUT.items():
        out[name] = {**fields, "tie_embeddings": False}
    for name, fields in tp.HELD_OUT_TIED.items():
        out[name] = {**fields, "tie_embeddings": True}
    out.update(tp.HELD_OUT_WIDE)
    out.update(tm.HELD_OUT_MODERN)
    for fields in tm.EVERY_FIELD:
        if fields["parametrization"] == "standard":
            fields = {k: v for k, v in fields.items() if k != "parametrization"}
            out[f"every-field-{fields['architecture']}"] = {**tm.TINY, **fields}
    out["parallel-enc-dec"] = dict(tm.PARALLEL_ENC_DEC)
    for name in PRESETS:
        cfg = load_preset(name)
        seq = min(cfg.seq_len, PRESET_SEQ)
        out[f"preset-{name}"] = {**_fields(cfg), "seq_len": seq,
                                 "batch_size": min(cfg.batch_size, PRESET_BATCH)}
    out["gpt3-4-layers"] = dict(d_model=12288, n_heads=96, d_ff=49152, n_layers=4,
                                vocab_size=50257, max_len=2048, seq_len=2048, batch_size=1)
    return out


def _fields(cfg: ModelConfig) -> dict:
    d = dict(cfg.to_dict())
    d.pop("parametrization", None)
    return d


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:24]


def record(cfg: ModelConfig) -> dict:
    """What is pinned of one prediction (cache cleared first: a fresh pass)."""
    P.clear_cache()
    # by name and kind: what is pinned is each row's prediction, not the order rows are
    # listed in (a display matter, changed on its own, e.g. experts listed one by one)
    rows = sorted(P.predict(cfg, formats=FORMATS), key=lambda r: (r.name, r.kind))
    rms = np.array([r.rms for r in rows], dtype=np.float64)
    # the scales are functions of the config's shape alone: a digest of them at 12
    # significant digits (a change within 1e-9 could only flip a digit at a rounding
    # boundary: never seen)
    scales = _digest(f"{v:.11e}" for r in rows for _k, v in sorted(r.scales.items()))
    status = {}
    for fmt in FORMATS:
        cols = [[r.formats[fmt][k] for r in rows]
                for k in ("underflow", "subnormal", "overflow")]
        status[fmt] = "".join(_STATUS[s] for s in headroom_status_array(*cols, rms))
    shares = [s for _n, s in P._pass(cfg).own_shares]
    aniso = P.stream_anisotropy(cfg)
    return {
        "rows": len(rows),
        "names": _digest(f"{r.name}\t{r.kind}\t{','.join(sorted(r.scales))}" for r in rows),
        "formulas": _digest(r.formula for r in rows),
        "norms": _digest(n for n, _s in P._pass(cfg).own_shares),
        "rms": [float(f"{v:.12g}") for v in rms.tolist()],
        "scales": scales,
        "status": status,
        "own_shares": [float(f"{v:.12g}") for v in shares],
        "anisotropy": [float(f"{v:.12g}") for _n, v in aniso],
        "aniso_norms": _digest(n for n, _s in aniso),
        "first_names": [f"{r.name}/{r.kind}" for r in rows],
    }


def compute() -> dict[str, dict]:
    """case ``name/parametrization`` → :func:`record`, for every case."""
    out = {}
    for name, fields in configs().items():
        for param in PARAMETRIZATIONS:
            out[f"{name}/{param}"] = record(ModelConfig(**{**fields, "parametrization": param}))
    return out


def _strip(rec: dict) -> dict:
    """What the file keeps (row names only as their digest)."""
    return {k: v for k, v in rec.items() if k != "first_names"}


def _close(a: float, b: float) -> bool:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    return abs(a - b) <= RTOL * max(abs(a), abs(b))


def differences(case: str, want: dict, got: dict, limit: int = 8) -> list[str]:
    """Human-readable differences of one case (empty: it matches)."""
    out = []
    for key in ("rows", "names", "formulas", "scales", "norms", "aniso_norms", "status"):
        if want[key] != got[key]:
            if key == "status":
                for fmt in FORMATS:
                    w, g = want[key][fmt], got[key][fmt]
                    bad = [i for i, (x, y) in enumerate(zip(w, g)) if x != y]
                    if bad or len(w) != len(g):
                        out.append(f"{case}: {fmt} status differs at rows "
                                   f"{[got['first_names'][i] for i in bad[:limit]]}")
            else:
                out.append(f"{case}: {key} differ ({want[key]} → {got[key]})")
    for key in ("rms", "own_shares", "anisotropy"):
        w, g = want[key], got[key]
        if len(w) != len(g):
            out.append(f"{case}: {len(w)} {key} pinned, {len(g)} now")
            continue
        bad = [i for i, (x, y) in enumerate(zip(w, g)) if not _close(x, y)]
        for i in bad[:limit]:
            label = got["first_names"][i] if key == "rms" else f"#{i}"
            out.append(f"{case}: {key} {label}: {w[i]!r} → {g[i]!r} "
                       f"({g[i] / w[i] - 1 if w[i] else math.inf:+.3g} relative)")
        if len(bad) > limit:
            out.append(f"{case}: … {len(bad) - limit} more {key} differ")
    return out


def load() -> dict[str, dict]:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


def write(recs: dict[str, dict]) -> None:
    data = {case: _strip(rec) for case, rec in recs.items()}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    # one case per line: a change of one shows as one line of the diff
    lines = [f"{json.dumps(case)}: {json.dumps(rec, separators=(',', ':'))}"
             for case, rec in data.items()]
    REFERENCE.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true",
                    help="overwrite the reference (only when predictions change on purpose)")
    args = ap.parse_args(argv)
    recs = compute()
    if args.write:
        write(recs)
        print(f"wrote {len(recs)} cases, {sum(r['rows'] for r in recs.values())} rows "
              f"to {REFERENCE}")
        return 0
    ref = load()
    diffs = [d for case, rec in recs.items() for d in (
        differences(case, ref[case], rec) if case in ref else [f"{case}: not pinned"])]
    diffs += [f"{case}: pinned, no longer computed" for case in ref if case not in recs]
    print("\n".join(diffs) if diffs else f"all {len(recs)} cases match")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
