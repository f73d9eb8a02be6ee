"""Training tasks: byte-level language modelling on the corpus and three toy sequence tasks.

Every batch is a pure function of ``(seed, step)`` (:func:`batch_rng`), so a run resumed from a
checkpoint at step k draws exactly the batches an uninterrupted run would.

Tasks, by architecture (B = batch_size, T = seq_len):

``lm`` (byte tokens, needs ``vocab_size ≥ 256``; windows at random offsets of the train split)
  * decoder: next-byte prediction on a window of T + 1 bytes (inputs ``w[:-1]``, targets
    ``w[1:]``), loss on every position;
  * encoder-decoder: the encoder reads T bytes, the decoder continues the text: decoder
    inputs ``w[T-1:2T-1]`` (it starts from the last source byte), targets ``w[T:2T]``;
  * encoder (bidirectional, cannot predict the next byte): masked-byte prediction, BERT-style
    — each position is replaced by the mask id 0 (a byte the ASCII corpus never contains) with
    probability 15 % (at least one per row) and the loss is on the masked positions only.

``copy`` / ``reverse`` / ``sort`` (needs ``vocab_size ≥ 17``): a string x of n symbols drawn
uniformly from the 16 letters ``a``–``p`` (ids 0–15) and its answer y = x, x reversed or x
sorted; ``|`` (id 16) separates them. n = 16, or fewer when seq_len is short.
  * decoder: one causal sequence ``x | y`` (inputs ``x|y[:-1]``, 2n tokens, n ≤ seq_len / 2),
    loss on the n answer positions only;
  * encoder-decoder: source x, decoder inputs ``| y[:-1]``, targets y (n ≤ seq_len);
  * encoder: sequence labelling, position i predicts y_i from the whole of x (copy is the
    identity, reverse and sort need attention across the string).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .corpus import BYTE_VOCAB, byte_label, split

TASKS = ("lm", "copy", "reverse", "sort")
#: Toy alphabet: ids 0..15 shown as the letters a..p; the separator is id 16.
TOY_SYMBOLS = 16
SEPARATOR = TOY_SYMBOLS
TOY_VOCAB = TOY_SYMBOLS + 1
#: Longest toy string (symbols before the separator).
TOY_LENGTH = 16
#: Masked-byte prediction (encoder ``lm``): mask id and masking probability.
MASK_ID = 0
MASK_PROBABILITY = 0.15
#: The attention probe of ``lm`` shows at most this many bytes (a readable heatmap).
PROBE_LM_LENGTH = 64
#: Fixed seed of the toy attention probe: the same example for every run.
PROBE_SEED = 20240601


@dataclass
class Batch:
    """Token ids of one step, numpy ``int64`` arrays.

    ``inputs (B, T)``: what the (decoder or single) stack reads; ``targets (B, T)``: the id
    each position should predict; ``src (B, S)``: encoder input of an encoder-decoder model,
    else None. The loss covers positions ``answer_from:`` of every row, and, when
    ``loss_mask (B, T)`` is given, only the positions where it is True.
    """

    inputs: np.ndarray
    targets: np.ndarray
    src: np.ndarray | None = None
    answer_from: int = 0
    loss_mask: np.ndarray | None = None


def required_vocab(task: str) -> int:
    """Smallest ``vocab_size`` a task needs: 256 byte ids for ``lm``, 17 for toy tasks."""
    return BYTE_VOCAB if task == "lm" else TOY_VOCAB


def toy_length(architecture: str, seq_len: int) -> int:
    """Symbols per toy string: 16, or what fits in ``seq_len`` (a decoder holds x and y)."""
    room = seq_len // 2 if architecture == "decoder" else seq_len
    return min(TOY_LENGTH, room)


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The data generator of step ``step`` (1-based) of a run seeded ``seed``: PCG64 seeded
    with ``SeedSequence([seed, step])``, independent of every other step."""
    return np.random.default_rng([seed, step])


def toy_answer(task: str, x: np.ndarray) -> np.ndarray:
    """y for x ``(B, n)``: x itself (copy), x reversed (reverse) or x sorted (sort)."""
    if task == "copy":
        return x.copy()
    if task == "reverse":
        return x[:, ::-1].copy()
    if task == "sort":
        return np.sort(x, axis=1)
    raise ValueError(f"task={task!r} is not a toy task")


def _toy(task: str, architecture: str, x: np.ndarray) -> Batch:
    b, n = x.shape
    y = toy_answer(task, x)
    sep = np.full((b, 1), SEPARATOR, dtype=np.int64)
    if architecture == "decoder":
        tokens = np.concatenate([x, sep, y], axis=1)  # (B, 2n + 1)
        return Batch(tokens[:, :-1], tokens[:, 1:], answer_from=n)
    if architecture == "encoder-decoder":
        return Batch(np.concatenate([sep, y[:, :-1]], axis=1), y, src=x)
    return Batch(x, y)


def _lm(architecture: str, seq_len: int, rng: np.random.Generator, b: int,
        text: np.ndarray) -> Batch:
    t = seq_len
    width = {"decoder": t + 1, "encoder-decoder": 2 * t, "encoder": t}[architecture]
    offsets = rng.integers(0, len(text) - width + 1, size=b)
    w = np.stack([text[o:o + width] for o in offsets]).astype(np.int64)  # (B, width)
    if architecture == "decoder":
        return Batch(w[:, :-1], w[:, 1:])
    if architecture == "encoder-decoder":
        return Batch(w[:, t - 1:2 * t - 1], w[:, t:], src=w[:, :t])
    mask = rng.random((b, t)) < MASK_PROBABILITY
    mask[np.arange(b), rng.integers(0, t, size=b)] = True  # every row has a masked byte
    return Batch(np.where(mask, MASK_ID, w), w, loss_mask=mask)


def make_batch(task: str, architecture: str, seq_len: int, batch_size: int,
               rng: np.random.Generator) -> Batch:
    """One training batch of ``task`` for ``architecture`` (see the module docstring)."""
    if task == "lm":
        return _lm(architecture, seq_len, rng, batch_size, split("train"))
    n = toy_length(architecture, seq_len)
    x = rng.integers(0, TOY_SYMBOLS, size=(batch_size, n), dtype=np.int64)
    return _toy(task, architecture, x)


def token_label(task: str, token: int) -> str:
    """How a token id reads: a byte (``lm``) or a toy symbol ``a``–``p`` / ``|``."""
    if task == "lm":
        return "[M]" if token == MASK_ID else byte_label(token)
    return "|" if token == SEPARATOR else chr(ord("a") + token)


def probe(task: str, architecture: str, seq_len: int) -> tuple[Batch, list[str]]:
    """A fixed one-row example of the task and the labels of the tokens whose self-attention
    the attention view shows (the decoder's inputs for an encoder-decoder model).

    ``lm``: the first ``min(seq_len, 64)`` bytes of the validation split (no masking);
    toy tasks: one string drawn with :data:`PROBE_SEED`.
    """
    if task == "lm":
        text = split("validation")
        t = min(seq_len, PROBE_LM_LENGTH)
        width = {"decoder": t + 1, "encoder-decoder": 2 * t, "encoder": t}[architecture]
        w = text[:width].astype(np.int64)[None]
        if architecture == "decoder":
            batch = Batch(w[:, :-1], w[:, 1:])
        elif architecture == "encoder-decoder":
            batch = Batch(w[:, t - 1:2 * t - 1], w[:, t:], src=w[:, :t])
        else:
            batch = Batch(w, w)
    else:
        rng = np.random.default_rng(PROBE_SEED)
        n = toy_length(architecture, seq_len)
        batch = _toy(task, architecture, rng.integers(0, TOY_SYMBOLS, size=(1, n)))
    return batch, [token_label(task, int(i)) for i in batch.inputs[0]]
