"""Fact tracing: attribution judged against gold documents (the documents that state each fact).

Recall@k / MRR measure *attribution* (are the stating documents found? 1-based ranks, ties by row order);
``tail-patch@10`` measures *influence* (does one more step on a retrieved document raise log p(answer)?,
`dataworth.evaluation.effects`), for every method including BM25. `fact_tracing_table` is the table of
``dataworth demo`` and ``dataworth eval facts`` (`eval_facts`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.evaluation.baselines import bm25_scores
from dataworth.evaluation.effects import answer_effects
from dataworth.evaluation.metrics import fact_tracing_metrics, mean_effect, tail_patch
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.gradients.queries import query_gradients
from dataworth.influence.curvature import check_kind, ensure_curvature
from dataworth.influence.scores import check_mode, score_rows
from dataworth.model.load import load_model
from dataworth.model.optimizer import final_optimizer_dir, state_covers
from dataworth.util import say


def gold_positions(queries, train_ids: list[str]) -> list[list[int]]:
    """Row positions (in store order) of each query's gold documents."""
    where = {t: i for i, t in enumerate(train_ids)}
    out = []
    for q in queries:
        missing = [g for g in q.data["gold"] if g not in where]
        if missing:
            raise InputError(f"query {q.id}: gold documents {missing[:3]} are not in the store")
        out.append([where[g] for g in q.data["gold"]])
    return out


TAIL_PATCH_K = 10
TAIL_PATCH = f"tail-patch@{TAIL_PATCH_K}"


def fact_tracing_table(store, model, tokenizer, queries, curvatures, modes, documents, *, train_rows=None,
                       optimizer_dir=None) -> list[dict]:
    """recall@1 / recall@10 / MRR for each (curvature, mode) on the bios fact queries, plus BM25.

    With ``train_rows`` (the store's rows, in its order) and ``optimizer_dir`` (the trained model directory or
    its final checkpoint, see ``model.optimizer.final_optimizer_dir``), every row also gets ``tail-patch@10``: the mean,
    over queries and their top-10 documents, of how much one more training step on that document alone raises
    log p(answer) in nats (``evaluation.metrics.tail_patch`` over ``evaluation.effects.one_step_effects``, computed once; the query
    loss is the answer's, as attributed). Two reference rows follow: ``gold documents`` (score 1 on the gold
    rows: recall 1 by construction; its tail-patch averages the effects of the query's gold rows — 2 or 3 on
    bios — instead of padding them to 10 with score-0 rows taken in row order) and ``one-step oracle`` (the
    effects as scores: the highest tail-patch@10 any method can reach; its ``score_s`` is the effects' time).
    """
    gold = gold_positions(queries, store.ids)
    q_rows = query_gradients(store, model, tokenizer, queries)
    q_ids = [q.id for q in queries]
    effects, effects_s = None, 0.0
    if optimizer_dir is not None and train_rows is not None:
        started = time.perf_counter()
        effects = answer_effects(store, model, tokenizer, queries, train_rows, optimizer_dir)
        effects_s = time.perf_counter() - started
    table = []
    for kind in curvatures:
        started = time.perf_counter()
        curv = ensure_curvature(store.path, kind)
        fit_s = time.perf_counter() - started
        for mode in modes:
            started = time.perf_counter()
            scores = score_rows(store, q_rows, q_ids, curv, mode=mode, top_k=10, full=True)
            table.append(_table_row(f"{kind}/{mode}", np.asarray(scores.matrix), gold, effects, fit_s,
                                    time.perf_counter() - started))
    bm25 = bm25_scores(documents, [q.data["prompt"] + q.data["response"] for q in queries])
    table.append(_table_row("BM25 (prompt+response)", bm25, gold, effects, 0.0, 0.0))
    if effects is not None:
        gold_scores = np.zeros_like(effects)
        for q, rows in enumerate(gold):
            gold_scores[q, rows] = 1.0
        gold_row = _table_row("gold documents", gold_scores, gold, effects, 0.0, 0.0)
        gold_row[TAIL_PATCH] = _gold_tail_patch(effects, gold)
        table.append(gold_row)
        table.append(_table_row("one-step oracle", effects, gold, effects, 0.0, effects_s))
    return table


def _table_row(method: str, scores: np.ndarray, gold, effects, fit_s: float, score_s: float) -> dict:
    row = {"method": method, **fact_tracing_metrics(scores, gold, ks=(1, 10))}
    if effects is not None:
        row[TAIL_PATCH] = tail_patch(scores, effects, TAIL_PATCH_K)
    return {**row, "fit_s": round(fit_s, 2), "score_s": round(score_s, 2)}


def _gold_tail_patch(effects: np.ndarray, gold) -> float:
    """Mean over queries of the mean effect of the query's gold rows (the first ``TAIL_PATCH_K`` in row order)."""
    return mean_effect(effects, [sorted(rows)[:TAIL_PATCH_K] for rows in gold])


def format_table(table: list[dict]) -> str:
    """A Markdown table of the fact-tracing figures (``tail-patch@10`` in nats, when the rows have it)."""
    cols = ["method", "recall@1", "recall@10", "strict_recall@10", "mrr"]
    cols += [TAIL_PATCH] if any(TAIL_PATCH in row for row in table) else []
    cols += ["fit_s", "score_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = [row["method"]] + [_cell(row.get(c), c) for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value, column: str) -> str:
    if value is None:
        return "n/a"
    if column == TAIL_PATCH:
        return f"{value:+.4f}"
    if isinstance(value, float) and column not in ("fit_s", "score_s"):
        return f"{value:.3f}"
    return str(value)


def eval_facts(model: str, data: str, queries: str, out_dir: str | os.PathLike, *, projection: str = "random",
               rank: int = 32, curvatures: Sequence[str] = ("none", "ekfac"), modes: Sequence[str] = ("dot", "cosine"),
               modules: str = "all", seed: int = 0, progress: bool = True) -> list[dict]:
    """``dataworth eval facts``: recall@1/@10, strict recall@10 and MRR of the gold fact documents for each
    (curvature, mode), with BM25 in the same table (``evaluation.facts.fact_tracing_table``; 1-based ranks, ties by row
    order), and ``tail-patch@10`` with its reference rows when ``model`` is a ``dataworth train`` directory
    holding its final optimizer state. Extracts a store of ``model`` on ``data`` under ``out_dir/store``
    (resumed when present)."""
    for kind in curvatures:
        check_kind(kind)
    for mode in modes:
        check_mode(mode)
    query_rows = load_rows(queries)
    missing = [q for q in query_rows if "gold" not in q.data]
    if missing:
        raise InputError(f"{missing[0].source}: fact queries need a 'gold' list of training ids (builtin:bios:queries)")
    store = extract(ExtractConfig(model=model, data=data, out=str(Path(out_dir) / "store"), modules=modules,
                                  projection=projection, rank_in=rank, rank_out=rank, seed=seed, dtype="float32",
                                  device="cpu", shard_rows=1024), progress=progress)
    loaded = load_model(model, device="cpu")
    train_rows = load_rows(data)
    documents = [r.data.get("text") or (r.prompt + r.response) for r in train_rows]
    optimizer_dir = final_optimizer_dir(model) if Path(model).is_dir() else None
    if optimizer_dir is not None and not state_covers(loaded.model, optimizer_dir):
        optimizer_dir = None  # e.g. a merged LoRA model: the state holds the adapter's weights, not these
    if optimizer_dir is None and progress:
        say(f"[facts] {model}: no final optimizer state for its weights (checkpoints/epoch-N/), so no tail-patch")
    return fact_tracing_table(store, loaded.model, loaded.tokenizer, query_rows, list(curvatures), list(modes),
                              documents, train_rows=train_rows, optimizer_dir=optimizer_dir)
