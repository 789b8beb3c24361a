"""`dataworth extract`: build (or resume) a gradient store."""

from __future__ import annotations

import click

from dataworth.errors import InputError
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.gradients.projection import WHITEN_DAMPING_FRACTION
from dataworth.store.format import STORE_DTYPES


@click.command("extract")
@click.option("--model", "model", required=True, help="Model directory, .gguf file, hf:ID or smollm2.")
@click.option("--data", "data", required=True, help="JSONL/JSON/parquet file, directory, hf:NAME[:SPLIT] or builtin:NAME.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Store directory.")
@click.option("--modules", default="all", show_default=True, help="all, mlp, attn, or a regex on module names.")
@click.option("--projection", type=click.Choice(["random", "pca", "whitened", "identity", "dense"]), default="random", show_default=True)
@click.option("--rank", type=int, default=None, help="k_in = k_out = K (LoGra rank).")
@click.option("--rank-in", type=int, default=64, show_default=True)
@click.option("--rank-out", type=int, default=64, show_default=True)
@click.option("--dense-dim", type=int, default=8192, show_default=True, help="Output size of --projection dense.")
@click.option("--whiten-damping", type=float, default=WHITEN_DAMPING_FRACTION, show_default=True,
              help="--projection whitened: damping of each KFAC factor, as a fraction of its mean eigenvalue.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(list(STORE_DTYPES)), default="float16", show_default=True,
              help="Storage dtype of the rows (computation is float32).")
@click.option("--batch-size", type=int, default=None, help="Rows per batch (default 8).")
@click.option("--token-budget", type=int, default=None, help="Padded tokens per batch; length-sorted batching.")
@click.option("--max-length", type=int, default=512, show_default=True, help="Truncate rows to this many tokens.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--shard-rows", type=int, default=1024, show_default=True, help="Rows per shard (the unit of resumption).")
@click.option("--skip-nonfinite", is_flag=True, help="Record rows with NaN/inf gradients (stored as zeros) instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace a store made with another model or configuration.")
@click.option("--autocast", type=click.Choice(["none", "bf16", "fp16"]), default="none", show_default=True,
              help="Forward pass under torch.autocast in bf16/fp16 (GPU); projections stay float32.")
@click.option("--async-write/--sync-write", "async_write", default=None,
              help="Write shards on a background thread (default: on for CUDA, off on CPU).")
def extract_command(model, data, out, modules, projection, rank, rank_in, rank_out, dense_dim, whiten_damping, seed,
                    dtype, batch_size, token_budget, max_length, device, shard_rows, skip_nonfinite, overwrite, autocast, async_write):
    """Per-example LoGra-projected gradients of MODEL on DATA, written to a resumable store.

    \b
    Example:
      dataworth extract --model demo_out/model --data builtin:bios --out demo_out/store --rank 16 --modules mlp
      torchrun --nproc-per-node 4 -m dataworth extract --model demo_out/model --data builtin:bios \\
          --out demo_out/store --rank 16 --modules mlp --autocast bf16
    """
    if rank is not None:
        if rank < 1:  # checked here: the config only knows rank_in / rank_out, and would name --rank-in
            raise InputError(f"--rank must be >= 1, got {rank}")
        rank_in = rank_out = rank
    cfg = ExtractConfig(model=model, data=data, out=out, modules=modules, projection=projection, rank_in=rank_in,
                        rank_out=rank_out, dense_dim=dense_dim, seed=seed, dtype=dtype, batch_size=batch_size,
                        token_budget=token_budget, max_length=max_length, device=device, shard_rows=shard_rows,
                        skip_nonfinite=skip_nonfinite, autocast=autocast, async_write=async_write,
                        whiten_damping=whiten_damping)
    from dataworth.distributed import is_main_process, shutdown

    store = extract(cfg, overwrite=overwrite)
    shutdown()
    if is_main_process():  # torchrun: rank 0 reports
        click.echo(f"store: {out} ({store.rows} rows × {store.dim} dims, {store.dtype})")
