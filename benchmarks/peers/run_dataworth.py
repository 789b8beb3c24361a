"""dataworth on the shared task: LoGra extraction → curvature fit → query gradients → full score matrix.

    python benchmarks/peers/run_dataworth.py --model M --train T.jsonl --queries Q.jsonl --out DIR \
        [--projection random --rank 32 --curvature ekfac --mode dot]

fit_s = extraction (store written to DIR/store, with its per-shard KFAC statistics) + curvature fit;
score_s = query gradients + scoring every training row. Sign: dataworth's own convention, no flip.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Stopwatch, load_task, parse_args, write_result  # noqa: E402


def options(ap) -> None:
    ap.add_argument("--projection", default="random", help="random | pca | identity")
    ap.add_argument("--rank", type=int, default=32, help="LoGra k_in = k_out")
    ap.add_argument("--curvature", default="ekfac", help="none | raw | kfac | ekfac")
    ap.add_argument("--mode", default="dot", help="dot | cosine | relative")
    ap.add_argument("--damping", default="auto")


def main() -> None:
    args = parse_args(__doc__, options)
    from dataworth.curvature import fit
    from dataworth.extract import ExtractConfig, extract, query_gradients
    from dataworth.scoring import score_rows

    clock = Stopwatch()
    with clock("load"):
        task = load_task(args)
    store_dir = Path(args.out) / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    damping = args.damping if args.damping == "auto" else float(args.damping)
    with clock("fit"):
        store = extract(ExtractConfig(model=args.model, data=args.train, out=str(store_dir), modules=args.modules,
                                      projection=args.projection, rank_in=args.rank, rank_out=args.rank,
                                      dtype="float32", device="cpu", max_length=args.max_length,
                                      batch_size=args.batch_size, shard_rows=4096),
                        model=task.model, tokenizer=task.tokenizer, encoded=task.train, progress=False)
        curvature = fit(store_dir, args.curvature, damping)
    with clock("score"):
        q_rows = query_gradients(store, task.model, task.tokenizer, task.queries, batch_size=args.batch_size)
        scores = score_rows(store, q_rows, task.query_ids, curvature, mode=args.mode, top_k=10, full=True)
    notes = (f"LoGra {args.projection} k_in=k_out={args.rank} on {len(task.module_names)} layers, "
             f"{args.curvature} damping {args.damping}, {args.mode}")
    write_result(args.out, "dataworth", scores.matrix, clock, task, notes=notes, store_dim=int(store.dim))
    shutil.rmtree(store_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
