"""`evaluation.effects.one_step_effects` (the ground truth of tail-patch) against steps made by hand on a copy of the model:
torch's own AdamW step (past momentum zeroed, no weight decay) and plain SGD; θ restored bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import hand_adamw_step

from dataworth.data.batching import Encoded, collate, example_losses
from dataworth.errors import InputError
from dataworth.evaluation.effects import one_step_effects
from dataworth.model.optimizer import final_optimizer_dir

TRAIN_TEXTS = ["Alice Smith was born in Paris on 3 May 1970.", "Bob Jones studied physics at Oxford.",
               "The capital of France is Paris."]
QUERIES = [("Alice Smith was born in", " Paris"), ("Bob Jones studied", " physics at Oxford"),
           ("The capital of France is", " Paris")]
PAIRS = [(0, 0), (1, 2), (2, 1)]  # (query, training row) pairs checked by hand


def _text_row(tok, i: int, text: str) -> Encoded:
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Encoded(f"t{i}", ids, [0] + [1] * (len(ids) - 1))


def _query_row(tok, i: int, prompt: str, response: str) -> Encoded:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    return Encoded(f"q{i}", [tok.bos_token_id] + p + r, [0] * (1 + len(p)) + [1] * len(r))


@pytest.fixture(scope="module")
def rows(tiny_tokenizer):
    train = [_text_row(tiny_tokenizer, i, t) for i, t in enumerate(TRAIN_TEXTS)]
    queries = [_query_row(tiny_tokenizer, i, p, r) for i, (p, r) in enumerate(QUERIES)]
    return train, queries


@pytest.fixture(scope="module")
def trained(tiny_llama, tiny_tokenizer, rows, tmp_path_factory):
    """A float64 copy of the tiny Llama after 3 AdamW steps, and the directory holding that optimizer state."""
    from dataworth.model.optimizer import save_optimizer_state

    model = copy.deepcopy(tiny_llama).double().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    train, _ = rows
    batch = collate(train, range(len(train)), tiny_tokenizer.pad_token_id)
    for _ in range(3):
        opt.zero_grad()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        example_losses(logits, batch).sum().backward()
        opt.step()
    for group in opt.param_groups:
        group["lr"] = 2e-3  # the "last step's" learning rate the effects must use
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_optimizer_state(opt, model, ckpt)
    return model.eval(), ckpt


def _loss(model, row: Encoded, pad_id: int) -> torch.Tensor:
    b = collate([row], [0], pad_id)
    return example_losses(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b)[0]


def test_adam_effects_equal_torch_adamw_step_on_the_row_without_momentum_or_decay(trained, tiny_tokenizer, rows):
    """Reference: a fresh copy, torch.optim.AdamW loaded with the saved second moment and step, exp_avg = 0,
    weight_decay = 0, lr = the saved last lr, stepped on the row's mean target loss (dataworth.train's loss)."""
    from dataworth.model.optimizer import load_optimizer_state

    model, ckpt = trained
    train, queries = rows
    pad = tiny_tokenizer.pad_token_id
    got = one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=ckpt, batch_size=2)
    states, meta = load_optimizer_state(ckpt)
    for q, n in PAIRS:
        ref = copy.deepcopy(model)
        named = dict(ref.named_parameters())
        opt = torch.optim.AdamW(named.values(), lr=meta["lr"], betas=tuple(meta["betas"]), eps=meta["eps"],
                                weight_decay=0.0)
        for name, p in named.items():
            opt.state[p] = {"step": torch.tensor(float(meta["step"][name])), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": states[name]["exp_avg_sq"].to(p.dtype).clone()}
        with torch.no_grad():
            before = float(_loss(ref, queries[q], pad))
        (_loss(ref, train[n], pad) / train[n].n_targets).backward()
        opt.step()
        with torch.no_grad():
            after = float(_loss(ref, queries[q], pad))
        assert got[q, n] == pytest.approx(before - after, rel=1e-5, abs=1e-12)
    assert meta["lr"] == pytest.approx(2e-3)


def test_adam_effects_equal_the_explicit_formula(trained, tiny_tokenizer, rows):
    """θ' = θ − η·(1−β₁)/(1−β₁^{t+1})·g/(√(v'/(1−β₂^{t+1})) + ε), v' = β₂v + (1−β₂)g², g = ∇L_n / T_n."""
    from dataworth.model.optimizer import load_optimizer_state

    model, ckpt = trained
    train, queries = rows
    pad = tiny_tokenizer.pad_token_id
    got = one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=ckpt)
    states, meta = load_optimizer_state(ckpt)
    lr = meta["lr"]
    q, n = PAIRS[1]
    ref = copy.deepcopy(model)
    names, params = zip(*ref.named_parameters())
    grads = torch.autograd.grad(_loss(ref, train[n], pad), params)
    with torch.no_grad():
        before = float(_loss(ref, queries[q], pad))
        hand_adamw_step(names, params, grads, states, meta, lr, train[n].n_targets)
        after = float(_loss(ref, queries[q], pad))
    assert got[q, n] == pytest.approx(before - after, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("only", [None, ["model.layers.1.mlp.down_proj.weight"]])
def test_sgd_effects_equal_a_hand_made_step_on_the_summed_loss(trained, tiny_tokenizer, rows, only):
    model, _ = trained
    train, queries = rows
    pad, lr = tiny_tokenizer.pad_token_id, 0.05
    got = one_step_effects(model, tiny_tokenizer, train, queries, lr=lr, params=only)
    assert got.shape == (len(queries), len(train)) and got.dtype == np.float64
    for q, n in PAIRS:
        ref = copy.deepcopy(model)
        named = [(k, p) for k, p in ref.named_parameters() if only is None or k in only]
        grads = torch.autograd.grad(_loss(ref, train[n], pad), [p for _, p in named])
        with torch.no_grad():
            before = float(_loss(ref, queries[q], pad))
            for (_, p), g in zip(named, grads):
                p -= lr * g
            after = float(_loss(ref, queries[q], pad))
        assert got[q, n] == pytest.approx(before - after, rel=1e-5, abs=1e-12)


def test_weights_are_restored_bit_for_bit_and_the_mode_kept(tiny_llama, tiny_tokenizer, rows, trained):
    _, ckpt = trained
    train, queries = rows
    model = copy.deepcopy(tiny_llama).float().train()  # float32, as the demo runs it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam = one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=ckpt)
    sgd = one_step_effects(model, tiny_tokenizer, train, queries, lr=0.1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # the caller's mode comes back
    assert np.isfinite(adam).all() and np.isfinite(sgd).all() and np.abs(sgd).max() > 0


def test_missing_optimizer_state_or_entry_and_no_lr_are_refused(tiny_llama, tiny_tokenizer, rows, tmp_path):
    from dataworth.model.optimizer import save_optimizer_state

    train, queries = rows
    with pytest.raises(InputError, match="optimizer_dir.*or an explicit lr"):
        one_step_effects(tiny_llama, tiny_tokenizer, train, queries)
    with pytest.raises(InputError, match="no optimizer state"):
        one_step_effects(tiny_llama, tiny_tokenizer, train, queries, optimizer_dir=tmp_path)
    model = copy.deepcopy(tiny_llama)
    head = model.get_output_embeddings().weight
    opt = torch.optim.AdamW([head])  # state for the head only
    head.grad = torch.ones_like(head)
    opt.step()
    save_optimizer_state(opt, model, tmp_path)
    every = [name for name, _ in model.named_parameters()]
    with pytest.raises(InputError, match="no entry for model.embed_tokens.weight"):
        one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=tmp_path, params=every)
    # by default the step touches what the state holds (what training stepped), here the head alone
    # (behaviour change: it used to step every parameter with requires_grad and refuse this state)
    default = one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=tmp_path)
    head_only = one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=tmp_path, params=["lm_head.weight"])
    assert np.array_equal(default, head_only) and np.abs(default).max() > 0
    from dataworth.model.optimizer import state_covers as _state_covers

    assert not _state_covers(model, tmp_path)
    model.requires_grad_(False)
    head.requires_grad_(True)
    assert _state_covers(model, tmp_path)


def _write_state(ckpt, *, last_lr, avg_lr=None, peak_lr=None, trainer_state=True):
    import json

    from dataworth.model.optimizer import (
        OPTIMIZER_JSON,
        OPTIMIZER_TENSORS,
        TRAINER_STATE,
    )

    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / OPTIMIZER_TENSORS).write_bytes(b"")  # step_size reads the JSON files only
    (ckpt / OPTIMIZER_JSON).write_text(json.dumps({"kind": "adamw", "lr": last_lr, "params": []}))
    if trainer_state:
        state = {"epoch": 4, "avg_lr": avg_lr, "schedule": {"peak_lr": peak_lr}}
        (ckpt / TRAINER_STATE).write_text(json.dumps(state))
    return ckpt


def test_step_size_is_the_final_epochs_mean_lr_then_the_peak_then_the_last_lr(tmp_path):
    """A schedule that decays to 0 leaves lr 0 in optimizer.json: the step is η̄ (avg_lr), said so."""
    from dataworth.evaluation.effects import step_size

    eta = step_size(_write_state(tmp_path / "a", last_lr=0.0, avg_lr=1.5e-4, peak_lr=2e-4))
    assert eta.lr == 1.5e-4 and "avg_lr" in eta.source and "epoch 4" in eta.source
    eta = step_size(_write_state(tmp_path / "b", last_lr=0.0, avg_lr=0.0, peak_lr=2e-4))
    assert eta.lr == 2e-4 and "peak" in eta.source
    eta = step_size(_write_state(tmp_path / "c", last_lr=3e-5, trainer_state=False))
    assert eta.lr == 3e-5 and "optimizer.json lr" in eta.source
    # a model directory resolves to its last checkpoint
    _write_state(tmp_path / "m" / "checkpoints" / "epoch-2", last_lr=0.0, avg_lr=7e-4)
    assert step_size(tmp_path / "m").lr == 7e-4
    with pytest.raises(InputError, match="no positive learning rate"):
        step_size(_write_state(tmp_path / "d", last_lr=0.0, avg_lr=0.0, peak_lr=0.0))
    assert step_size(tmp_path / "d", lr=5e-4) == type(eta)(5e-4, "given")  # an explicit lr overrides


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), float("inf")])
def test_a_zero_or_non_finite_step_is_refused(trained, tiny_tokenizer, rows, lr):
    model, ckpt = trained
    train, queries = rows
    with pytest.raises(InputError, match="tail-patch lr: must be a finite number > 0"):
        one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=ckpt, lr=lr)
    with pytest.raises(InputError, match="tail-patch lr"):
        one_step_effects(model, tiny_tokenizer, train, queries, lr=lr)


def test_pair_restricted_effects_equal_the_full_matrix_entries_and_skip_unneeded_rows(trained, tiny_tokenizer, rows):
    """Only the asked entries are measured (NaN elsewhere), each equal to the full matrix's to round-off (float64);
    a row no pair needs is never stepped (counted: forwards with autograd on are the rows' backward passes)."""
    model, ckpt = trained
    train, queries = rows
    full = one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=ckpt)
    mask = np.array([[True, False, False], [False, False, False], [True, True, False]])  # row 2 needed by none
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        got = one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=ckpt, pairs=mask, batch_size=1)
    finally:
        hook.remove()
    assert sum(calls) == 2  # rows 0 and 1 stepped, row 2 not
    assert np.isnan(got[~mask]).all()
    np.testing.assert_allclose(got[mask], full[mask], rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="bool mask"):
        one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=ckpt, pairs=mask[:2])


def test_pair_restricted_effects_restore_weights_and_grad_flags(tiny_llama, tiny_tokenizer, rows, trained):
    _, ckpt = trained
    train, queries = rows
    model = copy.deepcopy(tiny_llama).float().eval()
    model.requires_grad_(False)  # as an adapter loaded for inference: the state's parameters are stepped anyway
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = np.zeros((len(queries), len(train)), dtype=bool)
    mask[1, 0] = mask[2, 2] = True
    got = one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=ckpt, pairs=mask)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert np.isfinite(got[mask]).all() and np.abs(got[mask]).max() > 0


def test_final_optimizer_dir_is_the_last_epoch_checkpoint_with_state(tmp_path):
    from dataworth.model.optimizer import OPTIMIZER_JSON, OPTIMIZER_TENSORS

    assert final_optimizer_dir(tmp_path) is None
    for epoch in (2, 10, 11, 12):
        (tmp_path / "checkpoints" / f"epoch-{epoch}").mkdir(parents=True)
    for epoch in (2, 10, 12):  # epoch-11 has no optimizer state, epoch-12 only half of it
        (tmp_path / "checkpoints" / f"epoch-{epoch}" / OPTIMIZER_TENSORS).write_bytes(b"")
    for epoch in (2, 10):
        (tmp_path / "checkpoints" / f"epoch-{epoch}" / OPTIMIZER_JSON).write_text("{}")
    assert final_optimizer_dir(tmp_path) == tmp_path / "checkpoints" / "epoch-10"
    ckpt = tmp_path / "checkpoints" / "epoch-2"
    assert final_optimizer_dir(ckpt) == ckpt

