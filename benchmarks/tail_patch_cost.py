"""What tail-patch's one-step effects cost on SmolLM2-135M-Instruct (CPU, one thread), to budget `eval facts`:
the full ``[Q, N]`` matrix against the (query, row) pairs the figures need.

Q chat-formatted bios fact questions, N bios training rows; the step is that of a ``train --preset lora`` run
(LoRA r = 8 on q/k/v/o, AdamW state from two real steps so that B ≠ 0) and, for comparison, a plain SGD step on
all 135 M weights. The needed pairs are simulated as the union of 7 methods' top 10 drawn at random per query
(real methods overlap more, so this over-counts). A few rows are timed measured on 1 query, on their needed
queries and on all; a row costs ``a + b·k`` for ``k`` measured queries (least squares), and the totals over all
rows are extrapolated from it.

    PYTHONPATH=src HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tail_patch_cost.py [Q N TIMED_ROWS]
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dataworth.data.batching import collate, example_losses
from dataworth.data.encode import encode_rows, measured_queries
from dataworth.data.rows import load_rows
from dataworth.evaluation.effects import effects_flops, one_step_effects
from dataworth.model.load import load_model
from dataworth.model.optimizer import TRAINER_STATE, save_optimizer_state
from dataworth.model.train import PRESETS, attach_lora

torch.set_num_threads(1)
n_queries, n_rows, timed = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (20, 200, 6)
METHODS, K = 7, 10


def clock(run):
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return out, time.perf_counter() - wall, time.process_time() - cpu


started = time.perf_counter()
loaded = load_model("smollm2", device="cpu")
tok = loaded.tokenizer
print(f"load_model('smollm2'): {time.perf_counter() - started:.1f} s", flush=True)
queries = load_rows("builtin:bios:queries")[:n_queries]
rows = load_rows("builtin:bios")[:n_rows]
train_enc, _ = encode_rows(rows, tok, max_length=512)
query_enc = measured_queries(encode_rows(queries, tok)[0], tok, "answer")
print(f"{len(query_enc)} queries (chat template), mean {np.mean([len(q.input_ids) for q in query_enc]):.0f} tokens; "
      f"{len(train_enc)} rows, mean {np.mean([len(r.input_ids) for r in train_enc]):.0f} tokens", flush=True)

rng = np.random.default_rng(0)
need = np.zeros((len(query_enc), len(train_enc)), dtype=bool)
for q in range(len(query_enc)):
    for _ in range(METHODS):
        need[q, rng.choice(len(train_enc), size=K, replace=False)] = True
stepped = np.flatnonzero(need.any(axis=0))
print(f"needed pairs (union of {METHODS} random top-{K}s): {int(need.sum())} of {need.size}, "
      f"{len(stepped)} of {len(train_enc)} rows stepped, {need[:, stepped].sum(0).mean():.1f} queries a row", flush=True)


def measure(label, model, **kwargs):
    """Time `timed` rows measured on 1 query, on their needed queries, on all; fit ``a + b·k`` (least squares,
    CPU seconds: the 2 cores are shared, wall clock is noisy) and extrapolate both totals."""
    cols = stepped[:timed]
    one, needed_sub, full_sub = (np.zeros_like(need) for _ in range(3))
    one[np.argmax(need[:, cols], axis=0), cols] = True
    needed_sub[:, cols] = need[:, cols]
    full_sub[:, cols] = True
    points = {}
    for name, mask in (("1 query", one), ("needed", needed_sub), ("full", full_sub)):
        _, wall, cpu = clock(lambda: one_step_effects(model, tok, train_enc, query_enc, pairs=mask, **kwargs))
        k = float(mask[:, cols].sum(0).mean())
        points[name] = {"k": k, "row_wall_s": wall / timed, "row_cpu_s": cpu / timed}
        print(f"  {label}, {name}: {timed} rows × {k:.1f} queries: {wall:.1f} s wall, {cpu:.1f} s CPU "
              f"→ {wall / timed:.2f} s a row ({cpu / timed:.2f} s CPU)", flush=True)
    k = np.array([p["k"] for p in points.values()])
    fit = {}
    for key in ("row_wall_s", "row_cpu_s"):
        b, a = np.polyfit(k, [p[key] for p in points.values()], 1)
        fit[key] = {"step_s": float(a), "query_s": float(b),
                    "full_total_s": float(len(train_enc) * (a + b * len(query_enc))),
                    "needed_total_s": float(len(stepped) * a + need.sum() * b)}
    flops = {"full": effects_flops(model, train_enc, query_enc), "needed": effects_flops(model, train_enc, query_enc, need)}
    c = fit["row_cpu_s"]
    print(f"  {label}: a row's step {c['step_s']:.2f} s + {c['query_s']:.3f} s a measured query (CPU); all "
          f"{len(train_enc)} rows: full ≈ {c['full_total_s']:.0f} s, needed pairs ≈ {c['needed_total_s']:.0f} s CPU "
          f"(wall fit: {fit['row_wall_s']['full_total_s']:.0f} s / {fit['row_wall_s']['needed_total_s']:.0f} s); "
          f"estimated FLOPs {flops['full']:.2g} / {flops['needed']:.2g}", flush=True)
    return {"points": points, "fit": fit, "flops": flops}


report = {"queries": len(query_enc), "rows": len(train_enc), "needed_pairs": int(need.sum()),
          "stepped_rows": int(len(stepped)), "timed_rows": timed}
with tempfile.TemporaryDirectory() as tmp:
    lora = attach_lora(loaded.model, PRESETS["lora"], "smollm2")
    trainable = [p for p in lora.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)
    batch = collate(train_enc[:8], list(range(8)), tok.pad_token_id if tok.pad_token_id is not None else 0)
    lora.train()
    for _ in range(2):
        opt.zero_grad()
        loss = example_losses(lora(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch)
        (loss.sum() / batch.loss_mask[:, 1:].sum()).backward()
        opt.step()
    lora.eval()
    ckpt = Path(tmp)
    save_optimizer_state(opt, lora, ckpt)
    (ckpt / TRAINER_STATE).write_text(json.dumps({"epoch": 4, "avg_lr": 1e-5, "schedule": {"peak_lr": 2e-4}}))
    print(f"LoRA: {sum(p.numel() for p in trainable):,} adapter weights stepped", flush=True)
    report["lora_adamw"] = measure("LoRA AdamW", lora, optimizer_dir=ckpt)
    base = lora.unload()  # the base model without adapter layers
base.requires_grad_(True)
print(f"full model: {sum(p.numel() for p in base.parameters()):,} weights stepped (SGD)", flush=True)
report["full_sgd"] = measure("all-weights SGD", base, lr=1e-5)
print(json.dumps(report, indent=1, default=float))
