"""Reference attributions that need no gradients: what a gradient method must beat (or explain losing to).

BM25 (Robertson & Zaragoza 2009) over the training documents, with the query's prompt and response as the
search text: an oracle for "which documents state this fact" when gold documents share the query's words.
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
