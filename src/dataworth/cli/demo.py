"""`dataworth demo`: the whole pipeline on the built-in world."""

from __future__ import annotations

import json

import click

from dataworth.demo import DemoConfig, run_demo
from dataworth.evaluation.facts import format_table


@click.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--world", default="", help="bios world parameters, e.g. '?people=12' for a quick run.")
@click.option("--preset", default="tiny", show_default=True, help="Training preset (tiny, tiny-test).")
@click.option("--epochs", type=int, default=None, help="Override the preset's epochs.")
@click.option("--rank", type=int, default=DemoConfig.rank, show_default=True)
@click.option("--modules", default=DemoConfig.modules, show_default=True)
@click.option("--projection", type=click.Choice(["random", "pca", "identity"]), default=DemoConfig.projection,
              show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the figures as JSON.")
def demo_command(out, world, preset, epochs, rank, modules, projection, json_out):
    """Train a tiny model on builtin:bios, generate answers, attribute them, and write a report.

    \b
    Prints recall@1 / recall@10 / MRR of the gold documents for each curvature and mode, next to BM25, and
    tail-patch@10 (how much one more training step on the top-10 documents raises log p(answer)).
    Example:
      dataworth demo --out demo_out
      dataworth demo --out quick --world '?people=12' --preset tiny-test
    """
    result = run_demo(DemoConfig(out=out, world=world, preset=preset, epochs=epochs, rank=rank, modules=modules,
                                 projection=projection))
    if result.fact_accuracy is not None:
        click.echo(f"fact accuracy of the trained model (greedy exact match): {result.fact_accuracy:.3f}")
    click.echo("\nFact tracing on builtin:bios (gold = the documents stating the fact):\n")
    click.echo(format_table(result.table))
    click.echo("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()))
    if json_out:
        flat = {"fact_accuracy": result.fact_accuracy}
        for row in result.table:
            for k, v in row.items():
                if k != "method":
                    flat[f"{row['method']}:{k}"] = v
        with open(json_out, "w") as fh:
            json.dump(flat, fh, indent=2)
    click.echo(f"\noutputs: {result.out}/ (model, store, scores)")
    click.echo(f"report: {result.report}")
