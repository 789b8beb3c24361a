"""Pure metrics on hand-computed cases: fact tracing (1-based ranks, ties by row order), LDS, noise ceiling,
bootstrap interval, removal summaries."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataworth.evaluation.baselines import bm25_scores
from dataworth.evaluation.metrics import (
    bootstrap_interval,
    fact_tracing_metrics,
    lds,
    lds_summary,
    mean_effect,
    noise_ceiling,
    ranks,
    removal_summary,
    rival_metrics,
    sample_pairs,
    sampled_mean_effect,
    subset_predictions,
    tail_patch,
    top_k_rows,
)


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


# ------------------------------------------------------------------------ LDS and removal (pure)

def test_lds_hand_computed_spearman():
    scores = np.array([[1.0, 2.0, 3.0]])
    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=bool)
    assert subset_predictions(scores, masks)[:, 0].tolist() == [1, 2, 3, 6]
    # −loss ranks [2, 1, 3, 4] vs prediction ranks [1, 2, 3, 4]: Σd² = 2 → ρ = 1 − 6·2/(4·15) = 0.8
    losses = -np.array([[2.0], [1.0], [3.0], [4.0]])
    assert lds(scores, masks, losses)[0] == pytest.approx(0.8)
    # Lower loss where the prediction is higher is agreement (+1); the flipped sign is −1.
    losses = np.array([[4.0], [3.0], [2.0], [1.0]])
    assert lds(scores, masks, losses)[0] == pytest.approx(1.0)
    assert lds(-scores, masks, losses)[0] == pytest.approx(-1.0)


def test_lds_averages_replicates_and_is_nan_for_constant_predictions():
    scores = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=bool)
    a = np.array([[5.0, 1], [4, 2], [1, 3], [3, 4]])
    b = np.array([[5.0, 1], [2, 2], [3, 3], [1, 4]])
    per_query = lds(scores, masks, np.stack([a, b]))
    np.testing.assert_allclose(per_query[0], lds(scores, masks, (a + b) / 2)[0])
    assert np.isnan(per_query[1])
    summary = lds_summary(scores, masks, np.stack([a, b]), n_bootstrap=50)
    assert summary["lds_undefined"] == 1 and summary["lds"] == pytest.approx(per_query[0])


def test_noise_ceiling_hand_computed():
    a = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    b = np.array([[10.0, 4.0], [20.0, 3.0], [40.0, 1.0], [30.0, 2.0]])
    ceiling = noise_ceiling(a, b)
    assert ceiling[0] == pytest.approx(0.8)  # ranks [1,2,4,3]: Σd² = 2
    assert ceiling[1] == pytest.approx(-0.8)  # ranks [4,3,1,2] vs [1,2,3,4]: Σd² = 18 → 1 − 108/60
    assert np.isnan(lds_summary(np.ones((2, 3)), np.eye(3, dtype=bool)[[0, 1, 2, 0]], a)["noise_ceiling"])
    # Both columns agree at ρ = 0.8: the ceiling of the 2-seed mean is sqrt(2ρ / (1 + ρ)).
    both = np.stack([a, np.stack([b[:, 0], b[:, 0]], axis=1)])
    summary = lds_summary(np.ones((2, 3)), np.eye(3, dtype=bool)[[0, 1, 2, 0]], both)
    assert summary["noise_ceiling"] == pytest.approx(0.8)
    assert summary["lds_ceiling"] == pytest.approx(np.sqrt(1.6 / 1.8))


def test_bootstrap_interval_matches_a_plain_loop_and_brackets_the_mean():
    values = np.array([0.1, 0.5, 0.2, 0.9, np.nan, 0.4])
    lo, hi = bootstrap_interval(values, n=200, seed=3)
    finite = values[np.isfinite(values)]
    rng = np.random.default_rng(3)
    idx = rng.integers(0, finite.size, size=(200, finite.size))
    means = [finite[row].mean() for row in idx]
    assert (lo, hi) == (pytest.approx(np.quantile(means, 0.025)), pytest.approx(np.quantile(means, 0.975)))
    assert lo <= finite.mean() <= hi
    assert bootstrap_interval(np.full(5, 0.3)) == (pytest.approx(0.3), pytest.approx(0.3))
    assert all(np.isnan(bootstrap_interval(np.array([np.nan]))))


def test_removal_summary_hand_computed():
    base = np.array([1.0, 2.0])
    top = np.array([3.0, 2.5])  # increases 2.0, 0.5
    random = np.array([[1.5, 2.0], [0.5, 3.0]])  # per query mean increase: 0.0, 0.5
    s = removal_summary(base, top, random)
    assert s["top_increase"] == pytest.approx(1.25)
    assert s["random_increase"] == pytest.approx(0.25)
    assert s["ratio"] == pytest.approx(5.0)
    assert s["top_beats_random"] == pytest.approx(0.5)  # query 1 ties: not a win


def test_top_k_rows_breaks_ties_by_row_order():
    assert top_k_rows(np.array([[0.5, 0.9, 0.5, 0.1]]), 3).tolist() == [[1, 0, 2]]


def test_tail_patch_hand_computed_with_ties_by_row_order():
    scores = np.array([
        [0.9, 0.1, 0.5, 0.5],  # top-2: rows 0, 2 (row 2 beats row 3 on the tie)
        [0.0, 0.0, 0.0, 1.0],  # top-2: rows 3, 0
    ])
    effects = np.array([
        [1.0, 100.0, -3.0, 7.0],
        [4.0, 5.0, 6.0, -2.0],
    ])
    # q0: (1 − 3)/2 = −1; q1: (−2 + 4)/2 = 1 → mean 0.  k = 1: q0 1, q1 −2 → −0.5
    assert tail_patch(scores, effects, 2) == pytest.approx(0.0)
    assert tail_patch(scores, effects, 1) == pytest.approx(-0.5)
    # the effects as scores give the largest possible value (the one-step oracle)
    assert tail_patch(effects, effects, 2) == pytest.approx(((100 + 7) / 2 + (6 + 5) / 2) / 2)


def _population(seed: int = 0):
    """Effects [6, 40] and per-query row lists of unequal sizes (10 rows, or 2-3 like bios gold rows)."""
    rng = np.random.default_rng(seed)
    effects = rng.standard_t(3, size=(6, 40)) * 0.1 + rng.normal(size=(6, 1))
    rows = [rng.choice(40, size=10 if q % 2 else 2 + q % 3, replace=False).tolist() for q in range(6)]
    return effects, rows


def test_sampled_mean_effect_hand_computed():
    """U = {(0,0), (0,1), (1,2)}, w = 1/4, 1/4, 1/2; sample {(0,0), (1,2)}: y = 1/4·2, 1/2·6 = 0.5, 3;
    T̂ = 3/2 · 3.5 = 5.25; Var = 9 · (1 − 2/3) · s²/2 with s² = (3 − 0.5)²/2 = 3.125 → 4.6875."""
    from scipy.stats import t

    effects = np.array([[2.0, 4.0, 0.0], [0.0, 0.0, 6.0]])
    estimate, half = sampled_mean_effect(effects, [[0, 1], [2]], np.array([[0, 0], [1, 2]]))
    assert estimate == pytest.approx(5.25)
    assert half == pytest.approx(t.ppf(0.975, 1) * np.sqrt(4.6875))
    # the whole population: the exact mean, no interval
    assert sampled_mean_effect(effects, [[0, 1], [2]], np.array([[0, 0], [0, 1], [1, 2]])) == (
        pytest.approx(mean_effect(effects, [[0, 1], [2]])), 0.0)


def test_sampled_interval_covers_the_exact_mean_about_95_percent_of_the_time():
    effects, rows = _population()
    exact = mean_effect(effects, rows)
    unmeasured = np.full_like(effects, np.nan)  # only the sampled entries may be read
    hits = []
    for seed in range(400):
        pairs = sample_pairs(rows, 14, seed)
        assert len(pairs) == 14 and len({tuple(p) for p in pairs}) == 14
        view = unmeasured.copy()
        view[pairs[:, 0], pairs[:, 1]] = effects[pairs[:, 0], pairs[:, 1]]
        estimate, half = sampled_mean_effect(view, rows, pairs)
        hits.append(abs(estimate - exact) <= half)
    assert 0.90 <= np.mean(hits) <= 0.99, np.mean(hits)
    # seeded: the same pairs again; more pairs than the population: all of it
    assert np.array_equal(sample_pairs(rows, 14, 3), sample_pairs(rows, 14, 3))
    assert len(sample_pairs(rows, 10_000, 0)) == sum(len(r) for r in rows)


def test_sampled_mean_effect_refuses_pairs_outside_the_population_and_repeats():
    effects, rows = _population()
    outside = next(n for n in range(40) if n not in rows[0])
    with pytest.raises(ValueError, match="distinct"):
        sampled_mean_effect(effects, rows, np.array([[0, rows[0][0]], [0, outside]]))
    with pytest.raises(ValueError, match="distinct"):
        sampled_mean_effect(effects, rows, np.array([[0, rows[0][0]], [0, rows[0][0]]]))
    with pytest.raises(ValueError, match="at least 2"):
        sample_pairs(rows, 1, 0)


def test_tail_patch_refuses_mismatched_shapes_and_bad_k():
    with pytest.raises(ValueError):
        tail_patch(np.zeros((2, 3)), np.zeros((2, 4)), 1)
    with pytest.raises(ValueError):
        tail_patch(np.zeros((2, 3)), np.zeros((2, 3)), 4)


def test_mean_effect_averages_within_then_across_queries():
    effects = np.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    assert mean_effect(effects, [[0, 2], [1]]) == pytest.approx((2.0 + 20.0) / 2)
    with pytest.raises(ValueError):
        mean_effect(effects, [[0], []])


def test_rival_metrics_on_a_hand_computed_case():
    # query 0: ranks by score: row3 (0.9) > row1 (0.5) > row0 (0.2) > row2 (-0.1); gold {0, 2}; rivals {1, 3}
    # query 1: ranks: row0 (1.0) > row2 (0.0) = row3 (0.0, later row) > row1 (-2); gold {0}; no rivals
    scores = np.array([[0.2, 0.5, -0.1, 0.9], [1.0, -2.0, 0.0, 0.0]])
    got = rival_metrics(scores, [[0, 2], [0]], [[1, 3], []], k=2)
    assert got == {"rivals@2": (2 / 2 + 0) / 2, "rivals_above_gold": (2 / 2 + 0) / 2,
                   "gold_negative": (1 / 2 + 0) / 2}
    # k larger than the rivals: the share is of k
    assert rival_metrics(scores, [[0, 2], [0]], [[1, 3], []], k=4)["rivals@4"] == (2 / 4) / 2


def test_rival_metrics_refuse_a_row_that_is_gold_and_rival():
    with pytest.raises(ValueError, match="both gold and rivals"):
        rival_metrics(np.zeros((1, 3)), [[0]], [[0, 1]])
