"""`dataworth train`: train a small causal LM from scratch (or fine-tune one, incl. LoRA) on a corpus."""

from __future__ import annotations

import click

from dataworth.model.train import PRESETS, TrainConfig, train


@click.command("train")
@click.option("--data", required=True, help="Training rows: a JSONL/JSON/parquet file, a directory, hf:NAME[:SPLIT] "
              "or builtin:NAME[?k=v&...].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model directory.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="Size and schedule preset; the flags below override it.")
@click.option("--epochs", type=int, default=None, help="Passes over the data.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (cosine schedule with warm-up).")
@click.option("--batch-size", type=int, default=None, help="Rows per optimizer step.")
@click.option("--base", default=None, help="Fine-tune this model (dir, .gguf, hf:ID, smollm2) instead of training "
              "from scratch.")
@click.option("--lora/--full", default=None, help="With --base: train LoRA adapters only (default: full).")
@click.option("--seed", type=int, default=None, help="Seed of initialisation and data order.")
@click.option("--max-length", type=int, default=None, help="Truncate rows to this many tokens.")
@click.option("--save-every-epoch", is_flag=True, default=None, help="Checkpoint after every epoch (LoRA always does).")
@click.option("--queries", default="auto", show_default=True,
              help="prompt/response rows for the post-training fact accuracy; 'auto' = builtin:bios:queries "
              "for builtin:bios; 'none' skips it.")
@click.option("--device", default=None, help="auto (CUDA if available), cpu, cuda:N.")
def train_command(data, out, preset, epochs, lr, batch_size, base, lora, seed, max_length, save_every_epoch,
                  queries, device):
    """Train a causal LM on DATA and save a Hugging Face model directory to OUT.

    \b
    Example (the built-in default: ~1 M-parameter Llama, a few CPU minutes):
      dataworth train --data builtin:bios --out models/tiny
    \b
    LoRA fine-tuning of an existing model:
      dataworth train --data rows.jsonl --out models/lora --preset lora --base smollm2
    """
    config = TrainConfig.from_preset(
        preset, epochs=epochs, lr=lr, batch_size=batch_size, base=base, lora=lora, seed=seed,
        max_length=max_length, save_every_epoch=save_every_epoch, device=device,
    )
    result = train(data, out, config, queries_spec=None if queries == "none" else queries)
    losses = result.epoch_losses
    click.echo(f"trained {result.steps} steps over {len(losses)} epochs in {result.seconds:.1f}s "
               f"({result.tokens_per_second:,.0f} tokens/s)")
    click.echo(f"loss per target token: first epoch {losses[0]:.4f}, last epoch {losses[-1]:.4f}")
    if result.fact_accuracy is not None:
        click.echo(f"fact accuracy (greedy exact match): {result.fact_accuracy:.3f}")
    click.echo(f"fingerprint: {result.fingerprint[:16]}")
    click.echo(f"saved: {result.out_dir}")
