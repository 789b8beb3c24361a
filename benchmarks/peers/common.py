"""What every attribution adapter of ``benchmarks/peers.py`` shares: one task, one loss, one output format.

Why a module of its own: a comparison is only fair when every method sees the *same* model, the *same*
token ids and loss masks, and the *same* per-example loss — summed over the example's target tokens
(``dataworth.data.batching.example_losses``), never averaged. Each adapter (``run_<method>.py``) runs in its own
process (so its peak RSS is its own) and only turns that shared task into its library's calls.

This file imports dataworth, torch and numpy only, so it works both in the project's ``.venv`` and in
``benchmarks/_peers_venv`` (where dataworth is installed editable beside the peer libraries).

Output of an adapter, in ``--out``::

    scores.npy    [Q, N] float32, rows = query order, columns = training order of the JSONL files.
                  Sign convention (dataworth's): a POSITIVE score means up-weighting that training example
                  LOWERS the query's loss. Each adapter says in a comment why its library needs (or not) a flip.
    timing.json   {"method", "fit_s" (extraction + fitting), "score_s", "peak_rss_mib", "notes", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dataworth.data.batching import Encoded, collate, example_losses


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """The common adapter flags (``--model --train --queries --out``) plus ``extra(parser)``'s."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help="HF model directory (the model being attributed)")
    ap.add_argument("--train", required=True, help="training rows, JSONL (text rows)")
    ap.add_argument("--queries", required=True, help="query rows, JSONL (prompt/response rows)")
    ap.add_argument("--out", required=True, help="output directory: scores.npy, timing.json")
    ap.add_argument("--max-length", type=int, default=256, help="token limit per row (as in training)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the same for every method)")
    ap.add_argument("--modules", default="all", help="dataworth.gradients.modules.select_modules spec of the watched layers")
    ap.add_argument("--measure", default="answer", choices=("answer", "answer+end"),
                    help="query loss measured: the response tokens, or also the appended end token "
                         "(dataworth.data.encode.MEASURES; must match the LDS task's)")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # sampled Fisher labels (Kronfluence), LoRA init (LogIX), projections: repeatable runs
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


@dataclass
class PeerTask:
    """The loaded task: model (eval mode, CPU, float32), tokenizer, rows and their encodings."""

    model: Any
    tokenizer: Any
    train_rows: list
    query_rows: list
    train: list[Encoded]
    queries: list[Encoded]
    pad_id: int
    module_names: list[str]

    @property
    def train_ids(self) -> list[str]:
        return [e.id for e in self.train]

    @property
    def query_ids(self) -> list[str]:
        return [e.id for e in self.queries]


def load_task(args: argparse.Namespace, model_dir: str | None = None) -> PeerTask:
    """Model (``model_dir`` or ``--model``), tokenizer and encoded rows exactly as dataworth's own stages
    build them."""
    from dataworth.data.encode import encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.gradients.modules import select_modules
    from dataworth.model.load import load_model
    from dataworth.data.encode import measured_queries

    loaded = load_model(model_dir or args.model, device="cpu")
    model = loaded.model.float().eval()
    train_rows, query_rows = load_rows(args.train), load_rows(args.queries)
    train, _ = encode_rows(train_rows, loaded.tokenizer, max_length=args.max_length)
    queries, _ = encode_rows(query_rows, loaded.tokenizer, max_length=args.max_length)
    queries = measured_queries(queries, loaded.tokenizer, args.measure)  # the retrains' measurement, exactly
    pad = loaded.tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else loaded.tokenizer.eos_token_id)
    names = [n for n, _ in select_modules(model, args.modules)]
    return PeerTask(model, loaded.tokenizer, train_rows, query_rows, train, queries, pad_id, names)


def as_linear_layers(model: Any) -> int:
    """Replace every Hugging Face ``Conv1D`` (GPT-2's ``y = x W + b``, ``W`` stored in × out) by the equivalent
    ``nn.Linear`` (weight ``Wᵀ``), in place, keeping module names; returns how many were replaced.

    Kronfluence, LogIX and TRAK's per-layer machinery handles ``nn.Linear`` only; the function computed is the
    same to round-off and each weight's gradient is the transpose of the ``Conv1D`` one, so the peers attribute
    the same model. (dataworth watches ``Conv1D`` as it is.)
    """
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        d_in, d_out = module.weight.shape
        linear = torch.nn.Linear(d_in, d_out, bias=module.bias is not None, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    return replaced


def batch_dict(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of ``rows`` (``dataworth.data.batching.collate``) as a plain dict, which every peer's
    data loader moves between devices without knowing our types."""
    b = collate(list(rows), list(range(len(rows))), pad_id)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "loss_mask": b.loss_mask}


def ordered_batches(rows: Sequence[Encoded], pad_id: int, batch_size: int) -> Iterator[tuple[list[int], dict]]:
    """``(positions, batch)`` in dataset order (no length sorting, so positions are contiguous)."""
    for start in range(0, len(rows), batch_size):
        pos = list(range(start, min(start + batch_size, len(rows))))
        yield pos, batch_dict([rows[i] for i in pos], pad_id)


class _LossBatch:
    """The attribute view ``dataworth.data.batching.token_losses`` reads (input_ids, loss_mask)."""

    def __init__(self, batch: dict):
        self.input_ids = batch["input_ids"]
        self.loss_mask = batch["loss_mask"]


def summed_losses(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """``[B]``: each example's loss summed over its target tokens — the one loss every method uses."""
    return example_losses(logits, _LossBatch(batch))


def peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB (``ru_maxrss`` is KiB on Linux).

    Children are reported apart (`children_peak_rss_mib`), not added: the only children these adapters start
    are short-lived helpers forked by imported libraries (e.g. ``/sbin/ldconfig -p`` from ``ctypes.util``),
    and a forked child's ``ru_maxrss`` counts the parent's pages it inherited, so adding it would count the
    parent twice. No adapter uses worker processes (data loaders run with ``num_workers=0``).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def children_peak_rss_mib() -> float:
    """Largest peak RSS of any waited-for child process, MiB (see `peak_rss_mib`)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


class Stopwatch:
    """Named wall-clock phases: ``with clock("fit"): ...`` adds the seconds to ``clock.seconds["fit"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name: str | None = None

    def __call__(self, name: str) -> "Stopwatch":
        self._name = name
        return self

    def __enter__(self) -> "Stopwatch":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._t0


def kept_checkpoints(model: str, mode: str) -> list[Path]:
    """The models an adapter attributes with: ``[model]`` for ``--checkpoints final``, else every
    ``model/checkpoints/epoch-N`` in epoch order (SystemExit when there is none)."""
    if mode != "ensemble":
        return [Path(model)]
    found = sorted((Path(model) / "checkpoints").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise SystemExit(f"{model}: no checkpoints/epoch-N to ensemble")
    return found


def combine_checkpoints(args: argparse.Namespace, matrices: list[np.ndarray]) -> tuple[np.ndarray, str]:
    """The checkpoints' ``[Q, N]`` matrices combined as ``dataworth combine`` combines them (``--ensemble-weights``,
    ``--standardise``), and the words for the notes (empty for one matrix)."""
    if len(matrices) == 1:
        return matrices[0], ""
    from dataworth.influence.ensemble import ensemble_scores, parse_weights

    weights = parse_weights(args.ensemble_weights, len(matrices))
    note = (f", ensemble of {len(matrices)} checkpoints, weights {', '.join(f'{w:.3g}' for w in weights)}"
            + (", each standardised per query" if args.standardise else ""))
    return ensemble_scores(matrices, weights, args.standardise), note


def write_result(out: str | os.PathLike, method: str, scores: np.ndarray, clock: Stopwatch, task: PeerTask,
                 notes: str = "", **extra: Any) -> None:
    """Write ``scores.npy`` ([Q, N] float32) and ``timing.json`` atomically (tmp + ``os.replace``)."""
    scores = np.asarray(scores, dtype=np.float32)
    expected = (len(task.queries), len(task.train))
    if scores.shape != expected:
        raise ValueError(f"{method}: scores have shape {scores.shape}, expected [Q, N] = {expected}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{method}: {int((~np.isfinite(scores)).sum())} non-finite scores")
    out = Path(out)
    tmp = out / f"scores.npy.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        np.save(fh, scores)
    os.replace(tmp, out / "scores.npy")
    timing = {"method": method, "fit_s": clock.seconds.get("fit", 0.0), "score_s": clock.seconds.get("score", 0.0),
              "load_s": clock.seconds.get("load", 0.0), "peak_rss_mib": peak_rss_mib(),
              "children_peak_rss_mib": children_peak_rss_mib(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": len(task.train), "queries": len(task.queries),
              "modules": len(task.module_names), "notes": notes, **extra}
    tmp = out / f"timing.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(timing, indent=1) + "\n")
    os.replace(tmp, out / "timing.json")
