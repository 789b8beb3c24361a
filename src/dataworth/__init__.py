"""dataworth: influence functions at LLM scale (LoGra) and targeted data selection (LESS).

`import dataworth as dw` gives the stages of the data flow as functions (loaded lazily, so importing the
package is cheap); see README.md for the API reference.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it, in data-flow order
_API = {
    "load_rows": "dataworth.data.rows",
    "encode_rows": "dataworth.data.encode",
    "builtin_rows": "dataworth.data.worlds",
    "load_model": "dataworth.model.load",
    "train": "dataworth.model.train",
    "TrainConfig": "dataworth.model.train",
    "generate": "dataworth.model.generate",
    "extract": "dataworth.gradients.extract",
    "ExtractConfig": "dataworth.gradients.extract",
    "query_gradients": "dataworth.gradients.queries",
    "token_contributions": "dataworth.gradients.queries",
    "watch": "dataworth.gradients.watch",
    "Task": "dataworth.gradients.task",
    "LanguageModelTask": "dataworth.gradients.task",
    "ClassificationMarginTask": "dataworth.gradients.task",
    "FunctionTask": "dataworth.gradients.task",
    "TensorBatch": "dataworth.gradients.task",
    "tensor_batches": "dataworth.gradients.task",
    "measurement_gradients": "dataworth.gradients.queries",
    "score_with_task": "dataworth.influence.score",
    "open_store": "dataworth.store.reader",
    "fit": "dataworth.influence.curvature",
    "load_curvature": "dataworth.influence.curvature",
    "score": "dataworth.influence.score",
    "score_rows": "dataworth.influence.scores",
    "load_scores": "dataworth.influence.scores",
    "combine_scores": "dataworth.influence.ensemble",
    "report": "dataworth.reports.report",
    "value_ledger": "dataworth.reports.ledger",
    "fact_tracing_metrics": "dataworth.evaluation.metrics",
    "SelectConfig": "dataworth.selection.less",
    "PrefilterConfig": "dataworth.selection.prefilter",
    "run_demo": "dataworth.demo",
    "InputError": "dataworth.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # resolved once; later lookups do not come here
        return value
    raise AttributeError(f"module 'dataworth' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
