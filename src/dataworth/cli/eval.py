"""`dataworth eval`: judge attribution against retraining (LDS, leave-k-out, brittleness) and gold facts.

Sign convention everywhere: a positive score means the training row lowers the query loss, so the LDS is
the Spearman correlation between the summed scores of a subset's rows and the *negated* query loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

_TASK = [
    click.option("--data", default="builtin:bios?people=8&distractors=8", show_default=True,
                 help="Training rows (file, directory, hf:… or builtin:…)."),
    click.option("--queries", default=None,
                 help="Prompt/response rows whose summed response loss is measured [builtin:bios:queries of --data]."),
    click.option("--preset", default="tiny-test", show_default=True, help="Training preset of every (re)train."),
    click.option("--epochs", type=int, default=None, help="Override the preset's epochs."),
    click.option("--alpha", type=float, default=0.5, show_default=True, help="Fraction of rows in each subset, in (0, 1)."),
    click.option("--subsets", type=int, default=32, show_default=True, help="M random subsets (>= 8)."),
    click.option("--replicates", type=int, default=2, show_default=True,
                 help="Seeds per subset; >= 2 gives the noise ceiling."),
    click.option("--keep-checkpoints", type=int, default=0, show_default=True,
                 help="Per-epoch checkpoints of the full-data model to keep (for --checkpoints ensemble)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subsets and retrains."),
    click.option("--measure", type=click.Choice(["answer", "answer+end"]), default="answer", show_default=True,
                 help="Query loss each retrain measures: the response tokens, or also the appended end token."),
    click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                 help="Task directory: full-data model + retrain cache (resumable; another config is refused)."),
]
_METHOD = [
    click.option("--projection", type=click.Choice(["random", "pca", "whitened", "identity"]), default="random", show_default=True),
    click.option("--rank", type=int, default=32, show_default=True, help="LoGra k_in = k_out (TrackStar: dense dims, 0 = exact with R = I)."),
    click.option("--curvature", type=click.Choice(["none", "raw", "kfac", "ekfac"]), default="ekfac", show_default=True),
    click.option("--damping", default="auto", show_default=True,
                 help="λ: 'auto', a fraction of each module's mean eigenvalue ('1e-3x') or a number > 0."),
    click.option("--mode", type=click.Choice(["dot", "cosine", "relative"]), default="dot", show_default=True),
    click.option("--modules", default="all", show_default=True, help="all, mlp, attn or a regex."),
    click.option("--checkpoints", "checkpoint_mode", type=click.Choice(["final", "ensemble"]), default="final",
                 show_default=True, help="ensemble: mean scores over the kept checkpoints (needs --keep-checkpoints)."),
    click.option("--optimizer", type=click.Choice(["none", "adam"]), default="none", show_default=True,
                 help="adam: TrackStar (Adam second-moment normalisation; needs --projection identity)."),
    click.option("--mix", type=float, default=0.5, show_default=True,
                 help="TrackStar: weight of the query second moment in the curvature mixture."),
    click.option("--measure-end-token", is_flag=True,
                 help="Query gradients include the appended end token (match --measure answer+end)."),
]
_JSON = click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                     help="Also write the figures as one JSON object (keys as printed).")
_QUIET = click.option("--quiet", is_flag=True, help="No progress messages.")


def _options(*groups):
    def decorate(func):
        for group in reversed(groups):
            for option in reversed(group if isinstance(group, list) else [group]):
                func = option(func)
        return func
    return decorate


def _task_config(data, queries, preset, epochs, alpha, subsets, replicates, keep_checkpoints, seed, measure):
    from dataworth.evaluation.lds import auto_queries
    from dataworth.evaluation.retrain import LdsConfig
    from dataworth.model.train import TrainConfig

    return LdsConfig(data=data, queries=queries or auto_queries(data),
                     train=TrainConfig.from_preset(preset, epochs=epochs), alpha=alpha, subsets=subsets,
                     replicates=replicates, checkpoints=keep_checkpoints, seed=seed, measure=measure)


def _method(projection, rank, curvature, damping, mode, modules, checkpoint_mode, optimizer, mix, measure_end_token):
    from dataworth.evaluation.methods import AttributionConfig

    return AttributionConfig(projection=projection, rank=rank, curvature=curvature, damping=damping, mode=mode,
                             modules=modules, checkpoints=checkpoint_mode, optimizer=optimizer, mix=mix,
                             measure_end_token=measure_end_token)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _emit(figures: dict, json_path: str | None) -> None:
    for key, value in figures.items():
        click.echo(f"{key}: {_fmt(value)}")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2, default=str) + "\n")


@click.group("eval")
def eval_group() -> None:
    """Evaluate attribution: LDS against retraining, fact tracing, brittleness.

    \b
    Example (LDS of LoGra + EK-FAC on a reduced bios world, 32 subsets × 2 seeds):
      dataworth eval lds --out lds_out --subsets 32 --replicates 2 --curvature ekfac
    """


@eval_group.command("lds")
@_options(_TASK, _METHOD)
@click.option("--leave-out-percent", type=float, multiple=True,
              help="Also the leave-k-out test with k = PERCENT % of rows (repeatable; one retrain per query).")
@click.option("--random-draws", type=int, default=1, show_default=True, help="Random removals per query (leave-k-out).")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples of the query mean.")
@_options(_JSON, _QUIET)
def lds_command(data, queries, preset, epochs, alpha, subsets, replicates, keep_checkpoints, seed, measure, out_dir,
                projection, rank, curvature, damping, mode, modules, checkpoint_mode, optimizer, mix,
                measure_end_token, leave_out_percent, random_draws, bootstrap, json_path, quiet):
    """Linear Datamodeling Score (TRAK): Spearman over subsets of summed scores vs −query loss.

    Trains the full-data model, retrains on M random α-subsets (× replicates, cached in --out, resumable),
    attributes the queries with the chosen method and prints lds (mean over queries), its bootstrap 95%
    interval (lds_ci_low, lds_ci_high) and the noise_ceiling (Spearman between two retrain seeds).

    \b
    Example:
      dataworth eval lds --out lds_out --data 'builtin:bios?people=8&distractors=8' \\
          --subsets 32 --replicates 2 --projection random --rank 32 --curvature ekfac --json lds.json
    """
    from dataworth.evaluation.lds import eval_lds

    config = _task_config(data, queries, preset, epochs, alpha, subsets, replicates, keep_checkpoints, seed, measure)
    figures = eval_lds(out_dir, config, _method(projection, rank, curvature, damping, mode, modules, checkpoint_mode,
                                                optimizer, mix, measure_end_token),
                       leave_out_percent=tuple(leave_out_percent), random_draws=random_draws, n_bootstrap=bootstrap,
                       progress=not quiet)
    _emit(figures, json_path)


@eval_group.command("brittleness")
@_options(_TASK, _METHOD)
@click.option("--k", "ks", type=int, multiple=True, help="Rows removed (repeatable) [1, 2, 4].")
@click.option("--queries-sampled", type=int, default=4, show_default=True, help="Queries tested (seeded sample).")
@click.option("--random-draws", type=int, default=1, show_default=True, help="Random removals per query and k.")
@_options(_JSON, _QUIET)
def brittleness_command(data, queries, preset, epochs, alpha, subsets, replicates, keep_checkpoints, seed, measure, out_dir,
                        projection, rank, curvature, damping, mode, modules, checkpoint_mode, optimizer, mix,
                        measure_end_token, ks, queries_sampled, random_draws, json_path, quiet):
    """Remove each query's top-k attributed rows, retrain, and compare the query-loss increase with removing k
    random rows (top_increase@k, random_increase@k, ratio@k, top_beats_random@k).

    \b
    Example:
      dataworth eval brittleness --out lds_out --k 1 --k 2 --k 4 --queries-sampled 4 --json brittle.json
    """
    from dataworth.evaluation.lds import eval_brittleness

    config = _task_config(data, queries, preset, epochs, alpha, subsets, replicates, keep_checkpoints, seed, measure)
    figures = eval_brittleness(out_dir, config, _method(projection, rank, curvature, damping, mode, modules,
                                                        checkpoint_mode, optimizer, mix, measure_end_token),
                               ks=tuple(ks) or (1, 2, 4), n_queries=queries_sampled, random_draws=random_draws,
                               progress=not quiet)
    _emit(figures, json_path)


@eval_group.command("facts")
@click.option("--model", required=True, help="The trained model (e.g. demo_out/model).")
@click.option("--data", default="builtin:bios", show_default=True, help="The model's training rows.")
@click.option("--queries", default=None, help="Fact queries with 'gold' ids [builtin:bios:queries of --data].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where the store goes.")
@click.option("--projection", type=click.Choice(["random", "pca", "whitened", "identity"]), default="random", show_default=True)
@click.option("--rank", type=int, default=32, show_default=True)
@click.option("--curvature", "curvatures", multiple=True, help="Repeatable [none, ekfac].")
@click.option("--mode", "modes", multiple=True, help="Repeatable [dot, cosine].")
@click.option("--modules", default="all", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the projection and of --tail-patch-sample.")
@click.option("--tail-patch", "tail_patch", type=click.Choice(["auto", "full", "needed", "off"]), default="auto",
              show_default=True,
              help="One-step effects measured: the (query, row) pairs the figures need, the full matrix (adds the "
                   "one-step oracle row), auto (full when cheap), or none.")
@click.option("--tail-patch-lr", type=float, default=None,
              help="Step size η of the one more step [the final epoch's mean lr η̄ from trainer_state.json].")
@click.option("--tail-patch-sample", type=int, default=None,
              help="Measure a seeded sample of this many pairs per table row; prints the 95% interval (±).")
@click.option("--effects-model", default=None,
              help="The model the optimizer state belongs to, stepped for tail-patch [--model, or the unmerged "
                   "adapter of a merged LoRA model].")
@_options(_JSON, _QUIET)
def facts_command(model, data, queries, out_dir, projection, rank, curvatures, modes, modules, seed, tail_patch,
                  tail_patch_lr, tail_patch_sample, effects_model, json_path, quiet):
    """Fact tracing on builtin:bios: recall@1, recall@10, strict recall@10 and MRR of the gold documents
    (1-based ranks, ties by row order), one row per curvature/mode, with BM25 as the baseline; and, for a
    `dataworth train` model with its optimizer state, tail-patch@10 (nats one more step on a top-10 document
    adds to log p(answer); the step size used is printed under the table).

    \b
    Example:
      dataworth eval facts --model demo_out/model --data builtin:bios --out facts_out --json facts.json
    """
    from dataworth.evaluation.facts import eval_facts, format_table
    from dataworth.evaluation.lds import auto_queries

    table = eval_facts(model, data, queries or auto_queries(data), out_dir, projection=projection, rank=rank,
                       curvatures=curvatures or ("none", "ekfac"), modes=modes or ("dot", "cosine"), modules=modules,
                       seed=seed, progress=not quiet, effects_model=effects_model, tail_patch=tail_patch,
                       tail_patch_lr=tail_patch_lr, tail_patch_sample=tail_patch_sample)
    click.echo(format_table(table))
    if json_path:
        first = table[0]
        figures = {k: first[k] for k in first if k != "method"} | {"method": first["method"], "table": table}
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
