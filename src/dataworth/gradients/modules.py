"""Which layers are watched: module selection by group, regular expression or explicit names.

Only ``nn.Linear`` and Hugging Face ``Conv1D`` are supported: their per-example gradient factorises as
``G = Σ_t δ_t x_tᵀ``, which LoGra projects without forming it. The output head is left out of ``all`` (it is
as large as the vocabulary; LoGra and LogIX skip it too); name it in a regex to watch it.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from dataworth.errors import InputError

try:  # transformers' GPT-2 style layer: weight is (d_in, d_out), y = x @ W + b
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency, this is belt and braces
    Conv1D = ()  # type: ignore[assignment]


MODULE_GROUPS = {
    "mlp": re.compile(r"(mlp|feed_forward|ffn|dense_h_to_4h|dense_4h_to_h|fc_in|fc_out|c_fc)"),
    "attn": re.compile(r"(attn|attention|self_attn|q_proj|k_proj|v_proj|o_proj|query_key_value)"),
}


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D stores weight as (in, out)
    return int(d_in), int(d_out)


def weight_layout(module: nn.Module) -> str:
    """How ``weight.grad`` relates to a store row: rows are always Ĝ as (k_out × k_in); Conv1D's weight is (in × out)."""
    return "out_in" if isinstance(module, nn.Linear) else "in_out"


def select_modules(model: nn.Module, spec: str = "all", include_lm_head: bool = False) -> list[tuple[str, nn.Module]]:
    """Supported layers chosen by ``spec``: ``all``, ``mlp``, ``attn`` or a regex searched in module names.

    The output head is left out of ``all`` (it is as large as the vocabulary and LoGra/LogIX skip it too);
    name it in a regex to watch it. No match is an error that lists what is available.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and is_supported(m)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if spec == "all":
        chosen = [(n, m) for n, m in candidates if include_lm_head or m is not head]
    elif spec in MODULE_GROUPS:
        rx = MODULE_GROUPS[spec]
        chosen = [(n, m) for n, m in candidates if rx.search(n) and m is not head]
    else:
        try:
            rx = re.compile(spec)
        except re.error as exc:
            raise InputError(f"--modules: invalid regular expression {spec!r}: {exc}") from None
        chosen = [(n, m) for n, m in candidates if rx.search(n)]
    if not chosen:
        available = ", ".join(n for n, _ in candidates[:40]) + (" ..." if len(candidates) > 40 else "")
        raise InputError(
            f"--modules {spec!r} matches no supported layer (nn.Linear / Conv1D); available: {available or 'none'}"
        )
    return chosen


def resolve_modules(model: nn.Module, modules: str | Sequence[str] = "all") -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` in model order for a spec (``all|mlp|attn|regex``) or an explicit list of names.

    Only ``nn.Linear`` and Hugging Face ``Conv1D`` are supported (their per-example gradient factorises as
    ``Σ_t δ_t x_tᵀ``); naming anything else is an `InputError` that lists the linear layers there are.
    """
    if isinstance(modules, str):
        return select_modules(model, modules)
    names = [str(n) for n in modules]
    by_name = dict(model.named_modules())
    linear = [n for n, m in by_name.items() if n and is_supported(m)]
    if not names:
        raise InputError(f"modules: empty list; name at least one linear layer ({listing(linear)})")
    for n in names:
        if n not in by_name or not n:
            raise InputError(f"modules: no module named {n!r} in the model; linear layers: {listing(linear)}")
        if not is_supported(by_name[n]):
            raise InputError(
                f"modules: {n!r} is a {type(by_name[n]).__name__}; supported layers are nn.Linear and "
                f"transformers Conv1D (linear layers in this model: {listing(linear)})"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"modules: {repeated[0]!r} is named more than once")
    order = {n: i for i, n in enumerate(by_name)}
    return [(n, by_name[n]) for n in sorted(names, key=order.__getitem__)]


def modules_spec(modules: str | Sequence[str], chosen: Sequence[tuple[str, nn.Module]]) -> str:
    """The spec recorded in the manifest: the string as given, or an anchored regex of exactly ``chosen``
    (so `dataworth.gradients.queries.store_extractor` reselects the same layers for query gradients)."""
    if isinstance(modules, str):
        return modules
    return "^(?:" + "|".join(re.escape(n) for n, _ in chosen) + ")$"


def listing(names: Sequence[str], limit: int = 30) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")
