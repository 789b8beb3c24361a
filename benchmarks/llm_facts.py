"""Facts over templates, and which gradients, on the outputs of `dataworth demo --model smollm2` (issue 17).

    .venv/bin/python benchmarks/llm_facts.py demo_llm_out [--json FILE] [--lora]

One table, every row on the same fine-tuned model, store, queries and one-step effects:

- scoring: curvature (raw, ekfac) × mode (dot, cosine = unit-normalised after preconditioning, relative);
- what the query measures: ``answer`` (the whole generated answer, the default), ``value`` (only the
  value's tokens, `data.encode.value_only`), ``contrast`` (the answer's gradient minus that of the same
  answer about another person — a template-matched baseline query, so what the template and the value's
  prior contribute cancels);
- gradients (``--lora``): LoGra of the merged model's MLP weights (the demo's store) vs LoGra of the LoRA
  adapters' weights (lora_A / lora_B of every layer, the unmerged adapter model) vs both (scores summed
  after each is unit-normalised per query) vs LESS's own features (``--less-dim``: every LoRA weight's
  per-example gradient of the token-mean loss, training rows through the final checkpoint's Adam update,
  queries plain, each densely projected by one seeded Gaussian to 8,192 dims, cosine; the final checkpoint
  only, where LESS sums four);
- baselines: BM25, representation similarity (cosine of mean final hidden states).

Columns: recall@1/10 and MRR of the gold biographies; ``rivals@10`` (share of the top 10 that are other
people's documents stating the same attribute), ``rivals_above_gold`` and ``gold_negative``
(`evaluation.metrics.rival_metrics`); ``tail-patch@10`` on the answer and on the value (one more AdamW step on
the unmerged adapter from its final state, at the last epoch's mean learning rate; effects computed once).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from dataworth.data.encode import encode_rows, value_only, without_end_token
from dataworth.data.rows import load_rows
from dataworth.evaluation.baselines import bm25_scores, representation_similarity
from dataworth.evaluation.effects import one_step_effects
from dataworth.evaluation.facts import gold_positions, rival_positions
from dataworth.evaluation.metrics import (
    fact_tracing_metrics,
    mean_effect,
    rival_metrics,
    top_k_rows,
)
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.gradients.queries import query_gradients
from dataworth.influence.curvature import ensure_curvature
from dataworth.influence.scores import score_rows
from dataworth.model.load import load_model
from dataworth.model.optimizer import adam_update, final_optimizer_dir, load_adam_state
from dataworth.selection.less import gradient_features, lora_modules
from dataworth.store.reader import open_store
from dataworth.util import pad_token_id, say


def contrast_rows(queries, train_rows) -> list:
    """Each query with its person's name replaced by another person's: same template, same value."""
    from dataworth.data.rows import Row

    people = sorted({r.data["person"] for r in train_rows if r.data.get("person")})
    out = []
    for q in queries:
        other = next(p for p in people if p != q.data["person"])
        data = dict(q.data, prompt=q.data["prompt"].replace(q.data["person"], other),
                    response=q.data["response"].replace(q.data["person"], other))
        out.append(Row(id=q.id + "-contrast", kind="prompt_response", data=data, source=q.source))
    return out


def less_scores(model, tok, train_encoded, query_encoded, out: Path, dense_dim: int) -> np.ndarray:
    """``[Q, N]`` cosine of LESS features (Xia et al. 2024, §3): the training rows' LoRA gradients through the
    final checkpoint's Adam update, the queries' plain gradients, both projected by the same dense Gaussian."""
    ckpt = final_optimizer_dir(out / "model")
    state = load_adam_state(ckpt, lora_modules(model))
    common = dict(dense_dim=dense_dim, seed=0, batch_size=64, progress=True, header={"model": {"path": str(ckpt)}})
    started, cpu = time.perf_counter(), time.process_time()
    train = gradient_features(model, tok, train_encoded, out / "less" / "train",
                              transform=lambda g: adam_update(g, state), **common)
    query = gradient_features(model, tok, query_encoded, out / "less" / "queries", transform=None, **common)
    say(f"LESS features: {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu:.0f} CPU s")
    t, q = (unit(s.read_rows(0, s.rows).astype(np.float64)) for s in (train, query))
    return q @ t.T


def unit(m: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(n > 0, n, 1.0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--lora", action="store_true", help="also extract and compare LoRA-adapter gradients")
    parser.add_argument("--less-dim", type=int, default=8192,
                        help="with --lora: LESS's dense projection size (0: skip the LESS features)")
    parser.add_argument("--no-effects", action="store_true", help="skip the one-step effects (tail-patch)")
    args = parser.parse_args(argv)
    out = args.out
    store = open_store(out / "store")
    merged = load_model(str(out / "model"), device="cpu")
    adapter = load_model(str(out / "model" / "adapter"), device="cpu")
    tok = merged.tokenizer
    queries = load_rows(out / "queries.jsonl")
    train_rows = load_rows(out / "train.jsonl")
    ids = [q.id for q in queries]
    gold = gold_positions(queries, store.ids)
    rivals = rival_positions(queries, train_rows)
    max_length = store.manifest["config"].get("max_length")

    answer = [without_end_token(e, tok) for e in encode_rows(queries, tok, max_length=max_length)[0]]
    value = [value_only(e, tok, q.data["value"]) or e for e, q in zip(answer, queries)]
    baseline = [without_end_token(e, tok) for e in encode_rows(contrast_rows(queries, train_rows), tok,
                                                                max_length=max_length)[0]]
    train_encoded = encode_rows(train_rows, tok, max_length=max_length)[0]

    methods: dict[str, np.ndarray] = {}
    measured = {"answer": answer, "value": value}
    grads = {name: query_gradients(store, merged.model, tok, rows) for name, rows in measured.items()}
    grads["contrast"] = grads["answer"] - query_gradients(store, merged.model, tok, baseline)
    best: dict[str, np.ndarray] = {}
    for kind in ("raw", "ekfac"):
        curv = ensure_curvature(store.path, kind)
        for measure, q_rows in grads.items():
            for mode in ("dot", "cosine", "relative"):
                scores = np.asarray(score_rows(store, q_rows, ids, curv, mode=mode, top_k=10, full=True).matrix)
                methods[f"{kind}/{mode} · {measure}"] = scores
                if mode == "dot" and kind == "ekfac":
                    best[measure] = scores

    if args.lora:
        lora_store = out / "store_lora"
        extract(ExtractConfig(model=str(out / "model" / "adapter"), data=str(out / "train.jsonl"), out=str(lora_store),
                              modules=r"lora_[AB]", projection="random", rank_in=64, rank_out=64, dtype="float16",
                              device="cpu", shard_rows=64, max_length=max_length))
        lstore = open_store(lora_store)
        curv = ensure_curvature(lora_store, "ekfac")
        for measure, rows in measured.items():
            q_rows = query_gradients(lstore, adapter.model, tok, rows)
            for mode in ("dot", "cosine"):
                scores = np.asarray(score_rows(lstore, q_rows, ids, curv, mode=mode, top_k=10, full=True).matrix)
                methods[f"LoRA-adapter LoGra-64 ekfac/{mode} · {measure}"] = scores
                if mode == "dot":
                    methods[f"both (MLP + LoRA, unit per query) ekfac/dot · {measure}"] = unit(scores) + unit(best[measure])
        if args.less_dim:
            methods["LESS features (LoRA, Adam-transformed, dense-%d) cosine · answer" % args.less_dim] = less_scores(
                adapter.model, tok, train_encoded, answer, out, args.less_dim)

    documents = [r.text if r.kind == "text" else "\n".join(m["content"] for m in r.messages) for r in train_rows]
    methods["BM25 (prompt+response)"] = bm25_scores(documents, [q.data["prompt"] + " " + q.data["response"]
                                                                for q in queries])
    methods["representation similarity"] = representation_similarity(merged.model, train_encoded, answer,
                                                                      pad_token_id(tok))
    gold_scores = np.zeros((len(queries), store.rows))
    for q, rows in enumerate(gold):
        gold_scores[q, rows] = 1.0
    methods["gold documents"] = gold_scores

    effects = None
    if not args.no_effects:
        # the rows where it decides something: not raw (degenerate with N < D_m), relative or contrast (far behind)
        measured_methods = {m: v for m, v in methods.items()
                            if not m.startswith("raw/") and "relative" not in m and "contrast" not in m}
        pairs = np.zeros((len(queries), store.rows), dtype=bool)
        for scores in measured_methods.values():
            np.put_along_axis(pairs, top_k_rows(scores, 10), True, axis=1)
        for q, rows in enumerate(gold):
            pairs[q, rows] = True
        both = np.concatenate([pairs, pairs])
        started, cpu = time.perf_counter(), time.process_time()
        say(f"one-step effects on {int(pairs.sum())} (query, row) pairs, answers and values (adapter model)")
        effects = one_step_effects(adapter.model, tok, train_encoded, answer + value, optimizer_dir=out / "model",
                                   pairs=both, progress=True)
        say(f"effects: {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu:.0f} CPU s")

    table = []
    for method, scores in methods.items():
        row = {"method": method, **fact_tracing_metrics(scores, gold, ks=(1, 10)),
               **rival_metrics(scores, gold, rivals)}
        if effects is not None and method in measured_methods:
            chosen = gold if method == "gold documents" else top_k_rows(scores, 10)  # gold: not padded to 10
            row["tail-patch@10"] = mean_effect(effects[: len(queries)], chosen)
            row["tail-patch@10 (value)"] = mean_effect(effects[len(queries):], chosen)
        table.append(row)
    result = {"table": table, "queries": len(queries), "rows": len(train_rows),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def markdown(table: list[dict]) -> str:
    cols = ["method", "recall@1", "recall@10", "mrr", "rivals@10", "rivals_above_gold", "gold_negative",
            "tail-patch@10", "tail-patch@10 (value)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = [row["method"]] + ["n/a" if c not in row else f"{row[c]:+.4f}" if c.startswith("tail")
                                   else f"{row[c]:.3f}" for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
