"""Pure evaluation metrics over score arrays (fact tracing), with their shape contracts.

Why pure functions: a metric must be checkable on a hand-computed case; retraining, caching and I/O live
elsewhere and call these. Conventions (as in EleutherAI/bergson's recall evaluation): ranks are 1-based;
ties are broken by row order (the earlier training row ranks higher); a higher score ranks higher.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens for lexical baselines."""
    return _WORD.findall(text.lower())


def bm25_scores(documents: Sequence[str], queries: Sequence[str]) -> np.ndarray:
    """BM25 (Okapi, `rank_bm25`) relevance of every document to every query: ``[Q, N]`` float64.

    The lexical baseline that attribution must beat on fact tracing.
    """
    from rank_bm25 import BM25Okapi

    index = BM25Okapi([words(d) for d in documents])
    return np.stack([np.asarray(index.get_scores(words(q)), dtype=np.float64) for q in queries])
