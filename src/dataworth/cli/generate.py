"""`dataworth generate`: model responses for prompts → query JSONL (`id`, `prompt`, `response`, `model`)."""

from __future__ import annotations

import click

from dataworth.model.generate import generate
from dataworth.util import displayable


@click.command("generate")
@click.option("--model", required=True, help="Model: HF dir (e.g. from `dataworth train`), .gguf file, hf:ID or smollm2.")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False),
              help="JSON list (strings or {prompt, id}) or JSONL ({prompt|text, id}).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--sample/--greedy", "do_sample", default=False, show_default=True, help="Sampling or greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="With --sample.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="With --sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample.")
@click.option("--chat", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Wrap prompts in the tokenizer's chat template (auto: when it has one).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda:N.")
def generate_command(model, prompts, out, max_new_tokens, do_sample, temperature, top_p, seed, chat, batch_size,
                     device):
    """Generate a response from MODEL for every prompt in PROMPTS and write them to OUT.

    \b
    Example:
      dataworth generate --model models/tiny --prompts prompts.jsonl --out queries.jsonl
    """
    rows = generate(model, prompts, out, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, top_p=top_p, seed=seed,
                    chat={"auto": "auto", "yes": True, "no": False}[chat], batch_size=batch_size, device=device)
    click.echo(f"generated {len(rows)} responses → {out}")
    empty = [str(row["id"]) for row in rows if not row["response"].strip()]
    if empty:  # kept in OUT as generated, but a query with nothing to measure is refused by score / extract
        shown = ", ".join(displayable(i, one_line=True) for i in empty[:5]) + (", …" if len(empty) > 5 else "")
        click.echo(f"note: {len(empty)} response(s) are empty (the model ended at once: {shown}); `dataworth score` "
                   "refuses them, as an empty response measures only the end token", err=True)
