"""The gradient-free baselines: representation similarity equals the cosine of each row's own unpadded forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dataworth.data.encode import encode_rows
from dataworth.data.rows import load_rows
from dataworth.evaluation.baselines import mean_final_hidden_states, representation_similarity


@pytest.fixture()
def rows(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(
        ["the cat sat", "a dog ran far away today", "hello", "the cat sat on the mat again and again"])))
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": "q0", "prompt": "the cat", "response": " sat"}) + "\n"
                       + json.dumps({"id": "q1", "prompt": "a dog ran", "response": " far away"}) + "\n")
    return load_rows(train), load_rows(queries)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_representation_similarity_is_the_cosine_of_each_rows_own_mean_hidden_state(request, tiny_tokenizer,
                                                                                  rows, arch):
    model = request.getfixturevalue(arch)
    train, _ = encode_rows(rows[0], tiny_tokenizer)
    queries, _ = encode_rows(rows[1], tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id

    def alone(encoded):  # one row at a time: no padding, no batching
        with torch.no_grad():
            out = model(input_ids=torch.tensor([encoded.input_ids]), output_hidden_states=True)
        return out.hidden_states[-1][0].double().mean(dim=0).numpy()

    for batch_size in (1, 3):
        means = mean_final_hidden_states(model, train, pad, batch_size=batch_size)
        np.testing.assert_allclose(means, np.stack([alone(e) for e in train]), rtol=1e-5, atol=1e-6)
    t, q = np.stack([alone(e) for e in train]), np.stack([alone(e) for e in queries])
    expected = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    got = representation_similarity(model, train, queries, pad, batch_size=2)
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
