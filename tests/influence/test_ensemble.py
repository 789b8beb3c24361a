"""Checkpoint ensembles (`dataworth combine`): the weighted mean of full score matrices, against numpy.

Each "checkpoint" is a store of its own rows over the same ids; its run is scored with an explicit raw
curvature, so the expected ensemble is a plain weighted sum of the runs' matrices, and its top-k the stable
argsort of that sum.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_test_store
from hypothesis import given, settings
from hypothesis import strategies as st

from dataworth.cli import cli as cli_main
from dataworth.errors import InputError
from dataworth.influence import curvature as C
from dataworth.influence import ensemble as E
from dataworth.influence import scores as S
from dataworth.reports.ledger import value_ledger
from dataworth.store.format import modules_layout
from dataworth.store.reader import open_store

HEADER = {"projection": {"kind": "identity"}, "model": {"fingerprint": "fp"}, "data": {}, "config": {"model": "m"}}
MODULES = modules_layout([("a", 3, 4), ("b", 2, 3)])  # D = 18
N_ROWS, N_QUERIES = 30, 5


def scored_run(root, name, seed, *, n_rows=N_ROWS, queries=None, mode="dot", full=True):
    """A store of seeded rows (ids row0…), raw curvature, scored against seeded queries and saved."""
    rng = np.random.default_rng(seed)
    store = write_test_store(root / f"store-{name}", rng.normal(size=(n_rows, 18)).astype(np.float32), MODULES, HEADER)
    C.fit(store.path, "raw", 0.5)
    store = open_store(store.path)  # with the fit recorded in its manifest
    q = rng.normal(size=(N_QUERIES, 18)).astype(np.float32)
    ids = queries or [f"q{i}" for i in range(N_QUERIES)]
    result = S.score_rows(store, q, ids, C.load_curvature(store, "raw"), mode, top_k=4, full=full)
    result.save(root / f"scores-{name}")
    return root / f"scores-{name}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    return root, [scored_run(root, f"c{i}", seed=i) for i in range(3)]


def test_combined_matrix_is_the_weighted_mean_and_its_top_k_the_stable_argsort(runs, tmp_path):
    _root, dirs = runs
    mats = [np.asarray(S.load_scores(d).matrix, dtype=np.float64) for d in dirs]
    result = E.combine_scores(dirs, tmp_path / "ens", weights="1,2,5", top_k=6)
    expected = (1 * mats[0] + 2 * mats[1] + 5 * mats[2]) / 8
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-6, atol=1e-6)
    loaded = S.load_scores(tmp_path / "ens")
    np.testing.assert_array_equal(loaded.matrix, result.matrix)
    for direction, descending in (("positive", True), ("negative", False)):
        rows, values = S.top_k_reference(np.asarray(loaded.matrix), 6, descending)
        table = loaded.top_k(direction=direction)
        np.testing.assert_array_equal(table["train_row"].to_numpy().reshape(N_QUERIES, 6), rows)
        assert list(table["train_id"][:6]) == [f"row{r}" for r in rows[0]]
        np.testing.assert_allclose(table["score"].to_numpy().reshape(N_QUERIES, 6), values, rtol=1e-6)
    assert [e["weight"] for e in loaded.summary["ensemble"]] == pytest.approx([1 / 8, 2 / 8, 5 / 8])
    assert loaded.summary["store"] == S.load_scores(dirs[-1]).summary["store"]  # the last run's


def test_standardised_runs_are_divided_by_their_spread_over_the_rows_per_query(runs, tmp_path):
    _root, dirs = runs
    mats = [np.asarray(S.load_scores(d).matrix, dtype=np.float64) for d in dirs]
    result = E.combine_scores(dirs, tmp_path / "ens", weights=[3, 1, 0], standardise=True)
    expected = (3 * mats[0] / mats[0].std(axis=1, keepdims=True) + mats[1] / mats[1].std(axis=1, keepdims=True)) / 4
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-6, atol=1e-6)
    assert result.summary["standardised"] and "standardised" in result.summary["notes"][0]
    flat = np.vstack([np.full((1, 6), 2.5), np.arange(6.0)[None]])  # a query whose scores are all equal
    np.testing.assert_allclose(E.ensemble_scores([flat], np.ones(1), standardise=True),
                               np.vstack([flat[:1], flat[1:] / flat[1].std()]))


def test_equal_weights_by_default_and_value_reads_the_combined_run(runs, tmp_path):
    _root, dirs = runs
    result = E.combine_scores(dirs[:2], tmp_path / "ens")
    mats = [np.asarray(S.load_scores(d).matrix, dtype=np.float64) for d in dirs[:2]]
    np.testing.assert_allclose(result.matrix, (mats[0] + mats[1]) / 2, rtol=1e-6, atol=1e-6)
    assert result.summary["top_k"] == 4  # the largest any run kept
    ledger = value_ledger(tmp_path / "ens")
    np.testing.assert_allclose(ledger.sort_values("train_row")["net_sum"].to_numpy(),
                               np.asarray(result.matrix, dtype=np.float64).sum(axis=0), rtol=1e-5)


def test_runs_that_do_not_line_up_are_refused_naming_the_run_and_field(runs, tmp_path):
    root, dirs = runs
    with pytest.raises(InputError, match="at least two"):
        E.combine_scores(dirs[:1], tmp_path / "a")
    with pytest.raises(InputError, match="is one of the runs being combined"):
        E.combine_scores(dirs, dirs[1])
    other_rows = scored_run(root, "short", seed=9, n_rows=N_ROWS - 1)
    with pytest.raises(InputError, match=r"scores-short: its store .* has row 29 = '\(none\)' where "
                                         r".*scores-c0's store has 'row29'"):
        E.combine_scores([dirs[0], other_rows], tmp_path / "b")
    other_queries = scored_run(root, "otherq", seed=9, queries=["q0", "q1", "x", "q3", "q4"])
    with pytest.raises(InputError, match=r"scores-otherq: queries differ from .*scores-c0's at query 2"):
        E.combine_scores([dirs[0], other_queries], tmp_path / "c")
    cosine = scored_run(root, "cos", seed=9, mode="cosine")
    with pytest.raises(InputError, match=r"scores-cos: summary field 'mode' is 'cosine'"):
        E.combine_scores([dirs[0], cosine], tmp_path / "d")
    no_matrix = scored_run(root, "topk", seed=9, full=False)
    with pytest.raises(InputError, match=r"scores-topk: holds no full matrix.*--full"):
        E.combine_scores([dirs[0], no_matrix], tmp_path / "e")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".*staging*"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)), max_size=5),
       st.integers(1, 4))
def test_weights_parse_to_a_normalised_vector_or_a_one_line_error(parts, n):
    text = ",".join(str(p) for p in parts)
    try:
        w = E.parse_weights(text, n)
    except InputError as exc:
        assert str(exc).startswith("--weights") and "\n" not in str(exc)
        return
    values = [float(p) for p in text.split(",")]
    assert len(values) == n and all(np.isfinite(values)) and min(values) >= 0 and sum(values) > 0
    np.testing.assert_allclose(w, np.array(values) / sum(values))
    assert w.sum() == pytest.approx(1.0)


def test_cli_combines_and_bad_weights_exit_2_with_one_line(runs, tmp_path):
    _root, dirs = runs
    runner = CliRunner()
    done = runner.invoke(cli_main, ["combine", *map(str, dirs), "--out", str(tmp_path / "ens"), "--weights", "1,1,2"])
    assert done.exit_code == 0, done.output
    assert "combined 3 runs: 5 queries × 30 rows (weights 0.25, 0.25, 0.5)" in done.output
    bad = runner.invoke(cli_main, ["combine", *map(str, dirs), "--out", str(tmp_path / "x"), "--weights", "1,-1,2"])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error: --weights") and len(bad.output.splitlines()) == 1
