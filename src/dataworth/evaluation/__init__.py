"""Stage 6b, evaluation: is an attribution right? Pure metrics, and the ground truths they are judged by.

- `metrics`: pure functions over score arrays (recall / MRR, LDS, noise ceiling, tail-patch, removal).
- `baselines`: reference attributions that need no gradients (BM25).
- `effects`: one more optimizer step on one row — the influence ground truth of tail-patch.
- `retrain`: the resumable cache of retrains on data subsets — the ground truth of LDS.
- `methods`: dataworth's attribution options for a retrain task (curvatures, ensembles, TrackStar).
- `facts`: fact tracing against gold documents (the demo's table, ``dataworth eval facts``).
- `lds`: the evaluation runs behind ``dataworth eval lds`` / ``brittleness``.
"""
