"""Stage 6a, reports: what a person reads — the value ledger and the Markdown / HTML report.

- `ledger`: per-document and per-source sums of influence (`dw.value_ledger`).
- `render`: the report's pure rendering (escaping, token colours, HTML with its CSP, Markdown).
- `plots`: matplotlib figures as PNG bytes.
- `report`: `dw.report`, which reads a scores directory and its store, recomputes per-token contributions
  of the shown documents and writes everything.
"""
