"""Scoring throughput against a plain in-memory matrix product of the same shapes, measured in one run.

    .venv/bin/python benchmarks/score_throughput.py [--rows N | --large] [--dim-side 32] [--json FILE]

A synthetic store per ``--dtypes`` entry (float16 and float32 by default; ``D = 4096``: 4 modules of 32 × 32,
``N = 10⁵`` rows by default, ``10⁶`` with ``--large``) is written once into a temporary directory with
``StoreWriter``, with KFAC factors so that ``ekfac`` can be fitted. For curvature ``none`` and ``ekfac`` and
``Q`` in (1, 16, 64) queries it times

- dataworth: ``dataworth.influence.scores.score_rows(store, queries, ids, curvature, mode="dot", top_k=10)`` — reads
  the store block by block (positioned reads into two reused buffers, read ahead; float16 widened to
  float32 in cache-sized pieces), multiplies, keeps the exact top-k;
- plain: ``rows_f32 @ preconditioned.T`` on the same rows already in memory as one float32 array (read
  before any timing), with ``preconditioned`` the same ``(F + λI)⁻¹`` queries dataworth uses.

Throughput is ``rows × dims / s``; ratio = dataworth ÷ plain (target ≥ 0.8 when the store fits in the page
cache, which is warmed by one full read first). ``s/query`` = dataworth seconds ÷ Q. Each timing is the best
of ``--repeat`` runs. With ``--large`` the float32 copy of 10⁶ rows (16 GB) may not fit in memory: the plain
product is then timed on the first ``--plain-rows`` rows (default 10⁵) and scaled to ``N`` rows (its cost is
linear in N); the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_store(root: Path, n_rows: int, side: int, n_modules: int, shard_rows: int, dtype: str = "float16"):
    """A finished ``dtype`` store of standard-normal rows with identity-ish KFAC factors (random SPD)."""
    import torch

    from dataworth.store.format import KFAC_FILE as KFAC_FACTORS
    from dataworth.store.writer import StoreWriter
    from dataworth.store.format import modules_layout
    from dataworth.store.reader import open_store

    specs = modules_layout([(f"m{i}", side, side) for i in range(n_modules)])
    header = {"projection": {"kind": "random"}, "model": {"fingerprint": "synthetic"}, "data": {"rows": n_rows},
              "config": {"model": "synthetic"}}
    writer = StoreWriter(root, modules=specs, dtype=dtype, shard_rows=shard_rows, header=header)
    rng = np.random.default_rng(0)
    dim = side * side * n_modules
    for shard, start in enumerate(range(0, n_rows, shard_rows)):
        count = min(shard_rows, n_rows - start)
        rows = rng.standard_normal((count, dim), dtype=np.float32)
        writer.write_shard(shard, rows, [f"r{start + i}" for i in range(count)], np.zeros(count),
                           np.ones(count, dtype=np.int64))
    factors = {}
    for spec in specs:
        for key, size in (("S", spec.k_out), ("A", spec.k_in)):
            x = rng.standard_normal((size, 4 * size))
            factors[f"{spec.name}.{key}"] = torch.from_numpy(x @ x.T / (4 * size)).float()
    writer.save_tensors(KFAC_FACTORS, factors, metadata={"n_rows": str(n_rows), "n_tokens": str(n_rows)})
    writer.finalize()
    return open_store(root, verify=False)


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--large", action="store_true", help="10⁶ rows (8 GB store)")
    parser.add_argument("--dim-side", type=int, default=32, help="modules are side × side")
    parser.add_argument("--modules", type=int, default=4)
    parser.add_argument("--queries", default="1,16,64")
    parser.add_argument("--curvatures", default="none,ekfac")
    parser.add_argument("--dtypes", default="float16,float32", help="store dtypes, each its own store")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--plain-rows", type=int, default=100_000,
                        help="with --large: rows the plain product is timed on (scaled to N)")
    parser.add_argument("--shard-rows", type=int, default=16384)
    parser.add_argument("--tmp", default=None, help="directory for the temporary store (default: system tmp)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    n_rows = 1_000_000 if args.large else args.rows

    results = []
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            results += measure_dtype(Path(tmp) / "store", dtype, n_rows, args)
    print(table(results))
    if any(r["plain_rows_timed"] != r["rows"] for r in results):
        print(f"\nplain matmul timed on the first {results[0]['plain_rows_timed']} rows in memory and scaled to "
              f"{n_rows} rows.")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure_dtype(path: Path, dtype: str, n_rows: int, args) -> list[dict]:
    """Every (curvature, Q) timing on one ``dtype`` store (written, read once to warm the page cache)."""
    from dataworth.influence.curvature import fit
    from dataworth.influence.scores import score_rows

    t0 = time.perf_counter()
    store = build_store(path, n_rows, args.dim_side, args.modules, args.shard_rows, dtype)
    print(f"store: {n_rows} rows × {store.dim} dims {dtype} written in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    plain_n = min(n_rows, args.plain_rows) if args.large else n_rows
    rows_f32 = store.read_rows(0, plain_n)  # in memory before any timing
    for _ in store.iter_blocks(args.shard_rows, reuse=True):  # warm the page cache with one full read
        pass
    results = []
    for kind in args.curvatures.split(","):
        curvature = fit(store.path, kind)
        for q in (int(x) for x in args.queries.split(",")):
            queries = np.random.default_rng(q).standard_normal((q, store.dim)).astype(np.float32)
            ids = [f"q{i}" for i in range(q)]
            preconditioned = curvature.precondition64(queries).astype(np.float32)
            dw_s = best_of(args.repeat, lambda: score_rows(store, queries, ids, curvature, mode="dot", top_k=10))
            plain_s = best_of(args.repeat, lambda: rows_f32 @ preconditioned.T) * n_rows / plain_n
            work = n_rows * store.dim
            results.append({"dtype": dtype, "curvature": kind, "rows": n_rows, "dims": store.dim, "queries": q,
                            "dataworth_rows_dims_per_s": work / dw_s, "plain_rows_dims_per_s": work / plain_s,
                            "ratio": plain_s / dw_s, "seconds_per_query": dw_s / q, "dataworth_s": dw_s,
                            "plain_s": plain_s, "plain_rows_timed": plain_n})
            print(f"{dtype} {kind} Q={q}: dataworth {dw_s:.3f}s, plain {plain_s:.3f}s", file=sys.stderr)
    return results


def table(results: list[dict]) -> str:
    lines = ["| store dtype | curvature | rows | dims | Q | dataworth rows×dims/s | plain matmul rows×dims/s | ratio | s/query |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['dtype']} | {r['curvature']} | {r['rows']:,} | {r['dims']} | {r['queries']} | "
                     f"{r['dataworth_rows_dims_per_s']:.3g} | {r['plain_rows_dims_per_s']:.3g} | {r['ratio']:.2f} | "
                     f"{r['seconds_per_query']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
