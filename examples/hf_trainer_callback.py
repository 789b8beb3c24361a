"""Capture per-example gradients while a Hugging Face `Trainer` trains, into a dataworth store.

    .venv/bin/python examples/hf_trainer_callback.py [--people 12] [--epochs 30] [--capture-epochs 1] [--json F]

Why a `Trainer` subclass and not only a `TrainerCallback`: callback events (``on_step_begin``,
``on_substep_end``, ...) receive the training state but neither the batch (so no example ids) nor the
loss tensor, and they run before or after — never around — the forward/backward. Capturing needs the
forward and the backward of a batch *inside* ``logger.capture(ids)``. So:

- `GradientCaptureCallback` (a `TrainerCallback`) owns the `dw.watch` logger, decides which epochs are
  captured and finalizes the store at ``on_train_end`` — the lifecycle part, where a callback belongs;
- `CapturingTrainer` overrides `Trainer.training_step` (the documented extension point for "custom
  behaviour in a training step") to wrap the unchanged parent step in ``logger.capture(ids)``, and
  `compute_loss` to compute per-example losses (summed over tokens), ``record`` them, and return the
  loss the Trainer would have used (token mean over the batch, or over ``num_items_in_batch`` under gradient
  accumulation). Whatever scaling the Trainer applies afterwards (accumulation, AMP) is measured by the
  logger and divided out.

Rows of an id captured in several epochs are replaced by the latest (``overwrite=True``). Examples need an
``example_id`` column (an integer tensor); the model never sees it. `benchmarks/trainer_callback_overhead.py`
times training with and without the capture.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from custom_loop_lm import build_model, corpus  # noqa: E402 - the same tiny model and corpus


class GradientCaptureCallback(TrainerCallback):
    """Owns a `dw.watch` logger: captures during the last ``capture_epochs`` epochs, finalizes at train end."""

    def __init__(self, logger, capture_epochs: int = 1):
        self.logger = logger
        self.capture_epochs = capture_epochs
        self.capturing = False
        self.store = None
        self.finalize_seconds = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(round(state.epoch or 0))
        self.capturing = epoch >= int(args.num_train_epochs) - self.capture_epochs

    def on_train_end(self, args, state, control, **kwargs):
        started = time.perf_counter()
        self.store = self.logger.finalize()
        self.finalize_seconds = time.perf_counter() - started


class CapturingTrainer(Trainer):
    """A `Trainer` whose training steps run inside ``logger.capture(ids)`` while the callback says so."""

    def __init__(self, *args, capture: GradientCaptureCallback, **kwargs):
        super().__init__(*args, callbacks=[capture, *kwargs.pop("callbacks", [])], **kwargs)
        self.capture = capture
        self._open = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = [str(int(i)) for i in inputs["example_id"]]
        if not self.capture.capturing:
            return super().training_step(model, inputs, num_items_in_batch)
        with self.capture.logger.capture(ids, attention_mask=inputs["attention_mask"], overwrite=True) as cap:
            self._open = cap
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._open = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("example_id")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        losses = per_example_lm_losses(outputs.logits, labels)
        if self._open is not None:
            losses = self._open.record(losses)
        targets = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
        loss = losses.sum() / targets
        return (loss, outputs) if return_outputs else loss


def per_example_lm_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: each example's next-token cross-entropy summed over its labelled tokens (-100 = ignored)."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100,
                         reduction="none")
    return ce.view(targets.shape).sum(dim=1)


class EncodedDataset(torch.utils.data.Dataset):
    """`Encoded` rows as Trainer examples: input_ids, labels (-100 where the loss mask is 0), example_id."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        return {"input_ids": r.input_ids, "labels": [t if m else -100 for t, m in zip(r.input_ids, r.loss_mask)],
                "example_id": i}


def collate_examples(items):
    """Right-pad to the longest example; padding has attention 0 and label -100."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n] = torch.tensor(it["input_ids"])
        labels[b, :n] = torch.tensor(it["labels"])
        attention[b, :n] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels,
            "example_id": torch.tensor([it["example_id"] for it in items])}


def training_arguments(out: Path, epochs: int, batch: int, accumulate: int, seed: int,
                       learning_rate: float = 3e-3) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate, learning_rate=learning_rate, weight_decay=0.0, lr_scheduler_type="constant",
        warmup_steps=0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=seed,
        data_seed=seed, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )


def train(docs, *, epochs: int, batch: int = 4, accumulate: int = 2, seed: int = 0, capture_epochs: int = 0,
          rank: int = 16, learning_rate: float = 3e-3, store_dir: Path | None = None, work_dir: Path | None = None,
          timings: dict | None = None):
    """Train the tiny model with a plain `Trainer` (``capture_epochs=0``) or a `CapturingTrainer`.

    Returns ``(model, store or None)``; ``timings`` (a dict) receives ``finalize_s``, the store-writing time.
    """
    import dataworth as dw

    model = build_model(seed)
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="hf-trainer-"))
    args = training_arguments(work_dir / "trainer", epochs, batch, accumulate, seed, learning_rate)
    common = dict(model=model, args=args, train_dataset=EncodedDataset(docs), data_collator=collate_examples)
    if not capture_epochs:
        Trainer(**common).train()
        return model, None
    logger = dw.watch(model, modules="mlp", projection="random", rank=rank, seed=seed,
                      out=store_dir or work_dir / "store", dtype="float32", replace=True)
    callback = GradientCaptureCallback(logger, capture_epochs=capture_epochs)
    CapturingTrainer(capture=callback, **common).train()
    if timings is not None:
        timings["finalize_s"] = callback.finalize_seconds
    return model, callback.store


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=12)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--capture-epochs", type=int, default=1, help="capture during the last N epochs")
    p.add_argument("--accumulate", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="store directory (default: a temporary one)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import dataworth as dw
    from dataworth.data.batching import collate

    args = parse(argv)
    docs, queries, gold = corpus(args.people)
    model, store = train(docs, epochs=args.epochs, accumulate=args.accumulate, seed=args.seed,
                         capture_epochs=args.capture_epochs, rank=args.rank, learning_rate=args.lr,
                         store_dir=Path(args.out) if args.out else None)
    dw.fit(store.path, "ekfac")
    model.eval()
    scores = dw.score_with_task(store, model, dw.LanguageModelTask(modules="mlp"),
                                [collate(queries, range(len(queries)), pad_id=0)], curvature="ekfac", top_k=3)
    table = scores.top_k(direction="positive")
    names = {str(i): d.id for i, d in enumerate(docs)}  # store ids are the dataset positions
    hits = 0
    for q in queries:
        top = [names[t] for t in table[table["query_id"] == q.id].sort_values("rank")["train_id"]]
        hits += top[0] == gold[q.id]
        print(f"{q.id}: top-3 {', '.join(top)}  (gold {gold[q.id]})")
    figures = {"recall@1": hits / len(queries), "queries": len(queries), "rows": len(store), "store": str(store.path)}
    print(f"recall@1 {figures['recall@1']:.3f} over {len(queries)} queries ({len(store)} rows captured by the Trainer)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
