"""Tasks make any model attributable: rows equal the per-example gradients the task defines, the LM task
reproduces plain extract(), and scores through a task equal the explicit formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_llama
from torch import nn
from torch.func import functional_call, grad

import dataworth as dw
from dataworth.data.batching import Encoded
from dataworth.errors import InputError
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.gradients.queries import measurement_gradients
from dataworth.gradients.task import (
    ClassificationMarginTask,
    FunctionTask,
    LanguageModelTask,
    classification_margin,
    tensor_batches,
)
from dataworth.influence.score import score_with_task


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def data(n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def config(out, **kw) -> ExtractConfig:
    return ExtractConfig(**{"out": str(out), "projection": "identity", "dtype": "float32", "shard_rows": 4,
                            "device": "cpu", **kw})


def reference(model, x, y, fn) -> np.ndarray:
    """torch.func.grad of ``fn(logits_b, y_b)`` w.r.t. every Linear weight, one example at a time."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    keys = [n for n in params if n.endswith("weight")]

    def loss(w, xb, yb):
        return fn(functional_call(model, {**params, **w}, (xb[None],)), yb[None]).sum()

    out = []
    for xb, yb in zip(x, y):
        g = grad(loss)({k: params[k] for k in keys}, xb, yb)
        out.append(torch.cat([g[k].reshape(-1) for k in keys]))
    return torch.stack(out).numpy()


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def test_classification_margin_is_correct_logit_minus_logsumexp_of_the_others():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 3.0, -1.0]])
    got = classification_margin(logits, torch.tensor([0, 2]))
    want = torch.tensor([2 - np.log(np.exp(1) + np.exp(0)), -1 - np.log(np.exp(0.5) + np.exp(3))], dtype=torch.float32)
    torch.testing.assert_close(got, want)


def test_classifier_rows_are_torch_func_gradients_of_loss_and_of_minus_margin(tmp_path):
    model, (x, y) = mlp(), data()
    task = ClassificationMarginTask()
    store = extract(config(tmp_path / "s"), model=model, task=task, batches=tensor_batches(x, y, batch_size=3))
    assert store.ids == [str(i) for i in range(10)]
    np.testing.assert_allclose(store.matrix(), reference(model, x, y, ce), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(store.loss, ce(model(x), y).detach().numpy(), rtol=1e-6)
    queries, ids = measurement_gradients(store, model, task, tensor_batches(x[:4], y[:4], ids="abcd", batch_size=2))
    assert ids == list("abcd")
    want = reference(model, x[:4], y[:4], lambda z, t: -classification_margin(z, t))
    np.testing.assert_allclose(queries, want, rtol=1e-5, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters()) and model.training  # state restored


def test_any_callable_task_squared_error_matches_the_closed_form_gradient(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    x, t = torch.randn(6, 4), torch.randn(6)
    task = FunctionTask(lambda b, m: (m(b.inputs).squeeze(1) - b.targets) ** 2)
    store = extract(config(tmp_path / "s"), model=model, task=task, batches=tensor_batches(x, t, batch_size=4))
    residual = (x @ model[0].weight.detach().T).squeeze(1) - t
    np.testing.assert_allclose(store.matrix(), (2 * residual[:, None] * x).numpy(), rtol=1e-5, atol=1e-7)


def test_language_model_task_reproduces_plain_extract(tmp_path):
    model = build_llama(60, seed=3)
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(5):
        ids = torch.randint(3, 60, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append(Encoded(f"d{i}", ids, [0, 0] + [1] * (len(ids) - 2)))
    cfg = dict(modules="mlp", projection="random", rank_in=3, rank_out=2, seed=4, batch_size=2)
    plain = extract(config(tmp_path / "plain", **cfg), model=model, encoded=rows, progress=False)
    tasked = extract(config(tmp_path / "task", **cfg), model=model, encoded=rows, task=LanguageModelTask())
    np.testing.assert_allclose(tasked.matrix(), plain.matrix(), rtol=1e-4, atol=1e-7)
    assert tasked.ids == plain.ids and tasked.dim == plain.dim
    a, b = (s.load_tensors("curvature/kfac_factors.safetensors") for s in (tasked, plain))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-9)


def test_scores_through_a_task_equal_the_explicit_formula_and_positive_means_helps(tmp_path):
    model, (x, y) = mlp(seed=5), data(12, seed=6)
    task = ClassificationMarginTask()
    store = extract(config(tmp_path / "s"), model=model, task=task, batches=tensor_batches(x, y, batch_size=5))
    dw.fit(store.path, "raw", damping=0.1)
    curvature = dw.load_curvature(store, "raw")
    queries = tensor_batches(x[:3], y[:3], ids=["q0", "q1", "q2"])
    scores = score_with_task(store, model, task, queries, curvature="raw", full=True, top_k=2)
    via_score = dw.score(store.path, queries, model, task=task, curvature="raw", full=True, top_k=2)
    np.testing.assert_array_equal(via_score.matrix, scores.matrix)  # dw.score accepts a Task too
    q, _ = measurement_gradients(store, model, task, queries)
    want = curvature.precondition64(q) @ store.matrix().astype(np.float64).T
    np.testing.assert_allclose(scores.matrix, want, rtol=1e-4, atol=1e-7)
    # sign: a gradient step on training example n changes the query's -margin by about -lr * ∇(-m_q)·∇ℓ_n;
    # with no curvature (dot), positive scores must be the examples whose step raises the margin.
    dot = score_with_task(store, model, task, queries, curvature="none", full=True).matrix
    n, lr = int(np.argmax(dot[0])), 1e-3
    before = classification_margin(model(x[:1]), y[:1]).item()
    loss = ce(model(x[n:n + 1]), y[n:n + 1]).sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    with torch.no_grad():
        for p, gp in zip(model.parameters(), grads):
            if p.dim() == 2:  # the store tracks weights (not biases): step those only
                p -= lr * gp
    after = classification_margin(model(x[:1]), y[:1]).item()
    assert after - before == pytest.approx(lr * dot[0, n], rel=0.05)
    assert dot[0, n] > 0


def test_a_batch_averaged_loss_and_non_linear_modules_are_refused(tmp_path):
    model, (x, y) = mlp(), data()
    averaged = FunctionTask(lambda b, m: ce(m(b.inputs), b.targets).mean())
    with pytest.raises(InputError, match=r"compute_train_loss returned shape \(\), expected \[10\] per-example"):
        extract(config(tmp_path / "a"), model=model, task=averaged, batches=tensor_batches(x, y, batch_size=10))
    with pytest.raises(InputError, match=r"'1' is a Tanh; supported layers are nn.Linear.*: 0, 2\)"):
        extract(config(tmp_path / "b"), model=model, task=ClassificationMarginTask(modules=("0", "1")),
                   batches=tensor_batches(x, y))
    with pytest.raises(InputError, match="has no 'ids'"):
        extract(config(tmp_path / "c"), model=model, task=ClassificationMarginTask(), batches=[(x, y)])
    with pytest.raises(InputError, match="supports random and identity"):
        extract(config(tmp_path / "d", projection="pca"), model=model, task=ClassificationMarginTask(),
                   batches=tensor_batches(x, y))
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.staging").exists()
