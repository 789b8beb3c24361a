"""Influence scoring against explicit formulas: dense products, argsort top-k, finite-difference sign.

Stores are built directly with ``StoreWriter`` from synthetic rows or exact per-example gradients, so every
expected number is a plain numpy expression over the same rows.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import write_test_store
from hypothesis import given, settings
from hypothesis import strategies as st

from dataworth.errors import InputError
from dataworth.influence import curvature as C
from dataworth.influence import score as SC
from dataworth.influence import scores as S
from dataworth.store.format import modules_layout

HEADER = {"projection": {"kind": "identity"}, "model": {"fingerprint": "fp-store"},
          "data": {}, "config": {"model": "tiny-model-dir"}}
MODULES = modules_layout([("a", 3, 4), ("b", 2, 3)])  # D = 12 + 6 = 18


def write_store(path, rows, modules=MODULES, *, shard_rows=7, dtype="float32"):
    return write_test_store(path, rows, modules, HEADER, shard_rows=shard_rows, dtype=dtype)


def dense_inverse(store, curvature) -> np.ndarray:
    """Block-diagonal ``(F + λI)⁻¹`` ``[D, D]`` with ``F_m = (1/N) Σ g gᵀ`` explicit (raw) or 0 (none)."""
    rows = store.matrix().astype(np.float64)
    inv = np.eye(store.dim)
    if curvature.kind == "none":
        return inv
    for m in store.modules:
        g = rows[:, m.columns]
        block = g.T @ g / len(g) + curvature.damping[m.name] * np.eye(m.size)
        inv[m.columns, m.columns] = np.linalg.inv(block)
    return inv


@pytest.fixture(scope="module")
def random_store(tmp_path_factory):
    rows = np.random.default_rng(0).normal(size=(40, 18)).astype(np.float32)
    rows[5] = 0.0  # a zero gradient row: cosine and relative must give 0, not NaN
    store = write_store(tmp_path_factory.mktemp("scores") / "store", rows)
    C.fit(store.path, "raw", 0.3)
    return store


def queries(n=4, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 18)).astype(np.float32)


def qids(n):
    return [f"q{i}" for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Modes against explicit formulas


def test_dot_equals_query_times_explicit_inverse_times_rows(random_store):
    curv = C.load_curvature(random_store, "raw")
    q = queries()
    result = S.score_rows(random_store, q, qids(4), curv, "dot", top_k=3, full=True, block_rows=9)
    expected = q.astype(np.float64) @ dense_inverse(random_store, curv) @ random_store.matrix().T.astype(np.float64)
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-4, atol=1e-5)


def test_cosine_is_between_preconditioned_query_and_raw_row_and_in_unit_interval(random_store):
    curv = C.load_curvature(random_store, "raw")
    q = queries()
    result = S.score_rows(random_store, q, qids(4), curv, "cosine", top_k=3, full=True, block_rows=9)
    p = q.astype(np.float64) @ dense_inverse(random_store, curv)  # F + λI is symmetric
    g = random_store.matrix().astype(np.float64)
    norms = np.outer(np.linalg.norm(p, axis=1), np.linalg.norm(g, axis=1))
    expected = np.divide(p @ g.T, norms, out=np.zeros_like(norms), where=norms > 0)
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.abs(result.matrix) <= 1 + 1e-6)
    assert np.all(result.matrix[:, 5] == 0)


def test_relative_is_dot_over_self_influence(random_store):
    curv = C.load_curvature(random_store, "raw")
    q = queries()
    inv = dense_inverse(random_store, curv)
    g = random_store.matrix().astype(np.float64)
    self_inf = np.einsum("nd,de,ne->n", g, inv, g)
    np.testing.assert_allclose(S.self_influence(random_store, curv, block_rows=6), self_inf, rtol=1e-10)
    result = S.score_rows(random_store, q, qids(4), curv, "relative", top_k=3, full=True, block_rows=9,
                          with_self_influence=True)
    dots = q.astype(np.float64) @ inv @ g.T
    expected = np.divide(dots, self_inf, out=np.zeros_like(dots), where=self_inf > 0)
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.self_influence["self_influence"], self_inf, rtol=1e-10)
    assert list(result.self_influence["train_id"]) == [f"row{i}" for i in range(40)]


def test_sign_positive_score_means_upweighting_lowers_the_query_loss(tmp_path):
    """Finite-difference truth for the documented sign: up-weighting example n by ε moves the parameters by
    ``−ε (F + λI)⁻¹ ∇L_n`` (a damped Newton step on ``ε L_n``), and the query loss changes by ≈ ``−ε s(q, n)``."""
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(10, 5, 4, dtype=torch.float64)  # 10 examples × 5 tokens
    y = torch.randn(10, 5, 3, dtype=torch.float64)
    xq, yq = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)

    def loss(weight, xi, yi):  # summed over tokens
        return 0.5 * ((xi @ weight.T - yi) ** 2).sum()

    rows = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, y).reshape(10, -1).numpy()
    store = write_store(tmp_path / "s", rows, modules_layout([("w", 3, 4)]), shard_rows=4)
    curv = C.fit(store.path, "raw", 0.5)
    g_q = torch.func.grad(loss)(w, xq, yq).reshape(1, -1).numpy()
    result = S.score_rows(store, g_q, ["q"], curv, "dot", top_k=10, full=True)
    eps = 1e-6
    for n in range(10):
        step = curv.precondition64(rows[n : n + 1].astype(np.float64)).reshape(3, 4)
        moved = w - eps * torch.from_numpy(step)
        change = (loss(moved, xq, yq) - loss(w, xq, yq)).item()
        assert -change / eps == pytest.approx(float(result.matrix[0, n]), rel=1e-3, abs=1e-6)
    helpful = result.top_k("q", "positive").iloc[0]
    assert helpful["score"] == result.matrix[0].max() and helpful["train_row"] == int(np.argmax(result.matrix[0]))


# ---------------------------------------------------------------------------------------------------------
# Streaming and top-k


@pytest.mark.parametrize("block_rows", [1, 4, 7, 13, 1000])
def test_streaming_over_small_shards_and_odd_blocks_equals_one_shot_product(tmp_path_factory, block_rows):
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(50, 18)).astype(np.float32)
    store = write_store(tmp_path_factory.mktemp("odd") / "s", rows, shard_rows=3)
    curv = C.fit(store.path, "raw", "auto")
    q = queries(5)
    one_shot = curv.precondition(q).astype(np.float64) @ rows.T.astype(np.float64)
    result = S.score_rows(store, q, qids(5), curv, "dot", top_k=6, full=True, block_rows=block_rows)
    np.testing.assert_allclose(result.matrix, one_shot, rtol=1e-5, atol=1e-6)
    for d, descending in (("positive", True), ("negative", False)):
        ref_rows, _ = S.top_k_reference(one_shot, 6, descending)
        got = result.top_k(direction=d)
        np.testing.assert_array_equal(got["train_row"].to_numpy().reshape(5, 6), ref_rows)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_store_scores_equal_the_formula_on_its_widened_rows_across_pieces(tmp_path, dtype):
    """Rows stored in 16 bits are widened 256 at a time inside the product (``SUB_BLOCK_ROWS``): with 600 rows in
    shards of 400 and blocks of 350 (blocks [0, 350), [350, 400), [400, 600)), a block holds two pieces. Every mode must equal the explicit formula
    on the exactly widened rows (``store.matrix()``), and asking for self-influence must not change a score."""
    rng = np.random.default_rng(7)
    store = write_store(tmp_path / "s", rng.normal(size=(600, 18)).astype(np.float32), shard_rows=400, dtype=dtype)
    assert S.SUB_BLOCK_ROWS < 350 and store.dtype == dtype
    curv = C.fit(store.path, "raw", 0.3)
    q = queries(3)
    inv = dense_inverse(store, curv)
    g = store.matrix().astype(np.float64)  # exact widening: every 16-bit value is a float32
    p = q.astype(np.float64) @ inv
    dots = p @ g.T
    norms = np.outer(np.linalg.norm(p, axis=1), np.linalg.norm(g, axis=1))
    self_inf = np.einsum("nd,de,ne->n", g, inv, g)
    expected = {"dot": dots, "cosine": dots / norms, "relative": dots / self_inf}
    for mode, want in expected.items():
        got = S.score_rows(store, q, qids(3), curv, mode, top_k=5, full=True, block_rows=350)
        np.testing.assert_allclose(got.matrix, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        again = S.score_rows(store, q, qids(3), curv, mode, top_k=5, full=True, block_rows=350,
                             with_self_influence=True)
        np.testing.assert_array_equal(again.matrix, got.matrix)


def test_streaming_top_k_equals_argsort_of_the_full_matrix_with_ties(tmp_path):
    """Integer rows drawn from a few values → many exactly tied scores; ranks must follow row order."""
    rng = np.random.default_rng(3)
    rows = rng.integers(-1, 2, size=(31, 18)).astype(np.float32)
    rows[10] = rows[3]
    rows[20] = rows[3]  # exact duplicates: identical scores for every query
    store = write_store(tmp_path / "s", rows, shard_rows=5)
    curv = C.load_curvature(store, "none")
    q = rng.integers(-1, 2, size=(6, 18)).astype(np.float32)
    exact = q.astype(np.int64) @ rows.T.astype(np.int64)
    for k in (1, 3, 10, 31):
        for block_rows in (1, 4, 31):
            result = S.score_rows(store, q, qids(6), curv, "dot", top_k=k, block_rows=block_rows)
            for d, descending in (("positive", True), ("negative", False)):
                ref_rows, ref_vals = S.top_k_reference(exact, k, descending)
                got = result.top_k(direction=d)
                np.testing.assert_array_equal(got["train_row"].to_numpy().reshape(6, k), ref_rows)
                np.testing.assert_array_equal(got["score"].to_numpy().reshape(6, k), ref_vals)
                assert list(got["rank"]) == list(range(1, k + 1)) * 6
                assert list(got["train_id"]) == [f"row{r}" for r in ref_rows.reshape(-1)]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n_queries=st.integers(1, 3),
    n_rows=st.integers(1, 25),
)
def test_streaming_top_k_merge_matches_stable_argsort(data, n_queries, n_rows):
    values = np.array(
        data.draw(st.lists(st.lists(st.integers(-3, 3), min_size=n_rows, max_size=n_rows),
                           min_size=n_queries, max_size=n_queries)),
        dtype=np.float32,
    )
    k = data.draw(st.integers(1, n_rows))
    block = data.draw(st.integers(1, n_rows))
    for descending in (True, False):
        state = S.StreamingTopK(n_queries, k, descending)
        for start in range(0, n_rows, block):
            state.update(values[:, start : start + block], start)
        ref_rows, ref_vals = S.top_k_reference(values, k, descending)
        np.testing.assert_array_equal(state.rows, ref_rows)
        np.testing.assert_array_equal(state.values, ref_vals)


def test_top_k_larger_than_the_store_is_clamped_and_says_so(random_store):
    curv = C.load_curvature(random_store, "none")
    result = S.score_rows(random_store, queries(2), qids(2), curv, "dot", top_k=100)
    assert result.summary["clamped"] is True
    assert result.summary["top_k"] == 40 and result.summary["top_k_requested"] == 100
    assert result.summary["notes"] == ["--top-k 100 is larger than the store (40 rows): clamped to 40"]
    assert len(result.top_k("q1", "negative")) == 40
    assert sorted(result.top_k("q1")["train_row"]) == list(range(40))


@pytest.mark.parametrize("top_k", [0, -2])
def test_top_k_below_one_is_an_input_error(random_store, top_k):
    with pytest.raises(InputError, match="--top-k"):
        S.score_rows(random_store, queries(1), ["q"], C.load_curvature(random_store, "none"), top_k=top_k)


def test_bad_query_input_is_an_input_error(random_store):
    curv = C.load_curvature(random_store, "none")
    with pytest.raises(InputError, match="duplicate query id 'q'"):
        S.score_rows(random_store, queries(2), ["q", "q"], curv)
    with pytest.raises(InputError, match="18 columns"):
        S.score_rows(random_store, np.zeros((1, 5), np.float32), ["q"], curv)
    with pytest.raises(InputError, match="--mode"):
        S.score_rows(random_store, queries(1), ["q"], curv, mode="l2")


# ---------------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_and_load_round_trip_with_full_matrix_written_block_by_block(random_store, tmp_path):
    curv = C.load_curvature(random_store, "raw")
    q = queries(3)
    in_memory = S.score_rows(random_store, q, qids(3), curv, "dot", top_k=4, full=True, block_rows=6)
    on_disk = S.score_rows(random_store, q, qids(3), curv, "dot", top_k=4, full=True, block_rows=6,
                           with_self_influence=True, out_dir=tmp_path / "out")
    assert isinstance(on_disk.matrix, np.memmap)
    np.testing.assert_array_equal(np.asarray(on_disk.matrix), in_memory.matrix)
    on_disk.save(tmp_path / "out")
    loaded = S.load_scores(tmp_path / "out")
    pd.testing.assert_frame_equal(loaded.to_pandas(), in_memory.to_pandas())
    np.testing.assert_array_equal(np.asarray(loaded.matrix), in_memory.matrix)
    assert loaded.query_ids == qids(3)
    assert loaded.summary["damping_values"] == {"a": 0.3, "b": 0.3}
    assert loaded.summary["curvature"] == "raw" and loaded.summary["n_rows"] == 40
    assert list(loaded.self_influence.columns) == ["train_row", "train_id", "self_influence"]
    jsonl = pd.read_json(tmp_path / "out" / "topk.jsonl", lines=True, dtype={"query_id": str, "train_id": str})
    assert list(jsonl.columns) == S.TOPK_COLUMNS
    np.testing.assert_allclose(jsonl["score"], in_memory.to_pandas()["score"], rtol=1e-6)
    assert not list((tmp_path / "out").glob("*.tmp-*"))


def test_load_scores_of_a_missing_or_old_format_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no summary.json"):
        S.load_scores(tmp_path / "nowhere")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"format": S.SCORES_FORMAT, "version": 0}))
    with pytest.raises(InputError, match="field 'version' is 0"):
        S.load_scores(tmp_path / "old")


def test_top_k_accessor_validates_query_and_direction(random_store):
    result = S.score_rows(random_store, queries(2), qids(2), C.load_curvature(random_store, "none"), top_k=2)
    assert list(result.top_k()["query_id"]) == ["q0", "q0", "q1", "q1"]
    with pytest.raises(InputError, match="'zz' is not one of the 2 scored queries"):
        result.top_k("zz")
    with pytest.raises(InputError, match="direction"):
        result.top_k("q0", "sideways")


# ---------------------------------------------------------------------------------------------------------
# dw.score and the CLI (model loading and query gradients replaced by fakes: their own tests live elsewhere)


@pytest.fixture
def fake_model(monkeypatch):
    """Replace model loading and query-gradient extraction: query ``i`` gets the fixed row ``queries()[i]``."""
    import dataworth.influence.score

    seen = {}

    def load_model(spec, device="auto", **_):
        seen["spec"] = spec
        return types.SimpleNamespace(model=None, tokenizer=None, fingerprint=seen.get("fingerprint", "fp-store"),
                                     spec=str(spec), device=device)

    def query_gradients(store, model, tokenizer, rows):
        return queries(len(rows))

    monkeypatch.setattr(dataworth.influence.score, "load_model", load_model)
    monkeypatch.setattr(dataworth.influence.score, "query_gradients", query_gradients)
    return seen


def write_queries(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QUERY_ROWS = [{"id": "alice", "prompt": "Where was Alice born?", "response": "Paris"},
              {"id": "bob", "prompt": "What did Bob study?", "response": "physics"}]


def test_score_entry_point_scores_query_rows_with_the_stores_model(random_store, fake_model, tmp_path):
    qfile = write_queries(tmp_path / "q.jsonl", QUERY_ROWS)
    result = SC.score(random_store.path, qfile, mode="dot", curvature="raw", top_k=5, full=True,
                     self_influence=True, out=tmp_path / "out")
    assert fake_model["spec"] == "tiny-model-dir"  # manifest["config"]["model"]
    direct = S.score_rows(random_store, queries(2), ["alice", "bob"], C.load_curvature(random_store, "raw"),
                          "dot", 5, True)
    pd.testing.assert_frame_equal(result.to_pandas(), direct.to_pandas())
    for name in ("topk.parquet", "topk.jsonl", "scores.npy", "summary.json", "self_influence.parquet"):
        assert (tmp_path / "out" / name).is_file(), name
    assert S.load_scores(tmp_path / "out").summary["model"]["fingerprint"] == "fp-store"


def test_score_with_a_model_of_another_fingerprint_names_both(random_store, fake_model, tmp_path):
    fake_model["fingerprint"] = "fp-other"
    qfile = write_queries(tmp_path / "q.jsonl", QUERY_ROWS)
    with pytest.raises(InputError, match="fp-other.*fp-store"):
        SC.score(random_store.path, qfile, curvature="none")


def test_query_rows_generated_by_another_model_name_both_fingerprints(random_store, fake_model, tmp_path):
    rows = [QUERY_ROWS[0], {**QUERY_ROWS[1], "model": {"fingerprint": "fp-generator"}}]
    qfile = write_queries(tmp_path / "q.jsonl", rows)
    with pytest.raises(InputError, match=r"q.jsonl:2 field 'model'.*fp-generator.*fp-store.*--allow-other-query-model"):
        SC.score(random_store.path, qfile, curvature="none")
    allowed = SC.score(random_store.path, qfile, curvature="none", allow_other_query_model=True)  # a checkpoint
    direct = S.score_rows(random_store, queries(2), ["alice", "bob"], C.load_curvature(random_store, "none"))
    pd.testing.assert_frame_equal(allowed.to_pandas(), direct.to_pandas())
    assert any("fp-generator" in n and "--allow-other-query-model" in n for n in allowed.summary["notes"])


def test_empty_query_file_is_an_input_error(random_store, fake_model, tmp_path):
    qfile = tmp_path / "empty.jsonl"
    qfile.write_text("")
    with pytest.raises(InputError):
        SC.score(random_store.path, qfile, curvature="none")


def test_score_without_a_fitted_curvature_names_the_fit_command(random_store, fake_model, tmp_path):
    qfile = write_queries(tmp_path / "q.jsonl", QUERY_ROWS)
    with pytest.raises(InputError, match="dataworth fit --store .* --curvature ekfac|store lacks KFAC"):
        SC.score(random_store.path, qfile, curvature="ekfac")


@pytest.mark.parametrize("budget", ["nan", "inf", "0", "-2"])
def test_score_cli_refuses_a_memory_budget_that_is_not_a_positive_number(random_store, fake_model, tmp_path, budget):
    from dataworth.cli import cli

    qfile = write_queries(tmp_path / "q.jsonl", QUERY_ROWS)
    result = CliRunner().invoke(cli, ["score", "--store", str(random_store.path), "--queries", str(qfile), "--out",
                                      str(tmp_path / "out"), "--curvature", "raw", "--memory-budget", budget])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("error: --memory-budget: must be") and len(result.output.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="--memory-budget: must be"):
        S.score_budget(float(budget), random_store, 2, 3, "dot", False)


def test_score_cli_prints_top_rows_clamp_note_and_files(random_store, fake_model, tmp_path):
    from dataworth.cli import cli

    qfile = write_queries(tmp_path / "q.jsonl", QUERY_ROWS)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["score", "--store", str(random_store.path), "--queries", str(qfile),
                                      "--out", str(out), "--mode", "cosine", "--curvature", "raw", "--top-k", "99",
                                      "--full", "--self", "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert "clamped to 40" in result.output
    assert "alice" in result.output and "topk.parquet" in result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["mode"] == "cosine" and summary["clamped"] is True and summary["top_k"] == 40
    assert np.load(out / "scores.npy").shape == (2, 40)
    bad = CliRunner().invoke(cli, ["score", "--store", str(random_store.path), "--queries", str(qfile),
                                   "--out", str(out), "--curvature", "kfac"])
    assert bad.exit_code == 2 and bad.output.startswith("error: ")
    assert "dataworth score --store" in CliRunner().invoke(cli, ["score", "--help"]).output


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(list("\n\r\t\u202e\u2067\x1b")),
                        min_size=1, max_size=12), min_size=2, max_size=4, unique=True))
def test_score_terminal_table_escapes_newlines_and_bidi_controls_in_ids(ids):
    """An id holding "\\n" or "\\r" must not start or overwrite a line of the printed table, and U+202E must
    not reorder it: one line per shown row plus the header, nothing invisible left."""
    import unicodedata

    from dataworth.cli.score import format_top

    table = pd.DataFrame({"query_id": [ids[0], ids[0]], "direction": ["positive", "negative"], "rank": [1, 1],
                          "train_id": [ids[1], ids[-1]], "train_row": [0, 1], "score": [1.0, -1.0]})
    result = types.SimpleNamespace(query_ids=[ids[0]], to_pandas=lambda: table)
    printed = format_top(result, show=1, show_queries=1)
    assert len(printed.split("\n")) == 3 and "\r" not in printed and "\t" not in printed
    assert not [c for c in printed if unicodedata.category(c) in ("Cc", "Cf") and c != "\n"]


# ---------------------------------------------------------------------------------------------------------
# End to end with a real (tiny) model: extract → fit → score


def test_score_end_to_end_equals_autograd_gradient_dot_products(tmp_path, tiny_tokenizer):
    """A tiny Llama saved to disk, a store of exact gradients (identity projection) of one module, and a
    prompt/response query: with curvature ``none``, ``s(q, n) = ⟨∇_W L_q, ∇_W L_n⟩`` where ``L_q`` is the
    response's summed loss given the prompt (the appended end token is not measured for queries) — computed
    here with plain autograd, one example at a time."""
    from dataclasses import replace

    from conftest import CORPUS, build_llama

    from dataworth.data.batching import collate, example_losses
    from dataworth.data.encode import encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.gradients.extract import ExtractConfig, extract

    model = build_llama(len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    train = write_queries(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(CORPUS[:6])])
    qfile = write_queries(tmp_path / "q.jsonl", [{"id": "alice", "prompt": "Alice Smith was born in",
                                                   "response": " Paris"}])
    module = "model.layers.1.mlp.down_proj"
    extract(ExtractConfig(model=str(tmp_path / "model"), data=str(train), out=str(tmp_path / "store"),
                          modules=module.replace(".", r"\."), projection="identity", dtype="float32",
                          shard_rows=4, device="cpu"), progress=False)
    result = SC.score(tmp_path / "store", qfile, mode="dot", curvature="none", top_k=6, full=True, device="cpu")

    weight = dict(model.named_modules())[module].weight

    def grad_of(spec, query=False):
        encoded, _ = encode_rows(load_rows(str(spec)), tiny_tokenizer)
        if query:  # response tokens only: drop the eos that encoding appends
            encoded = [replace(e, loss_mask=e.loss_mask[:-1] + [0]) for e in encoded]
        grads = []
        for enc in encoded:
            batch = collate([enc], [0], tiny_tokenizer.pad_token_id)
            loss = example_losses(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                  batch)[0]
            grads.append(torch.autograd.grad(loss, weight)[0].reshape(-1).double().numpy())
        return np.array(grads)

    expected = grad_of(qfile, query=True) @ grad_of(train).T
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())
    assert result.top_k("alice")["train_row"].tolist() == list(np.argsort(-expected[0], kind="stable"))


# ---------------------------------------------------------------------------------------------------------
# Streaming without a store (score --no-store)


@pytest.fixture(scope="module")
def stream_world(tmp_path_factory):
    """A tiny Llama on disk, 10 distinct training rows (no exact ties), 3 prompt/response queries."""
    from conftest import CORPUS, build_llama, build_tokenizer

    root = tmp_path_factory.mktemp("stream")
    tokenizer = build_tokenizer()
    build_llama(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    train = write_queries(root / "train.jsonl", [{"id": f"t{i}", "text": f"{t} Row {i}."}
                                                          for i, t in enumerate(CORPUS[:10])])
    qfile = write_queries(root / "q.jsonl", [
        {"id": "alice", "prompt": "Alice Smith was born in", "response": " Paris"},
        {"id": "bob", "prompt": "Bob Jones studied", "response": " physics at Oxford"},
        {"id": "sum", "prompt": "What is 2 plus 3?", "response": " It is 5."}])
    return root, train, qfile


@pytest.mark.parametrize("mode", ["dot", "cosine"])
def test_score_stream_equals_extract_then_score_with_no_curvature(stream_world, mode):
    """Same seed / ranks / modules: the streamed top-k (ids, order) and scores equal a float32 store's
    `score(curvature="none")`, and the streamed full matrix equals the store's."""
    from dataworth.gradients.extract import ExtractConfig, extract

    root, train, qfile = stream_world
    settings_ = dict(modules=r"model\.layers\.1\..*", projection="random", rank_in=4, rank_out=3, seed=5)
    store_dir = root / "store"
    if not store_dir.exists():
        extract(ExtractConfig(model=str(root / "model"), data=str(train), out=str(store_dir), dtype="float32",
                              shard_rows=4, batch_size=3, device="cpu", **settings_), progress=False)
    stored = SC.score(store_dir, qfile, mode=mode, curvature="none", top_k=4, full=True, device="cpu")
    streamed = SC.score_stream(str(root / "model"), train, qfile, mode=mode, top_k=4, batch_size=3, full=True,
                              device="cpu", **settings_)
    assert streamed.summary["dim"] == stored.summary["dim"] and streamed.summary["n_rows"] == 10
    np.testing.assert_allclose(streamed.matrix, stored.matrix, rtol=1e-4,
                               atol=1e-5 * np.abs(stored.matrix).max())
    a, b = streamed.to_pandas(), stored.to_pandas()
    columns = ["query_id", "direction", "rank", "train_id", "train_row"]
    pd.testing.assert_frame_equal(a[columns], b[columns])
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-4, atol=1e-5 * np.abs(b["score"]).max())


def test_score_stream_cli_saves_scores_and_refuses_contradictory_flags(stream_world, tmp_path):
    from dataworth.cli import cli

    root, train, qfile = stream_world
    out = tmp_path / "out"
    args = ["score", "--no-store", "--model", str(root / "model"), "--data", str(train), "--queries", str(qfile),
            "--out", str(out), "--modules", r"model\.layers\.1\.mlp\..*", "--rank", "2", "--top-k", "3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    loaded = S.load_scores(out)
    assert loaded.summary["streaming"] is True and loaded.summary["n_rows"] == 10
    assert len(loaded.top_k("alice")) == 3
    direct = SC.score_stream(str(root / "model"), train, qfile, modules=r"model\.layers\.1\.mlp\..*", rank_in=2,
                            rank_out=2, top_k=3, device="cpu")
    pd.testing.assert_frame_equal(loaded.to_pandas(), direct.to_pandas())
    for bad, message in [(args[:3] + args[5:], "--no-store needs --data"),
                         (args + ["--curvature", "ekfac"], "--curvature ekfac"),
                         (args + ["--store", str(tmp_path)], "--store"),
                         (["score", "--queries", str(qfile), "--out", str(out)], "--store is required")]:
        refused = CliRunner().invoke(cli, bad)
        assert refused.exit_code == 2, refused.output
        assert message in refused.output and len(refused.output.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# A scores directory describes exactly one run (issue 16): no stale files, every file checked


def score_cli(store, qfile, out, *extra):
    from dataworth.cli import cli

    return CliRunner().invoke(cli, ["score", "--store", str(store), "--queries", str(qfile), "--out", str(out),
                                    *extra])


def value_cli(scores_dir, *extra):
    from dataworth.cli import cli

    return CliRunner().invoke(cli, ["value", "--scores", str(scores_dir), *extra])


def assert_one_line_error(result, *needles):
    """Exit 2 with one ``error:`` line holding every needle (a ``note:`` line may come before it), no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], result.output


def test_a_rerun_without_full_leaves_no_matrix_or_self_influence_of_the_earlier_run(random_store, fake_model,
                                                                                   tmp_path):
    """Issue 16's reproduction: ``score --full --self`` then ``score`` (no ``--full``) into the same ``--out``:
    ``value`` must use the second run's top-k entries, not the first run's matrix."""
    out = tmp_path / "out"
    first = score_cli(random_store.path, write_queries(tmp_path / "a.jsonl", QUERY_ROWS), out, "--curvature", "raw",
                      "--full", "--self")
    assert first.exit_code == 0, first.output
    assert (out / "scores.npy").is_file() and (out / "self_influence.parquet").is_file()
    second = score_cli(random_store.path, write_queries(tmp_path / "b.jsonl", QUERY_ROWS[:1]), out,
                       "--curvature", "raw")
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in out.iterdir()) == ["queries.parquet", "summary.json", "topk.jsonl", "topk.parquet"]
    loaded = S.load_scores(out)
    assert loaded.matrix is None and loaded.self_influence is None and loaded.query_ids == ["alice"]
    result = value_cli(out)
    assert result.exit_code == 0, result.output
    assert "top-k entries only" in result.output and "over 1 queries" in result.output
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name or ".old-" in p.name]


def test_a_file_of_another_run_is_refused_naming_it(random_store, fake_model, tmp_path):
    for name, rows in (("a", QUERY_ROWS), ("b", QUERY_ROWS[:1])):
        qfile = write_queries(tmp_path / f"{name}.jsonl", rows)
        assert score_cli(random_store.path, qfile, tmp_path / name, "--curvature", "raw", "--full",
                         "--self").exit_code == 0
    a, b = tmp_path / "a", tmp_path / "b"
    for name in ("topk.parquet", "scores.npy", "self_influence.parquet", "queries.parquet"):
        original = (b / name).read_bytes()
        (b / name).write_bytes((a / name).read_bytes())
        assert_one_line_error(value_cli(b), str(b / name))
        (b / name).write_bytes(original)
    assert value_cli(b).exit_code == 0


def test_a_parquet_file_carrying_another_run_id_is_refused_even_with_a_matching_checksum(random_store, tmp_path):
    curv = C.load_curvature(random_store, "none")
    S.score_rows(random_store, queries(2), qids(2), curv, top_k=2).save(tmp_path / "a")
    S.score_rows(random_store, queries(2), qids(2), curv, top_k=2).save(tmp_path / "b")
    summary = json.loads((tmp_path / "b/summary.json").read_text())
    (tmp_path / "b/topk.parquet").write_bytes((tmp_path / "a/topk.parquet").read_bytes())
    summary["checksums"]["topk.parquet"] = json.loads((tmp_path / "a/summary.json").read_text())["checksums"][
        "topk.parquet"]
    (tmp_path / "b/summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match=r"topk.parquet: belongs to run \w+, but .* describes run"):
        S.load_scores(tmp_path / "b")


def test_a_truncated_topk_parquet_is_a_one_line_error_not_a_pyarrow_traceback(random_store, fake_model, tmp_path):
    out = tmp_path / "out"
    assert score_cli(random_store.path, write_queries(tmp_path / "q.jsonl", QUERY_ROWS), out,
                     "--curvature", "none").exit_code == 0
    topk = out / "topk.parquet"
    topk.write_bytes(topk.read_bytes()[:-40])
    assert_one_line_error(value_cli(out), "topk.parquet", "truncated")
    # A directory written before checksums existed: pyarrow's own error, still one line naming the file.
    summary = json.loads((out / "summary.json").read_text())
    for key in ("run_id", "checksums"):
        del summary[key]
    (out / "summary.json").write_text(json.dumps(summary))
    assert_one_line_error(value_cli(out), "topk.parquet: not a readable parquet file")


def test_scores_written_before_run_ids_are_read_with_a_note_and_only_their_listed_files(random_store, tmp_path,
                                                                                       capsys):
    curv = C.load_curvature(random_store, "none")
    out = tmp_path / "old"
    S.score_rows(random_store, queries(2), qids(2), curv, top_k=2, full=True).save(out)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("run_id", "checksums"):
        del summary[key]
    summary["files"].pop("matrix")  # an older run's matrix left behind: not listed, so not read
    (out / "summary.json").write_text(json.dumps(summary))
    loaded = S.load_scores(out)
    assert loaded.matrix is None and loaded.query_ids == qids(2)
    err = capsys.readouterr().err
    assert "older dataworth" in err and "scores.npy: not listed" in err


def test_score_out_refuses_a_directory_holding_a_users_file_and_leaves_it(random_store, fake_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = score_cli(random_store.path, write_queries(tmp_path / "q.jsonl", QUERY_ROWS), out, "--curvature", "none")
    assert_one_line_error(result, "notes.txt", "choose an empty or new one")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


@settings(max_examples=12, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 6), st.booleans(), st.booleans(), st.booleans()),
                     min_size=1, max_size=4))
def test_after_any_sequence_of_runs_into_one_directory_it_describes_the_last_run(random_store, runs):
    """Runs ``(queries, top_k, full, self, matrix streamed to disk)`` saved into one directory: afterwards it
    holds exactly the last run's files, each of its run, and loads to the last run's results."""
    import tempfile
    from pathlib import Path

    curv = C.load_curvature(random_store, "none")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        for n, k, full, self_, streamed in runs:
            result = S.score_rows(random_store, queries(n, seed=n + k), qids(n), curv, top_k=k, full=full,
                                  with_self_influence=self_, out_dir=out if streamed and full else None)
            result.save(out)
        loaded = S.load_scores(out)
        n, k, full, self_, _ = runs[-1]
        expected = {"queries.parquet", "summary.json", "topk.jsonl", "topk.parquet"}
        expected |= {"scores.npy"} if full else set()
        expected |= {"self_influence.parquet"} if self_ else set()
        assert {p.name for p in out.iterdir()} == expected
        assert set(loaded.summary["files"].values()) | {"summary.json"} == expected
        assert loaded.query_ids == qids(n) and loaded.summary["top_k"] == min(k, random_store.rows)
        pd.testing.assert_frame_equal(loaded.to_pandas(), result.to_pandas())
        assert (loaded.matrix is not None) == full and (loaded.self_influence is not None) == self_
        if full:
            np.testing.assert_array_equal(np.asarray(loaded.matrix), np.asarray(result.matrix))
        assert [p.name for p in Path(tmp).iterdir()] == ["out"]  # no staging or old directory left


# ---------------------------------------------------------------------------------------------------------
# Curvature checksums and the default curvature (issue 16)


@pytest.fixture
def kfac_store(tmp_path):
    """A store of the 18-column layout with KFAC factors, so every curvature kind can be fitted."""
    rng = np.random.default_rng(4)

    def spd(k):
        m = rng.normal(size=(k, k))
        return m @ m.T + k * np.eye(k)

    return write_test_store(tmp_path / "kstore", rng.normal(size=(30, 18)).astype(np.float32), MODULES, HEADER,
                            shard_rows=7, kfac={"a": (spd(3), spd(4)), "b": (spd(2), spd(3))})


def test_a_flipped_byte_in_ekfac_is_refused_by_score_naming_the_file(kfac_store, fake_model, tmp_path):
    C.fit(kfac_store.path, "ekfac")
    target = kfac_store.path / "curvature/ekfac.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10  # an eigenvalue's byte: before the fix, 10 of 100 top-k entries changed with exit 0
    target.write_bytes(bytes(data))
    result = score_cli(kfac_store.path, write_queries(tmp_path / "q.jsonl", QUERY_ROWS), tmp_path / "out",
                       "--curvature", "ekfac")
    assert_one_line_error(result, "checksum error in curvature/ekfac.safetensors")
    assert not (tmp_path / "out").exists()


def test_score_without_curvature_uses_the_only_fitted_one_and_says_so(kfac_store, fake_model, tmp_path):
    qfile = write_queries(tmp_path / "q.jsonl", QUERY_ROWS)
    C.fit(kfac_store.path, "raw", 0.3)
    result = score_cli(kfac_store.path, qfile, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "using raw, the only curvature fitted" in result.stderr
    assert S.load_scores(tmp_path / "out").summary["curvature"] == "raw"
    assert SC.score(kfac_store.path, qfile).summary["curvature"] == "raw"  # the Python API chooses alike

    C.fit(kfac_store.path, "kfac")
    assert_one_line_error(score_cli(kfac_store.path, qfile, tmp_path / "out"), "raw, kfac", "--curvature")
    C.fit(kfac_store.path, "ekfac")
    assert SC.score(kfac_store.path, qfile).summary["curvature"] == "ekfac"  # the default, once it is fitted
