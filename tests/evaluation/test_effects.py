"""`retrain.one_step_effects` (the ground truth of tail-patch) against steps made by hand on a copy of the model:
torch's own AdamW step (past momentum zeroed, no weight decay) and plain SGD; θ restored bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

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
    (b1, b2), eps, lr = meta["betas"], meta["eps"], meta["lr"]
    q, n = PAIRS[1]
    ref = copy.deepcopy(model)
    names, params = zip(*ref.named_parameters())
    grads = torch.autograd.grad(_loss(ref, train[n], pad), params)
    with torch.no_grad():
        before = float(_loss(ref, queries[q], pad))
        for name, p, g in zip(names, params, grads):
            g = g / train[n].n_targets
            t = meta["step"][name] + 1
            v = b2 * states[name]["exp_avg_sq"].double() + (1 - b2) * g ** 2
            p -= lr * (1 - b1) / (1 - b1 ** t) * g / ((v / (1 - b2 ** t)).sqrt() + eps)
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
    with pytest.raises(InputError, match="no entry for model.embed_tokens.weight"):
        one_step_effects(model, tiny_tokenizer, train, queries, optimizer_dir=tmp_path)
    # eval facts leaves the tail-patch out for such a state (e.g. a merged LoRA model's adapter state)
    from dataworth.model.optimizer import state_covers as _state_covers

    assert not _state_covers(model, tmp_path)
    model.requires_grad_(False)
    head.requires_grad_(True)
    assert _state_covers(model, tmp_path)


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

