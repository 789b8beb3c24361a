"""dataworth: influence functions at LLM scale (LoGra) and targeted data selection (LESS).

`import dataworth as dw` gives the stages of the data flow as functions; see README.md for the API reference.
"""

from __future__ import annotations

__version__ = "0.1.0"
