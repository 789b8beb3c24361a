"""The custom-loop logger is exact and harmless: rows equal torch.func per-sample gradients and extract() rows,
whatever the loss reduction; the optimizer's updates are bit-identical with and without it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import build_gpt2, build_llama
from torch.func import functional_call, grad

import dataworth as dw
from dataworth.data.batching import Encoded, collate, example_losses
from dataworth.errors import InputError
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.gradients.modules import select_modules
from dataworth.gradients.queries import query_gradients
from dataworth.gradients.watch import watch

VOCAB = 60



def rows_of(n: int, seed: int = 0, prefix: str = "r") -> list[Encoded]:
    """Rows of different lengths, each with a prompt (no loss) and a response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 11, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(Encoded(f"{prefix}{i}", ids, [0] * prompt + [1] * (length - prompt)))
    return out


def reference_rows(model, rows: list[Encoded], names: list[str]) -> np.ndarray:
    """torch.func.grad of each example's own summed loss w.r.t. the watched weights, one example at a time,
    laid out like a store row (Ĝ as d_out × d_in, row-major, module order)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    keys = [f"{n}.weight" for n in names]
    modules = dict(model.named_modules())

    def loss_fn(watched, row):
        batch = collate([row], [0], pad_id=0)
        out = functional_call(model, {**params, **watched}, (batch.input_ids,),
                              {"attention_mask": batch.attention_mask})
        return example_losses(out.logits, batch).sum()

    out = []
    for row in rows:
        g = grad(loss_fn)({k: params[k] for k in keys}, row)
        parts = []
        for name, k in zip(names, keys):
            w = g[k] if isinstance(modules[name], torch.nn.Linear) else g[k].T  # Conv1D stores in × out
            parts.append(w.reshape(-1))
        out.append(torch.cat(parts))
    return torch.stack(out).numpy()


def forward_losses(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return example_losses(logits, batch)


@pytest.mark.parametrize("how", ["recorded-mean", "recorded-sum", "declared-mean", "declared-sum"])
def test_rows_captured_in_a_training_step_equal_torch_func_per_sample_gradients(tmp_path, how):
    model = build_llama(VOCAB, seed=1).train()
    rows = rows_of(5)
    batch = collate(rows, range(5), pad_id=0)
    reduction = how.split("-")[1]
    logger = watch(model, "mlp", "identity", out=tmp_path / "s", dtype="float32", loss_reduction=reduction)
    with logger.capture(batch.ids, attention_mask=batch.attention_mask) as cap:
        losses = forward_losses(model, batch)
        if how.startswith("recorded"):
            losses = cap.record(losses)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
    store = logger.finalize()
    want = reference_rows(model, rows, logger.modules)
    np.testing.assert_allclose(store.matrix(), want, rtol=1e-4, atol=1e-6)
    assert store.ids == [r.id for r in rows]
    assert store.tokens.tolist() == [len(r.input_ids) for r in rows]
    if how.startswith("recorded"):
        np.testing.assert_allclose(store.loss, forward_losses(model, batch).detach().numpy(), rtol=1e-5)
    else:
        assert np.isnan(store.loss).all()  # unknown, and said so


def test_averaged_loss_declared_as_summed_scales_rows_by_one_over_batch_size(tmp_path):
    """The documented limit of a *declared* reduction: a lie cannot be detected without recorded losses."""
    model = build_llama(VOCAB, seed=1)
    rows = rows_of(4)
    batch = collate(rows, range(4), pad_id=0)
    logger = watch(model, "mlp", "identity", out=tmp_path / "s", dtype="float32")  # declares "sum"
    with logger.capture(batch.ids, attention_mask=batch.attention_mask):
        forward_losses(model, batch).mean().backward()
    rows_got = logger.finalize().matrix()
    np.testing.assert_allclose(rows_got * 4, reference_rows(model, rows, logger.modules), rtol=1e-4, atol=1e-6)


def test_rows_and_kfac_factors_equal_those_of_extract_for_the_same_model_state(tmp_path):
    model = build_llama(VOCAB, seed=2)
    rows = rows_of(7, seed=3)
    cfg = ExtractConfig(out=str(tmp_path / "extract"), modules="mlp", projection="random", rank_in=4, rank_out=3,
                        seed=1, dtype="float32", batch_size=2, shard_rows=4, device="cpu")
    reference = extract(cfg, model=model, encoded=rows, progress=False)
    model.train()
    logger = watch(model, "mlp", "random", rank_in=4, rank_out=3, seed=1, out=tmp_path / "logger",
                   dtype="float32", shard_rows=4)
    for lo in range(0, 7, 3):  # batches of 3, 3, 1: different grouping from extract's
        batch = collate(rows[lo:lo + 3], range(lo, min(lo + 3, 7)), pad_id=0)
        with logger.capture(batch.ids, attention_mask=batch.attention_mask) as cap:
            cap.record(forward_losses(model, batch)).mean().backward()
    store = logger.finalize()
    np.testing.assert_allclose(store.matrix(), reference.matrix(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(store.loss, reference.loss, rtol=1e-5)
    assert store.ids == reference.ids and [m.to_json() for m in store.modules] == [m.to_json() for m in reference.modules]
    got, want = (s.load_tensors("curvature/kfac_factors.safetensors") for s in (store, reference))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-9)
    # the store is a normal one: query gradients through the store's own projection reproduce its rows
    np.testing.assert_allclose(query_gradients(store, model, None, rows), store.matrix(), rtol=1e-4, atol=1e-6)


def _train(model, batches, logger=None, accumulate: int = 1) -> None:
    """AdamW on the batch mean; with ``logger``: every micro-batch captured (losses recorded)."""
    torch.manual_seed(123)  # dropout masks: the same draws in both runs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step, batch in enumerate(batches):
        if logger is None:
            (forward_losses(model, batch).mean() / accumulate).backward()
        else:
            with logger.capture(batch.ids, attention_mask=batch.attention_mask) as cap:
                (cap.record(forward_losses(model, batch)).mean() / accumulate).backward()
        if (step + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("builder", [build_llama, build_gpt2], ids=["llama", "gpt2-dropout"])
def test_optimizer_updates_are_bit_identical_with_and_without_the_logger(tmp_path, builder):
    base = builder(VOCAB, seed=4).train()
    plain, watched = copy.deepcopy(base), copy.deepcopy(base)
    batches = [collate(rows_of(3, seed=s, prefix=f"e{s}-"), range(3), pad_id=0) for s in range(3)]
    _train(plain, batches)
    logger = watch(watched, "all", "random", rank=4, out=tmp_path / "s")
    _train(watched, batches, logger)
    for (name, a), (_, b) in zip(plain.named_parameters(), watched.named_parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(next(base.parameters()), next(plain.parameters()))  # training did happen
    assert len(logger.finalize()) == 9


def test_gradient_accumulation_gives_each_micro_batch_its_own_per_example_rows(tmp_path):
    model = build_llama(VOCAB, seed=5).train()
    before = copy.deepcopy(model)
    rows = rows_of(6, seed=6)
    micro = [collate(rows[:3], range(3), pad_id=0), collate(rows[3:], range(3), pad_id=0)]
    logger = watch(model, "mlp", "identity", out=tmp_path / "s", dtype="float32")
    _train(model, micro, logger, accumulate=2)  # one optimizer step after both micro-batches
    store = logger.finalize()
    np.testing.assert_allclose(store.matrix(), reference_rows(before, rows, logger.modules), rtol=1e-4, atol=1e-6)
    assert not torch.equal(next(model.parameters()), next(before.parameters()))


def test_repeated_ids_are_refused_unless_overwrite_which_keeps_the_latest_rows_in_first_position(tmp_path):
    model = build_llama(VOCAB, seed=7)
    rows = rows_of(4, seed=8)
    logger = watch(model, "mlp", "identity", out=tmp_path / "s", dtype="float32", shard_rows=2)

    def capture(part, **kw):
        batch = collate(part, range(len(part)), pad_id=0)
        with logger.capture(batch.ids, attention_mask=batch.attention_mask, **kw) as cap:
            cap.record(forward_losses(model, batch)).sum().backward()

    capture(rows[:2])
    with pytest.raises(InputError, match="r1.*captured before.*overwrite=True"):
        capture([rows[1], rows[2]])
    with torch.no_grad():  # change the weights, so the second capture of r1 differs from the first
        for p in model.parameters():
            p.mul_(1.5)
    capture([rows[1], rows[2]], overwrite=True)
    capture([rows[3]])
    store = logger.finalize()
    assert store.ids == ["r0", "r1", "r2", "r3"]
    np.testing.assert_allclose(store.matrix()[1:], reference_rows(model, rows[1:], logger.modules),
                               rtol=1e-4, atol=1e-6)
    assert not (tmp_path / "s.staging").exists()


def test_modules_that_are_not_linear_are_refused_with_what_is_supported(tmp_path):
    model = build_llama(VOCAB)
    with pytest.raises(InputError, match=r"Embedding; supported layers are nn.Linear.*model\.layers\.0"):
        watch(model, ["model.embed_tokens"], out=tmp_path / "s")
    with pytest.raises(InputError, match="no module named 'nope'"):
        watch(model, ["nope"], out=tmp_path / "s")
    with pytest.raises(InputError, match="pca.*dw.extract"):
        watch(model, "mlp", "pca", out=tmp_path / "s")


def test_bad_use_is_reported_in_one_line(tmp_path):
    model = build_llama(VOCAB)
    batch = collate(rows_of(3), range(3), pad_id=0)
    logger = watch(model, "mlp", "random", rank=2, out=tmp_path / "s")
    with pytest.raises(InputError, match=r"shape \(\), expected \[3\] per-example"):
        with logger.capture(batch.ids) as cap:
            cap.record(forward_losses(model, batch).mean())
    with pytest.raises(InputError, match="no gradient.*backward"):
        with logger.capture(batch.ids):
            loss = forward_losses(model, batch).sum()
    loss.backward()  # outside the capture: ignored
    with pytest.raises(InputError, match="recorded losses received no gradient"):
        with logger.capture(batch.ids) as cap:
            cap.record(forward_losses(model, batch))
            forward_losses(model, batch).sum().backward()
    with pytest.raises(InputError, match="weight 0"):
        with logger.capture(batch.ids) as cap:
            (cap.record(forward_losses(model, batch)) * torch.tensor([1.0, 0.0, 1.0])).sum().backward()
    with pytest.raises(InputError, match="appears twice"):
        logger.capture(["a", "a", "b"])
    with pytest.raises(InputError, match="nothing was captured"):
        logger.finalize()  # every capture above failed: nothing was kept
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and not a gradient store"):
        watch(model, "mlp", out=tmp_path / "user")


def test_a_logger_store_is_refused_as_out_unless_replace(tmp_path):
    model = build_llama(VOCAB)
    batch = collate(rows_of(2), range(2), pad_id=0)
    for replace in (False, True):
        logger = watch(model, "mlp", rank=2, out=tmp_path / "s", replace=replace)
        with logger.capture(batch.ids, attention_mask=batch.attention_mask) as cap:
            cap.record(forward_losses(model, batch)).sum().backward()
        logger.finalize()
    with pytest.raises(InputError, match="replace=True"):
        watch(model, "mlp", out=tmp_path / "s")


def test_logger_store_is_scoreable_with_fit_and_score_rows(tmp_path):
    model = build_llama(VOCAB, seed=9)
    rows = rows_of(6, seed=10)
    logger = dw.watch(model, "mlp", rank=4, out=tmp_path / "s", dtype="float32")
    batch = collate(rows, range(6), pad_id=0)
    with logger.capture(batch.ids, attention_mask=batch.attention_mask) as cap:
        cap.record(forward_losses(model, batch)).mean().backward()
    store = logger.finalize()
    dw.fit(store.path, "ekfac")
    curvature = dw.load_curvature(store, "ekfac")
    queries = query_gradients(store, model, None, rows[:2])
    scores = dw.score_rows(store, queries, ["q0", "q1"], curvature, full=True)
    want = curvature.precondition64(queries) @ store.matrix().astype(np.float64).T
    np.testing.assert_allclose(scores.matrix, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert select_modules(model, store.manifest["config"]["modules"])  # the recorded spec reselects the layers
