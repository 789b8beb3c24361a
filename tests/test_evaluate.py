"""Fact-tracing metrics on hand-computed cases (1-based ranks, ties broken by row order)."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from dataworth.evaluate import bm25_scores, fact_tracing_metrics, ranks


def test_ranks_break_ties_by_row_order():
    s = np.array([[0.5, 0.9, 0.5, 0.1]])
    assert ranks(s).tolist() == [[2, 1, 3, 4]]


def test_metrics_hand_computed():
    scores = np.array([
        [0.9, 0.1, 0.5, 0.3],  # gold {2}: rank 2
        [0.2, 0.2, 0.8, 0.2],  # gold {0, 1}: ranks 2, 3 (ties by row order)
    ])
    m = fact_tracing_metrics(scores, [[2], [0, 1]], ks=(1, 2))
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == 1.0
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    # strict@2: q0 1/1, q1 only rank 2 of {2, 3} fits → 1/2
    assert m["strict_recall@2"] == pytest.approx((1 + 0.5) / 2)


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=30), st.integers(0, 1000))
def test_ranks_are_a_permutation_consistent_with_scores(values, seed):
    s = np.array([values])
    r = ranks(s)[0]
    assert sorted(r.tolist()) == list(range(1, len(values) + 1))
    for i in range(len(values)):
        for j in range(len(values)):
            if values[i] > values[j] or (values[i] == values[j] and i < j):
                assert r[i] < r[j]


def test_bm25_ranks_the_lexical_match_first():
    docs = ["the cat sat on the mat", "Alice Smith was born in Paris", "dogs bark loudly"]
    s = bm25_scores(docs, ["Where was Alice Smith born?"])
    assert int(np.argmax(s[0])) == 1
