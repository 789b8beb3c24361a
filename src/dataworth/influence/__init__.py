"""Stage 5, influence: curvature, scores and approximate search over a store.

- `curvature`: none / raw / kfac / ekfac fitted in the projected space, damped — `dw.fit`.
- `scores`: the streaming kernels, exact top-k and the `Scores` results on disk — `dw.score_rows`.
- `score`: from a model and queries to scores (`dw.score`), the `Task` path and store-less streaming.
- `index`: an optional FAISS index for approximate top-k on huge stores.
"""
