"""Pure evaluation metrics over score arrays (fact tracing), with their shape contracts.

Why pure functions: a metric must be checkable on a hand-computed case; retraining, caching and I/O live
elsewhere and call these. Conventions (as in EleutherAI/bergson's recall evaluation): ranks are 1-based;
ties are broken by row order (the earlier training row ranks higher); a higher score ranks higher.
"""

from __future__ import annotations

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
    return [np.sort(r[q, g]) for q, g in enumerate(row_lists(gold, r.shape[0], "gold"))]


def row_lists(rows: Sequence[Sequence[int]], n_queries: int, what: str) -> list[np.ndarray]:
    """``rows`` as one int64 array per query, checked: one list per query, none empty (``what`` names them)."""
    if len(rows) != n_queries:
        raise ValueError(f"{len(rows)} {what} lists for {n_queries} queries")
    for q, chosen in enumerate(rows):
        if len(chosen) == 0:
            raise ValueError(f"query {q} has no {what} rows")
    return [np.asarray(chosen, dtype=np.int64) for chosen in rows]


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


def _spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-column Spearman correlation of ``x [M, Q]`` and ``y [M, Q]`` → ``[Q]`` (NaN where a column is constant)."""
    from scipy.stats import spearmanr

    out = np.full(x.shape[1], np.nan)
    for q in range(x.shape[1]):
        if np.ptp(x[:, q]) == 0 or np.ptp(y[:, q]) == 0:
            continue  # Spearman is undefined for a constant column; NaN says so (counted by lds_summary)
        out[q] = spearmanr(x[:, q], y[:, q]).statistic
    return out


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Datamodel predictions ``g [M, Q]``: ``g[m, q] = Σ_n masks[m, n] · scores[q, n]`` (float64)."""
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(f"scores {scores.shape} and masks {masks.shape} must be [Q, N] and [M, N]")
    return masks.astype(np.float64) @ scores.T


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per-query LDS ``[Q]``: ``Spearman_m(Σ_{n∈S_m} scores[q, n], −losses[m, q])``.

    ``scores [Q, N]`` (positive = helps = lowers the loss), ``masks [M, N]`` bool (row n in subset m),
    ``losses [M, Q]`` measured query losses of the model retrained on subset m (average replicates first,
    or pass ``[R, M, Q]`` and they are averaged). NaN for a query whose predictions or losses are constant.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim == 3:
        losses = losses.mean(axis=0)
    predictions = subset_predictions(scores, masks)
    if losses.shape != predictions.shape:
        raise ValueError(f"losses {losses.shape} must be [M, Q] = {predictions.shape}")
    return _spearman_columns(predictions, -losses)


def noise_ceiling(losses_a: np.ndarray, losses_b: np.ndarray) -> np.ndarray:
    """Per-query Spearman ``[Q]`` between two retrain sets on the same subsets with different seeds.

    ``losses_a``, ``losses_b``: ``[M, Q]``. How well one retrain set predicts another: the LDS that any
    attribution can hope to reach against a single retrain set is of this order (training noise, not the
    method, limits it).
    """
    losses_a, losses_b = np.asarray(losses_a, dtype=np.float64), np.asarray(losses_b, dtype=np.float64)
    if losses_a.shape != losses_b.shape or losses_a.ndim != 2:
        raise ValueError(f"losses_a {losses_a.shape} and losses_b {losses_b.shape} must both be [M, Q]")
    return _spearman_columns(losses_a, losses_b)


def bootstrap_interval(values: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped), resampling with replacement.

    ``n`` resamples from ``numpy.random.default_rng(seed)``; returns ``(lo, hi)`` at quantiles
    ``(1 − level)/2`` and ``(1 + level)/2``. ``(nan, nan)`` when no finite value is left.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def lds_summary(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray, n_bootstrap: int = 1000,
                seed: int = 0) -> dict:
    """The printed LDS figures: ``lds`` (mean over queries), ``lds_ci_low`` / ``lds_ci_high`` (bootstrap over
    queries), ``noise_ceiling`` ρ (replicate 0 vs 1, mean over queries; NaN with one replicate),
    ``lds_ceiling`` ≈ ``sqrt(Rρ / (1 + (R−1)ρ))`` — the correlation a perfect predictor of the *expected*
    loss would reach against the mean of R replicates (classical test theory: Spearman–Brown reliability of
    the R-mean, whose square root bounds a correlation; an approximation for rank correlations) — and
    ``lds_undefined`` (queries with a constant column, left out of the mean and counted here).

    ``losses``: ``[R, M, Q]`` (replicates) or ``[M, Q]``; the LDS uses the replicate mean.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim == 2:
        losses = losses[None]
    per_query = lds(scores, masks, losses.mean(axis=0))
    lo, hi = bootstrap_interval(per_query, n=n_bootstrap, seed=seed)
    ceiling, lds_ceiling = float("nan"), float("nan")
    if losses.shape[0] >= 2:
        ceiling = float(np.nanmean(noise_ceiling(losses[0], losses[1])))
        r = losses.shape[0]
        reliability = r * ceiling / (1 + (r - 1) * ceiling)
        lds_ceiling = float(np.sqrt(reliability)) if reliability > 0 else 0.0
    finite = per_query[np.isfinite(per_query)]
    return {"lds": float(finite.mean()) if finite.size else float("nan"), "lds_ci_low": lo, "lds_ci_high": hi,
            "noise_ceiling": ceiling, "lds_ceiling": lds_ceiling, "lds_undefined": int(per_query.size - finite.size),
            "queries": int(per_query.size), "subsets": int(losses.shape[1]), "replicates": int(losses.shape[0])}


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """``[Q, k]`` positions of each query's ``k`` highest-scoring rows (ties by row order, as `ranks`)."""
    scores = np.atleast_2d(np.asarray(scores))
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in 1..{scores.shape[1]}, got {k}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def removal_summary(base: np.ndarray, top: np.ndarray, random: np.ndarray) -> dict:
    """Query-loss increases after removing each query's top-attributed rows vs as many random rows.

    ``base [Q]``: query losses retrained on all rows; ``top [Q]``: retrained without that query's top rows;
    ``random [D, Q]``: retrained without D random draws of as many rows. Returns ``top_increase`` (mean of
    ``top − base``), ``random_increase`` (mean over draws and queries of ``random − base``), ``ratio``
    (top / random increase; NaN when the random increase is 0) and ``top_beats_random`` (fraction of
    queries whose top-removal increase exceeds their mean random-removal increase).
    """
    base, top = np.asarray(base, dtype=np.float64), np.asarray(top, dtype=np.float64)
    random = np.atleast_2d(np.asarray(random, dtype=np.float64))
    if top.shape != base.shape or random.shape[1:] != base.shape:
        raise ValueError(f"base {base.shape}, top {top.shape} must be [Q] and random {random.shape} [D, Q]")
    top_inc = top - base
    random_inc = (random - base[None]).mean(axis=0)
    ti, ri = float(top_inc.mean()), float(random_inc.mean())
    return {"top_increase": ti, "random_increase": ri, "ratio": ti / ri if ri != 0 else float("nan"),
            "top_beats_random": float(np.mean(top_inc > random_inc))}


def mean_effect(effects: np.ndarray, rows: Sequence[Sequence[int]]) -> float:
    """Mean over queries of the mean of ``effects[q, n]`` over that query's rows ``rows[q]`` (non-empty).

    ``effects [Q, N]``: e.g. ``evaluation.effects.one_step_effects`` (nats of query-loss decrease).
    """
    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    chosen = row_lists(rows, effects.shape[0], "chosen")
    return float(np.mean([effects[q, c].mean() for q, c in enumerate(chosen)]))


def tail_patch(scores: np.ndarray, effects: np.ndarray, k: int) -> float:
    """Tail-patch@k: how much one more training step on each of a query's top-k rows helps it, on average.

    ``tail_patch = (1/Q) Σ_q (1/k) Σ_{n ∈ top_k(scores[q])} effects[q, n]`` with ``scores [Q, N]`` (higher
    ranks higher; ties by row order, as `ranks`) and ``effects [Q, N]`` the measured effect of one step on
    row n (``evaluation.effects.one_step_effects``: positive = the step raises log p(answer), in nats). Independent of
    any gold labels: a method that retrieves the documents stating a fact can still score low here.
    """
    scores, effects = np.atleast_2d(np.asarray(scores)), np.atleast_2d(np.asarray(effects))
    if scores.shape != effects.shape:
        raise ValueError(f"scores {scores.shape} and effects {effects.shape} must both be [Q, N]")
    return mean_effect(effects, top_k_rows(scores, k))


def rival_metrics(scores: np.ndarray, gold: Sequence[Sequence[int]], rivals: Sequence[Sequence[int]],
                  k: int = 10) -> dict:
    """How much *rivals* — documents stating the same kind of fact about someone else (same template, other
    person) — crowd out the gold documents, and how often gold documents count as harmful.

    ``scores`` ``[Q, N]``; ``gold[q]`` / ``rivals[q]``: row positions (gold non-empty; rivals may be empty
    and never overlap gold). Returns, as means over queries (a query without rivals counts 0 for the
    rival figures):

    - ``rivals@k``: share of the top-``k`` rows (ties by row order) that are rivals;
    - ``rivals_above_gold``: share of the query's rivals ranked above its best-ranked gold row;
    - ``gold_negative``: share of the (query, gold row) pairs with a score below 0 ("hurts").

    Grosse et al. 2023 ("Studying Large Language Model Generalization with Influence Functions") saw LLM
    influence follow surface templates; these figures say how much it does here.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    q_ranks = ranks(scores)
    gold_l = row_lists(gold, scores.shape[0], "gold")
    rival_l = [np.asarray(r, dtype=np.int64) for r in rivals]
    if len(rival_l) != scores.shape[0]:
        raise ValueError(f"rivals: expected {scores.shape[0]} lists, got {len(rival_l)}")
    top_share, above, negative = [], [], []
    for q, (g, r) in enumerate(zip(gold_l, rival_l)):
        if np.intersect1d(g, r).size:
            raise ValueError(f"query {q}: rows {np.intersect1d(g, r)[:3].tolist()} are both gold and rivals")
        best_gold = q_ranks[q, g].min()
        top_share.append(np.count_nonzero(q_ranks[q, r] <= k) / k if r.size else 0.0)
        above.append(np.count_nonzero(q_ranks[q, r] < best_gold) / r.size if r.size else 0.0)
        negative.append(np.count_nonzero(scores[q, g] < 0) / g.size)
    return {f"rivals@{k}": float(np.mean(top_share)), "rivals_above_gold": float(np.mean(above)),
            "gold_negative": float(np.mean(negative))}


def sample_pairs(rows: Sequence[Sequence[int]], n_pairs: int, seed: int | Sequence[int]) -> np.ndarray:
    """``[S, 2]`` int64 ``(query, row)`` pairs drawn uniformly without replacement from the population
    ``U = {(q, n) : n ∈ rows[q]}`` (``numpy.random.default_rng(seed)``), in population order;
    ``S = min(n_pairs, |U|)`` — all of ``U`` when it is that small.
    """
    population = np.array([(q, int(n)) for q, chosen in enumerate(rows) for n in chosen], dtype=np.int64)
    if n_pairs < 2:
        raise ValueError(f"a sample needs at least 2 pairs (for its variance), got {n_pairs}")
    if n_pairs >= len(population):
        return population
    keep = np.random.default_rng(seed).choice(len(population), size=n_pairs, replace=False)
    return population[np.sort(keep)]


def sampled_mean_effect(effects: np.ndarray, rows: Sequence[Sequence[int]], pairs: np.ndarray,
                        confidence: float = 0.95) -> tuple[float, float]:
    """``(estimate, half_width)`` of ``mean_effect(effects, rows)`` from the measured ``pairs`` alone.

    ``mean_effect = Σ_{i ∈ U} w_i e_i`` over ``U = {(q, n) : n ∈ rows[q]}`` with ``w_i = 1 / (Q·|rows[q]|)``.
    ``pairs [S, 2]`` is a uniform sample of ``U`` without replacement (`sample_pairs`); with ``y_i = w_i e_i``::

        T̂ = |U|/S · Σ_{i ∈ s} y_i        Var(T̂) ≈ |U|² (1 − S/|U|) s²_y / S     (s²_y: sample variance, ddof 1)

    (Horvitz–Thompson for equal inclusion probabilities, with the finite-population correction), and the
    half-width is ``t_{(1+confidence)/2, S−1} · √Var``: 0 when the sample is all of ``U`` (then ``T̂`` is exact).
    Only ``effects`` at ``pairs`` are read (the rest may be NaN).
    """
    from scipy.stats import t as student_t

    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    chosen = row_lists(rows, effects.shape[0], "chosen")
    weight = {(q, int(n)): 1.0 / (len(chosen) * len(c)) for q, c in enumerate(chosen) for n in c}
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    keys = [(int(q), int(n)) for q, n in pairs]
    if len(set(keys)) != len(keys) or any(k not in weight for k in keys):
        raise ValueError("pairs must be distinct (query, row) pairs of the population rows defines")
    if len(keys) < 2:
        raise ValueError(f"a sample needs at least 2 pairs, got {len(keys)}")
    y = np.array([weight[k] for k in keys]) * effects[pairs[:, 0], pairs[:, 1]]
    size, n = len(weight), len(y)
    estimate = size / n * float(y.sum())
    if n == size:
        return estimate, 0.0
    variance = size ** 2 * (1 - n / size) * float(y.var(ddof=1)) / n
    return estimate, float(student_t.ppf((1 + confidence) / 2, n - 1) * np.sqrt(variance))
