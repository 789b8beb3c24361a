"""`dataworth combine`: one scores run from the weighted mean of several (a checkpoint ensemble)."""

from __future__ import annotations

import click

from dataworth.influence.ensemble import combine_scores


@click.command("combine")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output scores directory.")
@click.option("--weights", default=None,
              help="One weight per run, comma-separated (normalised to sum 1) [equal]; TracIn's: the sum of the "
                   "learning rates of the steps each checkpoint stands for.")
@click.option("--standardise", is_flag=True,
              help="Divide each run's scores by their standard deviation over the rows, per query, first.")
@click.option("--top-k", "top_k", type=int, default=None,
              help="Rows kept per query and direction [the largest any run kept].")
def combine_command(runs, out, weights, standardise, top_k):
    """Average the full score matrices of RUNS (scores directories from `dataworth score --full`, same
    queries, rows in the same order) into OUT: TRAK's model ensemble / TracIn's sum over checkpoints.

    List the final checkpoint last: OUT's store, model and curvature are the last run's, so `dataworth
    value` and `dataworth report` read OUT like any scores run.

    \b
    Example (a store, a fit and a scored run per checkpoint):
      for c in ckpt/epoch-2 ckpt/epoch-4 model; do
        dataworth extract --model $c --data train.jsonl --out stores/$(basename $c)
        dataworth fit --store stores/$(basename $c)
        dataworth score --store stores/$(basename $c) --queries q.jsonl --out scores/$(basename $c) --full \\
            --allow-other-query-model   # q.jsonl: the final model's answers
      done
      dataworth combine scores/epoch-2 scores/epoch-4 scores/model --out scores/ensemble
    """
    result = combine_scores(list(runs), out, weights=weights, standardise=standardise, top_k=top_k)
    summary = result.summary
    weights = ", ".join(f"{entry['weight']:.4g}" for entry in summary["ensemble"])
    click.echo(f"combined {len(runs)} runs: {summary['n_queries']} queries × {summary['n_rows']} rows "
               f"(weights {weights}) → {out}")
