"""Curvature fitting and preconditioning against explicit dense formulas.

The truth reference is a tiny two-layer model whose exact per-example weight gradients come from
``torch.func.vmap(grad(...))`` (identity "projection": store rows = the exact ``weight.grad`` of each linear
module for one example) and whose KFAC factors come from plain autograd. Every fitted curvature is compared
with ``np.linalg.inv(F + λI)`` built from an explicit ``F``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_test_store
from hypothesis import given
from hypothesis import strategies as st

from dataworth.errors import InputError
from dataworth.influence import curvature as C
from dataworth.store.format import ModuleSpec, modules_layout
from dataworth.store.reader import open_store

HEADER = {"projection": {"kind": "identity"}, "model": {"fingerprint": "test-model"}, "data": {}, "config": {}}


def write_store(path, rows, modules, *, shard_rows=7, dtype="float32", kfac=None):
    return write_test_store(path, rows, modules, HEADER, shard_rows=shard_rows, dtype=dtype, kfac=kfac)


# ---------------------------------------------------------------------------------------------------------
# The tiny model: exact per-example gradients and KFAC factors


class TinyMLP(torch.nn.Module):
    """``out = W2 tanh(W1 x)`` applied per token; modules ``l1`` (4×3) and ``l2`` (2×4), no biases."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(3, 4, bias=False, dtype=torch.float64)
        self.l2 = torch.nn.Linear(4, 2, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def example_loss(model, params, x, y):
    """Loss of ONE example: squared error *summed* over its tokens (``x [T, 3]``, ``y [T, 2]``)."""
    out = torch.func.functional_call(model, params, (x,))
    return 0.5 * ((out - y) ** 2).sum()


@pytest.fixture(scope="module")
def tiny_gradients():
    """``rows [N, 20]`` = exact per-example ``[vec(∇W1), vec(∇W2)]`` (row-major), the modules, and the
    KFAC factors ``A = (1/T) Σ_tokens a aᵀ``, ``S = (1/N) Σ_n Σ_t δ δᵀ`` of each module."""
    model = TinyMLP()
    gen = torch.Generator().manual_seed(1)
    n, t = 24, 5
    x = torch.randn(n, t, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(n, t, 2, generator=gen, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.vmap(torch.func.grad(lambda p, xi, yi: example_loss(model, p, xi, yi)), in_dims=(None, 0, 0))(
        params, x, y
    )
    rows = torch.cat([grads["l1.weight"].reshape(n, -1), grads["l2.weight"].reshape(n, -1)], dim=1).numpy()
    # KFAC factors from the activations and output gradients of every token.
    h = x @ params["l1.weight"].T
    h.requires_grad_(True)
    z = torch.tanh(h)
    out = z @ params["l2.weight"].T
    loss = 0.5 * ((out - y) ** 2).sum()
    d_h, d_out = torch.autograd.grad(loss, [h, out])
    # Sanity of the reference itself: Σ_t δ_t a_tᵀ is the per-example gradient.
    assert torch.allclose(torch.einsum("nto,nti->noi", d_h, x), grads["l1.weight"])
    assert torch.allclose(torch.einsum("nto,nti->noi", d_out, z.detach()), grads["l2.weight"])

    def cov(v, denom):
        flat = v.reshape(-1, v.shape[-1]).detach()
        return (flat.T @ flat / denom).numpy()

    kfac = {"l1": (cov(d_h, n), cov(x, n * t)), "l2": (cov(d_out, n), cov(z, n * t))}
    modules = modules_layout([("l1", 4, 3), ("l2", 2, 4)])
    return rows, modules, kfac


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_gradients):
    rows, modules, kfac = tiny_gradients
    return write_store(tmp_path_factory.mktemp("curv") / "store", rows.astype(np.float32), modules, kfac=kfac)


def explicit_fisher(rows: np.ndarray, m) -> np.ndarray:
    g = rows[:, m.columns].astype(np.float64)
    return g.T @ g / len(g)


def explicit_precondition(queries: np.ndarray, blocks: dict, damping: dict, modules) -> np.ndarray:
    """``(F_m + λ_m I)⁻¹ q`` per module with an explicit dense ``np.linalg.inv``."""
    out = np.asarray(queries, dtype=np.float64).copy()
    for m in modules:
        inv = np.linalg.inv(blocks[m.name] + damping[m.name] * np.eye(m.size))
        out[:, m.columns] = queries[:, m.columns] @ inv.T
    return out


def queries_for(dim: int, n: int = 3, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# raw / kfac / ekfac against dense formulas


def test_raw_preconditioning_equals_explicit_inverse_of_per_example_fisher(tiny_store, tiny_gradients):
    rows, modules, _ = tiny_gradients
    q = queries_for(tiny_store.dim)
    fitted = C.fit(tiny_store.path, "raw", 0.05)
    # float64 maths on the rows exactly as stored (float32): agreement to round-off.
    stored = tiny_store.matrix()
    blocks = {m.name: explicit_fisher(stored, m) for m in modules}
    expected = explicit_precondition(q, blocks, fitted.damping, modules)
    np.testing.assert_allclose(fitted.precondition64(q), expected, rtol=1e-8, atol=1e-10)
    # Against the float64 torch.func gradients themselves: only the store's float32 rounding differs.
    truth = explicit_precondition(q, {m.name: explicit_fisher(rows, m) for m in modules}, fitted.damping, modules)
    np.testing.assert_allclose(fitted.precondition(q), truth, rtol=1e-4, atol=1e-6)
    # The module's naive reference agrees, and so does the saved-and-reloaded curvature.
    np.testing.assert_allclose(C.precondition_reference(fitted, q), expected, rtol=1e-8, atol=1e-10)
    loaded = C.load_curvature(tiny_store, "raw")
    np.testing.assert_array_equal(loaded.precondition64(q), fitted.precondition64(q))
    assert loaded.damping == {"l1": 0.05, "l2": 0.05}


def test_raw_with_fewer_rows_than_columns_is_fitted_thin_and_equals_the_explicit_inverse(tmp_path):
    # 5 rows, modules of 12 and 6 columns: F has rank <= 5, so the thin SVD form is used for both modules
    rng = np.random.default_rng(3)
    modules = modules_layout([("a", 3, 4), ("b", 2, 3)])
    rows = rng.normal(size=(5, 18)).astype(np.float32)
    store = write_store(tmp_path / "store", rows, modules, shard_rows=2)
    assert C.thin_raw_modules(store) == {"a", "b"}
    for damping in (0.05, "auto"):
        fitted = C.fit(store.path, "raw", damping)
        assert all(m.thin and m.eigvecs.shape == (m.size, 5) for m in fitted.modules)
        blocks = {m.name: explicit_fisher(rows, m) for m in modules}
        # auto damping: the mean over all D_m eigenvalues (zeros included) = trace(F) / D_m, as the full fit has
        expected_damping = {m.name: 0.05 if damping == 0.05 else C.AUTO_DAMPING_FRACTION * np.trace(blocks[m.name])
                            / m.size for m in modules}
        np.testing.assert_allclose([fitted.damping[m.name] for m in modules],
                                   [expected_damping[m.name] for m in modules], rtol=1e-10)
        q = queries_for(store.dim)
        expected = explicit_precondition(q, blocks, fitted.damping, modules)
        np.testing.assert_allclose(fitted.precondition64(q), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
        np.testing.assert_allclose(C.precondition_reference(fitted, q), expected, rtol=1e-6,
                                   atol=1e-9 * np.abs(expected).max())
        self_expected = np.einsum("qd,qd->q", q.astype(np.float64), expected)
        np.testing.assert_allclose(fitted.self_inner(q), self_expected, rtol=1e-6)
        loaded = C.load_curvature(store, "raw")
        np.testing.assert_array_equal(loaded.precondition64(q), fitted.precondition64(q))


def test_kfac_equals_explicit_kronecker_inverse_with_s_outer(tiny_store, tiny_gradients):
    _, modules, kfac = tiny_gradients
    q = queries_for(tiny_store.dim)
    fitted = C.fit(tiny_store.path, "kfac", 0.01)
    blocks = {name: np.kron(s, a) for name, (s, a) in kfac.items()}  # row-major vec: S outer, A inner
    expected = explicit_precondition(q, blocks, fitted.damping, modules)
    np.testing.assert_allclose(fitted.precondition64(q), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(C.precondition_reference(C.load_curvature(tiny_store, "kfac"), q), expected,
                               rtol=1e-8, atol=1e-10)


def test_fitted_matrices_are_the_empirical_fisher_and_the_kronecker_product_of_the_store_factors(tiny_store,
                                                                                               tiny_gradients):
    """What the package fits, as explicit matrices (`dense_curvature`): ``raw`` is exactly the empirical Fisher
    ``(1/N) Σ_n vec(Ĝ_n) vec(Ĝ_n)ᵀ`` of the stored rows, ``kfac`` exactly ``S ⊗ A`` of the factors the store
    holds (row-major vec: S outer), and ``ekfac`` keeps KFAC's eigenbasis with eigenvalues refitted so that its
    diagonal in that basis equals the Fisher's (George et al. 2018)."""
    rows, modules, kfac = tiny_gradients
    stored = tiny_store.matrix()
    raw, kron, ekfac = (C.fit(tiny_store.path, kind, 0.1) for kind in ("raw", "kfac", "ekfac"))
    for m, mr, mk, me in zip(modules, raw.modules, kron.modules, ekfac.modules):
        fisher = explicit_fisher(stored, m)
        np.testing.assert_allclose(C.dense_curvature("raw", mr), fisher, rtol=1e-7, atol=1e-12)
        s, a = kfac[m.name]
        np.testing.assert_allclose(C.dense_curvature("kfac", mk), np.kron(s, a), rtol=1e-5, atol=1e-9)
        basis = np.kron(me.q_s, me.q_a)
        np.testing.assert_allclose(np.diag(basis.T @ C.dense_curvature("ekfac", me) @ basis),
                                   np.diag(basis.T @ fisher @ basis), rtol=1e-6, atol=1e-12)
        # ... which plain KFAC's eigenvalues are not (else the refit would be checking nothing)
        assert not np.allclose(np.diag(basis.T @ C.dense_curvature("kfac", mk) @ basis),
                               np.diag(basis.T @ fisher @ basis), rtol=1e-3)


def _random_orthogonal(k: int, rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    return q


def test_ekfac_equals_raw_when_the_kronecker_eigenbasis_is_exact(tmp_path):
    """Rows ``Ĝ_n = c_n Q_S e_o e_iᵀ Q_Aᵀ`` (one Kronecker basis vector each, random scale ``c_n``) make
    ``F = (1/N) Σ_n c_n² u_{oi} u_{oi}ᵀ`` with ``u_{oi} = q_S,o ⊗ q_A,i``: diagonal in the Kronecker basis
    ``Q_S ⊗ Q_A``. If the factors S, A have eigenvectors Q_S, Q_A (distinct eigenvalues, so eigh recovers
    them up to sign and order), EKFAC's refitted eigenvalues ``Λ[o, i] = (1/N) Σ c_n² [(o, i) = (o_n, i_n)]``
    are exactly F's eigenvalues, so EKFAC = raw; plain KFAC (eigenvalues e_S e_Aᵀ) is not."""
    rng = np.random.default_rng(0)
    k_out, k_in = 3, 4
    q_s, q_a = _random_orthogonal(k_out, rng), _random_orthogonal(k_in, rng)
    s = q_s @ np.diag([3.0, 2.0, 1.0]) @ q_s.T
    a = q_a @ np.diag([4.0, 3.0, 2.0, 1.0]) @ q_a.T
    rows = []
    for n in range(3 * k_out * k_in):
        o, i = divmod(n % (k_out * k_in), k_in)
        g = rng.uniform(0.5, 2.0) * np.outer(q_s[:, o], q_a[:, i])
        rows.append(g.reshape(-1))
    rows = np.array(rows)
    modules = modules_layout([("m", k_out, k_in)])
    store = write_store(tmp_path / "store", rows, modules, kfac={"m": (s, a)})
    q = queries_for(store.dim)
    raw = C.fit(store.path, "raw", 0.1)
    ekfac = C.fit(store.path, "ekfac", 0.1)
    kfac = C.fit(store.path, "kfac", 0.1)
    np.testing.assert_allclose(ekfac.precondition64(q), raw.precondition64(q), rtol=1e-6, atol=1e-8)
    assert not np.allclose(kfac.precondition64(q), raw.precondition64(q), rtol=1e-3)
    # And the refitted eigenvalues are the diagonal of F in the Kronecker basis.
    fisher = explicit_fisher(store.matrix(), modules[0])
    m = ekfac.modules[0]
    basis = np.kron(m.q_s, m.q_a)
    np.testing.assert_allclose(np.diag(basis.T @ fisher @ basis), m.eigvals.reshape(-1), atol=1e-10)


def test_in_out_layout_modules_give_the_transposed_preconditioning(tmp_path, tiny_gradients):
    """A module stored as ``Ĝᵀ`` (``layout="in_out"``, HF Conv1D) must precondition like its ``Ĝ`` twin."""
    rows, modules, kfac = tiny_gradients
    m1, m2 = modules

    def transposed(block):
        return np.concatenate([block[:, m1.columns].reshape(-1, 4, 3).transpose(0, 2, 1).reshape(-1, 12),
                               block[:, m2.columns].reshape(-1, 2, 4).transpose(0, 2, 1).reshape(-1, 8)], axis=1)

    in_out = [ModuleSpec(m.name, m.k_out, m.k_in, m.offset, m.size, "in_out") for m in modules]
    store_t = write_store(tmp_path / "t", transposed(rows), in_out, kfac=kfac)
    store = write_store(tmp_path / "n", rows, modules, kfac=kfac)
    q = queries_for(store.dim)
    for kind in ("raw", "kfac", "ekfac"):
        plain = C.fit(store.path, kind, 0.02).precondition64(q)
        flipped = C.fit(store_t.path, kind, 0.02)
        np.testing.assert_allclose(flipped.precondition64(transposed(q)), transposed(plain), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(C.precondition_reference(flipped, transposed(q)), transposed(plain),
                                   rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(flipped.self_inner(transposed(q)), np.einsum("bd,bd->b", q, plain), rtol=1e-9)


@pytest.mark.parametrize("kind", C.CURVATURE_KINDS)
def test_self_inner_product_equals_g_dot_explicitly_preconditioned_g(tiny_store, kind):
    q = queries_for(tiny_store.dim, n=5).astype(np.float64)
    fitted = C.fit(tiny_store.path, kind, 0.03)
    expected = np.einsum("bd,bd->b", q, C.precondition_reference(fitted, q))
    np.testing.assert_allclose(fitted.self_inner(q), expected, rtol=1e-10)


def test_none_is_the_identity_and_needs_no_fit(tiny_store):
    q = queries_for(tiny_store.dim)
    np.testing.assert_array_equal(C.load_curvature(tiny_store, "none").precondition(q), q)


# ---------------------------------------------------------------------------------------------------------
# Damping


@pytest.mark.parametrize("spec, fraction", [("auto", C.AUTO_DAMPING_FRACTION), ("0.25x", 0.25), ("1E-3X", 1e-3)])
def test_relative_damping_is_that_fraction_of_each_modules_mean_eigenvalue(tiny_store, tiny_gradients, spec,
                                                                         fraction):
    _, modules, kfac = tiny_gradients
    stored = tiny_store.matrix()
    raw = C.fit(tiny_store.path, "raw", spec)
    kfac_fit = C.fit(tiny_store.path, "kfac", spec)
    ekfac = C.fit(tiny_store.path, "ekfac", spec)
    for m in modules:
        fisher = explicit_fisher(stored, m)
        assert raw.damping[m.name] == pytest.approx(fraction * np.trace(fisher) / m.size, rel=1e-10)
        s, a = kfac[m.name]
        assert kfac_fit.damping[m.name] == pytest.approx(fraction * np.trace(s) * np.trace(a) / m.size, rel=1e-10)
        # EKFAC's Λ has sum = tr(F) (an orthogonal basis change keeps the trace), so the same mean.
        assert ekfac.damping[m.name] == pytest.approx(fraction * np.trace(fisher) / m.size, rel=1e-10)
    meta = json.loads(tiny_store.load_tensor_metadata(C.curvature_file("raw"))["dataworth"])
    assert meta["damping"] == str(C.parse_damping(spec)) and meta["kind"] == "raw"
    assert meta["damping_values"] == pytest.approx(raw.damping)
    loaded = C.load_curvature(tiny_store, "raw")
    assert loaded.damping == pytest.approx(raw.damping)
    assert loaded.damping_spec == C.parse_damping(spec)


def test_auto_damping_of_an_all_zero_module_falls_back_to_one(tmp_path):
    rows = np.zeros((4, 6), dtype=np.float32)
    rows[:, :2] = 1.0
    store = write_store(tmp_path / "s", rows, modules_layout([("a", 1, 2), ("b", 2, 2)]))
    fitted = C.fit(store.path, "raw", "auto")
    assert fitted.damping == {"a": pytest.approx(C.AUTO_DAMPING_FRACTION * 1.0), "b": 1.0}


@given(st.one_of(st.floats(min_value=1e-300, max_value=1e300),
                 st.floats(min_value=1e-300, max_value=1e300).map(lambda f: f"{f!r}x"),
                 st.just("auto")))
def test_a_damping_spec_survives_its_own_text(spec):
    parsed = C.parse_damping(spec)
    assert C.parse_damping(str(parsed)) == parsed == C.parse_damping(parsed.to_json())


@pytest.mark.parametrize("bad", [0, -1.0, "0", "-3", "nan", "inf", "lots", "x", "0x", "-1e-3x", "nanx", "infx",
                                 "1e-3xx", "auto x"])
def test_damping_that_is_not_a_positive_number_is_an_input_error(tiny_store, bad):
    with pytest.raises(InputError, match="--damping"):
        C.fit(tiny_store.path, "raw", bad)


# ---------------------------------------------------------------------------------------------------------
# Missing or stale files


def test_missing_curvature_names_the_fit_command(tmp_path, tiny_gradients):
    rows, modules, _ = tiny_gradients
    store = write_store(tmp_path / "s", rows, modules)
    with pytest.raises(InputError, match="dataworth fit --store .* --curvature raw"):
        C.load_curvature(store, "raw")


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_curvature_without_kfac_factors_says_the_store_lacks_them(tmp_path, tiny_gradients, kind):
    rows, modules, _ = tiny_gradients
    store = write_store(tmp_path / "s", rows, modules)
    with pytest.raises(InputError, match="store lacks KFAC factors"):
        C.fit(store.path, kind)
    with pytest.raises(InputError, match="store lacks KFAC factors"):
        C.load_curvature(store, kind)


def test_curvature_fitted_on_other_rows_asks_for_a_refit(tmp_path, tiny_gradients):
    rows, modules, _ = tiny_gradients
    small = write_store(tmp_path / "small", rows[:10], modules)
    big = write_store(tmp_path / "big", rows, modules)
    C.fit(small.path, "raw")
    (big.path / "curvature").mkdir(exist_ok=True)
    (big.path / C.curvature_file("raw")).write_bytes((small.path / C.curvature_file("raw")).read_bytes())
    with pytest.raises(InputError, match="fitted on 10 rows but the store now has 24"):
        C.load_curvature(open_store(big.path), "raw")


def test_unknown_curvature_kind_is_an_input_error(tiny_store):
    with pytest.raises(InputError, match="--curvature: unknown curvature 'diag'"):
        C.fit(tiny_store.path, "diag")


# ---------------------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "0", "-1"])
def test_fit_cli_refuses_a_memory_budget_that_is_not_a_positive_number(tmp_path_factory, tiny_gradients, budget):
    """NaN / inf were a 'cannot convert float NaN to integer' traceback: one line naming the flag instead."""
    from dataworth.cli import cli

    rows, modules, kfac = tiny_gradients
    store = write_store(tmp_path_factory.mktemp("budget") / "s", rows, modules, kfac=kfac)
    result = CliRunner().invoke(cli, ["fit", "--store", str(store.path), "--curvature", "raw", "--memory-budget",
                                      budget])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip().splitlines() == [result.output.strip().splitlines()[-1]]
    assert result.output.startswith("error: --memory-budget: must be")
    assert not (store.path / "curvature" / "raw.safetensors").exists()


def test_fit_cli_saves_the_curvature_and_reports_damping(tmp_path, tiny_gradients):
    from dataworth.cli import cli

    rows, modules, kfac = tiny_gradients
    store = write_store(tmp_path / "s", rows, modules, kfac=kfac)
    result = CliRunner().invoke(cli, ["fit", "--store", str(store.path), "--curvature", "ekfac", "--damping", "0.5"])
    assert result.exit_code == 0, result.output
    assert "ekfac" in result.output and "saved:" in result.output
    assert C.load_curvature(store, "ekfac").damping == {"l1": 0.5, "l2": 0.5}
    bad = CliRunner().invoke(cli, ["fit", "--store", str(store.path), "--damping", "-1"])
    assert bad.exit_code == 2 and "error: --damping" in bad.output
    helped = CliRunner().invoke(cli, ["fit", "--help"])
    assert "dataworth fit --store" in helped.output
