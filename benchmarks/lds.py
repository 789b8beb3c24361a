"""The measured LDS table: dataworth's attribution options judged by the Linear Datamodeling Score.

One command builds (or resumes) the tiny task — the `tiny-test` model trained on a reduced `builtin:bios`
world (8 people × 3 documents + 8 distractors = 32 rows, 40 fact queries), 32 random half-subsets × 2
seeds retrained from scratch and cached — then scores every option below against the *same* retrains
(``dataworth.evaluation.retrain.build_lds_task``; ``benchmarks/peers.py`` uses the same task for Kronfluence & co.)
and prints one table: LDS (mean over queries) with its bootstrap 95% interval, the noise ceiling (Spearman
between the two retrain seeds), and the time of each option (extraction of its stores + fit + scoring).

Sign: a positive score means the training row lowers the query loss; LDS = Spearman(summed scores of the
included rows, −query loss).

Usage::

    .venv/bin/python benchmarks/lds.py                 # the table (retrains: ~15-25 CPU-min the first time)
    .venv/bin/python benchmarks/lds.py --quick         # a smoke run on an 11-row world (8 subsets, 2 epochs)
    .venv/bin/python benchmarks/lds.py --json lds.json # also the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from dataworth.evaluation.methods import AttributionConfig as A
from dataworth.evaluation.retrain import LdsConfig, build_lds_task
from dataworth.evaluation.methods import attribution_scores, store_dir_for

WORLD = "?people=8&distractors=8"
QUICK_WORLD = "?people=3&distractors=2"


def task_config(quick: bool, measure: str = "answer") -> LdsConfig:
    from dataworth.model.train import TrainConfig

    world = QUICK_WORLD if quick else WORLD
    return LdsConfig(data="builtin:bios" + world, queries="builtin:bios:queries" + world,
                     train=TrainConfig.from_preset("tiny-test", epochs=2 if quick else None),
                     alpha=0.5, subsets=8 if quick else 32, replicates=2, checkpoints=2 if quick else 4, seed=0,
                     measure=measure)


def task_dir_name(quick: bool, measure: str) -> str:
    """``out/<this>``: one cache per task (a cache never holds another configuration's retrains)."""
    return ("lds-quick" if quick else "lds") + ("" if measure == "answer" else "-end-token")


def methods(quick: bool) -> list[tuple[str, A]]:
    """(group, option) rows of the table."""
    rows = []
    for curvature in ("none", "kfac", "ekfac", "raw"):
        for mode in ("dot", "cosine", "relative"):
            rows.append(("curvature × mode (random-32)", A(projection="random", rank=32, curvature=curvature, mode=mode)))
    for projection in ("random", "pca"):
        for rank in (16, 64):
            rows.append(("projection", A(projection=projection, rank=rank, curvature="ekfac", mode="dot")))
    rows.append(("projection", A(projection="pca", rank=32, curvature="ekfac", mode="dot")))
    rows.append(("projection", A(projection="identity", curvature="ekfac", mode="dot")))
    rows.append(("projection", A(projection="identity", curvature="none", mode="dot")))
    rows.append(("projection", A(projection="identity", curvature="kfac", mode="dot")))
    rows.append(("projection", A(projection="identity", curvature="ekfac", mode="relative")))
    for mode in ("dot", "relative"):
        rows.append(("checkpoint ensemble", A(projection="random", rank=32, curvature="ekfac", mode=mode,
                                               checkpoints="ensemble")))
    rows.append(("checkpoint ensemble", A(projection="pca", rank=32, curvature="ekfac", mode="dot",
                                           checkpoints="ensemble")))
    rows.append(("checkpoint ensemble", A(projection="identity", curvature="ekfac", mode="dot",
                                           checkpoints="ensemble")))
    for mix in (0.0, 0.5):
        rows.append(("trackstar", A(projection="identity", rank=1024, optimizer="adam", mix=mix)))
    rows.append(("trackstar", A(projection="identity", rank=1024, optimizer="adam", mix=0.5, checkpoints="ensemble")))
    rows.append(("trackstar", A(projection="identity", rank=0, optimizer="adam")))
    rows.append(("trackstar", A(projection="identity", rank=0, optimizer="adam", checkpoints="ensemble")))
    # Which layers are watched: the MLP layers (where transformers store facts) or only their output
    # projections (dataworth's demo default) instead of every linear layer.
    for modules in ("mlp", r"mlp\.down_proj"):
        rows.append(("layers", A(projection="identity", curvature="ekfac", mode="dot", modules=modules)))
    rows.append(("layers", A(projection="random", rank=128, curvature="ekfac", mode="dot", modules="mlp")))
    rows.append(("layers", A(projection="identity", curvature="ekfac", mode="dot", modules="mlp",
                             checkpoints="ensemble")))
    rows.append(("layers", A(projection="identity", rank=0, optimizer="adam", modules="mlp", checkpoints="ensemble")))
    # Attributing the query loss *with* the appended end token while the retrains measure the answer only
    # (a mismatched measurement; dataworth's query gradients leave the end token out by default):
    for option in (A(projection="random", rank=32, curvature="ekfac", mode="dot"),
                   A(projection="identity", curvature="none", mode="dot"),
                   A(projection="identity", curvature="ekfac", mode="dot"),
                   A(projection="identity", curvature="ekfac", mode="dot", checkpoints="ensemble")):
        rows.append(("end token measured", replace(option, measure_end_token=True)))
    if quick:
        rows = [r for r in rows if r[1].curvature != "raw" or r[1].mode == "dot"]
    return rows


def baseline_scores(task) -> dict[str, np.ndarray]:
    """Reference rows: random scores, BM25 of the query text against each document, the gold documents."""
    from dataworth.evaluation.baselines import bm25_scores

    queries, rows = task.query_rows(), task.train_rows()
    rng = np.random.default_rng(0)
    where = {t: i for i, t in enumerate(task.train_ids)}
    gold = np.zeros((len(queries), len(rows)))
    for qi, q in enumerate(queries):
        gold[qi, [where[g] for g in q.data.get("gold", [])]] = 1.0
    return {
        "random scores": rng.normal(size=(len(queries), len(rows))),
        "BM25 (prompt+response)": bm25_scores([r.data["text"] for r in rows],
                                              [q.data["prompt"] + q.data["response"] for q in queries]),
        "gold documents = 1": gold,
    }


def store_keys(task, method: A) -> list[str]:
    ckpts = task.checkpoints if method.checkpoints == "ensemble" else [task.model_dir]
    return [store_dir_for(task, Path(c), method).name for c in ckpts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="task directory [out/lds, or out/lds-quick with --quick]")
    parser.add_argument("--quick", action="store_true", help="smoke run on an 11-row world")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--only", default=None, help="only options whose label contains one of these '|'-separated texts")
    parser.add_argument("--measure", default="answer", choices=("answer", "answer+end"),
                        help="query loss each retrain measures (LdsConfig.measure)")
    args = parser.parse_args()
    out = Path(args.out or Path("out") / task_dir_name(args.quick, args.measure))

    started = time.perf_counter()
    task = build_lds_task(out, task_config(args.quick, args.measure), progress=True)
    print(f"task: {len(task.train_ids)} rows, {len(task.query_ids)} queries, {task.masks.shape[0]} subsets × "
          f"{task.losses.shape[0]} seeds, retrains ready in {time.perf_counter() - started:.0f}s "
          f"(cache {out})", file=sys.stderr)

    results = []
    for label, scores in baseline_scores(task).items():
        results.append({"group": "baselines", "method": label, **task.evaluate(scores), "seconds": 0.0})
    extract_s: dict[str, float] = {}
    memo: dict = {}  # query gradients and fitted curvatures shared between options of the same store
    for group, method in methods(args.quick):
        if args.only and not any(part in method.label() for part in args.only.split("|")):
            continue
        keys = store_keys(task, method)
        fresh = [k for k in keys if not (out / "stores" / k / "manifest.json").exists()]
        t0 = time.perf_counter()
        try:
            scores = attribution_scores(task, method, memo=memo)
        except Exception as exc:  # an option that cannot run here is reported, not hidden
            results.append({"group": group, "method": method.label(), "error": f"{type(exc).__name__}: {exc}"})
            print(f"{method.label()}: {exc}", file=sys.stderr)
            continue
        elapsed = time.perf_counter() - t0
        if fresh:  # first use of these stores: the time includes their extraction; remember it per store
            for k in fresh:
                extract_s[k] = elapsed / len(fresh)
            seconds = elapsed
        else:
            seconds = elapsed + sum(extract_s.get(k, 0.0) for k in keys)
        label = method.label() + ("" if method.modules == "all" else f" [{method.modules}]")
        row = {"group": group, "method": label, **task.evaluate(scores), "seconds": round(seconds, 2)}
        results.append(row)
        print(f"{row['method']}: lds {row['lds']:.3f} [{row['lds_ci_low']:.3f}, {row['lds_ci_high']:.3f}] "
              f"{seconds:.1f}s", file=sys.stderr)

    print(format_table(results, task))
    if args.json:
        Path(args.json).write_text(json.dumps({"task": task.config.identity(), "rows": results}, indent=2) + "\n")


def format_table(results: list[dict], task) -> str:
    first = next((r for r in results if "noise_ceiling" in r), {})
    ceiling, lds_ceiling = first.get("noise_ceiling", float("nan")), first.get("lds_ceiling", float("nan"))
    lines = [f"LDS on {task.config.data}: {len(task.train_ids)} rows, {len(task.query_ids)} queries, "
             f"{task.masks.shape[0]} subsets (α={task.config.alpha}) × {task.losses.shape[0]} seeds; "
             f"noise_ceiling {ceiling:.3f} (seed vs seed), lds_ceiling {lds_ceiling:.3f} (perfect predictor "
             f"vs the {task.losses.shape[0]}-seed mean, Spearman–Brown)",
             "", "| group | method | LDS | 95% CI | seconds |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['group']} | {r['method']} | — | {r['error'][:60]} | — |")
            continue
        ci = f"[{r['lds_ci_low']:.3f}, {r['lds_ci_high']:.3f}]"
        lds = "nan" if math.isnan(r["lds"]) else f"{r['lds']:.3f}"
        lines.append(f"| {r['group']} | {r['method']} | {lds} | {ci} | {r['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
