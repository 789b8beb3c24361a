"""dataworth on the shared task: LoGra extraction → curvature fit → query gradients → full score matrix.

    python benchmarks/peers/run_dataworth.py --model M --train T.jsonl --queries Q.jsonl --out DIR \
        [--projection random --rank 32 --curvature ekfac --mode dot]

fit_s = extraction (store written to DIR/store, with its per-shard KFAC statistics) + curvature fit;
score_s = query gradients + scoring every training row. Sign: dataworth's own convention, no flip.

``--checkpoints ensemble``: the same on every kept checkpoint of the model (``MODEL/checkpoints/epoch-N``),
scores averaged (TRAK's ensemble / TracIn's checkpoint sum; ``--ensemble-weights`` / ``--standardise`` as
``dataworth combine --weights / --standardise``, the same function; each checkpoint's matrix is kept too, in
``DIR/scores_by_checkpoint.npy`` ``[C, Q, N]``); ``--optimizer adam``: TrackStar scoring
(``dataworth.evaluation.methods.trackstar_scores``: exact gradients divided by the checkpoint's √v̂ + ε, unit-normalised;
``--rank 0`` = no projection, R = I), which needs ``--projection identity``. Times include every checkpoint.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Stopwatch, combine_checkpoints, kept_checkpoints, load_task, parse_args, write_result  # noqa: E402


def options(ap) -> None:
    ap.add_argument("--projection", default="random", help="random | pca | whitened | identity")
    ap.add_argument("--rank", type=int, default=32, help="LoGra k_in = k_out")
    ap.add_argument("--rank-in", type=int, default=None, help="LoGra k_in (default: --rank)")
    ap.add_argument("--rank-out", type=int, default=None, help="LoGra k_out (default: --rank)")
    ap.add_argument("--curvature", default="ekfac", help="none | raw | kfac | ekfac")
    ap.add_argument("--mode", default="dot", help="dot | cosine | relative")
    ap.add_argument("--damping", default=None, help="as dataworth fit --damping [auto]")
    ap.add_argument("--checkpoints", default="final", choices=("final", "ensemble"),
                    help="ensemble: average the scores of every MODEL/checkpoints/epoch-N")
    ap.add_argument("--ensemble-weights", default=None,
                    help="--checkpoints ensemble: one weight per checkpoint, comma-separated [equal]")
    ap.add_argument("--standardise", action="store_true",
                    help="--checkpoints ensemble: each checkpoint's scores over its spread per query first")
    ap.add_argument("--optimizer", default="none", choices=("none", "adam"), help="adam: TrackStar scoring")
    ap.add_argument("--whiten-damping", type=float, default=None,
                    help="--projection whitened: factor damping as a fraction of its mean eigenvalue [ExtractConfig's]")
    ap.add_argument("--dtype", default="float32", help="store dtype (float16 | bfloat16 | float32)")
    ap.add_argument("--measure-end-token", action="store_true",
                    help="query gradients also measure the appended end token (the retrains do not)")
    ap.add_argument("--defaults", action="store_true",
                    help="what a user gets with no flags: ExtractConfig() / fit / score defaults (overrides "
                         "--projection --rank --curvature --mode --modules --dtype; --damping only when given)")


def main() -> None:
    args = parse_args(__doc__, options)
    from dataworth.evaluation.methods import AttributionConfig
    from dataworth.gradients.extract import ExtractConfig
    from dataworth.influence.curvature import DEFAULT_CURVATURE

    if args.defaults:
        d = ExtractConfig()
        args.projection, args.rank, args.modules, args.dtype = d.projection, d.rank_in, d.modules, d.dtype
        args.curvature, args.mode = DEFAULT_CURVATURE, "dot"
    args.damping = args.damping or "auto"

    method = AttributionConfig(projection=args.projection, rank=args.rank, curvature=args.curvature,
                               damping=args.damping, mode=args.mode, modules=args.modules,
                               checkpoints=args.checkpoints, optimizer=args.optimizer)
    method.check()
    clock = Stopwatch()
    with clock("load"):
        task = load_task(args)
    models = kept_checkpoints(args.model, args.checkpoints)
    matrices, dims = [], []
    for i, model_dir in enumerate(models):
        matrices.append(scores_at(args, method, task if i == 0 and args.checkpoints == "final" else None,
                                  model_dir, clock, dims))
    rank = "exact" if args.projection == "identity" else f"k_in=k_out={args.rank}"
    how = ("TrackStar (Adam-normalised, unit norm" + (", R=I)" if args.rank == 0 else f", dense {args.rank})")
           if args.optimizer == "adam" else f"{args.curvature} damping {args.damping}, {args.mode}")
    notes = (("defaults: " if args.defaults else "") + f"LoGra {args.projection} {rank} on "
             f"{len(task.module_names)} layers, {args.dtype} rows, {how}"
             + (", query measures the end token" if args.measure_end_token else ""))
    if len(models) > 1:  # [C, Q, N] in checkpoint order: weightings of the ensemble are judged offline from it
        np.save(Path(args.out) / "scores_by_checkpoint.npy", np.asarray(matrices, dtype=np.float32))
    scores, ensemble_note = combine_checkpoints(args, matrices)
    write_result(args.out, "dataworth", scores, clock, task, notes=notes + ensemble_note, store_dim=int(dims[0]))


def scores_at(args, method, task, model_dir: Path, clock: Stopwatch, dims: list) -> np.ndarray:
    """``[Q, N]`` scores of the model in ``model_dir`` (``task`` reused when it is that model, else loaded)."""
    from dataworth.influence.curvature import fit
    from dataworth.gradients.extract import ExtractConfig, extract
    from dataworth.gradients.queries import query_gradients
    from dataworth.evaluation.methods import trackstar_scores
    from dataworth.influence.scores import score_rows

    if task is None:
        with clock("load"):
            task = load_task(args, model_dir=str(model_dir))
    store_dir = Path(args.out) / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    with clock("fit"):
        store = extract(ExtractConfig(model=str(model_dir), data=args.train, out=str(store_dir), modules=args.modules,
                                      projection=args.projection, rank_in=args.rank_in or args.rank or 1,
                                      rank_out=args.rank_out or args.rank or 1,
                                      dtype=args.dtype, device="cpu", max_length=args.max_length,
                                      batch_size=args.batch_size, shard_rows=256,
                                      **({"whiten_damping": args.whiten_damping} if args.whiten_damping else {})),
                        model=task.model, tokenizer=task.tokenizer, encoded=task.train, progress=False)
        curvature = None if method.optimizer == "adam" else fit(store_dir, args.curvature, args.damping)
    with clock("score"):
        queries = task.query_rows if args.measure_end_token else task.queries
        q_rows = query_gradients(store, task.model, task.tokenizer, queries, batch_size=args.batch_size,
                                 measure_end_token=args.measure_end_token)
        if method.optimizer == "adam":
            matrix = trackstar_scores(store, q_rows, model_dir, method)
        else:
            matrix = score_rows(store, q_rows, task.query_ids, curvature, mode=args.mode, top_k=10, full=True).matrix
    dims.append(store.dim)
    shutil.rmtree(store_dir, ignore_errors=True)
    return matrix


if __name__ == "__main__":
    main()
