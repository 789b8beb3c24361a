"""`dataworth select`: LESS targeted data selection, step by step or all at once, and the learned pre-filter.

Every subcommand works on one run directory (``--run``); the first step saves its settings in
``RUN/select.json`` and later steps read them back, so a flag need only be given once.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dataworth.model.optimizer import ADAM_CONVENTIONS
from dataworth.selection.less import AGGREGATES, GRADIENTS, load_config

_LORA = [
    click.option("--lr", type=float, default=None, help="LoRA learning rate (warm-up and final) [2e-4]."),
    click.option("--batch-size", type=int, default=None, help="LoRA training batch size [8]."),
    click.option("--lora-r", type=int, default=None, help="LoRA rank [8]."),
    click.option("--lora-alpha", type=int, default=None, help="LoRA alpha [16]."),
    click.option("--lora-targets", default=None, help="Comma-separated module names [q_proj,k_proj,v_proj,o_proj]."),
    click.option("--max-length", type=int, default=None, help="Tokens kept per row [512]."),
    click.option("--seed", type=int, default=None, help="Seed of the warm-up subset and LoRA init [0]."),
]
_DATA = [
    click.option("--pool", default=None, help="Pool to select from: file, directory, hf:… or builtin:…"),
    click.option("--base", default=None, help="Model LoRA adapts (model dir, .gguf, hf:ID, smollm2)."),
]
_FEATURES = [
    click.option("--valid", default=None, help="Validation rows: a directory of <task>.jsonl files or a spec "
                 "whose rows have a 'task' field (e.g. builtin:instruct:valid)."),
    click.option("--task", "tasks", multiple=True, help="Target task (repeatable; default: every task in --valid)."),
    click.option("--dense-dim", type=int, default=None, help="Projection size [8192]."),
    click.option("--gradient", type=click.Choice(GRADIENTS), default=None,
                 help="Pool features: adam (LESS, needs optimizer state) or sgd (plain gradients) [adam]."),
    click.option("--adam-convention", type=click.Choice(ADAM_CONVENTIONS), default=None,
                 help="paper: m̂/(√v̂+ε) bias-corrected; less_code: m'/√(v'+ε) as LESS's code [paper]."),
    click.option("--feature-batch-size", type=int, default=None, help="Rows per gradient batch [16]."),
]
_MATCH = [
    click.option("--aggregate", type=click.Choice(AGGREGATES), default=None,
                 help="Reduction over a subtask's validation rows [mean, as LESS]."),
    click.option("--across", type=click.Choice(AGGREGATES), default=None,
                 help="Reduction across subtasks [max, as LESS]."),
    click.option("--percent", type=float, default=None, help="Select the top PERCENT % of the pool [5]."),
    click.option("--n", "n_select", type=int, default=None, help="Select the top N rows instead of a percent."),
]
_COMMON = [
    click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory."),
    click.option("--device", default=None, help="auto, cpu, cuda, ..."),
    click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's)."),
    click.option("--quiet", is_flag=True, help="No progress bars."),
]


def _options(*groups):
    def decorate(func):
        for group in reversed(groups):
            for option in reversed(group):
                func = option(func)
        return func
    return decorate


def _config(run_dir, **flags):
    """The run's saved config with the given flags applied (renamed to config fields)."""
    if flags.get("lora_targets"):
        flags["lora_targets"] = tuple(t.strip() for t in flags["lora_targets"].split(",") if t.strip())
    if "warmup_epochs_flag" in flags:
        flags["warmup_epochs"] = flags.pop("warmup_epochs_flag")
    return load_config(run_dir, **flags)


@click.group("select")
def select_group() -> None:
    """LESS targeted data selection (Xia et al. 2024) and a learned pre-filter.

    \b
    Steps (each reads what the previous one wrote in --run):
      warmup    LoRA on a random 5 % of the pool, a checkpoint + Adam state per epoch
      features  Adam-preconditioned pool gradients, SGD validation gradients, projected
      match     Σ_ckpt η̄·cos, mean per subtask, max across subtasks → top-p % JSONL
      run       all of the above, then LoRA on the selection and a held-out evaluation
      prefilter cheap predictor of LESS scores: recall of the top-p % and compute saved

    \b
    Example:
      dataworth select run --run less_out --pool builtin:instruct --base tiny_model \\
          --valid builtin:instruct:valid --test builtin:instruct:test --task units --task arithmetic
    """


@select_group.command("warmup")
@_options(_COMMON, _DATA, _LORA)
@click.option("--warmup-percent", type=float, default=None, help="Share of the pool to warm up on, in % [5].")
@click.option("--epochs", "warmup_epochs_flag", type=int, default=None, help="Warm-up epochs (one checkpoint each) [4].")
def warmup_command(run_dir, device, threads, quiet, **flags):
    """LoRA warm-up on a random p % of the pool; a checkpoint (adapter, AdamW moments, η̄) per epoch.

    \b
    Example:
      dataworth select warmup --run less_out --pool pool.jsonl --base tiny_model --warmup-percent 5 --epochs 4
    """
    from dataworth.selection.less import warmup

    config = _config(run_dir, device=device, threads=threads, **flags)
    result = warmup(config, progress=not quiet)
    for ckpt, lr, loss in zip(result.checkpoints, result.epoch_lrs, result.epoch_losses):
        click.echo(f"{ckpt}  avg_lr {lr:.3g}  loss {loss:.4f}")


@select_group.command("features")
@_options(_COMMON, _DATA[:1], _FEATURES)
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(file_okay=False),
              help="LoRA checkpoint directory (repeatable; default: the run's warm-up checkpoints).")
@click.option("--overwrite", is_flag=True, help="Replace feature stores made with other settings.")
def features_command(run_dir, device, threads, quiet, checkpoints, overwrite, **flags):
    """Gradient features per checkpoint: pool (Adam-preconditioned) and validation (SGD), same projection.

    \b
    Example:
      dataworth select features --run less_out --valid valid_dir --task units --dense-dim 8192
    """
    from dataworth.selection.less import features

    config = _config(run_dir, device=device, threads=threads, **flags)
    record = features(config, checkpoints or None, progress=not quiet, overwrite=overwrite)
    for ckpt in record["checkpoints"]:
        click.echo(f"{ckpt['features']}  η̄ {ckpt['avg_lr']:.3g}  pool {ckpt['pool_rows']} rows "
                   f"in {ckpt['pool_seconds']:.1f}s")


@select_group.command("match")
@_options(_COMMON, _DATA[:1], _MATCH)
@click.option("--valid", default=None, help="Validation rows (default: as saved in the run).")
@click.option("--task", "tasks", multiple=True, help="Target task (repeatable; default: the run's tasks).")
def match_command(run_dir, device, threads, quiet, tasks, **flags):
    """Score every pool row for each target task and write selected/<task>/top_p<P>.jsonl + scores.parquet.

    \b
    Example:
      dataworth select match --run less_out --task units --aggregate mean --across max --percent 5
    """
    from dataworth.selection.less import list_tasks, match

    config = _config(run_dir, device=device, threads=threads, tasks=tasks, **flags)
    for task in config.tasks or list_tasks(config.valid):
        summary = match(config, task)
        click.echo(f"{task}: selected {summary['k']} of {summary['pool']} rows "
                   f"(scores {summary['min_selected_score']:.4g} .. {summary['max_score']:.4g}) → {summary['selection']}")


@select_group.command("run")
@_options(_COMMON, _DATA, _LORA, _FEATURES, _MATCH)
@click.option("--test", default=None, help="Held-out test rows, same layout as --valid.")
@click.option("--warmup-percent", type=float, default=None, help="Share of the pool to warm up on, in % [5].")
@click.option("--warmup-epochs", "warmup_epochs_flag", type=int, default=None, help="Warm-up epochs [4].")
@click.option("--finetune-epochs", type=int, default=None, help="Epochs of the final LoRA training [4].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write {task: {loss, exact_match, k}} as one JSON object.")
def run_command(run_dir, device, threads, quiet, json_path, **flags):
    """The whole pipeline per target task: warm-up → features → match → select → LoRA → evaluate.

    \b
    Example:
      dataworth select run --run less_out --pool builtin:instruct --base tiny_model \\
          --valid builtin:instruct:valid --test builtin:instruct:test --task units
    """
    from dataworth.selection.less import run

    config = _config(run_dir, device=device, threads=threads, **flags)
    results = run(config, progress=not quiet)
    figures = {}
    for task, result in results.items():
        ev = result["eval"]
        figures[task] = {"loss": ev["loss"], "exact_match": ev["exact_match"], "k": result["selection"]["k"]}
        click.echo(f"{task}: trained on {result['selection']['k']} selected rows; test loss {ev['loss']:.4f}, "
                   f"exact match {ev['exact_match']:.3f} ({ev['rows']} rows)")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


@select_group.command("prefilter")
@_options(_COMMON, _MATCH)
@click.option("--task", "tasks", multiple=True, help="Target task (repeatable; default: the run's tasks).")
@click.option("--labelled", type=float, default=0.2, show_default=True, help="Share of the pool given true scores.")
@click.option("--keep", type=float, default=0.2, show_default=True,
              help="Share of the pool (predicted-top unlabelled rows) kept for the gradient pass.")
@click.option("--predictor", type=click.Choice(["ridge", "gbm"]), default="ridge", show_default=True)
@click.option("--buckets", type=int, default=5, show_default=True, help="Quantile buckets for bucket accuracy.")
@click.option("--prefilter-seed", type=int, default=0, show_default=True, help="Seed of the labelled sample.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the figures as one JSON object ({task: {recall, compute_saved, r2, ...}}).")
def prefilter_command(run_dir, device, threads, quiet, tasks, labelled, keep, predictor, buckets, prefilter_seed,
                      json_path, **flags):
    """Learned pre-filter on a run with complete features: recall of the true top-p % and compute saved.

    \b
    Example:
      dataworth select prefilter --run less_out --task units --labelled 0.2 --keep 0.2 --predictor gbm
    """
    from dataworth.selection.less import list_tasks
    from dataworth.selection.prefilter import (
        PrefilterConfig,
        format_metrics,
        run_prefilter,
    )

    config = _config(run_dir, device=device, threads=threads, tasks=tasks, **flags)
    percent = flags.get("percent") or config.percent
    pre = PrefilterConfig(labelled_fraction=labelled, keep_fraction=keep, percent=percent, predictor=predictor,
                          buckets=buckets, seed=prefilter_seed)
    figures = {}
    for task in config.tasks or list_tasks(config.valid):
        metrics = run_prefilter(config, task, pre)
        figures[task] = {k: v for k, v in metrics.items() if k != "config"}
        click.echo(f"{task} (labels: {config.aggregate} within subtask, {config.across} across):")
        click.echo(format_metrics(metrics))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")
