"""Any model through a Task: an MLP on scikit-learn's digits, attribution of its mistakes, mislabel detection.

    .venv/bin/python examples/digits_mlp.py [--train 1400] [--epochs 60] [--flip 0.05] [--rank 16] [--json F]

1. Load the 8×8 digits bundled with scikit-learn (no download), flip the labels of ``--flip`` of the
   training digits to a different random class, train a 64-64-10 MLP in plain PyTorch.
2. Extract a gradient store through `dw.ClassificationMarginTask` (rows = per-example cross-entropy
   gradients of both linear layers, LoGra-projected to ``--rank``), fit EK-FAC.
3. For misclassified test digits, ask "why this prediction?": the query measurement is TRAK's margin of the
   *predicted* class (negated, so positive score = the training digit pushed the model towards its
   prediction); print the top-3 training digits with their (possibly flipped) labels.
4. Rank every training digit by self-influence ``ĝ_nᵀ (F + λI)⁻¹ ĝ_n`` and print the ROC AUC of that
   ranking for finding the flipped labels (0.5 = chance).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=1400, help="training digits (the rest, up to 397, are test)")
    p.add_argument("--test", type=int, default=397)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--flip", type=float, default=0.05, help="fraction of training labels flipped")
    p.add_argument("--rank", type=int, default=16, help="LoGra rank (k_in = k_out, clamped to the layer)")
    p.add_argument("--queries", type=int, default=3, help="misclassified test digits to explain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="store directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the printed figures to this JSON file")
    return p.parse_args(argv)


def load(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Digits split into train/test, with ``flip`` of the training labels changed; returns the flip mask."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(y))
    train, test = order[: args.train], order[args.train: args.train + args.test]
    noisy = y[train].copy()
    flipped = np.zeros(len(train), dtype=bool)
    flipped[rng.choice(len(train), size=int(round(args.flip * len(train))), replace=False)] = True
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, size=flipped.sum())) % 10  # always a different class
    as_x = lambda idx: torch.tensor(x[idx] / 16.0, dtype=torch.float32)  # noqa: E731 - pixel values 0..16
    return as_x(train), torch.tensor(noisy), as_x(test), torch.tensor(y[test]), flipped


def train_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int, seed: int) -> nn.Module:
    """Mini-batch Adam on the mean cross-entropy (training needs no special loss: the task defines rows)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main(argv=None) -> dict:
    import dataworth as dw
    from dataworth.gradients.extract import ExtractConfig, extract
    from dataworth.influence.scores import self_influence
    from sklearn.metrics import roc_auc_score

    args = parse(argv)
    x, y, x_test, y_test, flipped = load(args)
    model = train_mlp(x, y, args.hidden, args.epochs, args.seed)
    with torch.no_grad():
        predicted = model(x_test).argmax(1)
    accuracy = float((predicted == y_test).float().mean())
    print(f"test accuracy {accuracy:.3f} ({len(y_test)} digits; {int(flipped.sum())} of {len(y)} training labels flipped)")

    out = Path(args.out or tempfile.mkdtemp(prefix="digits-store-"))
    task = dw.ClassificationMarginTask()
    ids = [f"train-{i}" for i in range(len(y))]
    config = ExtractConfig(out=str(out), projection="random", rank_in=args.rank, rank_out=args.rank,
                           seed=args.seed, dtype="float32", shard_rows=512)
    store = extract(config, model=model, task=task, batches=dw.tensor_batches(x, y, ids=ids, batch_size=128),
                    overwrite=True)
    dw.fit(store.path, "ekfac")
    curvature = dw.load_curvature(store, "ekfac")

    wrong = torch.nonzero(predicted != y_test).flatten()[: args.queries].tolist()
    if wrong:
        queries = dw.tensor_batches(x_test[wrong], predicted[wrong], ids=[f"test-{i}" for i in wrong])
        scores = dw.score_with_task(store, model, task, queries, curvature="ekfac", top_k=3)
        table = scores.top_k(direction="positive")
        for i in wrong:
            top = table[table["query_id"] == f"test-{i}"].sort_values("rank")
            described = ", ".join(
                f"{tid} (label {int(y[int(tid.split('-')[1])])}{', flipped' if flipped[int(tid.split('-')[1])] else ''})"
                for tid in top["train_id"])
            print(f"test-{i}: true {int(y_test[i])}, predicted {int(predicted[i])}; top-3 support: {described}")

    influence = self_influence(store, curvature)
    auc = float(roc_auc_score(flipped, influence))
    top = np.argsort(-influence)[: int(flipped.sum())]
    precision = float(flipped[top].mean())
    print(f"mislabel detection by self-influence: auc {auc:.3f}, precision@{len(top)} {precision:.3f}")
    figures = {"test_accuracy": accuracy, "auc": auc, f"precision@{len(top)}": precision,
               "flipped": int(flipped.sum()), "misclassified": int((predicted != y_test).sum()), "store": str(out)}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
