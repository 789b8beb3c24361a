"""The whole pipeline on the built-in world: train → generate → extract → fit → score → report.

Why: a newcomer should see, in one command on a laptop CPU, the answer dataworth gives (which training
documents made the model say this) *and* evidence that it is right: on `builtin:bios` every fact query has
gold documents (those stating the fact), so attribution is scored by recall@k / MRR against a BM25 baseline.
Recall measures *attribution* (are the documents stating the fact found?); the ``tail-patch@10`` column
measures *influence* (does one more training step on a retrieved document raise log p(answer)?), for every
method including BM25 (Chang et al. 2024, §4).

Each step is skipped when its output already exists (the demo resumes), so re-running is cheap.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.evaluation.facts import fact_tracing_table
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.influence.curvature import ensure_curvature
from dataworth.influence.score import score
from dataworth.model.generate import generate
from dataworth.model.load import load_model
from dataworth.model.train import TrainConfig, train
from dataworth.reports.report import report
from dataworth.store.reader import open_store
from dataworth.util import say


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. ``world`` is the bios spec suffix (e.g. ``?people=12`` for a quick run)."""

    out: str = "demo_out"
    world: str = ""
    preset: str = "tiny"
    epochs: int | None = None
    # Exact (identity-projection) gradients of the MLP output projections, where a transformer stores facts:
    # measured on the default world (auto damping = 1e-4x), EK-FAC recall@10 0.996 (MRR 0.88) vs 0.84 (MRR 0.65)
    # for LoGra rank 64 on all 28 layers (benchmarks/bios_damping.py). Use `--projection random --rank K
    # --modules all` for compressed stores.
    modules: str = r"mlp\.down_proj"
    projection: str = "identity"
    rank: int = 64
    dtype: str = "float16"
    curvatures: tuple[str, ...] = ("none", "kfac", "ekfac")
    modes: tuple[str, ...] = ("dot", "cosine")
    default_curvature: str = "ekfac"
    default_mode: str = "cosine"
    top_k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:  # before minutes of training, not at extraction (where the field is rank_in)
            raise InputError(f"--rank must be >= 1, got {self.rank}")


@dataclass
class DemoResult:
    out: Path
    fact_accuracy: float | None
    table: list[dict] = field(default_factory=list)
    report: Path | None = None
    seconds: dict = field(default_factory=dict)


def run_demo(config: DemoConfig = DemoConfig()) -> DemoResult:
    """Run (or resume) the demo under ``config.out``; prints figures and returns them."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data_spec = f"builtin:bios{config.world}"
    queries_spec = f"builtin:bios:queries{config.world}"
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    model_dir = out / "model"
    accuracy = None
    if not (model_dir / "dataworth_train.json").exists():
        say(f"[1/6] train a tiny model from scratch on {data_spec}")
        result = train(data_spec, model_dir, TrainConfig.from_preset(config.preset, epochs=config.epochs,
                                                                    seed=config.seed))
        accuracy = result.fact_accuracy
    else:
        say(f"[1/6] reuse {model_dir}")
        accuracy = json.loads((model_dir / "dataworth_train.json").read_text()).get("fact_accuracy")
    seconds["train"] = time.perf_counter() - t0

    t = time.perf_counter()
    queries = load_rows(queries_spec)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": q.id, "prompt": q.data["prompt"]}) + "\n" for q in queries))
    generated = out / "generated.jsonl"
    if not generated.exists():
        say("[2/6] generate the model's answers to the fact prompts (these are what we attribute)")
        generate(str(model_dir), prompts, generated, max_new_tokens=12)
    seconds["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    store_dir = out / "store"
    size = "exact" if config.projection == "identity" else f"{config.projection}, rank {config.rank}"
    say(f"[3/6] extract per-example gradients ({size}; modules {config.modules}) → {store_dir}")
    extract(ExtractConfig(model=str(model_dir), data=data_spec, out=str(store_dir), modules=config.modules,
                          projection=config.projection, rank_in=config.rank, rank_out=config.rank,
                          seed=config.seed, dtype=config.dtype, device="cpu", shard_rows=256))
    seconds["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[4/6] fit curvature, trace facts to their gold documents, measure one-step effects (tail-patch)")
    loaded = load_model(str(model_dir), device="cpu")
    train_rows = load_rows(data_spec)
    documents = [r.data["text"] for r in train_rows]
    # the final AdamW state lives in model_dir/checkpoints/epoch-<last>/ (retrain.final_optimizer_dir finds it)
    table = fact_tracing_table(open_store(store_dir), loaded.model, loaded.tokenizer, queries, config.curvatures,
                               config.modes, documents, train_rows=train_rows, optimizer_dir=model_dir)
    seconds["fit+trace"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"[5/6] score the generated answers ({config.default_curvature}/{config.default_mode})")
    scores_dir = out / "scores"
    ensure_curvature(store_dir, config.default_curvature)
    score(str(store_dir), str(generated), loaded, mode=config.default_mode, curvature=config.default_curvature,
          top_k=config.top_k, full=True, self_influence=True, out=scores_dir)
    seconds["score"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[6/6] write the report")
    report_path = write_report(scores_dir, out / "report", store_dir, loaded)
    seconds["report"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    summary = {"fact_accuracy": accuracy, "fact_tracing": table, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "config": asdict(config), "report": str(report_path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return DemoResult(out=out, fact_accuracy=accuracy, table=table, report=report_path, seconds=seconds)


def write_report(scores_dir: Path, report_dir: Path, store_dir: Path, loaded) -> Path:
    """The HTML + Markdown report of the demo's scores (`dataworth.reports.report.report`)."""
    return Path(report(scores_dir, report_dir, store=store_dir, model=loaded))
