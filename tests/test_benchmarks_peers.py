"""The pure parts of benchmarks/peers.py (no peer library needed): ratios, the sign check, the table, LDS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]

peers = load_benchmark("benchmarks_peers", ROOT / "benchmarks" / "peers.py")


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


def test_one_step_sign_check_truth_is_a_watched_weights_sgd_step_with_the_median_norm_eta(
        tiny_llama, tiny_tokenizer, tmp_path):
    """peers.one_step_effects (now `dataworth.evaluation.effects.one_step_effects`) against the plain loop it replaced:
    η = step_norm / median ‖∇L_n‖ over the watched weights, one SGD step per row, query loss decrease."""
    import copy
    import json

    import torch

    from dataworth.data.batching import collate, example_losses
    from dataworth.data.encode import encode_rows, measured_queries
    from dataworth.data.rows import load_rows
    from dataworth.gradients.modules import select_modules

    copy.deepcopy(tiny_llama).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    texts = ["Alice Smith was born in Paris on 3 May 1970.", "Bob Jones studied physics at Oxford.",
             "The capital of France is Paris.", "Reverse the word cat: tac."]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n"
                                                  for i, t in enumerate(texts)))
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "q0", "prompt": "Alice Smith was born in",
                                                  "response": " Paris"}) + "\n"
                                      + json.dumps({"id": "q1", "prompt": "Bob Jones studied",
                                                    "response": " physics"}) + "\n")
    got = peers.one_step_effects(str(tmp_path / "m"), str(tmp_path / "train.jsonl"), str(tmp_path / "q.jsonl"),
                                 "all", 64, step_norm=1e-2)

    model = copy.deepcopy(tiny_llama).double().eval()
    pad = tiny_tokenizer.pad_token_id
    train, _ = encode_rows(load_rows(str(tmp_path / "train.jsonl")), tiny_tokenizer, max_length=64)
    queries, _ = encode_rows(load_rows(str(tmp_path / "q.jsonl")), tiny_tokenizer, max_length=64)
    q_batch = collate(measured_queries(queries, tiny_tokenizer, "answer"), range(2), pad)
    weights = [m.weight for _, m in select_modules(model, "all")]

    def query_losses():
        with torch.no_grad():
            return example_losses(model(input_ids=q_batch.input_ids, attention_mask=q_batch.attention_mask).logits,
                                  q_batch).numpy()

    grads = []
    for i, row in enumerate(train):
        b = collate([row], [i], pad)
        loss = example_losses(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b).sum()
        grads.append(torch.autograd.grad(loss, weights))
    eta = 1e-2 / np.median([float(torch.sqrt(sum((g * g).sum() for g in gs))) for gs in grads])
    base, expected = query_losses(), np.zeros((2, len(train)))
    for n, gs in enumerate(grads):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            for (_, m), g in zip(select_modules(changed, "all"), gs):
                m.weight -= eta * g
            logits = changed(input_ids=q_batch.input_ids, attention_mask=q_batch.attention_mask).logits
            expected[:, n] = base - example_losses(logits, q_batch).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    assert np.abs(expected).max() > 0
