"""One more training step on one row: the influence ground truth of fact tracing's tail-patch metric.

Chang et al. 2024 ("Scalable Influence and Fact Tracing for LLM Pretraining", §4): recall / MRR ask whether a
method *finds* the documents that state a fact; tail-patch asks whether one more training step on a
retrieved document actually raises log p(answer). `one_step_effects` computes that effect exactly for every
(query, row) pair: ``N`` backward passes and ``N + 1`` batched query forwards, θ restored after every row.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dataworth.data.batching import collate, example_losses, plan_batches
from dataworth.data.encode import encode_rows, measured_queries
from dataworth.errors import InputError
from dataworth.model.losses import batch_losses
from dataworth.model.optimizer import (
    OPTIMIZER_TENSORS,
    final_optimizer_dir,
    load_optimizer_state,
)
from dataworth.util import pad_token_id, progress_bar


def row_gradients(model: torch.nn.Module, rows: Sequence[Any], pad_id: int,
                  params: Sequence[torch.nn.Parameter]):
    """For each encoded row, ``∇_params L_n(θ)`` of its summed target loss (``data.batching.example_losses``), as a
    list of tensors shaped like ``params`` (zeros for a parameter the loss does not reach). One backward pass
    per row, on a batch of that row alone (no padding, so nothing else can leak in)."""
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
                     lr: float | None = None, batch_size: int = 64, params: Sequence[str] | None = None,
                     progress: bool = False) -> np.ndarray:
    """``[Q, N]`` float64: how much one more training step on row ``n`` alone lowers query ``q``'s loss.

    ``effect[q, n] = L_q(θ) − L_q(θ − η·u_n)`` — positive: one more step on ``n`` raises the log-probability of
    ``q``'s targets by that many nats. ``L_q`` is the loss summed over the targets of ``q``'s loss mask
    (``data.batching.example_losses``; pass the queries through ``measured_queries(…, "answer")`` to measure the
    answer only). The step touches ``params`` (``model.named_parameters()`` names; default: every parameter
    with ``requires_grad``) and is, per parameter:

    - with ``optimizer_dir`` (a ``dataworth.model.train`` checkpoint, or a trained model directory: its final state,
      `final_optimizer_dir`) — AdamW's step on a batch holding row ``n`` alone, from the saved state, without
      the past momentum and the decoupled weight decay (both are the same for every row: they would shift all
      effects of a query by one constant). With ``g = ∇L_n(θ) / T_n`` (the row's loss as ``dataworth.model.train``
      computes it: the mean over its ``T_n`` targets), ``t`` the saved step count, ``v`` the saved
      ``exp_avg_sq``::

          v' = β₂·v + (1 − β₂)·g²        u_n = (1 − β₁)/(1 − β₁^{t+1}) · g / (√(v' / (1 − β₂^{t+1})) + ε)

      and ``η`` the learning rate of the checkpoint's last step (``optimizer.json`` ``lr``: ``train`` sets it
      from ``lr_at(step, …)`` before each step), unless ``lr`` is given. ``v'`` includes the row's own ``g²``,
      as in Adam: dividing by the stale ``√v̂`` alone (TrackStar's normalisation, fine for a cosine) lets a row
      take enormous steps on weights the last batches did not touch (the embeddings of its rare tokens):
      with it, on the demo model, one step on any row lowered the answers' log-probability by ~60 nats on
      average, and a query's own gold documents looked no better than the others (measured).
    - otherwise plain SGD on the summed loss, ``u_n = ∇L_n(θ)``, with the given ``lr`` (to first order the
      effect is ``η ∇L_qᵀ∇L_n``, the gradient dot product); neither ``optimizer_dir`` nor ``lr``: ``InputError``.

    Cost: N backward passes (one row each) + 1 + N batched forward passes over the queries (``batch_size``
    rows each), never Q×N. θ is restored bit for bit after every row (the touched tensors are copied back),
    also when an exception escapes. Runs in the model's own dtype and device with ``model.eval()`` (no
    dropout); the previous train/eval mode is restored afterwards.
    """
    named = _chosen_parameters(model, params)
    step_of = _update_rule(named, optimizer_dir, lr)
    if not train_encoded or not query_encoded:
        return np.zeros((len(query_encoded), len(train_encoded)), dtype=np.float64)
    weights = [p for _, p in named]
    pad_id = pad_token_id(tokenizer)
    device = weights[0].device
    # length-sorted batches waste less on padding; every query's loss goes back to its own position
    plan = plan_batches([len(r.input_ids) for r in query_encoded], batch_size=batch_size, sort_by_length=True)
    q_batches = [collate([query_encoded[i] for i in index], index, pad_id).to(device) for index in plan]
    out = np.zeros((len(query_encoded), len(train_encoded)), dtype=np.float64)
    originals = [w.detach().clone() for w in weights]
    was_training = model.training
    model.eval()
    bar = progress_bar(len(train_encoded), "one-step effects", enabled=progress)
    try:
        base = batch_losses(model, q_batches)
        for n, grads in enumerate(row_gradients(model, train_encoded, pad_id, weights)):
            with torch.no_grad():
                for i, (w, g) in enumerate(zip(weights, grads)):
                    step, eta = step_of(i, g, train_encoded[n])
                    w.sub_(step, alpha=eta)
            out[:, n] = base - batch_losses(model, q_batches)
            _restore(weights, originals)
            bar.update(1)
    finally:
        _restore(weights, originals)
        model.train(was_training)
        bar.close()
    return out


def _chosen_parameters(model: torch.nn.Module, names: Sequence[str] | None) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` to update: those named, in model order, or every one with ``requires_grad``."""
    available = dict(model.named_parameters())
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


def _update_rule(named: list, optimizer_dir: str | os.PathLike | None, lr: float | None) -> Callable:
    """``step_of(i, grad, row) -> (u, η)``: the update of parameter ``i`` for a row's summed-loss gradient."""
    if optimizer_dir is None:
        if lr is None:
            raise InputError("one-step effects: give the final optimizer state (optimizer_dir) or an explicit lr")
        return lambda _i, grad, _row: (grad, float(lr))

    source = final_optimizer_dir(optimizer_dir)
    if source is None:
        raise InputError(f"{optimizer_dir}: no optimizer state ({OPTIMIZER_TENSORS} here or under checkpoints/epoch-N/)")
    states, meta = load_optimizer_state(source)
    beta1, beta2 = (float(b) for b in meta["betas"])
    eps, eta = float(meta["eps"]), float(meta["lr"] if lr is None else lr)
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

    def step_of(i: int, grad: torch.Tensor, row: Any) -> tuple[torch.Tensor, float]:
        g = grad / max(row.n_targets, 1)
        v_new = second[i] * beta2 + (1 - beta2) * g * g
        return first_scale[i] * g / ((v_new / second_scale[i]).sqrt() + eps), eta

    return step_of


@torch.no_grad()
def _restore(weights: Sequence[torch.Tensor], originals: Sequence[torch.Tensor]) -> None:
    for w, w0 in zip(weights, originals):
        w.copy_(w0)


def answer_effects(store, model, tokenizer, queries, train_rows, optimizer_dir) -> np.ndarray:
    """``[Q, N]`` effect of one more training step on each store row on each query's answer loss (nats;
    ``evaluation.effects.one_step_effects`` with the final AdamW state). Rows are encoded as the store was extracted
    (its ``max_length`` and ``chat``); queries measure the answer without the appended end token, as
    ``gradients.queries.query_gradients`` attributes it."""
    cfg = store.manifest["config"]
    encoded, _ = encode_rows(train_rows, tokenizer, max_length=cfg.get("max_length"), chat=cfg.get("chat", "auto"))
    if [e.id for e in encoded] != list(store.ids):
        raise InputError(f"{store.path}: the training rows given are not the store's rows in order")
    encoded_queries, _ = encode_rows(queries, tokenizer, max_length=cfg.get("max_length"))
    return one_step_effects(model, tokenizer, encoded, measured_queries(encoded_queries, tokenizer, "answer"),
                            optimizer_dir=optimizer_dir)
