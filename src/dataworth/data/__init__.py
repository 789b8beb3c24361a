"""Stage 1, data: rows in, token ids with loss masks out — the one door every stage reads data through.

- `rows`: parse and validate JSONL / JSON / parquet / directories / ``hf:`` / ``builtin:`` specs into `Row` s
  with stable ids and ``path:line`` sources (`load_rows`).
- `encode`: tokenisation, chat templates, loss masks, the end token, truncation, the data fingerprint
  (`encode_rows`; `without_end_token` / `measured_queries` choose which tokens a query measures).
- `batching`: padded batches and the per-example loss every stage agrees on (summed, never averaged).
- `worlds`: built-in worlds with known ground truth (``builtin:bios``, ``builtin:instruct``).

Imports only `dataworth.errors` and `dataworth.util`.
"""
