"""LoGra extraction is exact: store rows equal torch.func per-sample gradients (projected where asked)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from dataworth.batching import Encoded, collate, example_losses
from dataworth.extract import ExtractConfig, Extractor, build_projections, encoded_rows_for, extract
from dataworth.logging import select_modules
from dataworth.projection import random_projection

from conftest import build_gpt2, build_llama, build_neox


def mixed_rows(vocab: int, n: int = 6, seed: int = 0) -> list[Encoded]:
    """Rows of different lengths with a prompt part (no loss) and a response part."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        mask = [0] * prompt + [1] * (length - prompt)
        rows.append(Encoded(f"r{i}", ids, mask))
    return rows


def per_sample_grads(model, rows: list[Encoded], names: list[str]) -> dict[str, torch.Tensor]:
    """Reference: ``torch.func.grad`` of each example's summed loss w.r.t. the watched weights, one at a time."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    keys = [f"{n}.weight" for n in names]

    def loss_fn(watched, row):
        batch = collate([row], [0], pad_id=0)
        out = functional_call(model, {**params, **watched}, (batch.input_ids,), {"attention_mask": batch.attention_mask})
        return example_losses(out.logits, batch).sum()

    out = {k: [] for k in keys}
    for row in rows:
        g = grad(loss_fn)({k: params[k] for k in keys}, row)
        for k in keys:
            out[k].append(g[k])
    return {k: torch.stack(v) for k, v in out.items()}


def as_out_in(model, name: str, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradient in (d_out × d_in) layout (Conv1D stores its weight transposed)."""
    module = dict(model.named_modules())[name]
    return g if isinstance(module, torch.nn.Linear) else g.transpose(-1, -2)


def rows_for(model, rows, kind="identity", modules="all", batch_size=4, rank=4, seed=0):
    chosen = select_modules(model, modules)
    projs = build_projections(chosen, kind, rank, rank, seed)
    with Extractor(model, chosen, projs, torch.device("cpu"), kind=kind) as ex:
        out, losses, _ = encoded_rows_for(ex, rows, pad_id=0, batch_size=batch_size, token_budget=None)
    return chosen, projs, out, losses


@pytest.mark.parametrize("builder", [build_llama, build_gpt2, build_neox], ids=["llama", "gpt2", "neox"])
def test_identity_rows_equal_torch_func_per_sample_gradients(builder):
    model = builder(60)
    rows = mixed_rows(60)
    chosen, _, got, losses = rows_for(model, rows, "identity", batch_size=4)
    names = [n for n, _ in chosen]
    ref = per_sample_grads(model, rows, names)
    offset = 0
    for name in names:
        g = as_out_in(model, name, ref[f"{name}.weight"])
        size = g[0].numel()
        np.testing.assert_allclose(got[:, offset:offset + size], g.reshape(len(rows), -1).numpy(), rtol=1e-4, atol=1e-6)
        offset += size
    assert offset == got.shape[1]
    # weights are untouched and requires_grad restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_random_rows_equal_projected_exact_gradient():
    model = build_llama(60)
    rows = mixed_rows(60, seed=1)
    chosen, projs, got, _ = rows_for(model, rows, "random", modules="mlp", rank=5, seed=7)
    names = [n for n, _ in chosen]
    ref = per_sample_grads(model, rows, names)
    offset = 0
    for name in names:
        p = projs[name]
        want = p.p_out @ ref[f"{name}.weight"] @ p.p_in.T  # P_out G P_inᵀ
        size = p.k_out * p.k_in
        np.testing.assert_allclose(got[:, offset:offset + size], want.reshape(len(rows), -1).numpy(), rtol=1e-4, atol=1e-6)
        offset += size


def test_rows_do_not_depend_on_batch_size_or_neighbours():
    """Eager attention with right padding is batch-invariant; rows of batch size 1 and 8 agree."""
    model = build_llama(60)
    rows = mixed_rows(60, n=8, seed=2)
    _, _, one, l1 = rows_for(model, rows, "random", batch_size=1)
    _, _, eight, l8 = rows_for(model, rows, "random", batch_size=8)
    np.testing.assert_allclose(one, eight, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)


def test_padding_tokens_contribute_exactly_zero():
    model = build_llama(60)
    row = mixed_rows(60, n=1, seed=3)[0]
    long = Encoded("long", [5] * 20, [1] * 20)
    _, _, alone, _ = rows_for(model, [row], "identity", batch_size=1)
    _, _, padded, _ = rows_for(model, [row, long], "identity", batch_size=2)
    np.testing.assert_allclose(alone[0], padded[0], rtol=1e-4, atol=1e-6)


def test_random_projection_is_regenerated_deterministically():
    a = random_projection("model.layers.0.mlp.up_proj", 32, 64, 8, 8, seed=3)
    b = random_projection("model.layers.0.mlp.up_proj", 32, 64, 8, 8, seed=3)
    c = random_projection("model.layers.1.mlp.up_proj", 32, 64, 8, 8, seed=3)
    assert torch.equal(a.p_in, b.p_in) and torch.equal(a.p_out, b.p_out)
    assert not torch.equal(a.p_in, c.p_in)


def test_rank_above_layer_size_is_clamped():
    p = random_projection("m", 16, 8, 64, 64, seed=0)
    assert (p.k_in, p.k_out) == (16, 8)


def test_unknown_module_spec_lists_available_names():
    from dataworth.errors import InputError

    with pytest.raises(InputError, match="available: .*q_proj"):
        select_modules(build_llama(60), "no_such_layer")
