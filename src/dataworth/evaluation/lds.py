"""The evaluation runs behind ``dataworth eval``: LDS, leave-k-out and brittleness of an attribution option.

LDS (Park et al. 2023, "TRAK", §2.2) correlates the summed scores of each subset's rows with the retrained
query losses (`dataworth.evaluation.retrain`); leave-k-out and brittleness (Ilyas et al. 2022) retrain without
the top-k attributed rows and compare with k random ones. The pure computations are in
`dataworth.evaluation.metrics`.
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
    """LDS of ``method`` on ``task`` (see ``dataworth.evaluation.metrics.lds_summary`` for the keys) plus, for each
    ``p`` in ``leave_out_percent``, the leave-k-out test with ``k = round(p·N/100)``: per query, retrain
    without its top-k rows vs without k random rows (``leave_out@p%_top_increase`` etc., see
    ``evaluation.metrics.removal_summary``). Leave-k-out retrains one model per query and k: expensive, opt-in."""
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
    (``evaluation.metrics.removal_summary``; ``k`` is added to the result)."""
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
