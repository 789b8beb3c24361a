"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny random Llama / GPT-2 / GPT-NeoX models.

They are built in-process (no downloads) and are deliberately small so the whole suite stays fast on 2 CPU
cores. Attention is "eager" so that per-example results do not depend on batch composition.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads and lose 10-30x when the 2 cores are shared; subprocesses
# (torchrun, the SIGKILL test) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

CORPUS = [
    "Alice Smith was born in Paris on 3 May 1970.",
    "Bob Jones studied physics at Oxford and works for Acme.",
    "The capital of France is Paris. Oxford is a university town.",
    "What is 2 plus 3? It is 5.",
    "Reverse the word cat: tac.",
    "<|user|> hello <|assistant|> hi there",
] * 4


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


# A ChatML template (the format of SmolLM2-Instruct and Qwen): every message between <|im_start|> and <|im_end|>.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_tokenizer(specials: list[str], bos: str | None, eos: str | None, template: str | None,
                         vocab_size: int = 300):
    """A byte-level BPE tokenizer with ``specials`` (ids 0, 1, …), the given bos/eos/chat template and pad =
    eos, laid out like SmolLM2-Instruct's when called with ``chatml_tokenizer``'s arguments."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    fast.chat_template = template
    return fast


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """SmolLM2-Instruct's special-token layout: <|endoftext|>=0, bos <|im_start|>=1, eos <|im_end|>=2, ChatML."""
    return build_chat_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>",
                                CHATML_TEMPLATE)


def build_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="eager", tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def build_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


def build_neox(vocab_size: int, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, attn_implementation="eager")
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    return build_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer):
    return build_gpt2(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_neox(tiny_tokenizer):
    return build_neox(len(tiny_tokenizer))


def write_test_store(path, rows, modules, header, *, shard_rows=7, dtype="float32", kfac=None):
    """A finished store holding ``rows`` (``[N, D]``) with the given ``ModuleSpec``s, ids ``row{i}``, and
    optional KFAC factors ``{module: (S, A)}`` written as extraction does (``curvature/kfac_factors``)."""
    import numpy as np

    from dataworth.store.format import KFAC_FILE as KFAC_FACTORS
    from dataworth.store.writer import StoreWriter

    rows = np.asarray(rows)
    writer = StoreWriter(path, modules=modules, dtype=dtype, shard_rows=shard_rows, header=header)
    for shard, start in enumerate(range(0, len(rows), shard_rows)):
        part = rows[start : start + shard_rows]
        ids = [f"row{i}" for i in range(start, start + len(part))]
        writer.write_shard(shard, part, ids, np.zeros(len(part)), np.ones(len(part), dtype=np.int64))
    if kfac is not None:
        tensors = {}
        for name, (s, a) in kfac.items():
            tensors[f"{name}.S"] = torch.as_tensor(s, dtype=torch.float64)
            tensors[f"{name}.A"] = torch.as_tensor(a, dtype=torch.float64)
        writer.save_tensors(KFAC_FACTORS, tensors, metadata={"n_rows": str(len(rows)), "n_tokens": "0"})
    return writer.finalize()


_HOLD_LOCK = r"""
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".dataworth.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def lock_held_by_another_process(directory):
    """Another process holding ``directory``'s writer lock (a plain flock on ``.dataworth.lock`` with its
    pid), as a second dataworth writer would; yields that process's pid."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def load_benchmark(name: str, path: Path):
    """A benchmark script imported as module ``name`` (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def hand_adamw_step(names, params, grads, states: dict, meta: dict, lr: float, n_targets: int) -> None:
    """The naive reference for `evaluation.effects.one_step_effects`' AdamW step, in place: ``g = ∇/T``,
    ``v' = β₂ v + (1−β₂) g²``, ``p −= η (1−β₁)/(1−β₁^t) · g / (√(v'/(1−β₂^t)) + ε)`` with ``t`` = saved step + 1."""
    (b1, b2), eps = meta["betas"], meta["eps"]
    for name, p, g in zip(names, params, grads):
        g = g / n_targets
        t = meta["step"][name] + 1
        v = b2 * states[name]["exp_avg_sq"].to(g.dtype) + (1 - b2) * g ** 2
        p -= lr * (1 - b1) / (1 - b1 ** t) * g / ((v / (1 - b2 ** t)).sqrt() + eps)
