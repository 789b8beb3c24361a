"""`dataworth score`: influence of every store row on every query; top-k tables, optional full matrix."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dataworth.errors import InputError
from dataworth.influence.curvature import CURVATURE_KINDS, DEFAULT_CURVATURE
from dataworth.influence.score import STREAM_PROJECTIONS, score, score_stream
from dataworth.influence.scores import SCORE_MODES
from dataworth.util import displayable


@click.command("score")
@click.option("--store", "store", default=None, type=click.Path(file_okay=False),
              help="Gradient store directory (required unless --no-store).")
@click.option("--no-store", "no_store", is_flag=True,
              help="Stream: compute training gradients from --model and --data and score them batch by batch, "
                   "writing no store (curvature none only).")
@click.option("--data", default=None, help="With --no-store: the training rows (any data file or spec).")
@click.option("--modules", default="all", show_default=True, help="With --no-store: modules to watch (regex or all).")
@click.option("--projection", type=click.Choice(list(STREAM_PROJECTIONS)), default="random", show_default=True,
              help="With --no-store: LoGra projection.")
@click.option("--rank", type=int, default=64, show_default=True, help="With --no-store: k_in = k_out per module.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --no-store: projection seed.")
@click.option("--batch-size", "batch_size", type=int, default=8, show_default=True,
              help="With --no-store: training rows per forward/backward.")
@click.option("--max-length", "max_length", type=int, default=512, show_default=True,
              help="With --no-store: truncate rows to this many tokens.")
@click.option("--queries", required=True, help="Query rows: JSONL from `dataworth generate`, any data file or spec.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--mode", type=click.Choice(list(SCORE_MODES)), default="dot", show_default=True,
              help="dot: g_q·(F+λI)⁻¹g_n; cosine: cos(preconditioned query, train row); "
                   "relative: dot / self-influence.")
@click.option("--curvature", type=click.Choice(list(CURVATURE_KINDS)), default=None,
              help=f"Fitted curvature to precondition with (run `dataworth fit` first unless none); default "
                   f"{DEFAULT_CURVATURE} with --store (or the only one fitted), none (the only choice) with "
                   "--no-store.")
@click.option("--top-k", "top_k", type=int, default=10, show_default=True,
              help="Most positive and most negative rows kept per query (clamped to the store size).")
@click.option("--full", is_flag=True, help="Also write the full [queries × rows] matrix to OUT/scores.npy.")
@click.option("--self", "self_influence", is_flag=True, help="Also write every row's self-influence.")
@click.option("--model", default=None, help="Model spec (default: the model recorded in the store).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@click.option("--block-rows", type=int, default=4096, show_default=True, help="Store rows per streamed block.")
@click.option("--memory-budget", "memory_budget", type=float, default=None,
              help="MiB for the streaming buffers; chooses block and query-batch sizes (one store pass per batch).")
@click.option("--show", type=int, default=3, show_default=True, help="Top rows printed per query and direction.")
@click.option("--show-queries", type=int, default=5, show_default=True, help="Queries printed (all are saved).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the summary (timings, counts) as one JSON object to this file.")
def score_command(store, no_store, data, modules, projection, rank, seed, batch_size, max_length, queries, out,
                  mode, curvature, top_k, full, self_influence, model, device, block_rows, memory_budget, show,
                  show_queries, json_path):
    """Influence of every row of STORE on every query in QUERIES; results in OUT.

    Positive scores: up-weighting that training row lowers the query's loss (it helps); negative: it hurts.

    \b
    Example:
      dataworth score --store demo_out/store --queries demo_out/queries.jsonl --out demo_out/scores \\
          --curvature ekfac --mode dot --top-k 20 --self
      torchrun --nproc-per-node 4 -m dataworth score --store demo_out/store --queries demo_out/queries.jsonl \\
          --out demo_out/scores --memory-budget 4096
      dataworth score --no-store --model demo_out/model --data train.jsonl --queries demo_out/queries.jsonl \\
          --out demo_out/scores_stream --modules all --rank 16 --mode cosine --top-k 20
    """
    from dataworth.distributed import is_main_process, shutdown

    check_store_flags(store, no_store, data, model, curvature, self_influence, memory_budget)
    if no_store:
        result = score_stream(model, data, queries, modules=modules, projection=projection, rank_in=rank,
                              rank_out=rank, seed=seed, mode=mode, top_k=top_k, batch_size=batch_size,
                              max_length=max_length, device=device, full=full, out=out)
    else:
        result = score(store, queries, model, mode=mode, curvature=curvature, top_k=top_k,
                       full=full, self_influence=self_influence, out=out, block_rows=block_rows, device=device,
                       memory_budget_mb=memory_budget)
    shutdown()
    if not is_main_process():  # torchrun: rank 0 reports
        return
    summary = result.summary
    for note in summary.get("notes", []):
        click.echo(f"note: {note}")
    click.echo(f"scored {summary['n_queries']} queries × {summary['n_rows']} rows ({summary['mode']}, "
               f"{summary['curvature']} curvature) in {summary['timings']['total_s']:.2f}s")
    click.echo(format_top(result, show, show_queries))
    files = ", ".join(str(Path(out) / name) for name in summary.get("files", {}).values())
    click.echo(f"wrote: {files}, {Path(out) / 'summary.json'}")
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")


def check_store_flags(store, no_store, data, model, curvature, self_influence, memory_budget) -> None:
    """One-line InputError for contradictory or missing flags of the store / --no-store paths."""
    if no_store:
        if store is not None:
            raise InputError("--store and --no-store: give one (--no-store computes the gradients from --model/--data)")
        if not data:
            raise InputError("--no-store needs --data (the training rows to stream)")
        if not model:
            raise InputError("--no-store needs --model (there is no store to read the model from)")
        if curvature not in (None, "none"):
            raise InputError(f"--curvature {curvature}: --no-store scores with curvature none only "
                             "(preconditioning needs a store: dataworth extract, then fit)")
        if self_influence or memory_budget is not None:
            raise InputError("--self / --memory-budget: need a store; not available with --no-store")
    else:
        if store is None:
            raise InputError("--store is required (or --no-store with --model and --data)")
        if data is not None:
            raise InputError("--data: only used with --no-store (a store already holds its training rows)")


def format_top(result, show: int, show_queries: int) -> str:
    """A short plain-text table: for the first ``show_queries`` queries, the ``show`` most positive (+) and
    most negative (-) rows. Ids come from the data: newlines, bidi overrides and other invisible characters in
    them are shown escaped (`displayable`), so they cannot break or disguise a line."""
    lines = [f"{'query':<20} {'dir':<4} {'rank':>4} {'train_id':<24} {'score':>12}"]
    table = result.to_pandas()
    shown = set(result.query_ids[:show_queries])
    table = table[(table["rank"] <= show) & table["query_id"].isin(shown)]
    for rec in table.itertuples(index=False):
        direction = "+" if rec.direction == "positive" else "-"
        query_id, train_id = (displayable(str(i), one_line=True) for i in (rec.query_id, rec.train_id))
        lines.append(f"{query_id[:20]:<20} {direction:<4} {rec.rank:>4} {train_id[:24]:<24} {rec.score:>12.5g}")
    if len(result.query_ids) > show_queries:
        lines.append(f"... and {len(result.query_ids) - show_queries} more queries (see topk.parquet)")
    return "\n".join(lines)
