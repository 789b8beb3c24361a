"""Stage 4, gradients: per-example LoGra-projected gradients, captured by one hook engine.

- `task`: the interface a model's owner implements (`Task`: train loss, measurement, layers); no machinery.
- `modules`: which linear layers are watched (``all`` / ``mlp`` / ``attn`` / a regex / names).
- `projection`: ``random`` / ``pca`` / ``identity`` / ``dense`` projections, regenerated from a store.
- `hooks`: the engine (`GradientHooks`): forward/backward hooks → rows, KFAC sums, per-token terms.
- `extract`: a dataset → a store (sharded, resumable, distributed) — `dw.extract`.
- `watch`: the same rows from a user's own training loop — `dw.watch`.
- `queries`: query rows in a store's coordinates, and exact per-token contributions.
"""
