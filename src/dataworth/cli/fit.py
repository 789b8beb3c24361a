"""`dataworth fit`: fit the curvature (none/raw/kfac/ekfac) of a gradient store."""

from __future__ import annotations

import click

from dataworth.influence.curvature import (
    CURVATURE_KINDS,
    DAMPING_HELP,
    DEFAULT_CURVATURE,
    fit,
)


@click.command("fit")
@click.option("--store", "store", required=True, type=click.Path(file_okay=False), help="Gradient store directory.")
@click.option("--curvature", type=click.Choice(list(CURVATURE_KINDS)), default=DEFAULT_CURVATURE, show_default=True,
              help="none: identity; raw: exact projected Fisher; kfac: S ⊗ A; ekfac: KFAC basis, refitted eigenvalues.")
@click.option("--damping", default="auto", show_default=True, help=DAMPING_HELP)
@click.option("--block-rows", type=int, default=1024, show_default=True, help="Store rows read per block.")
@click.option("--memory-budget", "memory_budget", type=float, default=None,
              help="MiB for the streaming buffers; chooses --block-rows so memory stays bounded whatever the store size.")
def fit_command(store, curvature, damping, block_rows, memory_budget):
    """Fit CURVATURE for the rows of STORE and save it as STORE/curvature/<kind>.safetensors.

    \b
    Example:
      dataworth fit --store demo_out/store --curvature ekfac --damping auto
      torchrun --nproc-per-node 4 -m dataworth fit --store demo_out/store --memory-budget 2048
    """
    from dataworth.distributed import is_main_process, shutdown

    fitted = fit(store, curvature, damping, block_rows=block_rows, memory_budget_mb=memory_budget)
    shutdown()
    if not is_main_process():  # torchrun: rank 0 reports
        return
    values = list(fitted.damping.values())
    where = fitted.path if fitted.path is not None else "(nothing to save)"
    click.echo(f"curvature: {fitted.kind} for {fitted.n_rows} rows × {fitted.dim} dims, {len(fitted.modules)} modules "
               f"in {fitted.fit_seconds:.2f}s")
    if values:
        click.echo(f"damping: {fitted.damping_spec} → λ per module in [{min(values):.4g}, {max(values):.4g}]")
    click.echo(f"saved: {where}")
