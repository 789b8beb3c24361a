"""The pure parts of benchmarks/peers.py (no peer library needed): ratios, the sign check, the table, LDS."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


peers = _load("benchmarks_peers", ROOT / "benchmarks" / "peers.py")


def test_ratio_is_ours_over_theirs_and_missing_when_undefined():
    assert peers.ratio(2.0, 8.0) == 0.25
    assert peers.ratio(None, 1.0) is None
    assert peers.ratio(1.0, 0.0) is None
    assert peers.ratio(1.0, float("nan")) is None


def test_sign_agreement_is_the_mean_per_query_spearman_and_flips_with_the_sign():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(4, 15))
    scores = truth + 0.3 * rng.normal(size=truth.shape)
    by_hand = np.mean([spearmanr(scores[q], truth[q]).statistic for q in range(4)])
    assert peers.sign_agreement(scores, truth) == pytest.approx(by_hand)
    assert peers.sign_agreement(scores, truth) > 0.5
    assert peers.sign_agreement(-scores, truth) == pytest.approx(-by_hand)


def test_sign_agreement_skips_constant_rows_and_refuses_shape_mismatch():
    truth = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert peers.sign_agreement(np.array([[1.0, 2.0, 4.0], [3.0, 1.0, 2.0]]), truth) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        peers.sign_agreement(np.zeros((2, 2)), truth)


def test_trak_projection_stays_at_or_below_half_the_rows():
    assert peers.trak_dim_for(1024, 32) == 16
    assert peers.trak_dim_for(8, 32) == 8
    assert peers.trak_dim_for(1024, 1) == 1


def test_lds_fallback_matches_a_per_query_spearman_by_hand():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    n, m, q = 12, 10, 3
    masks = rng.random((m, n)) < 0.5
    true_effect = rng.normal(size=(q, n))  # effect of each row on lowering each query's loss
    losses = -(masks @ true_effect.T) + 0.01 * rng.normal(size=(m, q))
    # Perfect scores give LDS ≈ 1; negated scores give ≈ −1 (the sign convention is checked, not assumed).
    assert peers.lds_fallback(true_effect, masks, losses) > 0.95
    assert peers.lds_fallback(-true_effect, masks, losses) < -0.95
    scores = rng.normal(size=(q, n))
    by_hand = np.mean([spearmanr(masks @ scores[i], -losses[:, i]).statistic for i in range(q)])
    assert peers.lds_fallback(scores, masks, losses) == pytest.approx(by_hand)


def test_table_has_every_column_ratios_against_dataworth_and_failures_inline():
    rows = peers.with_ratios([
        {"method": "dataworth", "lds": 0.31, "recall@10": 0.9, "fit_s": 2.0, "score_s": 1.0, "peak_rss_mib": 600.0},
        {"method": "kronfluence-ekfac", "lds": 0.28, "recall@10": 0.8, "fit_s": 9.0, "score_s": 3.0,
         "peak_rss_mib": 1200.0},
        {"method": "logix", "error": "rc 1: ImportError: no module named logix"},
    ])
    assert rows[0]["time_ratio"] == 1.0 and rows[0]["memory_ratio"] == 1.0
    assert rows[1]["time_ratio"] == pytest.approx(3.0 / 12.0)
    assert rows[1]["memory_ratio"] == pytest.approx(0.5)
    table = peers.format_table(rows).splitlines()
    assert table[0] == "| " + " | ".join(peers.TABLE_COLUMNS) + " |"
    assert len(table) == 2 + 3
    assert table[3] == "| kronfluence-ekfac | 0.280 | 0.800 | 9.0 | 3.0 | 1200 | 0.25 | 0.50 |"
    assert "failed: rc 1: ImportError" in table[4]
    with_ci = peers.format_table([{**rows[1], "lds_ci_low": 0.1, "lds_ci_high": 0.456}])
    assert "| 0.280 [0.10, 0.46] |" in with_ci


def test_missing_reference_gives_no_ratios():
    rows = peers.with_ratios([{"method": "trak", "fit_s": 1.0, "score_s": 1.0, "peak_rss_mib": 10.0}])
    assert rows[0]["time_ratio"] is None and rows[0]["memory_ratio"] is None
    assert "n/a" in peers.format_table(rows)


def test_every_method_has_an_adapter_script():
    for method in peers.methods(rank=8, trak_dim=64):
        assert (peers.ADAPTERS / method.script).exists(), method.script
