"""End-to-end check of LESS selection: does LESS's top 5 % beat a random 5 % on the target task?

Setting (``builtin:instruct``, everything trained here on CPU, nothing downloaded):

- base model: a tiny Llama trained from scratch (``dataworth.model.train``) on the pool's *chat* rows plus the
  ``builtin:bios`` documents (generic text with names, dates and numbers, so digit tokens are trained),
  i.e. a model that knows the chat format and some English but none of the target tasks;
- pool: ``builtin:instruct?pool=N`` (each target family a 6-10 % minority, 61 % chat); validation rows
  ``builtin:instruct:valid`` (8 per subtask); held-out test rows ``builtin:instruct:test`` (50 per task,
  disjoint from pool and validation);
- per seed: LESS (LoRA warm-up on a random 5 %, Adam features at each epoch checkpoint, cosine matching
  weighted by η̄, mean within subtask / max across, top 5 %) vs a random 5 % (another seed stream); both
  LoRA fine-tuned with the same settings and evaluated on the task's test rows: loss per target token and
  exact match of the greedy answer. The full pool, same settings, is the reference (``--full-pool-seeds``).
- the learned pre-filter on the same runs: labels are the LESS scores under mean / max / min aggregation
  within subtasks; 20 % of the pool labelled, the predicted-top 20 % kept; recall of the true top 5 %,
  compute saved (CPU time: cheap forward pass over the pool + gradient passes of labelled and kept rows at
  every checkpoint, vs gradient passes of every row), R², bucket accuracy; and the target share of the
  top 5 % under each aggregation.

Prints Markdown tables (mean ± std over seeds) and writes every figure as JSON (``--json``)::

    .venv/bin/python benchmarks/less_vs_random.py --out /tmp/less-bench --json less_vs_random.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_base(out: Path, rows: list[dict], args) -> Path:
    """Tiny Llama from scratch on ``rows`` (reused when ``out`` already holds one)."""
    from dataworth.model.train import TrainConfig, train

    if (out / "dataworth_train.json").is_file():
        return out
    data = write_jsonl(rows, out.parent / "base_corpus.jsonl")
    config = TrainConfig.from_preset(
        "tiny", vocab_size=512, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=4,
        intermediate_size=4 * args.hidden, epochs=args.base_epochs, lr=3e-3, batch_size=16, max_length=96,
        seed=0, threads=1,
    )
    result = train(str(data), out, config, queries_spec=None, progress=False)
    say(f"base: {len(rows)} rows, {args.base_epochs} epochs, final loss {result.epoch_losses[-1]:.3f}, "
        f"{result.seconds:.0f} s")
    return out


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/dataworth-less-bench")
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--tasks", default="units,arithmetic")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--percent", type=float, default=5.0)
    parser.add_argument("--dense-dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--base-epochs", type=int, default=5)
    parser.add_argument("--warmup-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--full-pool-seeds", type=int, default=1, help="seeds of the full-pool reference (0: skip)")
    parser.add_argument("--full-pool-epochs", type=int, default=2,
                        help="epochs of the full-pool reference (already 20x the steps per epoch of a 5 %% run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from dataworth.data.encode import encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.model.load import load_model
    from dataworth.selection.prefilter import PrefilterConfig, cheap_features, evaluate_prefilter
    from dataworth.selection.less import SelectConfig, compute_scores, evaluate_model, features, finetune, load_task_rows, match, random_subset, rank_rows, selection_size, warmup, write_rows
    from dataworth.data.worlds.instruct import InstructConfig, make_instruct

    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    world = make_instruct(InstructConfig(pool=args.pool))
    pool_path = write_jsonl(world.rows("train"), out / "pool.jsonl")
    bios = [r.data for r in load_rows("builtin:bios")]
    base = build_base(out / "base", [r for r in world.rows("train") if r["task"] == "chat"] + bios, args)
    valid_spec = f"builtin:instruct:valid?pool={args.pool}"
    test_spec = f"builtin:instruct:test?pool={args.pool}"
    pool_rows = load_rows(str(pool_path))
    task_of = [r.data["task"] for r in pool_rows]
    test_rows = {t: load_task_rows(test_spec, t, what="test") for t in tasks}
    k = selection_size(len(pool_rows), args.percent)
    results: dict = {"config": vars(args), "k": k, "pool_counts": world.train_counts, "runs": [], "prefilter": [],
                     "aggregates": []}

    def record(task, method, seed, model_dir, config, positions):
        metrics = evaluate_model(model_dir, test_rows[task], config)
        share = None if positions is None else sum(task_of[i] == task for i in positions) / len(positions)
        results["runs"].append({"task": task, "method": method, "seed": seed, "loss": metrics["loss"],
                                "exact_match": metrics["exact_match"], "target_share": share})
        say(f"  {method:6s} seed {seed} {task:10s} loss {metrics['loss']:.3f} EM {metrics['exact_match']:.3f} "
            f"share {share if share is None else round(share, 3)}")

    # cheap pre-filter features: one forward pass of the frozen base over the pool (same for every seed)
    loaded = load_model(base, device="cpu")
    encoded, _ = encode_rows(pool_rows, loaded.tokenizer, max_length=96)
    torch.set_num_threads(1)  # as the feature passes (SelectConfig.threads=1), so CPU times compare like for like
    cheap_features(loaded.model, loaded.tokenizer, encoded[:64])  # warm-up, so one-time costs are not counted
    t0 = time.process_time()  # CPU time: the machine may be shared, wall-clock would measure the neighbours
    cheap = cheap_features(loaded.model, loaded.tokenizer, encoded)
    cheap_seconds = (time.process_time() - t0) / len(pool_rows)

    for seed in range(args.seeds):
        run_dir = out / f"seed-{seed}"
        config = SelectConfig(
            run=str(run_dir), pool=str(pool_path), base=str(base), valid=valid_spec, test=test_spec,
            tasks=tuple(tasks), seed=seed, warmup_percent=args.percent, warmup_epochs=args.warmup_epochs,
            finetune_epochs=args.finetune_epochs, lr=args.lr, batch_size=8, lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r, lora_targets=LORA_TARGETS, max_length=96, dense_dim=args.dense_dim,
            percent=args.percent, feature_batch_size=32, threads=1,
        )
        t0 = time.perf_counter()
        warmup(config, progress=False)
        feature_record = features(config, progress=False)
        grad_seconds = sum(c["pool_cpu_seconds"] for c in feature_record["checkpoints"]) / len(pool_rows)
        say(f"seed {seed}: warm-up + features {time.perf_counter() - t0:.0f} s")
        for task in tasks:
            summary = match(config, task)
            chosen = [i for i in rank_rows(compute_scores(config, task)["scores"])[:k]]
            finetune(config, summary["selection"], run_dir / "final" / task, progress=False)
            record(task, "LESS", seed, run_dir / "final" / task, config, chosen)
            for aggregate in ("mean", "max", "min"):
                scores = compute_scores(dataclasses.replace(config, aggregate=aggregate), task)["scores"]
                top = rank_rows(scores)[:k]
                results["aggregates"].append({"task": task, "seed": seed, "aggregate": aggregate,
                                              "target_share": sum(task_of[i] == task for i in top) / k})
                for predictor in ("ridge", "gbm"):
                    pre = PrefilterConfig(labelled_fraction=0.2, keep_fraction=0.2, percent=args.percent,
                                          predictor=predictor, seed=seed)
                    metrics = evaluate_prefilter(scores, cheap, pre, cheap_seconds, grad_seconds)[0]
                    results["prefilter"].append({"task": task, "seed": seed, "aggregate": aggregate,
                                                 "predictor": predictor, **metrics})
        positions = random_subset(len(pool_rows), k, 10_000 + seed)  # not the warm-up subset's stream
        random_path = write_rows([pool_rows[i] for i in positions], run_dir / "random" / "rows.jsonl")
        finetune(config, random_path, run_dir / "random" / "model", progress=False)
        for task in tasks:
            record(task, "random", seed, run_dir / "random" / "model", config, positions)
        if seed < args.full_pool_seeds:
            full_config = dataclasses.replace(config, finetune_epochs=args.full_pool_epochs)
            finetune(full_config, pool_path, run_dir / "full" / "model", progress=False)
            for task in tasks:
                record(task, "full", seed, run_dir / "full" / "model", config, None)
        say(f"seed {seed} done at {time.perf_counter() - started:.0f} s wall, "
            f"{time.process_time() - cpu_started:.0f} s CPU")

    results["seconds"] = time.perf_counter() - started
    results["cpu_seconds"] = time.process_time() - cpu_started  # this process only; the machine may be shared
    print(tables(results, tasks, k, len(pool_rows)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def tables(results: dict, tasks: list[str], k: int, n: int) -> str:
    """Markdown: end-to-end (loss, exact match, target share) and the pre-filter, mean ± std over seeds."""
    lines = [f"Pool {n} rows, selection k = {k} (5 %); test: 50 held-out rows per task; mean ± std over seeds.",
             "", "| task | training rows | seeds | test loss ↓ | exact match ↑ | target-task share of training rows |",
             "|---|---|---|---|---|---|"]
    epochs = results["config"]["finetune_epochs"]
    label = {"LESS": f"LESS top {k}, {epochs} epochs", "random": f"random {k}, {epochs} epochs",
             "full": f"full pool ({n}), {results['config']['full_pool_epochs']} epochs"}
    for task in tasks:
        for method in ("LESS", "random", "full"):
            runs = [r for r in results["runs"] if r["task"] == task and r["method"] == method]
            if runs:
                shares = [r["target_share"] for r in runs]
                share = mean_std(shares) if shares[0] is not None else f"{results['pool_counts'][task] / n:.3f}"
                lines.append(f"| {task} | {label[method]} | {len(runs)} | {mean_std([r['loss'] for r in runs])} | "
                             f"{mean_std([r['exact_match'] for r in runs])} | {share} |")
    lines += ["", "Aggregation within subtask (then max across): target-task share of the top 5 %", "",
              "| task | mean | max | min |", "|---|---|---|---|"]
    for task in tasks:
        cells = [mean_std([a["target_share"] for a in results["aggregates"]
                           if a["task"] == task and a["aggregate"] == agg]) for agg in ("mean", "max", "min")]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "Learned pre-filter (20 % labelled, predicted-top 20 % kept; 60 % of gradient passes skipped)", "",
              "| task | labels | predictor | recall of true top 5 % | random-keep recall | compute saved | R² | "
              "Spearman | bucket acc. (5) |", "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for agg in ("mean", "max", "min"):
            for predictor in ("ridge", "gbm"):
                rows = [p for p in results["prefilter"]
                        if p["task"] == task and p["aggregate"] == agg and p["predictor"] == predictor]
                if rows:
                    cols = [mean_std([r[key] for r in rows]) for key in
                            ("recall", "recall_random", "compute_saved", "r2", "spearman", "bucket_accuracy")]
                    lines.append(f"| {task} | {agg} | {predictor} | " + " | ".join(cols) + " |")
    lines.append(f"\nwall-clock: {results['seconds'] / 60:.1f} min; CPU time of this process: "
                 f"{results['cpu_seconds'] / 60:.1f} min")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
