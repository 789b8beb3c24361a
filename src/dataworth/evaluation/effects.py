"""One more training step on one row: the influence ground truth of fact tracing's tail-patch metric.

Chang et al. 2024 ("Scalable Influence and Fact Tracing for LLM Pretraining", §4): recall / MRR ask whether a
method *finds* the documents that state a fact; tail-patch asks whether one more training step on a
retrieved document actually raises log p(answer). `one_step_effects` computes that effect exactly for every
(query, row) pair asked: one backward pass per row some pair needs, and one batched forward over the queries
that row is measured on, θ restored after every row. Tail-patch@10 needs only each method's top 10 per query
(and the gold rows), so at 135M parameters `evaluation.facts` asks for those pairs, not the ``[Q, N]`` matrix.

The step size is the one thing a saved state cannot be trusted for: a schedule that decays to zero (the
``lora`` preset) leaves ``lr = 0`` in the final ``optimizer.json``, and every effect would be exactly 0.
`step_size` takes the final epoch's mean learning rate η̄ instead (LESS weights its checkpoints by it),
says where it came from, and refuses a zero or non-finite step.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dataworth.data.batching import collate, example_losses, plan_batches
from dataworth.data.encode import encode_rows, measured_queries
from dataworth.errors import InputError
from dataworth.model.losses import batch_losses
from dataworth.model.optimizer import (
    OPTIMIZER_JSON,
    OPTIMIZER_TENSORS,
    TRAINER_STATE,
    final_optimizer_dir,
    load_optimizer_state,
    saved_parameters,
)
from dataworth.util import pad_token_id, progress_bar, say

PLAN_ROWS = 3  # rows timed before the plan line (and its estimate) is printed


@dataclass(frozen=True)
class StepSize:
    """The learning rate η of the one-step effects and where it came from (printed and recorded with them)."""

    lr: float
    source: str


def step_size(optimizer_dir: str | os.PathLike | None = None, lr: float | StepSize | None = None) -> StepSize:
    """η of the one more step: ``lr`` when given (a `StepSize` passes through with its source), else from the final
    checkpoint of ``optimizer_dir``, the first positive of

    1. ``trainer_state.json`` ``avg_lr``: η̄, the mean learning rate of the checkpoint's epoch (LESS's
       checkpoint weight, ``model.optimizer.checkpoint_lr``) — the step size the model was taking around the
       end of training, even when the schedule's last step was 0;
    2. ``trainer_state.json`` ``schedule.peak_lr``: the schedule's peak;
    3. ``optimizer.json`` ``lr``: the learning rate of the last step (what the state files of other trainers hold).

    A given ``lr`` that is 0, negative or not finite, or no positive value at all, is an ``InputError``: a zero
    step makes every effect exactly 0 and tail-patch meaningless.
    """
    if isinstance(lr, StepSize):
        lr, source = lr.lr, lr.source
    else:
        source = "given"
    if lr is not None:
        value = float(lr)
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"tail-patch lr: must be a finite number > 0 (a zero step changes nothing), got {lr}")
        return StepSize(value, source)
    if optimizer_dir is None:
        raise InputError("one-step effects: give the final optimizer state (optimizer_dir) or an explicit lr")
    source = state_dir(optimizer_dir)
    state: dict = {}
    if (source / TRAINER_STATE).is_file():
        state = json.loads((source / TRAINER_STATE).read_text())
    meta = json.loads((source / OPTIMIZER_JSON).read_text())
    candidates = [
        (state.get("avg_lr"), f"η̄ = the mean lr of epoch {state.get('epoch', '?')}: {source.name}/{TRAINER_STATE} avg_lr"),
        ((state.get("schedule") or {}).get("peak_lr"), f"the schedule's peak lr: {source.name}/{TRAINER_STATE} schedule.peak_lr"),
        (meta.get("lr"), f"the last step's lr: {source.name}/{OPTIMIZER_JSON} lr"),
    ]
    for value, where in candidates:
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            return StepSize(float(value), where)
    raise InputError(f"{source}: no positive learning rate for the one-step effects ({TRAINER_STATE} avg_lr, "
                     f"schedule peak_lr and {OPTIMIZER_JSON} lr are 0 or missing); give one (--tail-patch-lr)")


def state_dir(optimizer_dir: str | os.PathLike) -> Path:
    """The checkpoint holding the final AdamW state under ``optimizer_dir`` (`final_optimizer_dir`), or ``InputError``."""
    source = final_optimizer_dir(optimizer_dir)
    if source is None:
        raise InputError(f"{optimizer_dir}: no optimizer state ({OPTIMIZER_TENSORS} here or under checkpoints/epoch-N/)")
    return source


def stepped_parameters(model: torch.nn.Module, optimizer_dir: str | os.PathLike | None = None,
                       names: Sequence[str] | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` the one more step touches, in model order: those ``names``; else, with an optimizer
    state, the parameters it holds (what training stepped: for a LoRA run, the adapter weights only, whatever
    ``requires_grad`` says — an adapter loaded for inference has none); else every one with ``requires_grad``.
    A state naming a parameter the model lacks (a merged LoRA model given the adapter's state) is refused."""
    available = dict(model.named_parameters())
    if names is None and optimizer_dir is not None:
        source = state_dir(optimizer_dir)
        names = saved_parameters(source)
        missing = [n for n in names if n not in available]
        if missing:
            raise InputError(f"{source}: its optimizer state steps {missing[0]}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, which the model "
                             "lacks; measure the effects on the model that was trained (a merged LoRA model: its "
                             "unmerged adapter)")
    if names is None:
        chosen = [(n, p) for n, p in available.items() if p.requires_grad]
    else:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise InputError(f"params: {unknown[:3]} are not parameters of the model")
        wanted = set(names)
        chosen = [(n, p) for n, p in available.items() if n in wanted]
    if not chosen:
        raise InputError("params: no trainable parameter to update")
    return chosen


def row_gradients(model: torch.nn.Module, rows: Sequence[Any], pad_id: int,
                  params: Sequence[torch.nn.Parameter]):
    """For each encoded row, ``∇_params L_n(θ)`` of its summed target loss (``data.batching.example_losses``), as a
    list of tensors shaped like ``params`` (zeros for a parameter the loss does not reach). One backward pass
    per row, on a batch of that row alone (no padding, so nothing else can leak in); ``params`` must require
    grad (`one_step_effects` switches it on for the parameters it steps)."""
    device = params[0].device
    for i, row in enumerate(rows):
        batch = collate([row], [i], pad_id).to(device)
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = example_losses(logits, batch).sum()
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        yield [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def one_step_effects(model: torch.nn.Module, tokenizer: Any, train_encoded: Sequence[Any],
                     query_encoded: Sequence[Any], *, optimizer_dir: str | os.PathLike | None = None,
                     lr: float | StepSize | None = None, batch_size: int = 64, params: Sequence[str] | None = None,
                     pairs: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """``[Q, N]`` float64: how much one more training step on row ``n`` alone lowers query ``q``'s loss.

    ``effect[q, n] = L_q(θ) − L_q(θ − η·u_n)`` — positive: one more step on ``n`` raises the log-probability of
    ``q``'s targets by that many nats. ``L_q`` is the loss summed over the targets of ``q``'s loss mask
    (``data.batching.example_losses``; pass the queries through ``measured_queries(…, "answer")`` to measure the
    answer only). The step touches the parameters `stepped_parameters` picks (``params``: ``named_parameters()``
    names; default: those the optimizer state holds, else every one with ``requires_grad``); the effect is
    measured with the same ``model`` it steps. Per parameter the step is:

    - with ``optimizer_dir`` (a ``dataworth.model.train`` checkpoint, or a trained model directory: its final state,
      `final_optimizer_dir`) — AdamW's step on a batch holding row ``n`` alone, from the saved state, without
      the past momentum and the decoupled weight decay (both are the same for every row: they would shift all
      effects of a query by one constant). With ``g = ∇L_n(θ) / T_n`` (the row's loss as ``dataworth.model.train``
      computes it: the mean over its ``T_n`` targets), ``t`` the saved step count, ``v`` the saved
      ``exp_avg_sq``::

          v' = β₂·v + (1 − β₂)·g²        u_n = (1 − β₁)/(1 − β₁^{t+1}) · g / (√(v' / (1 − β₂^{t+1})) + ε)

      and ``η`` = `step_size` (``lr`` when given, else the final epoch's mean learning rate η̄). ``v'``
      includes the row's own ``g²``, as in Adam: dividing by the stale ``√v̂`` alone (TrackStar's
      normalisation, fine for a cosine) lets a row take enormous steps on weights the last batches did not
      touch (the embeddings of its rare tokens): with it, on the demo model, one step on any row lowered the
      answers' log-probability by ~60 nats on average, and a query's own gold documents looked no better than
      the others (measured).
    - otherwise plain SGD on the summed loss, ``u_n = ∇L_n(θ)``, with the given ``lr`` (to first order the
      effect is ``η ∇L_qᵀ∇L_n``, the gradient dot product); neither ``optimizer_dir`` nor ``lr``: ``InputError``.

    ``pairs``: ``[Q, N]`` bool, the entries wanted (the rest come back NaN): a row no pair needs is never
    stepped, and after stepping row ``n`` only the queries ``pairs[:, n]`` are run, in one batched forward
    (length-sorted, ``batch_size`` rows a batch). ``None``: every entry. The entries equal the full matrix's up
    to float round-off (another batch composition pads differently).

    Cost: one backward pass per stepped row + 1 + (stepped rows) batched forwards over their queries; with
    ``progress``, a plan line (rows, pairs, the seconds a row took over the first `PLAN_ROWS`, the estimated
    total) on stderr, then a bar. θ is restored bit for bit after every row (the touched tensors are copied
    back), also when an exception escapes; so is each stepped parameter's ``requires_grad``. Runs in the model's
    own dtype and device with ``model.eval()`` (no dropout); the previous train/eval mode is restored afterwards.
    """
    named = stepped_parameters(model, optimizer_dir, params)
    eta = step_size(optimizer_dir, lr)
    step_of = _update_rule(named, optimizer_dir)
    n_queries, n_rows = len(query_encoded), len(train_encoded)
    need = pair_mask(pairs, n_queries, n_rows)
    out = np.zeros((n_queries, n_rows), dtype=np.float64) if pairs is None else np.full((n_queries, n_rows), np.nan)
    stepped = np.flatnonzero(need.any(axis=0))
    if not len(stepped):
        return out
    weights = [p for _, p in named]
    pad_id = pad_token_id(tokenizer)
    device = weights[0].device
    batches_of = _query_batcher(query_encoded, pad_id, batch_size, device)
    asked = np.flatnonzero(need.any(axis=1))
    originals = [w.detach().clone() for w in weights]
    grad_flags = [w.requires_grad for w in weights]
    was_training = model.training
    model.eval()
    bar = None
    try:
        for w in weights:
            w.requires_grad_(True)
        base = np.full(n_queries, np.nan)
        base[asked] = batch_losses(model, batches_of(asked))
        started = time.perf_counter()
        rows = (train_encoded[n] for n in stepped)
        for i, (n, grads) in enumerate(zip(stepped, row_gradients(model, rows, pad_id, weights))):
            with torch.no_grad():
                for j, (w, g) in enumerate(zip(weights, grads)):
                    w.sub_(step_of(j, g, train_encoded[n]), alpha=eta.lr)
            measured = np.flatnonzero(need[:, n])
            out[measured, n] = base[measured] - batch_losses(model, batches_of(measured))
            _restore(weights, originals)
            if bar is not None:
                bar.update(1)
            elif progress and i + 1 == min(PLAN_ROWS, len(stepped)):
                per_row = (time.perf_counter() - started) / (i + 1)
                rule = "AdamW" if optimizer_dir is not None else "SGD"
                say(f"[effects] one {rule} step (η = {eta.lr:.3g}, {eta.source}) on each of {len(stepped)} of "
                    f"{n_rows} rows, measured on {int(need.sum())} (query, row) pairs of {len(asked)} queries: "
                    f"{per_row:.2f} s a row over the first {i + 1}, ≈ {per_row * len(stepped):.0f} s in all")
                bar = progress_bar(len(stepped), "one-step effects", enabled=True)
                bar.update(i + 1)
    finally:
        _restore(weights, originals)
        for w, flag in zip(weights, grad_flags):
            w.requires_grad_(flag)
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out


def pair_mask(pairs: np.ndarray | None, n_queries: int, n_rows: int) -> np.ndarray:
    """``pairs`` checked as a ``[Q, N]`` bool mask (``None``: all True)."""
    if pairs is None:
        return np.ones((n_queries, n_rows), dtype=bool)
    mask = np.asarray(pairs)
    if mask.dtype != bool or mask.shape != (n_queries, n_rows):
        raise ValueError(f"pairs must be a [Q, N] = [{n_queries}, {n_rows}] bool mask, got {mask.dtype} {mask.shape}")
    return mask


def _query_batcher(query_encoded: Sequence[Any], pad_id: int, batch_size: int, device) -> Callable:
    """``batches_of(positions)``: length-sorted padded batches of those queries (``Batch.index`` = place in
    ``positions``), cached per set of positions (most rows are measured on the same few sets)."""
    cache: dict[bytes, list] = {}

    def batches_of(positions: np.ndarray) -> list:
        key = np.asarray(positions, dtype=np.int64).tobytes()
        if key not in cache:
            if len(cache) > 256:
                cache.clear()
            chosen = [query_encoded[q] for q in positions]
            plan = plan_batches([len(r.input_ids) for r in chosen], batch_size=batch_size, sort_by_length=True)
            cache[key] = [collate([chosen[i] for i in index], index, pad_id).to(device) for index in plan]
        return cache[key]

    return batches_of


def _update_rule(named: list, optimizer_dir: str | os.PathLike | None) -> Callable:
    """``step_of(i, grad, row) -> u``: the update direction of parameter ``i`` for a row's summed-loss gradient."""
    if optimizer_dir is None:
        return lambda _i, grad, _row: grad

    source = state_dir(optimizer_dir)
    states, meta = load_optimizer_state(source)
    beta1, beta2 = (float(b) for b in meta["betas"])
    eps = float(meta["eps"])
    second, first_scale, second_scale = [], [], []
    for name, p in named:
        if name not in states or name not in meta.get("step", {}):
            raise InputError(f"{source}: optimizer state has no entry for {name} (a checkpoint of another model?)")
        v = states[name]["exp_avg_sq"]
        if v.shape != p.shape:
            raise InputError(f"{source}: {name} has optimizer state {tuple(v.shape)}, the model {tuple(p.shape)}")
        t = int(meta["step"][name]) + 1
        second.append(v.to(device=p.device, dtype=p.dtype))
        first_scale.append((1 - beta1) / (1 - beta1 ** t))
        second_scale.append(1 - beta2 ** t)

    def step_of(i: int, grad: torch.Tensor, row: Any) -> torch.Tensor:
        g = grad / max(row.n_targets, 1)
        v_new = second[i] * beta2 + (1 - beta2) * g * g
        return first_scale[i] * g / ((v_new / second_scale[i]).sqrt() + eps)

    return step_of


@torch.no_grad()
def _restore(weights: Sequence[torch.Tensor], originals: Sequence[torch.Tensor]) -> None:
    for w, w0 in zip(weights, originals):
        w.copy_(w0)


def effects_flops(model: torch.nn.Module, train_encoded: Sequence[Any], query_encoded: Sequence[Any],
                  pairs: np.ndarray | None = None) -> float:
    """Estimated floating-point operations of `one_step_effects` for ``pairs`` (``None``: the full matrix):
    ``P · (6 · Σ_{n stepped} T_n + 2 · (Σ_{q asked} T_q + Σ_{(q, n) ∈ pairs} T_q))`` with ``P`` the model's
    parameter count and ``T`` token counts — forward 2·P a token, forward + backward 6·P (an upper bound for
    LoRA, whose frozen weights get no gradient); padding and the update itself are left out. Deterministic, so
    the choice it drives (`evaluation.facts`: the full matrix or the needed pairs) does not depend on the machine.
    """
    need = pair_mask(pairs, len(query_encoded), len(train_encoded))
    n_params = sum(p.numel() for p in model.parameters())
    q_tokens = np.array([len(q.input_ids) for q in query_encoded], dtype=np.float64)
    r_tokens = np.array([len(r.input_ids) for r in train_encoded], dtype=np.float64)
    stepped, asked = need.any(axis=0), need.any(axis=1)
    forward = q_tokens[asked].sum() + float(q_tokens @ need.sum(axis=1))
    return float(n_params * (6 * r_tokens[stepped].sum() + 2 * forward))


def effects_inputs(store, tokenizer, queries, train_rows) -> tuple[list, list]:
    """``(train_encoded, query_encoded)`` for `one_step_effects`: the rows encoded as the store was extracted (its
    ``max_length`` and ``chat``, checked to be the store's rows in order), the queries measuring the answer
    without the appended end token, as ``gradients.queries.query_gradients`` attributes it."""
    cfg = store.manifest["config"]
    encoded, _ = encode_rows(train_rows, tokenizer, max_length=cfg.get("max_length"), chat=cfg.get("chat", "auto"))
    if [e.id for e in encoded] != list(store.ids):
        raise InputError(f"{store.path}: the training rows given are not the store's rows in order")
    encoded_queries, _ = encode_rows(queries, tokenizer, max_length=cfg.get("max_length"))
    return encoded, measured_queries(encoded_queries, tokenizer, "answer")


def answer_effects(store, model, tokenizer, queries, train_rows, optimizer_dir, *, lr: float | StepSize | None = None,
                   pairs: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """``[Q, N]`` effect of one more training step on each store row on each query's answer loss (nats;
    `one_step_effects` from the final AdamW state of ``optimizer_dir``, η = `step_size` ``(optimizer_dir, lr)``,
    only the ``pairs`` entries when given, NaN elsewhere), on the inputs `effects_inputs` encodes. ``model`` is
    the one stepped and measured: for a merged LoRA model, pass its unmerged adapter (the state is the adapter's).
    """
    encoded, measured = effects_inputs(store, tokenizer, queries, train_rows)
    return one_step_effects(model, tokenizer, encoded, measured, optimizer_dir=optimizer_dir, lr=lr, pairs=pairs,
                            progress=progress)
