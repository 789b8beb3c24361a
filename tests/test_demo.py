"""End to end on a reduced bios world: attribution finds the gold documents far above chance."""

import json

import numpy as np
import pytest

from dataworth.demo import DemoConfig, run_demo


def chance_mrr(n_rows: int, gold_sizes: list[int], trials: int = 2000, seed: int = 0) -> float:
    """MRR of a random ranking, estimated by simulation."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for g in gold_sizes:
        best = np.array([rng.permutation(n_rows)[:g].min() + 1 for _ in range(trials // len(gold_sizes) + 1)])
        total += np.mean(1.0 / best)
    return total / len(gold_sizes)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out=str(out), world="?people=12&distractors=12", preset="tiny-test", epochs=40, rank=32,
                     curvatures=("none", "kfac"), modes=("dot", "cosine"))
    return run_demo(cfg)


def test_demo_writes_every_stage_and_a_report(demo):
    for rel in ("model/config.json", "generated.jsonl", "store/manifest.json", "scores/topk.parquet",
                "scores/summary.json", "summary.json"):
        assert (demo.out / rel).exists(), rel
    assert demo.report is not None and demo.report.exists()
    summary = json.loads((demo.out / "summary.json").read_text())
    assert {row["method"] for row in summary["fact_tracing"]} >= {"kfac/cosine", "BM25 (prompt+response)"}


def test_attribution_ranks_gold_documents_far_above_chance(demo):
    from dataworth.data.rows import load_rows

    queries = load_rows("builtin:bios:queries?people=12&distractors=12")
    n_rows = len(load_rows("builtin:bios?people=12&distractors=12"))
    chance = chance_mrr(n_rows, [len(q.data["gold"]) for q in queries])
    best = max(row["mrr"] for row in demo.table if row["method"].startswith("kfac"))
    assert best > 3 * chance, (best, chance, demo.table)


def test_fact_table_has_tail_patch_for_every_method_and_the_reference_rows(demo):
    """Every row carries tail-patch@10; the figures are `evaluate.tail_patch` of that row's scores over the
    one-step effects (recomputed here for BM25 and the oracle); gold documents have recall 1 by construction."""
    from dataworth.data.rows import load_rows
    from dataworth.evaluation.baselines import bm25_scores
    from dataworth.evaluation.effects import answer_effects
    from dataworth.evaluation.facts import format_table, gold_positions
    from dataworth.evaluation.metrics import mean_effect, tail_patch
    from dataworth.model.load import load_model
    from dataworth.store.reader import open_store

    rows = {r["method"]: r for r in demo.table}
    assert {"gold documents", "one-step oracle", "BM25 (prompt+response)"} <= set(rows)
    assert all(np.isfinite(r["tail-patch@10"]) for r in demo.table)
    assert rows["gold documents"]["recall@10"] == 1.0 and rows["gold documents"]["mrr"] == 1.0
    world = "?people=12&distractors=12"
    train, queries = load_rows("builtin:bios" + world), load_rows("builtin:bios:queries" + world)
    loaded = load_model(str(demo.out / "model"), device="cpu")
    store = open_store(demo.out / "store")
    effects = answer_effects(store, loaded.model, loaded.tokenizer, queries, train, demo.out / "model")
    bm25 = bm25_scores([r.data["text"] for r in train], [q.data["prompt"] + q.data["response"] for q in queries])
    assert rows["BM25 (prompt+response)"]["tail-patch@10"] == pytest.approx(tail_patch(bm25, effects, 10), rel=1e-4)
    oracle = rows["one-step oracle"]["tail-patch@10"]
    assert oracle == pytest.approx(tail_patch(effects, effects, 10), rel=1e-4)
    gold = gold_positions(queries, store.ids)
    assert rows["gold documents"]["tail-patch@10"] == pytest.approx(mean_effect(effects, gold), rel=1e-4)
    # no method's top 10 can average a larger effect than the top 10 by effect
    assert all(oracle >= r["tail-patch@10"] - 1e-9 for m, r in rows.items() if m != "gold documents")
    assert "| tail-patch@10 |" in format_table(demo.table).splitlines()[0]
