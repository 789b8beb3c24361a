"""Fact tracing: attribution judged against gold documents (the documents that state each fact).

Recall@k / MRR measure *attribution* (are the stating documents found? 1-based ranks, ties by row order);
``tail-patch@10`` measures *influence* (does one more step on a retrieved document raise log p(answer)?,
`dataworth.evaluation.effects`), for every method including BM25. `fact_tracing_table` is the table of
``dataworth demo`` and ``dataworth eval facts`` (`eval_facts`).

Tail-patch@10 reads the one-step effect of each method's top 10 rows per query, nothing else, so on a real
model (SmolLM2-135M, one CPU thread: 0.86 s a row's LoRA step + 0.20 s a query measured after it,
``benchmarks/tail_patch_cost.py``) it measures only those (query, row) pairs — the union over methods and the
gold rows — exactly; the full ``[Q, N]`` matrix (and with it the "one-step oracle" row) only when it is cheap
(`FULL_EFFECTS_FLOPS`) or asked for; and, for a hard bound on the cost, a seeded sample of each method's pairs
with a 95% interval (``tail-patch@10 ±``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.evaluation.baselines import bm25_scores
from dataworth.evaluation.effects import (
    StepSize,
    effects_flops,
    effects_inputs,
    one_step_effects,
    step_size,
)
from dataworth.evaluation.metrics import (
    fact_tracing_metrics,
    mean_effect,
    rival_metrics,
    sample_pairs,
    sampled_mean_effect,
    top_k_rows,
)
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.gradients.queries import query_gradients
from dataworth.influence.curvature import check_kind, ensure_curvature
from dataworth.influence.scores import check_mode, score_rows
from dataworth.model.load import load_model
from dataworth.model.optimizer import final_optimizer_dir, saved_parameters
from dataworth.model.train import TRAIN_JSON
from dataworth.util import progress_bar, say


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


def rival_positions(queries, train_rows) -> list[list[int]]:
    """Row positions (in ``train_rows`` order) of each query's *rivals*: rows whose ``person`` is someone else
    and whose ``facts`` list the query's ``attribute`` — the same kind of fact, in the same templates, about
    another person (`evaluation.metrics.rival_metrics`)."""
    return [[i for i, r in enumerate(train_rows)
             if r.data.get("person") not in (None, q.data["person"]) and q.data["attribute"] in (r.data.get("facts") or [])]
            for q in queries]


TAIL_PATCH_K = 10
TAIL_PATCH = f"tail-patch@{TAIL_PATCH_K}"
TAIL_PATCH_MODES = ("auto", "full", "needed", "off")
# The full [Q, N] effects matrix is computed by default only below this many estimated FLOPs
# (`effects.effects_flops`): ~3-4 minutes of one CPU core, which reached ~50 GFLOP/s on SmolLM2-135M
# (benchmarks/tail_patch_cost.py). The demo's world (240 queries × 192 rows, ~1.3e12) and its 48-people
# reversals=10 world (~8e12) stay full; SmolLM2 with 20 queries × 192 rows (5.2e13, ~17 CPU minutes) does not.
FULL_EFFECTS_FLOPS = 1e13
QUERY_CHUNK = 8  # queries per gradient call (query_gradients' own batch size, so chunking changes nothing)


@dataclass(frozen=True)
class TailPatchEffects:
    """The one-step effects behind a table's tail-patch figures: ``matrix [Q, N]`` (NaN where not measured),
    whether it is ``full``, each method's sampled ``(query, row)`` pairs (``None``: every pair is measured),
    the step size, the seconds it took and a one-line description of what was measured."""

    matrix: np.ndarray
    full: bool
    sampled: dict | None
    step: StepSize
    seconds: float
    description: str


def fact_tracing_table(store, model, tokenizer, queries, curvatures, modes, documents, *, train_rows=None,
                       optimizer_dir=None, effects_model=None, tail_patch: str = "auto",
                       tail_patch_lr: float | None = None, tail_patch_sample: int | None = None, seed: int = 0,
                       rivals=None, progress: bool = False) -> list[dict]:
    """recall@1 / recall@10 / MRR for each (curvature, mode) on the bios fact queries, plus BM25.

    ``rivals`` (row positions per query: documents stating the same attribute about someone else): every row
    also gets `evaluation.metrics.rival_metrics` (``rivals@10``, ``rivals_above_gold``, ``gold_negative``).

    With ``train_rows`` (the store's rows, in its order) and ``optimizer_dir`` (the trained model directory or
    its final checkpoint, see ``model.optimizer.final_optimizer_dir``), every row also gets ``tail-patch@10``: the mean,
    over queries and their top-10 documents, of how much one more training step on that document alone raises
    log p(answer) in nats (``evaluation.metrics.mean_effect`` over ``evaluation.effects.one_step_effects``; the query
    loss is the answer's, as attributed). The step is measured on ``effects_model`` (default ``model``): the
    model the optimizer state belongs to — for a merged LoRA ``model``, its unmerged adapter (the store and
    the scores stay ``model``'s). Its size η is `effects.step_size` (``tail_patch_lr``, else the final epoch's
    mean lr η̄); each row records it (``tail-patch lr``, ``tail-patch lr from``).

    ``tail_patch`` says which effects are measured: ``"needed"`` — only the pairs some figure reads (every
    method's top 10 and the gold rows), exactly; ``"full"`` — the whole ``[Q, N]`` matrix; ``"auto"`` — the full
    matrix when `effects.effects_flops` ≤ `FULL_EFFECTS_FLOPS`, else the needed pairs; ``"off"`` — none.
    ``tail_patch_sample = S`` (not with ``"full"``): when the full matrix is not computed, each row's figure comes
    from a seeded (``seed``) uniform sample of ``S`` of its pairs (`metrics.sample_pairs`), and
    ``tail-patch@10 ±`` is the half-width of its 95% interval (`metrics.sampled_mean_effect`; 0 for an exact
    figure). ``tail-patch pairs`` is the number of pairs behind a row's figure, ``tail-patch effects`` says what
    was measured.

    Two reference rows follow: ``gold documents`` (score 1 on the gold rows: recall 1 by construction; its
    tail-patch averages the effects of the query's gold rows — 2 or 3 on bios — instead of padding them to 10
    with score-0 rows taken in row order) and, with the full matrix only, ``one-step oracle`` (the effects as
    scores: the highest tail-patch@10 any method can reach; its ``score_s`` is the effects' time); without the
    full matrix it is left out, and ``progress`` says why. ``progress``: bars with estimates on stderr for the
    query gradients, the fits and scores, and the effects (after a plan line).
    """
    check_tail_patch(tail_patch, tail_patch_sample)
    gold = gold_positions(queries, store.ids)
    q_rows = _query_rows(store, model, tokenizer, queries, progress)
    q_ids = [q.id for q in queries]
    methods = _method_scores(store, q_rows, q_ids, list(curvatures), list(modes), progress)
    bm25 = bm25_scores(documents, [q.data["prompt"] + q.data["response"] for q in queries])
    methods.append(("BM25 (prompt+response)", bm25, 0.0, 0.0))
    effects = None
    if optimizer_dir is not None and train_rows is not None and tail_patch != "off":
        chosen = {name: top_k_rows(scores, TAIL_PATCH_K).tolist() for name, scores, _, _ in methods}
        chosen["gold documents"] = [sorted(rows)[:TAIL_PATCH_K] for rows in gold]
        effects = tail_patch_effects(store, effects_model if effects_model is not None else model, tokenizer,
                                     queries, train_rows, optimizer_dir, chosen, tail_patch=tail_patch,
                                     lr=tail_patch_lr, sample=tail_patch_sample, seed=seed, progress=progress)
    table = [_table_row(name, scores, gold, effects, fit_s, score_s, rivals)
             for name, scores, fit_s, score_s in methods]
    if effects is not None:
        gold_scores = np.zeros((len(queries), store.rows))
        for q, rows in enumerate(gold):
            gold_scores[q, rows] = 1.0
        table.append(_table_row("gold documents", gold_scores, gold, effects, 0.0, 0.0, rivals))
        if effects.full:
            table.append(_table_row("one-step oracle", effects.matrix, gold, effects, 0.0, effects.seconds, rivals))
    return table


def check_tail_patch(tail_patch: str, sample: int | None) -> None:
    """``tail_patch`` one of `TAIL_PATCH_MODES`; ``sample`` ``None`` or ≥ 2 pairs, and not with ``"full"``."""
    if tail_patch not in TAIL_PATCH_MODES:
        raise InputError(f"--tail-patch: must be one of {', '.join(TAIL_PATCH_MODES)}, got {tail_patch!r}")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 2):
        raise InputError(f"--tail-patch-sample: must be a whole number of pairs >= 2, got {sample!r}")
    if sample is not None and tail_patch == "full":
        raise InputError("--tail-patch-sample: a sample of pairs is pointless with --tail-patch full (every pair)")


def tail_patch_effects(store, model, tokenizer, queries, train_rows, optimizer_dir, chosen: dict, *,
                       tail_patch: str = "auto", lr: float | None = None, sample: int | None = None, seed: int = 0,
                       progress: bool = False) -> TailPatchEffects:
    """The one-step effects the tail-patch figures of ``chosen`` (``{row name: rows per query}``) read, measured
    on ``model`` (see `fact_tracing_table` for ``tail_patch``, ``sample``, ``seed``)."""
    step = step_size(optimizer_dir, lr)
    encoded, measured = effects_inputs(store, tokenizer, queries, train_rows)
    n_queries, n_rows = len(measured), len(encoded)
    full_flops = effects_flops(model, encoded, measured)
    full = tail_patch == "full" or (tail_patch == "auto" and full_flops <= FULL_EFFECTS_FLOPS)
    sampled, mask = None, None
    if not full:
        if sample is not None:
            sampled = {name: sample_pairs(rows, sample, [seed, i]) for i, (name, rows) in enumerate(chosen.items())}
            pairs = np.concatenate(list(sampled.values()))
        else:
            pairs = np.array([(q, n) for rows in chosen.values() for q, r in enumerate(rows) for n in r])
        mask = np.zeros((n_queries, n_rows), dtype=bool)
        mask[pairs[:, 0], pairs[:, 1]] = True
    if full:
        description = f"the full matrix: {n_queries} queries × {n_rows} rows"
    else:
        what = (f"a seeded sample (seed {seed}) of {sample} pairs per row of the table" if sampled is not None
                else f"each method's top {TAIL_PATCH_K} and the gold rows")
        why = ("--tail-patch needed" if tail_patch == "needed"
               else f"the full matrix would take ≈ {full_flops:.2g} FLOPs > {FULL_EFFECTS_FLOPS:.2g}; --tail-patch full")
        description = (f"{int(mask.sum())} of {n_queries * n_rows} (query, row) pairs ({what}), "
                       f"{int(mask.any(axis=0).sum())} of {n_rows} rows stepped; no one-step oracle ({why})")
        if progress:
            say(f"[facts] tail-patch measures {description}")
    started = time.perf_counter()
    matrix = one_step_effects(model, tokenizer, encoded, measured, optimizer_dir=optimizer_dir, lr=step,
                              pairs=mask, progress=progress)
    return TailPatchEffects(matrix, full, sampled, step, time.perf_counter() - started, description)


def _query_rows(store, model, tokenizer, queries, progress: bool) -> np.ndarray:
    """`query_gradients` of the queries, `QUERY_CHUNK` at a time behind a progress bar."""
    bar = progress_bar(len(queries), "query gradients", unit="query", enabled=progress)
    parts = []
    try:
        for start in range(0, len(queries), QUERY_CHUNK):
            chunk = queries[start:start + QUERY_CHUNK]
            parts.append(query_gradients(store, model, tokenizer, chunk, batch_size=QUERY_CHUNK))
            bar.update(len(chunk))
    finally:
        bar.close()
    return np.concatenate(parts) if parts else np.zeros((0, store.dim), dtype=np.float32)


def _method_scores(store, q_rows, q_ids, curvatures, modes, progress: bool) -> list[tuple]:
    """``(name, scores [Q, N], fit_s, score_s)`` per (curvature, mode), fits and scores behind one bar."""
    bar = progress_bar(len(curvatures) * (1 + len(modes)), "fit + score", unit="step", enabled=progress)
    out = []
    try:
        for kind in curvatures:
            bar.set_postfix_str(f"fit {kind}")
            started = time.perf_counter()
            curv = ensure_curvature(store.path, kind)
            fit_s = time.perf_counter() - started
            bar.update(1)
            for mode in modes:
                bar.set_postfix_str(f"score {kind}/{mode}")
                started = time.perf_counter()
                scores = score_rows(store, q_rows, q_ids, curv, mode=mode, top_k=TAIL_PATCH_K, full=True)
                out.append((f"{kind}/{mode}", np.asarray(scores.matrix), fit_s, time.perf_counter() - started))
                bar.update(1)
    finally:
        bar.close()
    return out


def _table_row(method: str, scores: np.ndarray, gold, effects: TailPatchEffects | None, fit_s: float,
               score_s: float, rivals=None) -> dict:
    row = {"method": method, **fact_tracing_metrics(scores, gold, ks=(1, 10))}
    if rivals is not None:
        row |= rival_metrics(scores, gold, rivals, k=TAIL_PATCH_K)
    if effects is not None:
        if method == "gold documents":
            chosen = [sorted(rows)[:TAIL_PATCH_K] for rows in gold]  # the gold rows themselves, not padded to 10
        else:
            chosen = top_k_rows(scores, TAIL_PATCH_K).tolist()
        if effects.sampled is not None:
            pairs = effects.sampled[method]
            value, half = sampled_mean_effect(effects.matrix, chosen, pairs)
            n_pairs = len(pairs)
        else:
            value, half, n_pairs = mean_effect(effects.matrix, chosen), 0.0, sum(len(c) for c in chosen)
        row |= {TAIL_PATCH: value, f"{TAIL_PATCH} ±": half, "tail-patch pairs": n_pairs,
                "tail-patch lr": effects.step.lr, "tail-patch lr from": effects.step.source,
                "tail-patch effects": effects.description}
    return {**row, "fit_s": round(fit_s, 2), "score_s": round(score_s, 2)}


def format_table(table: list[dict]) -> str:
    """A Markdown table of the fact-tracing figures (``tail-patch@10`` in nats, ``± half-width`` when sampled),
    and, when the rows have it, a line saying what the tail-patch step was and what it measured."""
    cols = ["method", "recall@1", "recall@10", "strict_recall@10", "mrr"]
    cols += [c for c in (f"rivals@{TAIL_PATCH_K}", "gold_negative") if any(c in row for row in table)]
    with_effects = [row for row in table if TAIL_PATCH in row]
    cols += [TAIL_PATCH] if with_effects else []
    cols += ["fit_s", "score_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = [row["method"]] + [_cell(row, c) for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    if with_effects and "tail-patch lr" in with_effects[0]:
        first = with_effects[0]
        note = (f"{TAIL_PATCH}: nats of log p(answer) one more step on a top-{TAIL_PATCH_K} document alone adds; "
                f"step η = {first['tail-patch lr']:.4g} ({first['tail-patch lr from']}); "
                f"measured: {first['tail-patch effects']}")
        lines += ["", note]
    return "\n".join(lines)


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return "n/a"
    if column == TAIL_PATCH:
        half = row.get(f"{TAIL_PATCH} ±") or 0.0
        return f"{value:+.4f}" + (f" ± {half:.4f}" if half > 0 else "")
    if isinstance(value, float) and column not in ("fit_s", "score_s"):
        return f"{value:.3f}"
    return str(value)


def eval_facts(model: str, data: str, queries: str, out_dir: str | os.PathLike, *, projection: str = "random",
               rank: int = 32, curvatures: Sequence[str] = ("none", "ekfac"), modes: Sequence[str] = ("dot", "cosine"),
               modules: str = "all", seed: int = 0, progress: bool = True, effects_model: str | None = None,
               tail_patch: str = "auto", tail_patch_lr: float | None = None,
               tail_patch_sample: int | None = None) -> list[dict]:
    """``dataworth eval facts``: recall@1/@10, strict recall@10 and MRR of the gold fact documents for each
    (curvature, mode), with BM25 in the same table (``evaluation.facts.fact_tracing_table``; 1-based ranks, ties by row
    order), and ``tail-patch@10`` with its reference rows when ``model`` is a ``dataworth train`` directory
    holding its final optimizer state. Extracts a store of ``model`` on ``data`` under ``out_dir/store``
    (resumed when present).

    The one-step effects are measured on ``effects_model`` (a ``load_model`` spec) when given; else on
    ``model`` when it has every parameter the state steps; else — a merged LoRA model, whose state is the
    adapter's — on the unmerged adapter of the final checkpoint, checked to be the one merged (``dataworth_train.json``
    ``adapter_fingerprint``). ``tail_patch``, ``tail_patch_lr``, ``tail_patch_sample`` (sampled with ``seed``):
    see `fact_tracing_table`.
    """
    for kind in curvatures:
        check_kind(kind)
    for mode in modes:
        check_mode(mode)
    check_tail_patch(tail_patch, tail_patch_sample)
    if tail_patch_lr is not None:
        step_size(lr=tail_patch_lr)  # a zero or non-finite step is refused before any work
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
    optimizer_dir, stepper = None, None
    if tail_patch != "off":
        optimizer_dir, stepper = effects_model_for(model, loaded.model, effects_model, progress)
    return fact_tracing_table(store, loaded.model, loaded.tokenizer, query_rows, list(curvatures), list(modes),
                              documents, train_rows=train_rows, optimizer_dir=optimizer_dir, effects_model=stepper,
                              tail_patch=tail_patch, tail_patch_lr=tail_patch_lr, tail_patch_sample=tail_patch_sample,
                              seed=seed, progress=progress)


def effects_model_for(model: str, loaded, effects_model: str | None = None, progress: bool = True):
    """``(optimizer_dir, model to step)`` for tail-patch on the trained model directory ``model`` (``loaded``: its
    model): the directory's final optimizer state and the model it belongs to — for a merged LoRA model, the
    unmerged adapter of the final checkpoint (checked against the merge record) —, or ``(None, None)``
    (no tail-patch, said)."""
    dirs = [d for d in (effects_model, model) if d is not None and Path(d).is_dir()]
    optimizer_dir = next((found for d in dirs if (found := final_optimizer_dir(d)) is not None), None)
    if optimizer_dir is None:
        if progress:
            say(f"[facts] {model}: no final optimizer state (checkpoints/epoch-N/), so no tail-patch")
        return None, None
    if effects_model is not None:
        return optimizer_dir, load_model(effects_model, device="cpu").model
    names = set(dict(loaded.named_parameters()))
    if all(name in names for name in saved_parameters(optimizer_dir)):
        return optimizer_dir, loaded
    if not (optimizer_dir / "adapter_config.json").is_file():
        if progress:
            say(f"[facts] {optimizer_dir}: its optimizer state is not for {model}'s weights, so no tail-patch")
        return None, None
    adapter = load_model(optimizer_dir, device="cpu")
    record = Path(model) / TRAIN_JSON
    expected = json.loads(record.read_text()).get("adapter_fingerprint") if record.is_file() else None
    if expected is not None and adapter.fingerprint != expected:
        raise InputError(f"{optimizer_dir}: its adapter (fingerprint {adapter.fingerprint[:12]}) is not the one merged "
                         f"into {model} ({TRAIN_JSON} adapter_fingerprint {expected[:12]}); pass --effects-model")
    if progress:
        say(f"[facts] {model} is a merged LoRA model: the one-step effects step and measure the unmerged adapter "
            f"of {optimizer_dir}")
    return optimizer_dir, adapter.model
