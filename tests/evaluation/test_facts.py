"""Fact tracing's tail-patch on a LoRA fine-tune whose schedule ends at lr 0 (as the ``lora`` preset does): the
step is the final epoch's mean lr η̄, not the saved 0; the effects of a merged LoRA model are measured on its
unmerged adapter, stepping the adapter weights only; needed pairs equal the full matrix; the sampled figure's
interval covers the exact one; a zero step is refused, in Python and on the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import hand_adamw_step

from dataworth.cli import cli
from dataworth.data.batching import collate, example_losses
from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.evaluation.effects import (
    effects_inputs,
    one_step_effects,
    step_size,
    stepped_parameters,
)
from dataworth.evaluation.facts import (
    TAIL_PATCH,
    eval_facts,
    fact_tracing_table,
    format_table,
)
from dataworth.model.load import load_model
from dataworth.model.optimizer import final_optimizer_dir, load_optimizer_state
from dataworth.model.train import TrainConfig, train
from dataworth.store.reader import open_store

WORLD = "people=3&docs_per_person=3&distractors=3"
DATA, QUERIES = f"builtin:bios?{WORLD}", f"builtin:bios:queries?{WORLD}"


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny base trained from scratch, then a merged LoRA fine-tune on it with a cosine schedule to 0."""
    root = tmp_path_factory.mktemp("lora")
    base = train(DATA, root / "base", TrainConfig.from_preset("tiny-test", epochs=3), queries_spec=None, progress=False)
    config = TrainConfig.from_preset("tiny-test", base=str(base.out_dir), lora=True, epochs=2, lr=3e-3,
                                     min_lr_ratio=0.0, warmup_ratio=0.0, lora_targets=("q_proj", "v_proj"), lora_r=4)
    result = train(DATA, root / "model", config, queries_spec=None, progress=False)
    table = eval_facts(str(result.out_dir), DATA, QUERIES, root / "facts", curvatures=("none",), modes=("dot",),
                       rank=8, progress=False)
    return result, table, root


def test_the_schedule_ends_at_lr_zero_and_the_step_is_the_last_epochs_mean_lr(lora):
    result, _, _ = lora
    ckpt = final_optimizer_dir(result.out_dir)
    _, meta = load_optimizer_state(ckpt)
    assert meta["lr"] == 0.0  # what the old code stepped with: every effect exactly 0
    eta = step_size(result.out_dir)
    assert eta.lr == pytest.approx(meta["trainer_state"]["avg_lr"]) and eta.lr > 0 and "avg_lr" in eta.source


def _loss(model, row, pad_id):
    b = collate([row], [0], pad_id)
    return example_losses(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b)[0]


def test_adapter_effects_step_the_lora_weights_only_and_equal_the_formula_with_the_mean_lr(lora):
    """Reference: the AdamW formula with η = η̄ applied by hand to the adapter's LoRA weights of a copy."""
    result, _, root = lora
    ckpt = final_optimizer_dir(result.out_dir)
    adapter = load_model(ckpt, device="cpu")  # base + unmerged adapter, loaded for inference (nothing trainable)
    model, tok = adapter.model, adapter.tokenizer
    names = [n for n, _ in stepped_parameters(model, ckpt)]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    store = open_store(root / "facts" / "store")
    train_enc, query_enc = effects_inputs(store, tok, load_rows(QUERIES), load_rows(DATA))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = one_step_effects(model, tok, train_enc, query_enc, optimizer_dir=ckpt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())
    assert np.isfinite(got).all() and np.abs(got).max() > 1e-6  # not the all-zero matrix of lr 0

    states, meta = load_optimizer_state(ckpt)
    lr = meta["trainer_state"]["avg_lr"]
    q, n = 1, 4
    ref = copy.deepcopy(model)
    named = dict(ref.named_parameters())
    params = [named[k] for k in names]
    for p in params:
        p.requires_grad_(True)
    pad = tok.pad_token_id
    grads = torch.autograd.grad(_loss(ref, train_enc[n], pad), params)
    with torch.no_grad():
        loss_before = float(_loss(ref, query_enc[q], pad))
        hand_adamw_step(names, params, grads, states, meta, lr, train_enc[n].n_targets)
        loss_after = float(_loss(ref, query_enc[q], pad))
    # both sides difference two float32 losses: they agree to a few units in the last place of the loss
    # (a fresh environment gave −2⁻¹³ against −1.5163e-4, 2 ulps of a loss near 5)
    ulp = float(np.spacing(np.float32(loss_before)))
    assert got[q, n] == pytest.approx(loss_before - loss_after, rel=1e-4, abs=4 * ulp)
    # the merged model has no LoRA weights: stepping it with the adapter's state is refused, not skipped
    merged = load_model(result.out_dir, device="cpu").model
    with pytest.raises(InputError, match="which the model lacks"):
        one_step_effects(merged, tok, train_enc, query_enc, optimizer_dir=ckpt)


def test_eval_facts_on_a_merged_lora_model_reports_non_zero_tail_patch_with_its_step(lora):
    result, table, _ = lora
    rows = {r["method"]: r for r in table}
    assert {"none/dot", "BM25 (prompt+response)", "gold documents", "one-step oracle"} <= set(rows)
    eta = step_size(result.out_dir)
    for r in table:
        assert r["tail-patch lr"] == eta.lr and r["tail-patch lr from"] == eta.source
        assert r[f"{TAIL_PATCH} ±"] == 0.0 and np.isfinite(r[TAIL_PATCH])
    assert any(abs(r[TAIL_PATCH]) > 1e-6 for r in table)
    assert rows["one-step oracle"][TAIL_PATCH] >= max(r[TAIL_PATCH] for m, r in rows.items() if m != "gold documents")
    printed = format_table(table)
    assert f"step η = {eta.lr:.4g}" in printed and "avg_lr" in printed and "full matrix" in printed


def test_needed_pairs_give_the_full_figures_and_a_sample_covers_them(lora):
    """Same store, models and effects; tail_patch='needed' measures only the pairs the figures read (no oracle
    row); a seeded sample of 12 pairs per row gives intervals, which cover the exact figures here."""
    result, table, root = lora
    loaded = load_model(result.out_dir, device="cpu")
    adapter = load_model(final_optimizer_dir(result.out_dir), device="cpu").model
    train_rows, queries = load_rows(DATA), load_rows(QUERIES)
    args = (open_store(root / "facts" / "store"), loaded.model, loaded.tokenizer, queries, ["none"], ["dot"],
            [r.data["text"] for r in train_rows])
    kwargs = dict(train_rows=train_rows, optimizer_dir=result.out_dir, effects_model=adapter)
    exact = {r["method"]: r for r in table}
    needed = fact_tracing_table(*args, **kwargs, tail_patch="needed")
    assert "one-step oracle" not in {r["method"] for r in needed}
    for r in needed:
        assert r[TAIL_PATCH] == pytest.approx(exact[r["method"]][TAIL_PATCH], rel=1e-5, abs=1e-9)
        assert "no one-step oracle (--tail-patch needed)" in r["tail-patch effects"]
    sampled = fact_tracing_table(*args, **kwargs, tail_patch="needed", tail_patch_sample=12, seed=3)
    for r in sampled:
        value, half = r[TAIL_PATCH], r[f"{TAIL_PATCH} ±"]
        assert r["tail-patch pairs"] == 12 and half > 0
        assert abs(value - exact[r["method"]][TAIL_PATCH]) <= half, r
    assert " ± " in format_table(sampled)
    with pytest.raises(InputError, match="tail-patch-sample"):
        fact_tracing_table(*args, **kwargs, tail_patch="full", tail_patch_sample=12)


def test_cli_refuses_a_zero_tail_patch_step_in_one_line(lora, tmp_path):
    result, _, _ = lora
    run = CliRunner().invoke(cli, ["eval", "facts", "--model", str(result.out_dir), "--data", DATA, "--queries", QUERIES,
                                   "--out", str(tmp_path / "f"), "--tail-patch-lr", "0", "--quiet"])
    assert run.exit_code == 2, run.output
    line = run.output.strip().splitlines()[-1]
    assert line.startswith("error: tail-patch lr: must be a finite number > 0") and "Traceback" not in run.output
    assert not (tmp_path / "f").exists()  # refused before any extraction


def test_cli_prints_the_step_and_writes_it_to_json(lora, tmp_path):
    result, _, root = lora
    out = tmp_path / "facts.json"
    run = CliRunner().invoke(cli, ["eval", "facts", "--model", str(result.out_dir), "--data", DATA, "--queries", QUERIES,
                                   "--out", str(root / "facts"), "--curvature", "none", "--mode", "dot", "--rank", "8",
                                   "--tail-patch-lr", "1e-3", "--tail-patch", "needed", "--quiet", "--json", str(out)])
    assert run.exit_code == 0, run.output
    assert "step η = 0.001 (given)" in run.output
    figures = json.loads(out.read_text())
    assert figures["tail-patch lr"] == 1e-3 and figures["tail-patch lr from"] == "given"
    assert all(r["tail-patch lr"] == 1e-3 for r in figures["table"])
