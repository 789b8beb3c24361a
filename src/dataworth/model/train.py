"""Train a small causal LM from scratch (own BPE tokenizer), or fine-tune an existing one (full or LoRA).

Why a module of its own: dataworth's built-in default needs a model whose training data we *know*, so the
toolkit trains its own tiny model on ``builtin:bios`` in a few CPU minutes; LESS needs a LoRA warm-up that
leaves, per epoch, the Adam moments of every LoRA weight and the epoch's average learning rate η̄.

Loss: mean over the batch's target tokens, ``L = Σ_b Σ_t ce[b,t]·mask[b,t] / Σ mask`` (``data.batching.token_losses``);
the per-example *sum* convention matters for gradients stored later, not for training.

Schedule (``lr_at``): linear warm-up from ``peak/warmup`` to ``peak`` over ``warmup`` steps, then cosine decay
to ``min_lr_ratio · peak`` at the last step. Optimizer: ``torch.optim.AdamW`` (decoupled weight decay on
matrices only, none on norms/biases).

Outputs of ``train(data, out, config)``::

    out/                          normal HF model dir: config.json, model.safetensors, tokenizer files
    out/dataworth_train.json      config, data spec, per-epoch loss and average lr, fingerprints, accuracy
    out/adapter/                  (LoRA, merge_lora) the unmerged adapter; ``out/`` holds the merged model
    out/checkpoints/epoch-N/      model (full) or adapter (LoRA) weights + tokenizer
        optimizer.safetensors     "<param name>.exp_avg", "<param name>.exp_avg_sq" (float32)
        optimizer.json            {"kind": "adamw", "betas", "eps", "weight_decay", "lr", "step": {name: n}}
        trainer_state.json        {"epoch", "step", "avg_lr", "lrs", "schedule"}

Parameter names in the optimizer files are ``model.named_parameters()`` names of the trained model — for
LoRA, the ``PeftModel`` names (``base_model.model.….lora_A.default.weight``), which is what
``model.load.load_model(checkpoint_dir)`` reproduces. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from dataworth.data.batching import Encoded, collate, token_losses
from dataworth.data.encode import encode_rows, prompt_token_ids
from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.model.generate import generate_token_ids
from dataworth.model.load import load_model, model_fingerprint, tokenizer_fingerprint
from dataworth.model.optimizer import (
    TRAINER_STATE,
    save_optimizer_state,
)
from dataworth.util import (
    finite_number,
    pad_token_id,
    progress_bar,
    redraw_interval,
    resolve_device,
    torch_threads,
    write_json_atomic,
)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
TRAIN_JSON = "dataworth_train.json"

# open-instruct (Tülu) chat format, given to a from-scratch tokenizer when the corpus has messages rows, so
# that generation prompts (``data.encode.prompt_token_ids``) match the training format token for token.
OPEN_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on ``texts`` → ``PreTrainedTokenizerFast`` with ``SPECIAL_TOKENS``.

    ``<pad>``=0, ``<s>``=1, ``</s>``=2, then the open-instruct role markers ``<|system|>``, ``<|user|>``,
    ``<|assistant|>`` as single tokens; pad/bos/eos set. The normalizer prepends one space to a text
    segment unless it already starts with whitespace, so a name at the start of a prompt ("Alice …") gets
    the same token as inside a document (" Alice …") — worth ~10 points of fact accuracy on small worlds
    (measured) — while ``<|assistant|>\n`` stays two tokens (ByteLevel's ``add_prefix_space`` would make
    it ``<|assistant|> \n``: it prefixes every segment between special tokens).
    Deterministic: the same texts in the same order give the same vocabulary and merges.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise InputError(f"vocab_size: {vocab_size} is below the 256 byte symbols + {len(SPECIAL_TOKENS)} special tokens")
    backend = Tokenizer(models.BPE())
    # Prepend a space, then delete it again when the segment began with whitespace (a zero-width regex
    # replacement would be simpler but makes tokenizers 0.23 panic in ByteLevel's offset tracking).
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(" "), normalizers.Replace(Regex(r"\A (?=\s)"), "")])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        clean_up_tokenization_spaces=False,
    )


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (serialised into ``dataworth_train.json``).

    Architecture (from-scratch mode only): ``arch`` is ``"llama"`` or ``"gpt_neox"``; ``vocab_size`` is the
    BPE vocabulary trained on the corpus. Fine-tuning: ``base`` is a model spec (see ``model.load.load_model``);
    its tokenizer is kept and the architecture fields are ignored; ``lora=True`` trains only LoRA adapters
    on ``lora_targets`` (module-name suffixes); ``merge_lora=True`` makes ``out/`` the merged model (a normal
    HF dir) with the adapter in ``out/adapter``, ``False`` makes ``out/`` the adapter itself (saves a full
    copy of the base when only adapters are needed). ``max_length=None`` keeps whole rows. ``threads``: torch
    CPU threads during training (``None``: leave torch's default); the tiny presets use 1 because their
    matrices are too small to gain from intra-op parallelism, and on a busy machine spinning OpenMP
    threads made a step up to 10x slower (measured). ``attn_implementation``: the attention kernel while
    training (``None``: the model's own, eager for every model dataworth loads or builds; ``"sdpa"``: PyTorch's
    fused kernel: on SmolLM2-135M, one CPU thread, a step 11 % faster and its peak memory 0.8 GiB lower at
    4 × 256 tokens, no different at 4 × 64 — benchmarks/llm_stages.py). Not the default: it changes the
    trained weights in their last bits, so earlier runs would no longer be reproduced bit for bit; extraction
    uses eager attention whatever the model was trained with.
    """

    preset: str = "tiny"
    arch: str = "llama"
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    tie_embeddings: bool = True
    max_length: int | None = 256
    epochs: int = 40
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    batch_size: int = 16
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    seed: int = 0
    chat: str = "auto"
    save_every_epoch: bool = False
    base: str | None = None
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    merge_lora: bool = True
    device: str = "auto"
    threads: int | None = None
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        self._check_finite()
        checks = [
            (self.arch in ("llama", "gpt_neox"), "arch", f"must be llama or gpt_neox, got {self.arch!r}"),
            (self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}"),
            (self.lr > 0, "lr", f"must be > 0, got {self.lr}"),
            (self.lr <= _FLOAT32_MAX, "lr", f"must be at most {_FLOAT32_MAX:.4g} (the weights are float32), "
                                            f"got {self.lr}"),
            (self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"),
            (self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}"),
            (all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {self.betas}"),
            (self.eps > 0, "eps", f"must be > 0, got {self.eps}"),
            (self.grad_clip is None or self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}"),
            (0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}"),
            (self.max_length is None or self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}"),
            (self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads"),
            (self.num_heads % self.num_kv_heads == 0, "num_kv_heads", "must divide num_heads"),
            (not self.lora or self.base is not None, "lora", "LoRA needs a base model (--base)"),
            (self.lora_r >= 1, "lora_r", f"must be >= 1, got {self.lora_r}"),
            (self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}"),
            (self.attn_implementation in TRAIN_ATTENTION, "attn_implementation",
             f"must be one of eager, sdpa or None, got {self.attn_implementation!r}"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise InputError(f"{_field_name(name)}: {message}")

    def _check_finite(self) -> None:
        """Every float hyper-parameter must be finite: ``inf > 0`` passes the range checks below, and an
        infinite learning rate trains on NaN loss into a model whose every weight is NaN."""
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            for item in value if isinstance(value, tuple) else (value,):
                if item is not None:
                    finite_number(item, _field_name(name))

    @classmethod
    def from_preset(cls, name: str = "tiny", **overrides: Any) -> "TrainConfig":
        """A preset (``PRESETS``) with ``overrides`` applied; ``None`` overrides are ignored (unset flags)."""
        if name not in PRESETS:
            raise InputError(f"--preset: unknown preset '{name}' (known: {', '.join(PRESETS)})")
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"train config: unknown field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(PRESETS[name], **given)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


TRAIN_ATTENTION = (None, "eager", "sdpa")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # a larger lr cannot even be applied (torch raises)
# Float hyper-parameters (``_check_finite``), and the ``dataworth train`` flag of the fields that have one.
_FLOAT_FIELDS = ("lr", "min_lr_ratio", "warmup_ratio", "weight_decay", "betas", "eps", "grad_clip", "lora_dropout")
_FIELD_FLAGS = {"epochs": "--epochs", "lr": "--lr", "batch_size": "--batch-size", "seed": "--seed",
                "max_length": "--max-length", "base": "--base", "lora": "--lora"}


def _field_name(name: str) -> str:
    """``train config field 'lr' (--lr)``: the field, and the flag that sets it when there is one."""
    flag = _FIELD_FLAGS.get(name)
    return f"train config field '{name}'" + (f" ({flag})" if flag else "")


PRESETS: dict[str, TrainConfig] = {
    # ≈1.0 M parameters (tied embeddings); learns the default bios world (48 people) in ~2-3 CPU minutes.
    "tiny": TrainConfig(threads=1),
    # For tests: ≈0.7 exact match on an 8-person world (4 docs each) in ~15 s of one busy core.
    "tiny-test": TrainConfig(
        preset="tiny-test", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
        intermediate_size=256, epochs=30, lr=3e-3, batch_size=4, max_length=128, threads=1,
    ),
    # LoRA warm-up for LESS on an existing model (pass --base): 4 epochs, an adapter checkpoint per epoch.
    "lora": TrainConfig(
        preset="lora", lora=True, base="smollm2", epochs=4, lr=2e-4, batch_size=8, warmup_ratio=0.03,
        weight_decay=0.0, max_length=512, save_every_epoch=True, min_lr_ratio=0.0, betas=(0.9, 0.999),
    ),
}


def lr_at(step: int, total_steps: int, peak: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    ``warmup = ceil(warmup_ratio · total)``; for ``step < warmup``: ``peak · (step + 1) / warmup``; after:
    ``peak · (m + (1 - m) · ½(1 + cos(π · p)))`` with ``m = min_lr_ratio`` and
    ``p = (step - warmup) / max(1, total - warmup - 1)`` running from 0 to 1.
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: where, its per-epoch figures, the final fingerprint and fact accuracy."""

    out_dir: Path
    config: TrainConfig
    epoch_losses: tuple[float, ...]
    epoch_lrs: tuple[float, ...]
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    fingerprint: str
    fact_accuracy: float | None = None
    checkpoints: tuple[Path, ...] = field(default_factory=tuple)


def build_model(config: TrainConfig, tokenizer: Any) -> torch.nn.Module:
    """A fresh, seeded ``LlamaForCausalLM`` / ``GPTNeoXForCausalLM`` sized by ``config`` for ``tokenizer``."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    positions = max(config.max_length or 0, 512)
    torch.manual_seed(config.seed)
    if config.arch == "llama":
        hf_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, max_position_embeddings=positions,
            tie_word_embeddings=config.tie_embeddings, attn_implementation="eager", **ids,
        )
        model = LlamaForCausalLM(hf_config)
    else:
        hf_config = GPTNeoXConfig(
            vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            max_position_embeddings=positions, tie_word_embeddings=config.tie_embeddings,
            attn_implementation="eager", **ids,
        )
        model = GPTNeoXForCausalLM(hf_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def attach_lora(model: torch.nn.Module, config: TrainConfig, base_spec: str) -> torch.nn.Module:
    """Wrap ``model`` in a seeded PEFT LoRA model; only the LoRA weights require gradients.

    ``base_model_name_or_path`` in the saved adapter config is ``base_spec`` (a ``load_model`` spec), so
    ``load_model(adapter_dir)`` can rebuild base + adapter.
    """
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    missing = [t for t in config.lora_targets if t not in names]
    if missing:
        raise InputError(f"--lora-targets: no Linear module named {', '.join(missing)} in the base model "
                         f"(have: {', '.join(sorted(names))})")
    torch.manual_seed(config.seed)
    lora_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets), task_type="CAUSAL_LM", bias="none",
    )
    peft_model = get_peft_model(model, lora_config)
    peft_model.peft_config["default"].base_model_name_or_path = base_spec
    return peft_model


def _base_spec_for_record(base: str) -> str:
    """Paths become absolute so an adapter's recorded base still resolves from another directory."""
    if base == "smollm2" or base.startswith("hf:"):
        return base
    return str(Path(base).expanduser().resolve())


def response_matches(generated: str, expected: str) -> bool:
    """Exact match of a greedy answer: ``generated`` starts with ``expected`` after both are stripped of
    surrounding whitespace and ``expected`` of one trailing period; the match must end at a word boundary
    (``"Paris."``, ``"Paris"``, ``"Paris, a city"`` match ``" Paris."``; ``"Parisian"`` does not).
    An empty expected response never matches."""
    want = expected.strip()
    if want.endswith("."):
        want = want[:-1].rstrip()
    got = generated.strip()
    if not want or not got.startswith(want):
        return False
    return len(got) == len(want) or not got[len(want)].isalnum()


def _query_fields(query: Any) -> tuple[str, str]:
    data = getattr(query, "data", query)
    if "prompt" not in data or "response" not in data:
        source = getattr(query, "source", getattr(query, "id", "?"))
        raise InputError(f"{source}: fact query needs fields 'prompt' and 'response'")
    return data["prompt"], data["response"]


def fact_accuracy(model: torch.nn.Module, tokenizer: Any, queries: Sequence[Any], batch_size: int = 64,
                  chat: str = "auto") -> float:
    """Fraction of ``queries`` (rows or dicts with ``prompt``/``response``) whose greedy continuation of
    ``data.encode.prompt_token_ids(prompt)`` matches the expected response (``response_matches``).

    Decodes ``max(len(tokens(response))) + 4`` new tokens (stopping at eos), so a correct answer is followed
    by whatever the model says next and "Paris" cannot pass for "Parisian" by running out of tokens.
    """
    if not queries:
        return float("nan")
    pairs = [_query_fields(q) for q in queries]
    prompts = [prompt_token_ids(p, tokenizer, chat=chat) for p, _ in pairs]
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for _, r in pairs)
    outputs = generate_token_ids(model, tokenizer, prompts, max_new_tokens=longest + 4, batch_size=batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    return sum(response_matches(t, r) for t, (_, r) in zip(texts, pairs)) / len(pairs)


def train(data_spec: str, out_dir: str | Path, config: TrainConfig = PRESETS["tiny"],
          queries_spec: str | None = "auto", progress: bool = True) -> TrainResult:
    """Train on the rows of ``data_spec`` and save to ``out_dir`` (layout in the module docstring).

    ``queries_spec``: rows with ``prompt``/``response`` on which to measure ``fact_accuracy`` after training;
    ``"auto"`` uses ``builtin:bios:queries`` with the same parameters when ``data_spec`` is ``builtin:bios``,
    ``None`` skips it. Deterministic: same data, config and device → identical weights.
    """
    out = Path(out_dir)
    _check_out_dir(out)
    rows = load_rows(data_spec)
    if not rows:
        raise InputError(f"--data: '{data_spec}' has no rows")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    base_spec = None
    if config.base is None:
        tokenizer = train_tokenizer(_row_texts(rows), config.vocab_size)
        if any(row.kind == "messages" for row in rows):
            tokenizer.chat_template = OPEN_INSTRUCT_TEMPLATE
        model = build_model(config, tokenizer)
    else:
        loaded = load_model(config.base, device="cpu")
        tokenizer, model = loaded.tokenizer, loaded.model
        base_spec = _base_spec_for_record(config.base)
        if config.lora:
            model = attach_lora(model, config, base_spec)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)

    encoded, report = encode_rows(rows, tokenizer, max_length=config.max_length, chat=config.chat)
    queries = _resolve_queries(data_spec, queries_spec)
    accuracy = None
    staging = out.with_name(out.name + _TMP_SUFFIX)
    staging.mkdir(parents=True)  # now, so an unwritable --out fails before training, not after
    try:
        with torch_threads(config.threads):
            run = _run_training(model, encoded, pad_token_id(tokenizer), config, device, out, tokenizer, progress)
            if queries:
                accuracy = fact_accuracy(model, tokenizer, queries, chat=config.chat)
        fingerprint = _save_final(model, tokenizer, out, config, base_spec, {
            "data": data_spec, "config": config.to_json(), "base": base_spec,
            "rows": report.rows, "tokens_per_epoch": report.tokens, "truncated": report.truncated,
            "no_targets": report.no_targets, "epochs": run["epochs"], "steps": run["steps"],
            "seconds": run["seconds"], "tokens_per_second": run["tokens_per_second"],
            "queries": None if not queries else (queries_spec if queries_spec != "auto" else _auto_queries(data_spec)),
            "fact_accuracy": accuracy,
        })
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-saved: ``out`` is as it was
        raise
    return TrainResult(
        out_dir=out, config=config,
        epoch_losses=tuple(e["loss"] for e in run["epochs"]), epoch_lrs=tuple(e["avg_lr"] for e in run["epochs"]),
        steps=run["steps"], tokens=run["tokens"], seconds=run["seconds"],
        tokens_per_second=run["tokens_per_second"], fingerprint=fingerprint, fact_accuracy=accuracy,
        checkpoints=tuple(run["checkpoints"]),
    )


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW over trainable parameters; weight decay on ≥2-D weights only. Returns it and the names, in order."""
    decay, no_decay, names = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        names.append(name)
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                                  eps=config.eps)
    return optimizer, names


def train_epochs(model, encoded: Sequence[Encoded], pad_id: int, config: TrainConfig, device: torch.device, *,
                 on_step: Callable | None = None, on_epoch: Callable | None = None
                 ) -> tuple[torch.optim.AdamW, list[dict]]:
    """The AdamW loop, shared by `train` and ``evaluation.retrain.train_on_rows`` (so a retrain on every row with the base
    seed *is* `train`, bit for bit): a ``torch.Generator`` shuffle seeded with ``config.seed`` per epoch,
    per-step lr from ``lr_at``, the mean token loss of each batch, gradient clipping, the attention kernel of
    ``config.attn_implementation`` for the duration.

    ``on_step(epoch, batch, loss)`` runs after every optimizer step; ``on_epoch(record, lrs, optimizer)``
    after every epoch. Returns the optimizer and the epoch records ``{"epoch", "step", "loss", "avg_lr"}``
    (``loss``: mean token loss over the epoch); the model is left in eval mode. A non-finite batch loss
    stops training with an ``InputError`` naming the epoch and step.
    """
    with attention_kernel(model, config.attn_implementation):
        return _train_epochs(model, encoded, pad_id, config, device, on_step, on_epoch)


def _train_epochs(model, encoded: Sequence[Encoded], pad_id: int, config: TrainConfig, device: torch.device,
                  on_step: Callable | None, on_epoch: Callable | None) -> tuple[torch.optim.AdamW, list[dict]]:
    """`train_epochs` once its attention kernel is in place."""
    optimizer, _ = make_optimizer(model, config)
    total_steps = math.ceil(len(encoded) / config.batch_size) * config.epochs
    shuffle = torch.Generator().manual_seed(config.seed)
    trainable = _trainable(model)
    epochs, step = [], 0
    model.train()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(encoded), generator=shuffle).tolist()
        loss_sum, target_sum, lrs = 0.0, 0, []
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            batch = collate([encoded[i] for i in index], index, pad_id).to(device)
            lr = lr_at(step, total_steps, config.lr, config.warmup_ratio, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            per_token = token_losses(logits, batch)
            n_targets = int(batch.loss_mask[:, 1:].sum())
            loss = per_token.sum() / max(n_targets, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            step += 1
            lrs.append(lr)
            batch_loss = float(per_token.detach().sum())  # the one GPU sync of a step, read for the epoch mean
            _stop_unless_finite(batch_loss, epoch, step, lr)
            loss_sum += batch_loss
            target_sum += n_targets
            if on_step is not None:
                on_step(epoch, batch, loss)
        record = {"epoch": epoch, "step": step, "loss": loss_sum / max(target_sum, 1), "avg_lr": sum(lrs) / len(lrs)}
        epochs.append(record)
        if on_epoch is not None:
            on_epoch(record, lrs, optimizer)
    model.eval()
    return optimizer, epochs


@contextlib.contextmanager
def attention_kernel(model, name: str | None):
    """``model`` runs attention ``name`` (``config._attn_implementation``) within the block, then what it ran
    before; ``None`` changes nothing."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if name is None or name == before:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _stop_unless_finite(loss: float, epoch: int, step: int, lr: float) -> None:
    """Stop at the first non-finite loss: every later step would train on NaN and the saved model would be
    NaN throughout, with nothing to say so (weights broken by the very last step are caught before saving)."""
    if not math.isfinite(loss):
        raise InputError(f"training stopped: the loss became {loss} at epoch {epoch}, optimizer step {step} "
                         f"(lr {lr:.3g}); lower --lr, or check the data")


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or ±inf (none in a model fit to save)."""
    return [name for name, param in model.named_parameters() if not bool(torch.isfinite(param).all())]


def _check_weights(model: torch.nn.Module, when: str) -> None:
    bad = nonfinite_parameters(model)
    if bad:
        raise InputError(f"training stopped {when}: {len(bad)} weight tensor(s) hold NaN or inf "
                         f"({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''}); lower --lr")


def _run_training(model, encoded: list[Encoded], pad_id: int, config: TrainConfig, device: torch.device,
                  out: Path, tokenizer, progress: bool) -> dict:
    """`train_epochs` with a progress bar and checkpoints per ``save_every_epoch`` (always the last epoch)."""
    total_steps = math.ceil(len(encoded) / config.batch_size) * config.epochs
    schedule = {"kind": "cosine", "peak_lr": config.lr, "warmup_steps": math.ceil(config.warmup_ratio * total_steps),
                "total_steps": total_steps, "min_lr_ratio": config.min_lr_ratio}
    bar = progress_bar(total_steps, "train", unit="step", enabled=progress)
    checkpoints = []
    seen = {"tokens": 0}
    started = time.perf_counter()

    def on_step(epoch: int, batch, loss) -> None:
        seen["tokens"] += batch.n_tokens
        now = time.perf_counter()
        # The postfix only when the bar is due to redraw: reading the loss waits for the GPU, and a refresh per
        # step floods logs that are files, not terminals.
        if now - seen.get("shown", 0.0) >= redraw_interval():
            seen["shown"] = now
            rate = seen["tokens"] / max(now - started, 1e-9)
            bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.update(1)

    def on_epoch(record: dict, lrs: list, optimizer) -> None:
        if config.save_every_epoch or config.lora or record["epoch"] == config.epochs:
            _check_weights(model, f"after epoch {record['epoch']}")
            ckpt = out.with_name(out.name + _TMP_SUFFIX) / "checkpoints" / f"epoch-{record['epoch']}"
            _save_checkpoint(model, tokenizer, optimizer, ckpt, {**record, "lrs": lrs, "schedule": schedule})
            checkpoints.append(out / "checkpoints" / f"epoch-{record['epoch']}")

    try:
        _optimizer, epochs = train_epochs(model, encoded, pad_id, config, device, on_step=on_step, on_epoch=on_epoch)
    finally:
        bar.close()  # also when training stops, so the error starts a line of its own
    seconds = time.perf_counter() - started
    return {"epochs": epochs, "steps": epochs[-1]["step"] if epochs else 0, "tokens": seen["tokens"],
            "seconds": seconds, "tokens_per_second": seen["tokens"] / max(seconds, 1e-9), "checkpoints": checkpoints}


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _save_checkpoint(model, tokenizer, optimizer, ckpt: Path, state: dict) -> None:
    """Model (or adapter) weights + tokenizer + optimizer safetensors/JSON + trainer_state.json."""
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    save_optimizer_state(optimizer, model, ckpt)
    write_json_atomic(ckpt / TRAINER_STATE, state)


def _save_final(model, tokenizer, out: Path, config: TrainConfig, base_spec: str | None, record: dict) -> str:
    """Write the model dir next to ``out``, then swap it in; returns the saved model's fingerprint.

    LoRA with ``merge_lora``: ``out/adapter`` holds the unmerged adapter and ``out`` the merged model, so
    ``out`` is a normal HF directory (``AutoModelForCausalLM.from_pretrained(out)`` works) whatever the base
    spec was. Without: ``out`` is the adapter (``model.load.load_model(out)`` rebuilds base + adapter).
    """
    _check_weights(model, "before saving")
    staging = out.with_name(out.name + _TMP_SUFFIX)
    staging.mkdir(parents=True, exist_ok=True)
    if config.lora and config.merge_lora:
        model.save_pretrained(staging / "adapter")
        tokenizer.save_pretrained(staging / "adapter")
        record["adapter_fingerprint"] = model_fingerprint(model)
        model = model.merge_and_unload()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    fingerprint = model_fingerprint(model)
    record.update({"format": "dataworth-train", "version": 1, "fingerprint": fingerprint,
                   "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)})
    write_json_atomic(staging / TRAIN_JSON, record)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return fingerprint


_TMP_SUFFIX = f".tmp-{os.getpid()}"


def _check_out_dir(out: Path) -> None:
    """``out`` must be absent, empty, or an earlier ``dataworth train`` output (which is replaced)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / TRAIN_JSON).is_file())):
        raise InputError(f"--out: '{out}' exists and is not an earlier dataworth train output; choose another path")
    staging = out.with_name(out.name + _TMP_SUFFIX)
    if staging.exists():
        shutil.rmtree(staging)


def _row_texts(rows: Sequence[Any]) -> list[str]:
    """All the text of rows, for tokenizer training: text, prompt and response, or every message's content."""
    texts = []
    for row in rows:
        if row.kind == "text":
            texts.append(row.text)
        elif row.kind == "prompt_response":
            texts.extend((row.prompt, row.response))
        else:
            texts.extend(m["content"] for m in row.messages)
    return texts


def _auto_queries(data_spec: str) -> str | None:
    """``builtin:bios[:train][?params]`` → ``builtin:bios:queries[?params]``; anything else → None."""
    head, sep, params = data_spec.partition("?")
    if head not in ("builtin:bios", "builtin:bios:train"):
        return None
    return "builtin:bios:queries" + (sep + params)


def _resolve_queries(data_spec: str, queries_spec: str | None) -> list:
    spec = _auto_queries(data_spec) if queries_spec == "auto" else queries_spec
    return load_rows(spec) if spec else []
