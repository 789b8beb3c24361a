"""The shared loss convention: summed over target tokens, padding and prompt contribute nothing."""

import torch

from dataworth.data.batching import (
    Encoded,
    collate,
    example_losses,
    plan_batches,
    token_losses,
)


def test_example_loss_equals_hand_sum_over_target_tokens_only():
    rows = [Encoded("a", [5, 6, 7, 8], [0, 0, 1, 1]), Encoded("b", [5, 9], [0, 1])]
    batch = collate(rows, [0, 1], pad_id=0)
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 12)
    got = example_losses(logits, batch)
    logp = torch.log_softmax(logits, -1)
    want_a = -(logp[0, 1, 7] + logp[0, 2, 8])
    want_b = -logp[1, 0, 9]
    assert torch.allclose(got, torch.stack([want_a, want_b]), atol=1e-6)
    # padding positions of row b contribute exactly zero
    assert token_losses(logits, batch)[1, 2:].abs().sum() == 0


def test_plan_batches_covers_every_row_once_and_respects_budget():
    lengths = [5, 17, 3, 9, 9, 40, 1]
    plan = plan_batches(lengths, token_budget=40, sort_by_length=True)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(len(lengths)))
    for b in plan:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 40
    assert plan_batches(lengths, batch_size=3) == [[0, 1, 2], [3, 4, 5], [6]]
