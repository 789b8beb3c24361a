"""How extract / fit / score cost grows with the number of store rows and of queries, and what 1B tokens
would cost — an extrapolation from the measured per-token figures, stated as an estimate.

    .venv/bin/python benchmarks/scaling.py [--extract-rows 32,64,128] [--rows 2000,4000,8000]
                                           [--queries 1,8,64] [--seq 64] [--rank 16] [--json FILE]

1. extract: the tiny built-in Llama (``dataworth.model.train.PRESETS["tiny"]``, random weights) on synthetic rows
   of ``--seq`` tokens, MLP modules, rank ``--rank``; a fresh store per size, wall time of ``extract``.
2. fit / score: synthetic stores with the *same row layout* as that extraction (so the per-row figures
   combine), float16 rows; ``fit_curvature`` (raw, ekfac) and ``score_rows`` (dot, top-10) wall times.
   Every ``read_rows`` call is counted, so "store passes" = rows read / store rows is measured, not assumed:
   one pass per query batch, and ``--memory-budget`` shows more batches → more passes.
3. Each cost is fitted with a least-squares line ``t = a + b·rows`` (R² printed): linear in rows means
   the slope ``b`` is the per-row cost; per-token = per-row / tokens-per-row.
4. 1B-token estimate: rows = 1e9 / tokens-per-row; time = per-token (or per-row) cost × size, on this
   machine, one process. Divide by the number of ranks for torchrun (shards are independent). It ignores
   I/O limits of a real disk and the model size: an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataworth.model.train import PRESETS

    p = PRESETS["tiny"]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                      num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                      num_key_value_heads=p.num_kv_heads, max_position_embeddings=1024,
                      attn_implementation="eager", tie_word_embeddings=p.tie_embeddings)
    return LlamaForCausalLM(cfg).eval()


def synthetic_rows(n: int, seq: int, vocab: int, seed: int = 0):
    from dataworth.data.batching import Encoded

    g = torch.Generator().manual_seed(seed)
    return [Encoded(f"r{i}", torch.randint(3, vocab, (seq,), generator=g).tolist(), [0] + [1] * (seq - 1))
            for i in range(n)]


def line_fit(x: list[float], y: list[float]) -> dict:
    """Least squares ``y = a + b·x`` with R²."""
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    pred = a + b * np.asarray(x, float)
    ss_res = float(np.sum((np.asarray(y) - pred) ** 2))
    ss_tot = float(np.sum((np.asarray(y) - np.mean(y)) ** 2)) or 1e-30
    return {"intercept_s": float(a), "slope_s_per_row": float(b), "r2": 1 - ss_res / ss_tot}


def measure_extract(rows_list: list[int], seq: int, rank: int, root: Path) -> tuple[list[dict], object]:
    from dataworth.gradients.extract import ExtractConfig, extract

    model = tiny_model()
    vocab = model.config.vocab_size
    out, store = [], None
    for n in rows_list:
        target = root / f"extract_{n}"
        cfg = ExtractConfig(model="tiny", data="synthetic", out=str(target), modules="mlp", rank_in=rank,
                            rank_out=rank, dtype="float16", batch_size=8, shard_rows=64, device="cpu")
        encoded = synthetic_rows(n, seq, vocab)
        started = time.perf_counter()
        store = extract(cfg, model=model, encoded=encoded, progress=False)
        seconds = time.perf_counter() - started
        out.append({"rows": n, "tokens": n * seq, "seconds": seconds, "tokens_per_s": n * seq / seconds})
        print(f"extract  rows {n:>7} tokens {n * seq:>9}  {seconds:8.2f}s  {n * seq / seconds:10,.0f} tok/s", flush=True)
    return out, store


def synthetic_store(path: Path, like, n: int, seed: int = 0):
    """``n`` random float16 rows with the module layout of store ``like`` (and its KFAC factors)."""
    from dataworth.store.writer import StoreWriter

    rng = np.random.default_rng(seed)
    header = {"projection": {"kind": "random"}, "model": {"fingerprint": "synthetic"}, "data": {}, "config": {}}
    writer = StoreWriter(path, modules=like.modules, dtype="float16", shard_rows=4096, header=header)
    for i, lo in enumerate(range(0, n, 4096)):
        hi = min(n, lo + 4096)
        writer.write_shard(i, rng.standard_normal((hi - lo, like.dim), dtype=np.float32),
                           [f"t{j}" for j in range(lo, hi)], np.zeros(hi - lo), np.ones(hi - lo, np.int64))
    writer.save_tensors("curvature/kfac_factors.safetensors", like.load_tensors("curvature/kfac_factors.safetensors"))
    return writer.finalize()


class ReadCounter:
    """Counts rows read from a store (wraps ``read_rows``)."""

    def __init__(self, store):
        self.rows = 0
        real = store.read_rows

        def counted(start, stop):
            self.rows += stop - start
            return real(start, stop)

        store.read_rows = counted


def measure_fit_score(like, rows_list: list[int], queries_list: list[int], root: Path, budget_mb: float | None
                      ) -> tuple[list[dict], list[dict]]:
    from dataworth.influence.curvature import fit_curvature
    from dataworth.influence.scores import score_rows

    fits, scores = [], []
    for n in rows_list:
        store = synthetic_store(root / f"synthetic_{n}", like, n)
        for kind in ("raw", "ekfac"):
            counter = ReadCounter(store)
            started = time.perf_counter()
            fit_curvature(store, kind)
            seconds = time.perf_counter() - started
            fits.append({"kind": kind, "rows": n, "seconds": seconds, "passes": counter.rows / n})
            print(f"fit {kind:<5} rows {n:>7}  {seconds:8.3f}s  store passes {counter.rows / n:.0f}", flush=True)
        curv = fit_curvature(store, "ekfac")
        for q in queries_list:
            qrows = np.random.default_rng(q).standard_normal((q, store.dim), dtype=np.float32)
            for budget in (None, budget_mb):
                counter = ReadCounter(store)
                started = time.perf_counter()
                res = score_rows(store, qrows, [f"q{i}" for i in range(q)], curv, "dot", top_k=10,
                                 memory_budget_mb=budget)
                seconds = time.perf_counter() - started
                scores.append({"rows": n, "queries": q, "memory_budget_mb": budget, "seconds": seconds,
                               "passes": counter.rows / n, "query_batch": res.summary["query_batch"]})
                print(f"score rows {n:>7} queries {q:>4} budget {str(budget):>6} MiB  {seconds:8.3f}s  "
                      f"store passes {counter.rows / n:.0f} (query batch {res.summary['query_batch']})", flush=True)
        shutil.rmtree(root / f"synthetic_{n}")
    return fits, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extract-rows", default="32,64,128")
    ap.add_argument("--rows", default="2000,4000,8000")
    ap.add_argument("--queries", default="1,8,64")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--memory-budget", type=float, default=64.0, help="MiB, for the bounded score runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="dw-scaling-"))
    try:
        print(f"CPU threads {torch.get_num_threads()}, seq {args.seq}, rank {args.rank}, MLP modules", flush=True)
        ext, like = measure_extract(ints(args.extract_rows), args.seq, args.rank, root)
        fits, scores = measure_fit_score(like, ints(args.rows), ints(args.queries), root, args.memory_budget)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    tokens_per_row = args.seq
    report = {"dim": like.dim, "tokens_per_row": tokens_per_row, "extract": ext, "fit": fits, "score": scores}
    ext_line = line_fit([e["rows"] for e in ext], [e["seconds"] for e in ext])
    report["extract_line"] = ext_line
    lines = {"extract": ext_line}
    for kind in ("raw", "ekfac"):
        pts = [f for f in fits if f["kind"] == kind]
        lines[f"fit_{kind}"] = line_fit([p["rows"] for p in pts], [p["seconds"] for p in pts])
    for q in ints(args.queries):
        pts = [s for s in scores if s["queries"] == q and s["memory_budget_mb"] is None]
        lines[f"score_q{q}"] = line_fit([p["rows"] for p in pts], [p["seconds"] for p in pts])
    report["lines"] = lines
    print("\n| stage | per row (µs) | per token (µs) | R² of t = a + b·rows |")
    print("|---|---|---|---|")
    for name, fit in lines.items():
        print(f"| {name} | {fit['slope_s_per_row'] * 1e6:,.2f} | {fit['slope_s_per_row'] / tokens_per_row * 1e6:,.3f} "
              f"| {fit['r2']:.4f} |")
    passes = sorted({(s["queries"], s["query_batch"], s["passes"]) for s in scores})
    print("\nstore passes (queries, query batch, passes): " + ", ".join(f"({q}, {b}, {p:.0f})" for q, b, p in passes))

    billion = 1e9
    rows_1b = billion / tokens_per_row
    est = {
        "tokens": billion, "rows": rows_1b, "store_bytes_float16": rows_1b * like.dim * 2,
        "extract_hours": ext_line["slope_s_per_row"] * rows_1b / 3600,
        "fit_ekfac_hours": lines["fit_ekfac"]["slope_s_per_row"] * rows_1b / 3600,
        "fit_raw_hours": lines["fit_raw"]["slope_s_per_row"] * rows_1b / 3600,
        **{f"score_q{q}_hours": lines[f"score_q{q}"]["slope_s_per_row"] * rows_1b / 3600 for q in ints(args.queries)},
    }
    report["estimate_1b_tokens"] = est
    print(f"\nESTIMATE for 1B tokens ({rows_1b:,.0f} rows of {tokens_per_row} tokens, {like.dim} dims, "
          f"store {est['store_bytes_float16'] / 2**40:.2f} TiB float16), one process on this machine, "
          "extrapolated linearly from the per-row slopes above (not measured at that size):")
    for key, value in est.items():
        if key.endswith("_hours"):
            print(f"  {key[:-6]:<12} ≈ {value:,.1f} h")
    print("  (W ranks under torchrun divide extract/fit/score time by about W: shards are independent.)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
