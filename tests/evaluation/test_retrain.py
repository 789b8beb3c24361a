"""Evaluation by retraining (the pure metrics are tested in test_evaluate.py): the retrain cache (resume,
refusal of another configuration), the retrain loop against `dataworth.train`, and the `dataworth eval` CLI.

Most tests use a closed-form toy "trainer" whose query losses are exactly linear in the included rows
(``loss_q(S) = c − Σ_{n∈S} τ[q, n] + noise``): the true attribution is then ``τ`` and its LDS must be ~1.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from dataworth.errors import InputError
from dataworth.evaluation.lds import removal_test
from dataworth.evaluation.retrain import (
    MIN_SUBSETS,
    LdsConfig,
    build_lds_task,
    load_lds_task,
    subset_masks,
)

WORLD = "?people=3&distractors=2"  # 3 people × 3 docs + 2 distractors = 11 rows, 15 queries
N_ROWS, N_QUERIES = 11, 15


# ------------------------------------------------------------------------------------------- pure metrics

@given(st.integers(2, 60), st.floats(0.01, 0.99), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_subset_masks_have_exact_size_and_are_reproducible(n, alpha, seed):
    masks = subset_masks(n, alpha, MIN_SUBSETS, seed)
    assert masks.shape == (MIN_SUBSETS, n)
    assert (masks.sum(axis=1) == min(n, max(1, round(alpha * n)))).all()
    assert np.array_equal(masks, subset_masks(n, alpha, MIN_SUBSETS, seed))


# ----------------------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.2, 1.5])
def test_alpha_outside_open_unit_interval_is_refused(alpha):
    with pytest.raises(InputError, match="--alpha"):
        _config(alpha=alpha)


def test_too_few_subsets_are_refused_with_the_minimum():
    with pytest.raises(InputError, match=f"minimum is {MIN_SUBSETS}"):
        _config(subsets=MIN_SUBSETS - 1)


# ------------------------------------------------------------------------------------ cache with a toy

def _config(**overrides):
    from dataworth.model.train import TrainConfig

    fields = dict(data="builtin:bios" + WORLD, queries="builtin:bios:queries" + WORLD,
                  train=TrainConfig.from_preset("tiny-test", epochs=1), subsets=MIN_SUBSETS, replicates=2)
    return LdsConfig(**(fields | overrides))


TAU = np.random.default_rng(0).normal(size=(N_QUERIES, N_ROWS))


class ToyTrainer:
    """Query losses exactly linear in the included rows, plus seeded noise; counts its calls."""

    def __init__(self, noise: float = 0.01):
        self.noise, self.calls = noise, 0

    def __call__(self, included, seed):
        self.calls += 1
        jitter = np.random.default_rng(seed).normal(scale=self.noise, size=N_QUERIES)
        return 10.0 - TAU[:, included].sum(axis=1) + jitter, 0.0


def test_true_attribution_scores_lds_near_one_and_flipped_sign_near_minus_one(tmp_path):
    task = build_lds_task(tmp_path / "t", _config(), trainer=ToyTrainer(), progress=False)
    assert task.losses.shape == (2, MIN_SUBSETS, N_QUERIES) and task.masks.shape == (MIN_SUBSETS, N_ROWS)
    good, bad = task.evaluate(TAU), task.evaluate(-TAU)
    assert good["lds"] > 0.95 and bad["lds"] < -0.95
    assert good["lds_ci_low"] <= good["lds"] <= good["lds_ci_high"]
    assert good["noise_ceiling"] > 0.95


def test_noise_ceiling_drops_when_training_noise_dominates(tmp_path):
    task = build_lds_task(tmp_path / "t", _config(), trainer=ToyTrainer(noise=100.0), progress=False)
    assert task.evaluate(TAU)["noise_ceiling"] < 0.6


def test_killed_run_resumes_without_retraining_finished_subsets(tmp_path):
    first = ToyTrainer()
    assert build_lds_task(tmp_path / "t", _config(), trainer=first, progress=False, stop_after=5) is None
    assert first.calls == 5
    files = sorted((tmp_path / "t" / "retrains").glob("subset-*.json"))
    assert len(files) == 5 and not list((tmp_path / "t" / "retrains").glob("*.tmp-*"))
    second = ToyTrainer()
    task = build_lds_task(tmp_path / "t", _config(), trainer=second, progress=False)
    assert second.calls == 2 * MIN_SUBSETS - 5 + 1  # the rest, plus the all-rows base measurement
    fresh = build_lds_task(tmp_path / "fresh", _config(), trainer=ToyTrainer(), progress=False)
    np.testing.assert_array_equal(task.losses, fresh.losses)
    record = json.loads(files[0].read_text())
    assert set(record) >= {"included", "seed", "losses"} and len(record["losses"]) == N_QUERIES
    np.testing.assert_array_equal(load_lds_task(tmp_path / "t", _config()).losses, task.losses)


@pytest.mark.parametrize("change, key", [({"alpha": 0.25}, "alpha"), ({"seed": 1}, "seed"),
                                         ({"subsets": MIN_SUBSETS + 1}, "subsets"),
                                         ({"measure": "answer+end"}, "measure")])
def test_cache_from_another_configuration_is_refused_naming_the_key(tmp_path, change, key):
    build_lds_task(tmp_path / "t", _config(), trainer=ToyTrainer(), progress=False, stop_after=1)
    with pytest.raises(InputError, match=rf"cache\.json: retrain cache was made with {key}="):
        build_lds_task(tmp_path / "t", _config(**change), trainer=ToyTrainer(), progress=False)


def test_cache_made_before_measure_existed_opens_as_answer_plus_end_only(tmp_path):
    build_lds_task(tmp_path / "t", _config(measure="answer+end"), trainer=ToyTrainer(), progress=False, stop_after=1)
    path = tmp_path / "t" / "cache.json"
    header = json.loads(path.read_text())
    del header["config"]["measure"]  # what a cache written before the field existed looks like
    path.write_text(json.dumps(header))
    build_lds_task(tmp_path / "t", _config(measure="answer+end"), trainer=ToyTrainer(), progress=False, stop_after=1)
    with pytest.raises(InputError, match=r'measure="answer\+end", this run has measure="answer"'):
        build_lds_task(tmp_path / "t", _config(), trainer=ToyTrainer(), progress=False)


def test_unknown_measure_is_refused_naming_the_flag():
    with pytest.raises(InputError, match="--measure"):
        _config(measure="everything")


def test_answer_measure_is_the_response_loss_without_the_end_token(tiny_tokenizer):
    import torch

    from dataworth.data.batching import collate, example_losses, token_losses
    from dataworth.data.encode import encode_rows, measured_queries
    from dataworth.data.rows import Row

    rows = [Row("q", "prompt_response", {"prompt": "Alice was born in", "response": " Paris."}, "test:1")]
    encoded, _ = encode_rows(rows, tiny_tokenizer, max_length=64)
    answer = measured_queries(encoded, tiny_tokenizer, "answer")[0]
    assert encoded[0].input_ids[-1] == tiny_tokenizer.eos_token_id and encoded[0].loss_mask[-1] == 1
    assert answer.input_ids == encoded[0].input_ids and answer.loss_mask == encoded[0].loss_mask[:-1] + [0]
    assert measured_queries(encoded, tiny_tokenizer, "answer+end")[0] == encoded[0]
    logits = torch.randn(1, len(answer.input_ids), len(tiny_tokenizer))
    full = collate(encoded, [0], tiny_tokenizer.pad_token_id)
    per_token = token_losses(logits, full)[0]  # per target position, 0 elsewhere; the end token is last
    expected = per_token[:-1].sum()  # every target but the final (end) token
    got = example_losses(logits, collate([answer], [0], tiny_tokenizer.pad_token_id))[0]
    torch.testing.assert_close(got, expected)


def test_other_training_config_is_refused_naming_the_field(tmp_path):
    from dataworth.model.train import TrainConfig

    build_lds_task(tmp_path / "t", _config(), trainer=ToyTrainer(), progress=False, stop_after=1)
    with pytest.raises(InputError, match=r"train\.epochs="):
        build_lds_task(tmp_path / "t", _config(train=TrainConfig.from_preset("tiny-test", epochs=2)),
                       trainer=ToyTrainer(), progress=False)


def test_tampered_retrain_file_and_foreign_directory_are_refused(tmp_path):
    build_lds_task(tmp_path / "t", _config(), trainer=ToyTrainer(), progress=False, stop_after=1)
    path = tmp_path / "t" / "retrains" / "subset-000-r0.json"
    record = json.loads(path.read_text())
    record["included"] = record["included"][1:]
    path.write_text(json.dumps(record))
    with pytest.raises(InputError, match="subset-000-r0.json"):
        build_lds_task(tmp_path / "t", _config(), trainer=ToyTrainer(), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="no cache.json"):
        build_lds_task(tmp_path / "other", _config(), trainer=ToyTrainer(), progress=False)
    build_lds_task(tmp_path / "partial", _config(), trainer=ToyTrainer(), progress=False, stop_after=1)
    with pytest.raises(InputError, match="incomplete"):
        load_lds_task(tmp_path / "partial", _config())


def test_removing_the_true_top_rows_hurts_more_than_random(tmp_path):
    trainer = ToyTrainer(noise=0.0)
    task = build_lds_task(tmp_path / "t", _config(), trainer=trainer, progress=False)
    summary = removal_test(task, TAU, 2, range(N_QUERIES), random_draws=2, progress=False, trainer=trainer)
    # Removing rows n raises loss_q by Σ τ[q, n]: the top-2 by τ are exactly the largest possible increases.
    top2 = np.sort(TAU, axis=1)[:, -2:].sum(axis=1)
    assert summary["top_increase"] == pytest.approx(top2.mean())
    assert summary["top_beats_random"] == 1.0 and summary["top_increase"] > summary["random_increase"]
    calls = trainer.calls
    removal_test(task, TAU, 2, range(N_QUERIES), random_draws=2, progress=False, trainer=trainer)
    assert trainer.calls == calls  # every removal retrain came from the cache


# --------------------------------------------------------------------------------- real training (small)

def test_retrain_on_all_rows_with_the_base_seed_reproduces_dataworth_train(tmp_path):
    import torch

    from dataworth.data.encode import encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.evaluation.retrain import train_on_rows
    from dataworth.model.load import load_model
    from dataworth.model.train import TrainConfig, train

    cfg = TrainConfig.from_preset("tiny-test", epochs=1)
    spec = "builtin:bios?people=2&distractors=1"
    train(spec, tmp_path / "m", cfg, queries_spec=None, progress=False)
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    encoded, _ = encode_rows(load_rows(spec), loaded.tokenizer, max_length=cfg.max_length)
    model, _ = train_on_rows(encoded, loaded.tokenizer, cfg, cfg.seed)
    expected, got = loaded.model.state_dict(), model.state_dict()
    # both trainings ran on the config's device ("auto": CUDA where there is one); weights compared on CPU
    assert all(torch.equal(expected[k], got[k].cpu()) for k in expected)


# ------------------------------------------------------------------------------------------------ the CLI

def _cli(*args):
    from dataworth.cli import cli

    return CliRunner().invoke(cli, ["eval", *args])


@pytest.mark.parametrize("args, needle", [(["--alpha", "1"], "--alpha"), (["--subsets", "3"], "minimum is 8"),
                                          (["--data", "x.jsonl"], "--queries")])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    result = _cli("lds", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.count("\n") == 1


def test_cli_help_shows_examples():
    for sub in ("lds", "facts", "brittleness"):
        result = _cli(sub, "--help")
        assert result.exit_code == 0 and "dataworth eval " + sub in result.output


@pytest.mark.slow
def test_cli_lds_and_facts_end_to_end(tmp_path):
    """Real retrains on a 11-row world (16 retrains of 1 epoch): figures printed and written with their keys."""
    out, figures = tmp_path / "lds", tmp_path / "lds.json"
    result = _cli("lds", "--out", str(out), "--data", "builtin:bios" + WORLD, "--epochs", "2", "--subsets", "8",
                  "--replicates", "2", "--curvature", "kfac", "--quiet", "--json", str(figures))
    assert result.exit_code == 0, result.output
    data = json.loads(figures.read_text())
    for key in ("lds", "lds_ci_low", "lds_ci_high", "noise_ceiling"):
        assert f"{key}: " in result.output and np.isfinite(data[key])
    facts_json = tmp_path / "facts.json"
    result = _cli("facts", "--model", str(out / "model"), "--data", "builtin:bios" + WORLD, "--out",
                  str(tmp_path / "facts"), "--curvature", "none", "--mode", "dot", "--quiet", "--json", str(facts_json))
    assert result.exit_code == 0, result.output
    facts = json.loads(facts_json.read_text())
    assert {"recall@1", "recall@10", "mrr", "tail-patch@10"} <= set(facts) and "BM25" in result.output
    # the task's model is a dataworth train directory: its final optimizer state gives the tail-patch column
    assert "| tail-patch@10 |" in result.output and "one-step oracle" in result.output
    methods = {row["method"]: row for row in facts["table"]}
    assert {"gold documents", "one-step oracle"} <= set(methods)
    assert all(np.isfinite(row["tail-patch@10"]) for row in facts["table"])


@pytest.mark.parametrize("fields, needle", [({"rank": 0}, "--rank"), ({"optimizer": "adam"}, "--projection identity"),
                                            ({"checkpoints": "all"}, "--checkpoints"), ({"mode": "sum"}, "--mode"),
                                            ({"projection": "identity", "optimizer": "adam", "mix": 2.0}, "--mix")])
def test_bad_attribution_options_are_refused_naming_the_flag(fields, needle):
    from dataworth.evaluation.methods import AttributionConfig

    with pytest.raises(InputError, match=needle):
        AttributionConfig(**fields).check()
