"""`dataworth report`: Markdown + self-contained HTML report (with plots and the value ledger) from scores."""

from __future__ import annotations

import click

from dataworth.reports.report import DEFAULT_MAX_DISPLAY_TOKENS, report


@click.command("report")
@click.option("--scores", "scores_dir", required=True, type=click.Path(file_okay=False),
              help="Scores directory written by `dataworth score --out`.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--store", default=None, type=click.Path(file_okay=False),
              help="Gradient store (default: the one recorded in the scores' summary.json).")
@click.option("--model", default=None, help="Model spec (default: the model recorded in the store).")
@click.option("--queries", default=None, help="Query data (default: the spec recorded at scoring time).")
@click.option("--data", default=None, help="Training data (default: the spec recorded at extraction time).")
@click.option("--top-k", "top_k", type=int, default=None, help="Documents shown per query and direction (default: all kept).")
@click.option("--layer", default=None, help="Module whose KFAC factors are drawn: name, unique substring or index.")
@click.option("--by", default=None, help="Also a value ledger grouped by this metadata field (e.g. source).")
@click.option("--max-display-tokens", type=int, default=DEFAULT_MAX_DISPLAY_TOKENS, show_default=True,
              help="Tokens shown per document; the rest is cut with a marker.")
@click.option("--device", default="cpu", show_default=True, help="Device for recomputing per-token contributions.")
def report_command(scores_dir, out, store, model, queries, data, top_k, layer, by, max_display_tokens, device):
    """Write OUT/report.md and a self-contained OUT/report.html (opens from disk, no network) for SCORES.

    Each query shows its prompt and response and its most helpful and most harmful training documents,
    every token highlighted by its exact contribution to the score; plus plots and the data-value ledger.

    \b
    Example:
      dataworth report --scores demo_out/scores --out demo_out/report --top-k 5 --by source
    """
    path = report(scores_dir, out, store=store, model=model, top_k=top_k, layer=layer, by=by, queries=queries,
                  data=data, max_display_tokens=max_display_tokens, device=device)
    click.echo(f"wrote {path.with_name('report.md')}")
    click.echo(f"report: {path}")
