"""Gradient-free baselines on the shared task: BM25 and representation similarity.

    python benchmarks/peers/run_baselines.py --model M --train T.jsonl --queries Q.jsonl --out DIR --kind repsim

``--kind bm25``: Okapi BM25 of each training document against the query's prompt + response
(``dataworth.evaluation.baselines.bm25_scores``). ``--kind repsim``: cosine of the model's mean final hidden
states of query and document (``representation_similarity``; DATE-LM's strong baseline). Both are scores where
higher = more related, which LDS reads as "helps more".
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Stopwatch, load_task, parse_args, write_result  # noqa: E402


def options(ap) -> None:
    ap.add_argument("--kind", required=True, choices=("bm25", "repsim"))


def main() -> None:
    args = parse_args(__doc__, options)
    from dataworth.evaluation.baselines import bm25_scores, representation_similarity

    clock = Stopwatch()
    with clock("load"):
        task = load_task(args)
    with clock("score"):
        if args.kind == "bm25":
            texts = [r.text for r in task.train_rows]
            asked = [q.data["prompt"] + q.data["response"] for q in task.query_rows]
            scores = bm25_scores(texts, asked)
        else:
            scores = representation_similarity(task.model, task.train, task.queries, task.pad_id, args.batch_size)
    notes = ("BM25 of prompt+response" if args.kind == "bm25"
             else "cosine of mean final hidden states (whole query row)")
    write_result(args.out, args.kind, scores, clock, task, notes=notes)


if __name__ == "__main__":
    main()
