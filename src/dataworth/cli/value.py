"""`dataworth value`: the data-value ledger — what each training document (or source, or field value) is worth."""

from __future__ import annotations

from pathlib import Path

import click

from dataworth.reports.ledger import ledger_name, value_ledger
from dataworth.util import displayable


@click.command("value")
@click.option("--scores", "scores_dir", required=True, type=click.Path(file_okay=False),
              help="Scores directory written by `dataworth score --out` (use --full for exact sums).")
@click.option("--by", default=None, help="Group documents by this metadata field (e.g. source); 'file' = input file.")
@click.option("--store", default=None, type=click.Path(file_okay=False),
              help="Gradient store (default: the one recorded in the scores' summary.json).")
@click.option("--data", default=None, help="Training data for --by (default: the spec recorded at extraction).")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Where value[_by_FIELD].csv/.parquet go (default: the scores directory).")
@click.option("--show", type=int, default=10, show_default=True, help="Rows printed (all are saved).")
def value_command(scores_dir, by, store, data, out, show):
    """Sum and mean of positive and negative influence, and top-k appearances, per training document or per
    value of --by, over all scored queries.

    \b
    Example:
      dataworth value --scores demo_out/scores --by source
    """
    out = out or scores_dir
    ledger = value_ledger(scores_dir, by, store=store, data=data, out=out)
    basis = ledger.attrs["basis"]
    click.echo(f"value of {ledger.attrs['n_rows']} training rows over {ledger.attrs['n_queries']} queries "
               f"({'full matrix' if basis == 'full' else 'top-k entries only; score --full for exact sums'})")
    key = by or "train_id"
    columns = [key, "n_docs", "net_sum", "positive_sum", "negative_sum", "topk_positive", "topk_negative"]
    shown = ledger[columns].head(show).copy()
    shown[key] = [displayable(str(v), one_line=True) for v in shown[key]]  # ids and field values come from data
    click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if len(ledger) > show:
        click.echo(f"... and {len(ledger) - show} more")
    stem = Path(out) / ledger_name(by)
    click.echo(f"wrote: {stem}.csv, {stem}.parquet")
