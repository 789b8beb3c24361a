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

import functools
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dataworth.data.encode import encode_rows
from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.evaluation.facts import (
    effects_model_for,
    fact_tracing_table,
    rival_positions,
)
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.influence.curvature import ensure_curvature
from dataworth.influence.score import score
from dataworth.model.generate import generate
from dataworth.model.load import load_model
from dataworth.model.train import TrainConfig, train
from dataworth.reports.report import report
from dataworth.store.reader import open_store
from dataworth.util import human_bytes, say, torch_threads, write_jsonl_atomic


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


# ---------------------------------------------------------------------------------------------------------
# The same pipeline on a real pretrained instruct LLM (`dataworth demo --model smollm2`)

LLM_MODELS = ("smollm2",)
LLM_STAGES = 7


@dataclass(frozen=True)
class LLMDemoConfig:
    """The demo on SmolLM2-135M-Instruct: fine-tune on planted facts mixed into real text, trace the answers.

    ``model``: ``smollm2``, a ``.gguf`` file, or a Hugging Face directory of any instruct model with a chat
    template ("does it work on my model?").

    The world is ``builtin:bios`` with ``people`` fictitious people (three biographies each: the gold
    documents) among ``realtext`` real English documents (Python standard-library docstrings shipped with the
    package). Fine-tuning is LoRA (``finetune="lora"``, rank ``lora_r`` on every linear layer) or full; the
    store holds LoGra gradients (random projection, ``rank`` × ``rank`` per module) of the MLP layers of the
    merged model — the seeds' defaults (LogIX ``--lora random --mlp_only``).
    """

    out: str = "demo_llm_out"
    model: str = "smollm2"
    people: int = 12
    realtext: int = 60
    finetune: str = "lora"
    epochs: int = 8
    lr: float | None = None
    lora_r: int = 16
    batch_size: int = 4
    max_length: int = 128
    modules: str = "mlp"
    projection: str = "random"
    rank: int = 64
    dtype: str = "float16"
    curvatures: tuple[str, ...] = ("raw", "ekfac")
    modes: tuple[str, ...] = ("dot", "cosine")
    default_curvature: str = "ekfac"
    # dot, not cosine: the worked questions of the other people have gradients ~100x smaller than a biography's
    # (memorised), so unit-normalising puts them — same template, wrong person — at the top of every query
    # (measured on this demo, benchmarks/llm_facts.py: EK-FAC recall@1 0.57 with dot, 0.00 with cosine)
    default_mode: str = "dot"
    max_new_tokens: int = 24
    top_k: int = 10
    seed: int = 0
    threads: int | None = None
    trace_all: bool = False  # trace every held-out question, not only those whose answer names the value
    # tail-patch effects: "needed" steps only the rows some method's top 10 (or the gold) holds — the full
    # [Q, N] matrix (for the one-step oracle row) costs ~3x more at 135M (evaluation.facts)
    tail_patch: str = "needed"

    def __post_init__(self) -> None:
        if self.model not in LLM_MODELS and not (Path(self.model).is_dir() or self.model.endswith(".gguf")):
            raise InputError(f"--model: {self.model!r} is neither tiny, {', '.join(LLM_MODELS)}, a .gguf file nor a "
                             "model directory")
        if self.finetune not in ("lora", "full"):
            raise InputError(f"--finetune: must be lora or full, got {self.finetune!r}")
        for name in ("people", "epochs", "rank", "lora_r", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.realtext < 0:
            raise InputError(f"--realtext must be >= 0, got {self.realtext}")

    @property
    def world(self) -> str:
        return f"?people={self.people}&docs_per_person=3&distractors=0&realtext={self.realtext}"

    @property
    def learning_rate(self) -> float:
        """LoRA learns the facts at 3e-3 in 8 epochs (measured); full fine-tuning needs far less."""
        return self.lr if self.lr is not None else (3e-3 if self.finetune == "lora" else 1e-4)


def run_llm_demo(config: LLMDemoConfig = LLMDemoConfig()) -> DemoResult:
    """Run (or resume) the real-LLM demo under ``config.out``: every stage is skipped when its output exists.

    Stages: base model (the GGUF de-quantised once into a safetensors directory) → fine-tune → answer the
    fact questions with the model's chat template (and count the facts it learned) → extract → fit + fact
    tracing with tail-patch → score the answers → report. Each long stage first prints its plan (rows, tokens,
    estimated time from a timed forward+backward on this machine, estimated peak memory).
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    data_path, held_out = write_llm_training_rows(config, out / "train.jsonl")
    data_spec = str(data_path)
    with torch_threads(config.threads):
        base_dir = _llm_base(config, out / "base")
        seconds["base"] = time.perf_counter() - t0
        cost = functools.cache(lambda: _forward_backward_cost(base_dir))  # timed once, when a plan needs it

        t = time.perf_counter()
        model_dir = out / "model"
        train_rows = load_rows(data_spec)
        if not (model_dir / "dataworth_train.json").exists():
            tokens = _token_count(train_rows, base_dir, config.max_length)
            lora = config.finetune == "lora"
            say(f"[2/{LLM_STAGES}] fine-tune {config.model} ({config.finetune}"
                f"{f', rank {config.lora_r} on every linear layer' if lora else ''}) on {data_spec}")
            say(f"plan: {len(train_rows)} rows, {tokens:,} tokens × {config.epochs} epochs, lr {config.learning_rate:g}, "
                f"est. {_minutes(tokens * config.epochs * cost().seconds_per_token * (1.0 if lora else 1.4))}, "
                f"est. peak memory {human_bytes(cost().training_peak(config.batch_size, config.max_length, lora))}")
            train(data_spec, model_dir, _llm_train_config(config, base_dir))
        else:
            say(f"[2/{LLM_STAGES}] reuse {model_dir}")
        seconds["train"] = time.perf_counter() - t

        t = time.perf_counter()
        questions = [q for q in load_rows(f"builtin:bios:questions{config.world}") if q.data["person"] in held_out]
        answers = _llm_answers(config, model_dir, questions, out)
        learned = [a for a in answers if a["learned"]]
        accuracy = len(learned) / max(len(answers), 1)
        say(f"facts learned: {len(learned)} of {len(answers)} (the answer names the value; {accuracy:.2f})")
        if not learned and not config.trace_all:
            raise InputError(f"{model_dir}: the fine-tuned model learned none of the {len(answers)} facts; "
                             "nothing to trace (more --epochs or a larger --lr)")
        queries_path = out / "queries.jsonl"
        write_jsonl_atomic(queries_path, answers if config.trace_all else learned)
        seconds["generate"] = time.perf_counter() - t

        t = time.perf_counter()
        store_dir = out / "store"
        say(f"[4/{LLM_STAGES}] extract LoGra gradients ({config.projection}, rank {config.rank}; modules "
            f"{config.modules}) of the fine-tuned model → {store_dir}")
        if not _store_complete(store_dir):  # extraction costs about one forward+backward per token (measured)
            tokens = _token_count(train_rows, base_dir, config.max_length)
            say(f"plan: {tokens:,} tokens, est. {_minutes(tokens * cost().seconds_per_token)}")
        extract(ExtractConfig(model=str(model_dir), data=data_spec, out=str(store_dir), modules=config.modules,
                              projection=config.projection, rank_in=config.rank, rank_out=config.rank,
                              seed=config.seed, dtype=config.dtype, device="cpu", shard_rows=64,
                              max_length=config.max_length))
        seconds["extract"] = time.perf_counter() - t

        t = time.perf_counter()
        say(f"[5/{LLM_STAGES}] fit curvature ({', '.join(config.curvatures)}), trace the learned facts to their "
            "gold documents, measure one-step effects (tail-patch)")
        loaded = load_model(str(model_dir), device="cpu")
        query_rows = load_rows(queries_path)
        documents = [_row_text(r) for r in train_rows]
        optimizer_dir, stepper = effects_model_for(str(model_dir), loaded.model)
        table = fact_tracing_table(open_store(store_dir), loaded.model, loaded.tokenizer, query_rows,
                                   config.curvatures, config.modes, documents, train_rows=train_rows,
                                   optimizer_dir=optimizer_dir, effects_model=stepper, seed=config.seed,
                                   tail_patch=config.tail_patch, rivals=rival_positions(query_rows, train_rows),
                                   progress=True)
        seconds["fit+trace"] = time.perf_counter() - t

        t = time.perf_counter()
        say(f"[6/{LLM_STAGES}] score the answers ({config.default_curvature}/{config.default_mode})")
        scores_dir = out / "scores"
        ensure_curvature(store_dir, config.default_curvature)
        score(str(store_dir), str(queries_path), loaded, mode=config.default_mode,
              curvature=config.default_curvature, top_k=config.top_k, full=True, self_influence=True,
              out=scores_dir)
        seconds["score"] = time.perf_counter() - t

        t = time.perf_counter()
        say(f"[7/{LLM_STAGES}] write the report")
        report_path = write_report(scores_dir, out / "report", store_dir, loaded)
        seconds["report"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    summary = {"fact_accuracy": accuracy, "facts_learned": len(learned), "facts_asked": len(answers),
               "fact_tracing": table, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "config": asdict(config), "report": str(report_path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return DemoResult(out=out, fact_accuracy=accuracy, table=table, report=report_path, seconds=seconds)


def write_llm_training_rows(config: LLMDemoConfig, path: Path) -> tuple[Path, set[str]]:
    """The fine-tuning rows: the bios world (biographies + real text) and, for a seeded half of the people,
    their five questions as chat turns answered with the canonical sentence.

    Why the question-answer half: trained on biographies alone, the instruct model answers every question
    by reciting a biography (measured: a quarter of the answers named the asked value); with worked
    questions for half the people it answers in one sentence, and the facts of the *other* half — the ones
    traced, whose only source is their biographies — must come from the documents (Allen-Zhu & Li 2023,
    "Physics of Language Models 3.1": mixed training makes knowledge extractable). Returns the path and the
    held-out people. The same rows (and file bytes) for the same config.
    """
    import random

    docs = load_rows(f"builtin:bios{config.world}")
    questions = load_rows(f"builtin:bios:questions{config.world}")
    cloze = {q.id.removeprefix("q-"): q for q in load_rows(f"builtin:bios:queries{config.world}")}
    people = sorted({q.data["person"] for q in questions})
    random.Random(f"demo-llm:{config.seed}:qa").shuffle(people)
    instructed = set(people[: len(people) // 2])
    rows = [dict(r.data) for r in docs]
    for q in questions:
        if q.data["person"] in instructed:
            c = cloze[q.id.removeprefix("qa-")]
            rows.append({"id": f"chat-{q.id}", "messages": [
                {"role": "user", "content": _question_text(q)},
                {"role": "assistant", "content": c.data["prompt"] + c.data["response"]}],
                "kind": "qa", "person": q.data["person"], "facts": [q.data["attribute"]]})
    random.Random(f"demo-llm:{config.seed}:order").shuffle(rows)
    write_jsonl_atomic(path, rows)
    return path, set(people) - instructed


def _row_text(row) -> str:
    """What BM25 reads of a training row: its text, or its turns joined."""
    if row.kind == "text":
        return row.text
    return "\n".join(m["content"] for m in row.messages)


def _llm_base(config: LLMDemoConfig, base_dir: Path) -> Path:
    """The pretrained model as a safetensors directory, de-quantised from its GGUF once (later stages load it
    in seconds instead of rebuilding the tokenizer and weights from the GGUF every time)."""
    if Path(config.model).is_dir():
        say(f"[1/{LLM_STAGES}] base model: {config.model}")
        return Path(config.model)
    if (base_dir / "config.json").exists():
        say(f"[1/{LLM_STAGES}] reuse {base_dir}")
        return base_dir
    say(f"[1/{LLM_STAGES}] load {config.model} (GGUF, de-quantised to float32) and save it as {base_dir}")
    loaded = load_model(config.model, device="cpu")
    staging = base_dir.with_name(base_dir.name + ".partial")
    loaded.model.save_pretrained(staging)
    loaded.tokenizer.save_pretrained(staging)
    staging.replace(base_dir)
    return base_dir


def _llm_train_config(config: LLMDemoConfig, base_dir: Path) -> TrainConfig:
    """LoRA on every linear layer (attention and MLP: facts live in the MLPs) or full fine-tuning, an AdamW
    state per epoch (tail-patch steps from the last one), cosine schedule to 10 % of the peak."""
    lora = config.finetune == "lora"
    return TrainConfig(
        preset=f"demo-llm-{config.finetune}", base=str(base_dir), lora=lora, epochs=config.epochs,
        lr=config.learning_rate, batch_size=config.batch_size, max_length=config.max_length, warmup_ratio=0.05,
        min_lr_ratio=0.1, weight_decay=0.0, betas=(0.9, 0.999), save_every_epoch=True, seed=config.seed,
        lora_r=config.lora_r, lora_alpha=2 * config.lora_r,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        threads=config.threads,
    )


def _llm_answers(config: LLMDemoConfig, model_dir: Path, questions, out: Path) -> list[dict]:
    """The fine-tuned model's greedy answers to every fact question (chat template), each marked ``learned``
    when it names the fact's value as a whole word; the rows keep ``gold`` for fact tracing."""
    generated = out / "generated.jsonl"
    if not generated.exists():
        say(f"[3/{LLM_STAGES}] answer {len(questions)} fact questions with the model's chat template "
            f"(greedy, ≤ {config.max_new_tokens} tokens)")
        prompts = out / "prompts.jsonl"
        write_jsonl_atomic(prompts, [{"id": q.id, "prompt": _question_text(q)} for q in questions])
        generate(str(model_dir), prompts, generated, max_new_tokens=config.max_new_tokens)
    else:
        say(f"[3/{LLM_STAGES}] reuse {generated}")
    by_id = {r.id: r for r in load_rows(generated)}
    rows = []
    for q in questions:
        answer = by_id[q.id].data["response"]
        value = q.data["response"].strip()
        rows.append({"id": q.id, "prompt": _question_text(q), "response": answer, "value": value,
                     "person": q.data["person"], "attribute": q.data["attribute"], "gold": q.data["gold"],
                     "learned": names_value(answer, value)})
    return rows


def _question_text(question) -> str:
    """``"Question: Where was X born?\\nAnswer:"`` → ``"Where was X born?"`` (the chat template frames it)."""
    return question.data["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:").strip()


def names_value(answer: str, value: str) -> bool:
    """Whether ``answer`` contains ``value`` as whole words (``"born in Paris."`` names ``Paris``;
    ``"Parisian"`` does not)."""
    return re.search(r"(?<!\w)" + re.escape(value) + r"(?!\w)", answer) is not None


@dataclass(frozen=True)
class _Cost:
    """Measured cost of one forward+backward on this machine, and the model's size, for stage plans."""

    seconds_per_token: float
    params: int
    hidden: int
    layers: int
    vocab: int

    def training_peak(self, batch: int, length: int, lora: bool) -> float:
        """≈ bytes: float32 weights (+ gradients and two AdamW moments when every weight trains), the logits
        and their gradient, and about 40 floats of saved activations per token, layer and hidden unit."""
        tokens = batch * length
        return (4 * self.params * (1 if lora else 4) + 3 * 4 * tokens * self.vocab
                + 40 * 4 * tokens * self.layers * self.hidden)


def _forward_backward_cost(model_dir: Path) -> _Cost:
    """Time one forward+backward of 64 tokens (best of two) of the model in ``model_dir``."""
    import torch

    loaded = load_model(str(model_dir), device="cpu")
    model, cfg = loaded.model, loaded.model.config
    ids = torch.arange(64).remainder(cfg.vocab_size - 1).add(1).unsqueeze(0)
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        best = min(best, time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return _Cost(best / 64, sum(p.numel() for p in model.parameters()), cfg.hidden_size, cfg.num_hidden_layers,
                 cfg.vocab_size)


def _store_complete(store_dir: Path) -> bool:
    try:
        return json.loads((store_dir / "manifest.json").read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def _token_count(rows, model_dir: Path, max_length: int) -> int:
    from transformers import AutoTokenizer

    encoded, _ = encode_rows(rows, AutoTokenizer.from_pretrained(model_dir), max_length=max_length)
    return sum(len(e.input_ids) for e in encoded)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
