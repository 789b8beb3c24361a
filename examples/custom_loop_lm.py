"""A plain PyTorch training loop for a tiny causal LM, with `dw.watch` capturing gradients during training.

    .venv/bin/python examples/custom_loop_lm.py [--people 12] [--epochs 40] [--accumulate 2] [--json F]

The corpus is two short documents per person ("Ada lives in Oslo.", "Ada works as a baker."); the model
is a 2-layer Llama with byte-level tokens (no tokenizer to download). The loop is ordinary — AdamW on the
token-mean loss, gradient accumulation over micro-batches — and during the last epoch every micro-batch runs
inside ``logger.capture(ids)``. The logger measures how the token-mean and the accumulation scale each
example (``cap.record(losses)``), so the store holds the per-example gradients of each document's summed
loss, and the optimizer's updates are exactly what they would be without it.

Then: fit EK-FAC on the store and ask, for "Ada lives in" → " Oslo.", which training documents helped; the
right answer is Ada's "lives in" document (recall@1 over the queries is printed).

Note the rows of the last epoch come from the weights at each step (TracIn-style, one epoch); the query
gradients from the final weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

NAMES = ("Ada", "Bruno", "Chen", "Dara", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mo", "Nia",
         "Omar", "Pia")
CITIES = ("Oslo", "Lima", "Rome", "Kyiv", "Doha", "Baku", "Riga", "Bern")
JOBS = ("baker", "pilot", "nurse", "judge", "tutor", "smith")
BOS, OFFSET = 1, 3  # byte b is token b + 3; 0 = padding, 1 = beginning of text


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=12)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=4, help="micro-batch size")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="store directory (default: a temporary one)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def encode(doc_id: str, prompt: str, response: str = ""):
    """Byte-level tokens; loss on the response only (on everything when there is no separate response)."""
    from dataworth.data.batching import Encoded

    prompt_ids = [BOS] + [b + OFFSET for b in prompt.encode()]
    response_ids = [b + OFFSET for b in response.encode()]
    mask = [0] * len(prompt_ids) + [1] * len(response_ids) if response else [0] + [1] * (len(prompt_ids) - 1)
    return Encoded(doc_id, prompt_ids + response_ids, mask)


def corpus(people: int):
    docs, queries, gold = [], [], {}
    for i, name in enumerate(NAMES[:people]):
        city, job = CITIES[i % len(CITIES)], JOBS[(i * 5) % len(JOBS)]
        docs.append(encode(f"{name}-city", f"{name} lives in {city}."))
        docs.append(encode(f"{name}-job", f"{name} works as a {job}."))
        queries.append(encode(f"q-{name}", f"{name} lives in", f" {city}."))
        gold[f"q-{name}"] = f"{name}-city"
    return docs, queries, gold


def build_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256 + OFFSET, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      attn_implementation="eager", tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def main(argv=None) -> dict:
    import dataworth as dw
    from dataworth.data.batching import collate, example_losses

    args = parse(argv)
    docs, queries, gold = corpus(args.people)
    model = build_model(args.seed).train()
    out = Path(args.out or tempfile.mkdtemp(prefix="custom-loop-store-"))
    logger = dw.watch(model, modules="mlp", projection="random", rank=args.rank, seed=args.seed, out=out,
                      dtype="float32", replace=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        last = epoch == args.epochs - 1
        order = torch.randperm(len(docs), generator=gen).tolist()
        micro = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
        total = 0.0
        for step, idx in enumerate(micro):
            batch = collate([docs[i] for i in idx], idx, pad_id=0)

            def loss_of(record=lambda losses: losses):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                losses = record(example_losses(logits, batch))  # [B], each summed over its tokens
                return losses.sum() / batch.loss_mask[:, 1:].sum() / args.accumulate  # token mean, accumulated

            if last:  # capture the last epoch: the logger sees this very backward
                with logger.capture(batch.ids, attention_mask=batch.attention_mask) as cap:
                    loss = loss_of(cap.record)
                    loss.backward()
            else:
                loss = loss_of()
                loss.backward()
            total += float(loss.detach()) * args.accumulate
            if (step + 1) % args.accumulate == 0 or step == len(micro) - 1:
                opt.step()
                opt.zero_grad()
        if epoch % 10 == 0 or last:
            print(f"epoch {epoch}: mean token loss {total / len(micro):.3f}")
    store = logger.finalize()
    dw.fit(store.path, "ekfac")

    model.eval()
    query_batch = collate(queries, range(len(queries)), pad_id=0)
    scores = dw.score_with_task(store, model, dw.LanguageModelTask(modules="mlp"), [query_batch],
                                curvature="ekfac", top_k=3)
    table = scores.top_k(direction="positive")
    hits = 0
    for q in queries:
        top = table[table["query_id"] == q.id].sort_values("rank")["train_id"].tolist()
        hits += top[0] == gold[q.id]
        print(f"{q.id}: top-3 {', '.join(top)}  (gold {gold[q.id]})")
    figures = {"recall@1": hits / len(queries), "queries": len(queries), "rows": len(store), "store": str(out)}
    print(f"recall@1 {figures['recall@1']:.3f} over {len(queries)} queries ({len(store)} training rows captured)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
