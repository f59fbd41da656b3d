"""English text for the demo's language model, read from Python's own documentation.

Real multimodal LLMs start from a language model trained on text; a demo whose
language model only ever saw forty task words has no general ability to lose and
shrugs off pruning. The text here is ``pydoc_data.topics`` (the help texts that
``help("if")`` prints: ~120,000 words of English prose with code), which every
CPython ships, so training needs no download and nothing is copied into the package.

It is lower-cased and split into words, single digits and punctuation marks
(``words``); the demo's tokenizer keeps the commonest of them. The text differs a
little between Python versions, so ``corpus_fingerprint`` is recorded beside the
trained weights.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from functools import lru_cache

import numpy as np
import torch

__all__ = ["corpus_fingerprint", "corpus_words", "frequent_words", "text_windows"]

_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


@lru_cache(maxsize=1)
def _text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics)).lower()


def corpus_words() -> list[str]:
    """The corpus as a list of words, digits and punctuation marks, in reading order."""
    return _WORD.findall(_text())


def corpus_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the corpus text: which text the weights saw."""
    return hashlib.sha256(_text().encode()).hexdigest()[:16]


def frequent_words(count: int, exclude=()) -> list[str]:
    """The ``count`` commonest corpus words not in ``exclude`` (ties: first seen first)."""
    excluded = set(exclude)
    # Counter.most_common keeps first-seen order among equal counts: reproducible.
    return [w for w, _ in Counter(corpus_words()).most_common() if w not in excluded][:count]


def text_windows(ids: torch.Tensor, length: int, batch: int, rng: np.random.Generator,
                 bos_id: int) -> torch.Tensor:
    """``[batch, length]`` token windows at random places of ``ids``, each starting with ``bos_id``."""
    starts = rng.integers(0, len(ids) - length, size=batch)
    rows = torch.stack([ids[s : s + length - 1] for s in starts.tolist()])
    return torch.cat([torch.full((batch, 1), bos_id, dtype=ids.dtype), rows], 1)
