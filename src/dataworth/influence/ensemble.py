"""Checkpoint ensembles: one scores run from the weighted mean of several runs over the same queries and rows.

Why: on real text the final checkpoint is a poor one to attribute with, and the mean of the scores taken at a
few checkpoints of one training run (TRAK's model ensemble, TracIn's sum over checkpoints) raised LDS more
than any single-model option, for dataworth and Kronfluence alike (README, "Checkpoint ensembles, weighted").
A user who kept checkpoints extracts, fits and scores (``--full``) at each, then `combine_scores` averages them::

    s(q, n) = Σ_c w_c s_c(q, n)          w_c ≥ 0, Σ_c w_c = 1 (given weights are normalised)

optionally with each run's scores of a query divided by their standard deviation over the rows first
(``standardise``). TracIn (Pruthi et al. 2020) weights each checkpoint by the learning rate of the training
it stands for: ``w_c ∝ Σ η`` over the steps between the previous checkpoint and this one.

Each run must hold its full matrix (``dataworth score --full``), the same queries in the same order, the
same mode and curvature kind, and be computed on a store with the same row ids in the same order (every
store is opened and checked against its run's recorded digest). The result is an ordinary scores
directory: exact top-k (ties to the lower row), the full matrix, and a summary whose ``store``, ``model`` and
``curvature`` are the *last* run's (list the final checkpoint last), so `value` and `report` read it as
they read any run. The matrices are read in query batches sized to ``COMBINE_BUDGET_MB`` of buffers,
whatever the number of runs.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataworth.errors import InputError
from dataworth.influence.scores import (
    SCORES_FILES,
    SCORES_FORMAT,
    SCORES_VERSION,
    Scores,
    StreamingTopK,
    load_scores,
    open_scores_store,
    prepare_scores_dir,
    topk_table,
)

# A query batch holds every run's float32 slice, the float64 sum and a float64 part: about this many MiB.
COMBINE_BUDGET_MB = 128
COLUMN_BLOCK = 65536  # columns merged into the top-k at a time


def parse_weights(text: str | Sequence[float] | None, n_runs: int) -> np.ndarray:
    """``[C]`` float64 weights summing to 1: equal when ``text`` is None, else ``n_runs`` comma-separated (or
    listed) finite numbers ≥ 0, not all 0. InputError naming ``--weights`` otherwise."""
    if text is None:
        return np.full(n_runs, 1.0 / n_runs)
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    try:
        values = np.array([float(p) for p in parts], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"--weights: expected {n_runs} comma-separated numbers, got {text!r}") from None
    if len(values) != n_runs:
        raise InputError(f"--weights: {len(values)} weights for {n_runs} scores runs; give one per run")
    if not np.isfinite(values).all() or (values < 0).any():
        raise InputError(f"--weights: weights must be finite and >= 0, got {text!r}")
    if values.sum() <= 0:
        raise InputError("--weights: at least one weight must be > 0")
    return values / values.sum()


def ensemble_scores(parts: Sequence[np.ndarray], weights: np.ndarray, standardise: bool = False) -> np.ndarray:
    """``Σ_c w_c s_c`` ``[Q, N]`` float64 of the runs' score slices ``parts`` (each ``[Q, N]``, the same queries).

    ``standardise``: each run's row of scores for a query is first divided by its standard deviation over the
    ``N`` training rows (a row of equal scores is left as it is), so that every checkpoint casts a vote of
    the same size per query whatever the scale of its gradients and curvature (later checkpoints score
    larger: 184 → 232 mean |s| over four checkpoints of the real-text GPT-2).
    """
    total = np.zeros(np.shape(parts[0]), dtype=np.float64)
    for weight, part in zip(weights, parts):
        part = np.asarray(part, dtype=np.float64)
        if standardise:
            spread = part.std(axis=1, keepdims=True)
            part = part / np.where(spread > 0, spread, 1.0)
        total += weight * part
    return total


def combine_scores(runs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   weights: str | Sequence[float] | None = None, standardise: bool = False,
                   top_k: int | None = None) -> Scores:
    """``dw.combine_scores``: the weighted mean of the full score matrices of ``runs`` (scores directories,
    each from ``dataworth score --full``), saved to ``out`` as one scores run; see the module docstring.

    ``weights``: one per run (normalised to sum 1; default equal). ``standardise``: divide each run's scores
    by their spread over the rows, per query, first (`ensemble_scores`). ``top_k``: rows kept per query and
    direction (default: the largest any run kept, clamped to the row count).
    """
    started = time.perf_counter()
    if len(runs) < 2:
        raise InputError(f"combine: give at least two scores directories, got {len(runs)}")
    w = parse_weights(weights, len(runs))
    target = Path(out).resolve()
    if any(Path(r).resolve() == target for r in runs):
        raise InputError(f"--out {out}: is one of the runs being combined; write the ensemble elsewhere")
    loaded = [load_scores(r) for r in runs]
    first, last = loaded[0], loaded[-1]
    train_ids = [str(i) for i in open_scores_store(first).ids]
    for run, scores in zip(runs, loaded):  # one store's ids held at a time besides the first's
        _check_compatible(Path(run), scores, open_scores_store(scores), first, train_ids, Path(runs[0]))
    n_queries, n_rows = len(first.query_ids), len(train_ids)
    k = min(int(top_k) if top_k is not None else max(int(s.summary.get("top_k", 1)) for s in loaded), n_rows)
    if k < 1:
        raise InputError(f"--top-k: must be >= 1, got {top_k}")

    staging = prepare_scores_dir(out)
    try:
        matrix = np.lib.format.open_memmap(staging / SCORES_FILES["matrix"], mode="w+", dtype=np.float32,
                                           shape=(n_queries, n_rows))
        positive, negative = _weighted_mean_into(matrix, runs, loaded, w, k, standardise)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    table = topk_table(first.query_ids, train_ids, positive, negative)
    summary = {
        "format": SCORES_FORMAT,
        "version": SCORES_VERSION,
        "store": last.summary.get("store"),
        "store_digest": last.summary.get("store_digest"),
        "model": last.summary.get("model"),
        "queries": last.summary.get("queries"),
        "curvature": last.summary.get("curvature"),
        "mode": last.summary.get("mode"),
        "sign": last.summary.get("sign"),
        "n_queries": n_queries,
        "n_rows": n_rows,
        "top_k": k,
        "full": True,
        "self_influence": False,
        "ensemble": [{"scores": str(Path(r).resolve()), "run_id": s.summary.get("run_id"),
                      "store": s.summary.get("store"), "weight": float(wc)}
                     for r, s, wc in zip(runs, loaded, w)],
        "standardised": bool(standardise),
        "notes": [f"weighted mean of {len(runs)} scores runs (weights {', '.join(f'{x:.4g}' for x in w)}"
                  + (", each standardised per query" if standardise else "") + ")"],
        "timings": {"total_s": round(time.perf_counter() - started, 6)},
    }
    result = Scores(table=table, summary=summary, query_ids=list(first.query_ids), matrix=matrix)
    result.save(out, staging=staging)
    return result


def _check_compatible(run: Path, scores: Scores, store, first: Scores, train_ids: list[str], first_run: Path) -> None:
    """InputError naming ``run`` and the first field in which it differs from the first run: missing matrix,
    queries, row ids (of its store), mode, curvature kind."""
    if scores.matrix is None:
        raise InputError(f"{run}: holds no full matrix (scores.npy); re-run `dataworth score --full` there")
    if list(scores.query_ids) != list(first.query_ids):
        i = next((i for i, (a, b) in enumerate(zip(scores.query_ids, first.query_ids)) if a != b),
                 min(len(scores.query_ids), len(first.query_ids)))
        raise InputError(f"{run}: queries differ from {first_run}'s at query {i} "
                         f"({len(scores.query_ids)} vs {len(first.query_ids)} queries); score the same queries")
    ids = [str(i) for i in store.ids]
    if ids != train_ids:
        i = next((i for i, (a, b) in enumerate(zip(ids, train_ids)) if a != b), min(len(ids), len(train_ids)))
        got = ids[i] if i < len(ids) else "(none)"
        want = train_ids[i] if i < len(train_ids) else "(none)"
        raise InputError(f"{run}: its store {store.path} has row {i} = {got!r} where {first_run}'s store has "
                         f"{want!r}; extract every checkpoint from the same data")
    if scores.matrix.shape != (len(first.query_ids), len(ids)):
        raise InputError(f"{run}/scores.npy: shape {tuple(scores.matrix.shape)}, expected "
                         f"({len(first.query_ids)}, {len(ids)}); re-run `dataworth score --full`")
    for field in ("mode", "curvature"):
        if scores.summary.get(field) != first.summary.get(field):
            raise InputError(f"{run}: summary field '{field}' is {scores.summary.get(field)!r} but "
                             f"{first_run}'s is {first.summary.get(field)!r}; combine runs scored the same way")


def _weighted_mean_into(matrix: np.ndarray, runs, loaded: list[Scores], weights: np.ndarray, k: int,
                        standardise: bool):
    """Fill ``matrix`` ``[Q, N]`` with `ensemble_scores` (float64, query batch by query batch) and return
    its exact top-k states (positive, negative). A non-finite score is refused, naming the run and query."""
    n_queries, n_rows = matrix.shape
    query_batch = max(1, min(n_queries, (COMBINE_BUDGET_MB << 20) // max(1, 8 * (len(runs) + 2) * n_rows)))
    positive_parts, negative_parts = [], []
    for q0 in range(0, n_queries, query_batch):
        q1 = min(n_queries, q0 + query_batch)
        parts = [np.asarray(scores.matrix[q0:q1]) for scores in loaded]
        for run, scores, part in zip(runs, loaded, parts):
            if not np.isfinite(part).all():
                bad = q0 + int(np.flatnonzero(~np.isfinite(part).all(axis=1))[0])
                raise InputError(f"{run}/scores.npy: non-finite score for query {bad} "
                                 f"({scores.query_ids[bad]!r}); re-run `dataworth score --full` there")
        values = ensemble_scores(parts, weights, standardise).astype(np.float32)
        del parts
        matrix[q0:q1] = values
        positive = StreamingTopK(q1 - q0, k, descending=True)
        negative = StreamingTopK(q1 - q0, k, descending=False)
        for c0 in range(0, n_rows, COLUMN_BLOCK):
            positive.update(values[:, c0:c0 + COLUMN_BLOCK], c0)
            negative.update(values[:, c0:c0 + COLUMN_BLOCK], c0)
        positive_parts.append(positive)
        negative_parts.append(negative)
    matrix.flush()
    return _stacked(positive_parts), _stacked(negative_parts)


def _stacked(parts: list[StreamingTopK]) -> StreamingTopK:
    """One top-k state over every query from the per-query-batch states (in query order)."""
    stacked = StreamingTopK(sum(p.n_queries for p in parts), parts[0].k, parts[0].descending)
    stacked.values = np.concatenate([p.values for p in parts], axis=0)
    stacked.rows = np.concatenate([p.rows for p in parts], axis=0)
    return stacked
