"""dataworth: influence functions at LLM scale (LoGra) and targeted data selection (LESS).

`import dataworth as dw` gives the stages of the data flow as functions (loaded lazily, so importing the
package is cheap); see README.md for the API reference.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it, in data-flow order
_API = {
    "load_rows": "dataworth.data",
    "encode_rows": "dataworth.data",
    "builtin_rows": "dataworth.worlds",
    "load_model": "dataworth.models",
    "train": "dataworth.train",
    "TrainConfig": "dataworth.train",
    "generate": "dataworth.generate",
    "extract": "dataworth.extract",
    "ExtractConfig": "dataworth.extract",
    "query_gradients": "dataworth.extract",
    "token_contributions": "dataworth.extract",
    "watch": "dataworth.logger",
    "Task": "dataworth.task",
    "LanguageModelTask": "dataworth.task",
    "ClassificationMarginTask": "dataworth.task",
    "FunctionTask": "dataworth.task",
    "TensorBatch": "dataworth.task",
    "tensor_batches": "dataworth.task",
    "measurement_gradients": "dataworth.task",
    "score_with_task": "dataworth.task",
    "open_store": "dataworth.store",
    "fit": "dataworth.curvature",
    "load_curvature": "dataworth.curvature",
    "score": "dataworth.scoring",
    "score_rows": "dataworth.scoring",
    "load_scores": "dataworth.scoring",
    "report": "dataworth.report",
    "value_ledger": "dataworth.ledger",
    "fact_tracing_metrics": "dataworth.evaluate",
    "SelectConfig": "dataworth.select",
    "PrefilterConfig": "dataworth.prefilter",
    "run_demo": "dataworth.demo",
    "InputError": "dataworth.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(_API[name])
        value = globals().get(name) if _API[name] == f"{__name__}.{name}" else None
        return value if value is not None else getattr(module, name)
    raise AttributeError(f"module 'dataworth' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """A stage module that can be called as its own main function: ``dw.extract(...)``.

    The stages ``extract``, ``train``, ``generate`` and ``report`` share their name with their module, and
    importing ``dataworth.extract`` makes Python set the package attribute ``extract`` to the module. Making
    the module callable keeps both ``dw.extract(config)`` and ``import dataworth.extract`` working.
    """

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
