"""Fact tracing on the demo's bios store at several EK-FAC dampings (0.1x … 1e-8), for the exact demo store and a
LoGra random-64 all-modules store (the extract defaults), on one model: `make demo`, then

    .venv/bin/python benchmarks/bios_damping.py demo_out
"""

import json
import sys
from pathlib import Path

import numpy as np

from dataworth.data.rows import load_rows
from dataworth.evaluation.facts import gold_positions
from dataworth.evaluation.metrics import fact_tracing_metrics
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.gradients.queries import query_gradients
from dataworth.influence.curvature import fit_curvature
from dataworth.influence.scores import score_rows
from dataworth.model.load import load_model
from dataworth.store.reader import open_store

out = Path(sys.argv[1])
loaded = load_model(str(out / "model"), device="cpu")
queries = load_rows("builtin:bios:queries")
stores = {"exact down_proj (demo)": out / "store"}
d = ExtractConfig()
defaults = out / "store_defaults"
if not (defaults / "manifest.json").exists():
    extract(ExtractConfig(model=str(out / "model"), data="builtin:bios", out=str(defaults), device="cpu"))
stores[f"defaults ({d.projection}-{d.rank_in}, {d.modules}, {d.dtype})"] = defaults
res = {}
for label, path in stores.items():
    store = open_store(path)
    gold = gold_positions(queries, store.ids)
    q_rows = query_gradients(store, loaded.model, loaded.tokenizer, queries)
    for damping in ("0.1x", "1e-2x", "1e-3x", "1e-4x", 1e-8):
        curv = fit_curvature(store, "ekfac", damping)
        for mode in ("dot", "cosine"):
            m = score_rows(store, q_rows, [q.id for q in queries], curv, mode=mode, top_k=10, full=True).matrix
            r = fact_tracing_metrics(np.asarray(m), gold, ks=(1, 10))
            res[f"{label} | {damping} | {mode}"] = r
            print(f"{label:40s} {str(damping):6s} {mode:6s} r@1 {r['recall@1']:.3f} r@10 {r['recall@10']:.3f} mrr {r['mrr']:.3f}", flush=True)
(out / "bios_damping.json").write_text(json.dumps(res, indent=1))
