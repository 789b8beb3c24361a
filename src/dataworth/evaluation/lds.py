"""Retraining on subsets of the training data, with an on-disk resumable cache: the ground truth of evaluation.

Why a module of its own: the Linear Datamodeling Score (LDS, Park et al. 2023, "TRAK", §2.2), leave-k-out
and brittleness tests (Ilyas et al. 2022; Bae et al. 2024) all judge an attribution method against what
*really* happens to a query's loss when the model is retrained without some documents. Retraining is by far
the most expensive part of evaluation, so every retrain is cached on disk, one file per retrain, and a killed
run resumes. Several benchmarks (``benchmarks/lds.py``, ``benchmarks/peers.py``) score different attribution
methods against the *same* retrains by calling `build_lds_task` with the same `LdsConfig`.

The task (``build_lds_task(out_dir, LdsConfig(...)) -> LdsTask``)::

    out_dir/cache.json                 the configuration (see `LdsConfig.identity`); another one is refused
    out_dir/model/                     the full-data model (``dataworth.train``): the model being attributed,
                                       with ``checkpoints/epoch-N/`` for ``LdsConfig.checkpoints`` epochs
    out_dir/retrains/subset-MMM-rR.json  one LDS retrain: subset M, replicate (seed) R
    out_dir/retrains/removal-<sha>-rR.json  one removal retrain (leave-k-out / brittleness), keyed by the
                                       removed set; ``full-rR.json`` is the all-rows reference retrain

Public API: ``LdsConfig``, ``build_lds_task(out, config) -> LdsTask`` (``load_lds_task`` never trains),
``LdsTask.evaluate(scores [Q, N]) -> dict`` (``evaluate.lds_summary``), ``removal_losses`` / ``full_losses`` /
``removal_test`` (leave-k-out, brittleness), ``AttributionConfig`` + ``attribution_scores(task, method)``
(dataworth's own scores for the task), ``one_step_effects`` (the ``[Q, N]`` effect of one more training
step on each row: the ground truth of the tail-patch metric, ``evaluate.tail_patch``), and ``eval_lds`` /
``eval_brittleness`` / ``eval_facts`` (the CLI).

A retrain file (written atomically when that retrain is done)::

    {"name": "subset-003-r0", "seed": 1234, "included": ["doc-001", ...],  # ids of the training rows used
     "losses": [12.3, ...],           # per query (cache.json "query_ids" order): summed response loss
     "train_loss": 0.41, "seconds": 9.8}

Retrains: subset ``m`` holds exactly ``round(α·N)`` rows drawn without replacement with a generator seeded by
``(seed, m)``; replicate ``r`` of subset ``m`` trains from scratch with its own seed (init + shuffle), so the
replicates of a subset differ only by training noise — that is what the noise ceiling measures. The loop is
``dataworth.train``'s (same model builder, AdamW, schedule, clipping, seeded shuffle) on the full-data
model's tokenizer; with every row and the base seed it reproduces ``dataworth.train`` bit for bit (tested).
Models are not kept: only the per-query losses.

The query measurement is ``batching.example_losses``, the loss summed over the query's target tokens, with
``LdsConfig.measure`` choosing which: ``answer`` (default) — the response tokens only, the same measurement
``extract.query_gradients`` attributes by default — or ``answer+end`` — the response *and* the end token that
``data.encode_rows`` appends (what caches made before ``measure`` existed hold; they open as ``answer+end``).
``AttributionConfig.measure_end_token`` chooses what the *attribution* measures, so the two can be crossed.
Sign convention shared with ``dataworth.scoring``: a positive score means the training row *lowers* the query
loss, so the LDS correlates summed scores with the *negated* loss (``dataworth.evaluate.lds``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np

from dataworth.errors import InputError
from dataworth.evaluation.methods import AttributionConfig, attribution_scores
from dataworth.evaluation.metrics import removal_summary, top_k_rows
from dataworth.evaluation.retrain import (
    LdsConfig,
    LdsTask,
    Trainer,
    build_lds_task,
    derived_seed,
    full_losses,
    removal_losses,
)


def run_lds(task: LdsTask, method: AttributionConfig, *, leave_out_percent: Sequence[float] = (),
            random_draws: int = 1, n_bootstrap: int = 1000, progress: bool = True) -> dict:
    """LDS of ``method`` on ``task`` (see ``dataworth.evaluate.lds_summary`` for the keys) plus, for each
    ``p`` in ``leave_out_percent``, the leave-k-out test with ``k = round(p·N/100)``: per query, retrain
    without its top-k rows vs without k random rows (``leave_out@p%_top_increase`` etc., see
    ``evaluate.removal_summary``). Leave-k-out retrains one model per query and k: expensive, opt-in."""
    started = time.perf_counter()
    scores = attribution_scores(task, method, progress=progress)
    score_s = time.perf_counter() - started
    out = {"method": method.label(), **task.evaluate(scores, n_bootstrap=n_bootstrap),
           "sign": "lds = Spearman(sum of scores of the included rows, -query loss); positive score = lowers loss",
           "score_s": round(score_s, 2)}
    for p in leave_out_percent:
        if not 0 < p < 100:
            raise InputError(f"--leave-out-percent: must be in (0, 100), got {p}")
        k = max(1, int(round(p * len(task.train_ids) / 100)))
        summary = removal_test(task, scores, k, range(len(task.query_ids)), random_draws, progress=progress)
        out.update({f"leave_out@{p:g}%_{key}": value for key, value in summary.items()})
    return out


def removal_test(task: LdsTask, scores: np.ndarray, k: int, queries: Sequence[int], random_draws: int = 1,
                 replicate: int = 0, *, progress: bool = True, trainer: Trainer | None = None) -> dict:
    """For each query in ``queries``: retrain without its ``k`` top-scored rows and without ``k`` random rows
    (``random_draws`` draws), and compare the *query's own* loss with the all-rows retrain
    (``evaluate.removal_summary``; ``k`` is added to the result)."""

    queries = list(queries)
    if not 1 <= k < len(task.train_ids):
        raise InputError(f"--k: must be in 1..{len(task.train_ids) - 1}, got {k}")
    kw = {"progress": progress, "trainer": trainer}
    base_all = full_losses(task, replicate, **kw)
    top_rows = top_k_rows(scores, k)
    base, top, rand = [], [], np.zeros((random_draws, len(queries)))
    for j, q in enumerate(queries):
        base.append(base_all[q])
        top.append(removal_losses(task, top_rows[q], replicate, **kw)[q])
        for d in range(random_draws):
            rng = np.random.default_rng(derived_seed("random-removal", task.config.seed, q, k, d))
            rand[d, j] = removal_losses(task, rng.choice(len(task.train_ids), k, replace=False), replicate, **kw)[q]
    return {"k": k, **removal_summary(np.array(base), np.array(top), rand)}


def run_brittleness(task: LdsTask, method: AttributionConfig, ks: Sequence[int] = (1, 2, 4), n_queries: int = 4,
                    random_draws: int = 1, *, progress: bool = True) -> dict:
    """Brittleness (Ilyas et al. 2022): for ``n_queries`` queries (a seeded sample) and each ``k`` in ``ks``,
    the query-loss increase from removing the top-k attributed rows vs k random rows. Keys per k:
    ``top_increase@k``, ``random_increase@k``, ``ratio@k``, ``top_beats_random@k``."""
    if n_queries < 1:
        raise InputError(f"--queries-sampled: must be >= 1, got {n_queries}")
    rng = np.random.default_rng(derived_seed("brittleness-queries", task.config.seed))
    chosen = sorted(rng.choice(len(task.query_ids), min(n_queries, len(task.query_ids)), replace=False).tolist())
    scores = attribution_scores(task, method, progress=progress)
    out: dict[str, Any] = {"method": method.label(), "queries_sampled": [task.query_ids[q] for q in chosen],
                           "ks": list(ks)}
    for k in ks:
        summary = removal_test(task, scores, int(k), chosen, random_draws, progress=progress)
        out.update({f"{key}@{k}": value for key, value in summary.items() if key != "k"})
    return out


def auto_queries(data_spec: str) -> str:
    """``builtin:bios[?params]`` → ``builtin:bios:queries[?params]`` (the fact queries of the same world)."""
    head, sep, params = data_spec.partition("?")
    if head not in ("builtin:bios", "builtin:bios:train"):
        raise InputError(f"--queries: required for --data '{data_spec}' (only builtin:bios has default queries)")
    return "builtin:bios:queries" + sep + params


def eval_lds(out_dir: str | os.PathLike, config: LdsConfig, method: AttributionConfig, **kwargs: Any) -> dict:
    """``dataworth eval lds``: build (or resume) the task under ``out_dir`` and return `run_lds`'s figures."""
    method.check()
    progress = kwargs.pop("progress", True)
    task = build_lds_task(out_dir, config, progress=progress)
    out = run_lds(task, method, progress=progress, **kwargs)
    out["retrain_s"] = round(task.seconds, 1)
    return out


def eval_brittleness(out_dir: str | os.PathLike, config: LdsConfig, method: AttributionConfig, **kwargs: Any) -> dict:
    """``dataworth eval brittleness``: the task under ``out_dir`` (its LDS retrains are built too, since the
    cache is one task) and `run_brittleness`'s figures."""
    method.check()
    progress = kwargs.pop("progress", True)
    return run_brittleness(build_lds_task(out_dir, config, progress=progress), method, progress=progress, **kwargs)
