"""`dataworth index`: an optional FAISS index for approximate top-k on huge stores, and its measured recall."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dataworth.influence.curvature import CURVATURE_KINDS


@click.group("index")
def index_group() -> None:
    """Approximate top-k with FAISS (pip install 'dataworth[faiss]'); recall against exact search.

    \b
    Example:
      dataworth index build --store demo_out/store --factory IVF64,Flat
      dataworth index recall --store demo_out/store --curvature ekfac --k 10 --nprobe 8 --json recall.json
    """


@index_group.command("build")
@click.option("--store", "store", required=True, type=click.Path(file_okay=False), help="Gradient store directory.")
@click.option("--factory", default=None, help="faiss.index_factory string (default IVF<√N>,Flat; 'Flat' is exact).")
@click.option("--train-size", type=int, default=None, help="Rows sampled to train the index.")
def build_command(store, factory, train_size):
    """Index every row of STORE (inner product) into STORE/index/faiss.index.

    \b
    Example:
      dataworth index build --store demo_out/store --factory IVF256,PQ32
    """
    from dataworth.influence.index import build_index

    meta = build_index(store, factory, train_size=train_size)
    click.echo(f"index: {meta['factory']} over {meta['rows']} rows × {meta['dim']} dims in {meta['build_s']:.2f}s")


@index_group.command("recall")
@click.option("--store", "store", required=True, type=click.Path(file_okay=False), help="Gradient store directory.")
@click.option("--curvature", type=click.Choice(list(CURVATURE_KINDS)), default="none", show_default=True,
              help="Curvature the queries are preconditioned with (fitted with `dataworth fit`).")
@click.option("--k", "k", type=int, default=10, show_default=True, help="Top-k compared.")
@click.option("--nprobe", type=int, default=None, help="IVF lists searched per query (more: slower, higher recall).")
@click.option("--sample", type=int, default=100, show_default=True, help="Random store rows used as queries.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures as JSON.")
def recall_command(store, curvature, k, nprobe, sample, seed, json_path):
    """recall@k of the index against exact dot-product scoring, on SAMPLE store rows as queries.

    \b
    Example:
      dataworth index recall --store demo_out/store --k 10 --nprobe 16 --json recall.json
    """
    from dataworth.influence.index import index_recall

    figures = index_recall(store, curvature=curvature, k=k, nprobe=nprobe, sample=sample, seed=seed)
    for name, value in figures.items():
        click.echo(f"{name}: {value}")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
