"""The bundled corpus is the file its README describes, and byte-tokenises as documented."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import numpy as np

from unitscale_core.corpus import BYTE_VOCAB, corpus_bytes, split


def test_corpus_matches_its_readme():
    folder = resources.files("unitscale_core.resources").joinpath("corpus")
    readme = folder.joinpath("README.md").read_text(encoding="utf-8")
    digest = re.search(r"SHA-256 of the file: `([0-9a-f]{64})`", readme).group(1)
    data = folder.joinpath("tinyshakespeare.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest
    assert len(data) >= 250_000  # "a few hundred KB" (issue 8)


def test_bytes_are_ascii_tokens_and_the_split_is_fixed():
    data = corpus_bytes()
    assert data.dtype == np.uint8 and data.max() < 128 < BYTE_VOCAB and data.min() > 0
    train, validation = split("train"), split("validation")
    assert len(train) + len(validation) == len(data)
    assert np.array_equal(np.concatenate([train, validation]), data)
    assert abs(len(validation) / len(data) - 0.1) < 1e-4
