"""The training corpus shipped in ``resources/corpus``, byte-tokenised.

The text is the start of Karpathy's "tiny Shakespeare" (public domain; see
``resources/corpus/README.md``). Tokenisation is byte-level: token id = the byte's value
(0–255), so a model needs ``vocab_size ≥ 256`` to read it. The text is plain ASCII, so ids
≥ 128 and id 0 never occur; the encoder's masked-prediction task uses id 0 as its mask.

The split is fixed: the first 90 % of the bytes train, the last 10 % validate
(:data:`VALIDATION_FRACTION`), cut at a byte boundary that does not depend on any setting.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

CORPUS_FILE = "tinyshakespeare.txt"
#: Byte-level tokens: one id per byte value.
BYTE_VOCAB = 256
#: The last tenth of the corpus is held out for validation.
VALIDATION_FRACTION = 0.1


@lru_cache(maxsize=1)
def corpus_bytes() -> np.ndarray:
    """The whole corpus as ``uint8`` token ids (read-only array)."""
    path = resources.files("unitscale_core.resources").joinpath("corpus", CORPUS_FILE)
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    data.flags.writeable = False
    return data


def split(part: str) -> np.ndarray:
    """``"train"`` (first 90 %) or ``"validation"`` (last 10 %) of :func:`corpus_bytes`."""
    data = corpus_bytes()
    cut = int(len(data) * (1.0 - VALIDATION_FRACTION))
    if part == "train":
        return data[:cut]
    if part == "validation":
        return data[cut:]
    raise ValueError(f"part={part!r} is not one of train, validation")


def byte_label(token: int) -> str:
    """A printable label for a byte token: the character, ``␣`` for space, ``↵`` for newline,
    ``\\xNN`` for other control bytes."""
    if token == 32:
        return "␣"
    if token == 10:
        return "↵"
    if 32 < token < 127:
        return chr(token)
    return f"\\x{token:02x}"
