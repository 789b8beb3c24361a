"""Stage 3, the gradient store: the on-disk contract between the gradient writers and the influence readers.

It sits before `dataworth.gradients` in the import order because it knows nothing about models: plain
``.npy`` shards, parquet side tables, safetensors and one JSON manifest (docs/design.md, "Store on disk").

- `format`: names, dtypes and their exact codecs, the module layout of a row, manifest reading/validation.
- `reader`: `open_store` → `Store` (validated, memory-mapped, prefetching block reader).
- `writer`: `StoreWriter` (append-only, resumable, atomic) and rank-local shard files / fragments.
- `tensors`: safetensors side files (curvature, covariances, PCA) with sorted metadata.
"""
