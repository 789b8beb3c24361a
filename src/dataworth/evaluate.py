"""Pure evaluation metrics over score arrays (fact tracing), with their shape contracts.

Why pure functions: a metric must be checkable on a hand-computed case; retraining, caching and I/O live
elsewhere and call these. Conventions (as in EleutherAI/bergson's recall evaluation): ranks are 1-based;
ties are broken by row order (the earlier training row ranks higher); a higher score ranks higher.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every row for every query. ``scores``: ``[Q, N]`` → ``[Q, N]`` int64.

    ``rank[q, n] = 1 + #{m : s[q,m] > s[q,n]} + #{m < n : s[q,m] == s[q,n]}``.
    """
    scores = np.atleast_2d(np.asarray(scores))
    # A stable sort of -score puts ties in row order.
    order = np.argsort(-scores, axis=1, kind="stable")
    out = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    out[rows, order] = np.arange(1, scores.shape[1] + 1)[None, :]
    return out


def gold_ranks(scores: np.ndarray, gold: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """For each query, the sorted 1-based ranks of its gold rows. ``gold[q]``: row positions (non-empty)."""
    r = ranks(scores)
    if len(gold) != r.shape[0]:
        raise ValueError(f"{len(gold)} gold lists for {r.shape[0]} queries")
    out = []
    for q, g in enumerate(gold):
        if len(g) == 0:
            raise ValueError(f"query {q} has no gold rows")
        out.append(np.sort(r[q, np.asarray(g, dtype=np.int64)]))
    return out


def fact_tracing_metrics(scores: np.ndarray, gold: Sequence[Sequence[int]], ks: Sequence[int] = (1, 10)) -> dict:
    """Recall@k, strict recall@k and MRR of gold rows under ``scores`` ``[Q, N]``.

    - ``recall@k``: fraction of queries with at least one gold row in the top k.
    - ``strict_recall@k``: mean over queries of ``|gold ∩ top-k| / min(|gold|, k)`` (1 only when every gold
      row that could fit in the top k is there).
    - ``mrr``: mean over queries of ``1 / rank of the best-ranked gold row``.
    """
    gr = gold_ranks(scores, gold)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([g[0] <= k for g in gr]))
        out[f"strict_recall@{k}"] = float(np.mean([(g <= k).sum() / min(len(g), k) for g in gr]))
    out["mrr"] = float(np.mean([1.0 / g[0] for g in gr]))
    return out


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
