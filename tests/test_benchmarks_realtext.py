"""The corpus parsers and the split of benchmarks/realtext_lds.py (its retrains and methods are benchmarks)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import load_benchmark
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]

realtext = load_benchmark("benchmarks_realtext_lds", ROOT / "benchmarks" / "realtext_lds.py")


def test_dpkg_descriptions_are_the_paragraphs_of_each_long_description(tmp_path):
    status = tmp_path / "status"
    status.write_bytes(
        b"Package: a\nStatus: install ok installed\nDescription: short a\n first line of a\n second line of a\n"
        b" .\n second paragraph of a\nHomepage: x\n\n"
        b"Package: b\nDescription: short b\n only paragraph of b\n\n"
        b"Package: c\nVersion: 1\n\n"                          # no description: counted as skipped
        b"Package: d\nDescription: bad \xff\n text\n")          # not UTF-8: counted as skipped
    found, skipped = realtext.dpkg_descriptions(status)
    assert found == ["first line of a second line of a", "second paragraph of a", "only paragraph of b"]
    assert skipped == 2


def test_a_missing_dpkg_status_is_an_input_error(tmp_path):
    with pytest.raises(realtext.InputError, match="missing"):
        realtext.dpkg_descriptions(tmp_path / "nope")


words = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=8)


@given(st.lists(words, min_size=2, max_size=40))
def test_a_query_splits_at_a_word_boundary_into_a_nonempty_prompt_and_response(parts):
    text = " ".join(parts)
    prompt, response = realtext.split_query(text)
    assert prompt + response == text
    assert prompt and response.startswith(" ") and response.strip()
    assert abs(len(prompt.split(" ")) - len(parts) / 3) <= 1


def test_queries_are_held_out_documents_never_training_ones(monkeypatch):
    docs = [f"document number {i} says something {i % 7}" for i in range(60)]
    monkeypatch.setattr(realtext, "corpus_documents", lambda name: docs)
    train, queries, ident = realtext.task_rows("stdlib", 40, 10, seed=3)
    texts = {r["text"] for r in train}
    assert len(train) == 40 and len(queries) == 10 and len(texts) == 40
    assert all(q["prompt"] + q["response"] not in texts for q in queries)
    assert ident["digest"] == realtext.task_rows("stdlib", 40, 10, seed=3)[2]["digest"]
    with pytest.raises(realtext.InputError, match="fewer than"):
        realtext.task_rows("stdlib", 55, 10, seed=3)


def test_tracin_weights_are_the_learning_rate_sums_of_each_checkpoints_segment():
    loop = realtext.LoopConfig(checkpoints=(1, 3))
    lr_at = realtext.learning_rates(loop, 100)  # 4 steps an epoch, 32 in all
    sums = [sum(lr_at(t) for t in range(0, 4)), sum(lr_at(t) for t in range(4, 12))]
    assert realtext.segment_lr_weights(loop, 100) == pytest.approx([x / sum(sums) for x in sums])
    assert lr_at(0) == pytest.approx(loop.lr / 1) and lr_at(31) == pytest.approx(
        loop.lr * (loop.min_lr_ratio + (1 - loop.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * 30 / 31))))
