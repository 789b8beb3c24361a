"""dataworth.train: a tiny model learns the facts of a small bios world; what it saves reloads to the same
function; the optimizer state on disk is the AdamW state; same seed → same weights; LoRA saves only LoRA."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dataworth.cli import cli
from dataworth.data.encode import prompt_token_ids
from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.model.load import load_model, model_fingerprint
from dataworth.model.optimizer import load_optimizer_state, save_optimizer_state
from dataworth.model.train import (
    SPECIAL_TOKENS,
    TrainConfig,
    fact_accuracy,
    lr_at,
    response_matches,
    train,
    train_tokenizer,
)

WORLD = "people=8&docs_per_person=4&distractors=0"
DATA = f"builtin:bios?{WORLD}"
QUERIES = f"builtin:bios:queries?{WORLD}"



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "tiny"
    start = time.perf_counter()
    result = train(DATA, out, TrainConfig.from_preset("tiny-test"), progress=False)
    return result, time.perf_counter() - start


def reference_greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Obviously correct greedy decoding: full recompute each step, argmax, stop at eos."""
    ids = prompt_token_ids(prompt, tokenizer)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ learning facts

def test_tiny_model_learns_most_facts_quickly(trained):
    result, seconds = trained
    assert result.fact_accuracy > 0.5, result.fact_accuracy
    assert seconds < 120, f"training took {seconds:.0f}s"  # ~15-25 s measured on 2 shared cores
    assert result.epoch_losses[-1] < result.epoch_losses[0] / 10
    record = json.loads((result.out_dir / "dataworth_train.json").read_text())
    assert record["fact_accuracy"] == result.fact_accuracy
    assert [e["loss"] for e in record["epochs"]] == list(result.epoch_losses)


def test_fact_accuracy_equals_plain_greedy_reference(trained):
    result, _ = trained
    loaded = load_model(result.out_dir, device="cpu")
    queries = load_rows(QUERIES)
    budget = max(len(loaded.tokenizer(q.response, add_special_tokens=False)["input_ids"]) for q in queries) + 4
    correct = [response_matches(reference_greedy_text(loaded.model, loaded.tokenizer, q.prompt, budget), q.response)
               for q in queries]
    assert fact_accuracy(loaded.model, loaded.tokenizer, queries) == pytest.approx(sum(correct) / len(correct))
    assert result.fact_accuracy == pytest.approx(sum(correct) / len(correct))


@pytest.mark.parametrize("generated, expected, ok", [
    (" Paris.", " Paris.", True),
    ("Paris", " Paris.", True),
    (" Paris. She grew up", " Paris.", True),
    (" Paris, a city", " Paris.", True),
    (" Parisian", " Paris.", False),
    (" Berlin.", " Paris.", False),
    (" 12 March 1984.", " 12 March 1984.", True),
    (" 12 March 19845", " 12 March 1984.", False),
    (" 12 March", " 12 March 1984.", False),
    ("", " Paris.", False),
    ("anything", "", False),
])
def test_response_matches_cases(generated, expected, ok):
    assert response_matches(generated, expected) is ok


# ------------------------------------------------------------------------------------------ saved artefacts

def test_saved_dir_reloads_with_transformers_to_identical_logits(trained):
    result, _ = trained
    model = AutoModelForCausalLM.from_pretrained(result.out_dir, attn_implementation="eager").eval()
    last = result.checkpoints[-1]
    from_ckpt = AutoModelForCausalLM.from_pretrained(last, attn_implementation="eager").eval()
    loaded = load_model(result.out_dir, device="cpu")
    ids = torch.tensor([prompt_token_ids("Alice Smith was born in", loaded.tokenizer)])
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, from_ckpt(ids).logits)
        assert torch.equal(logits, loaded.model(ids).logits)
    assert model_fingerprint(model) == result.fingerprint == loaded.fingerprint
    assert last == result.out_dir / "checkpoints" / f"epoch-{result.config.epochs}"


def test_checkpoint_optimizer_state_covers_every_parameter(trained):
    result, _ = trained
    ckpt = result.checkpoints[-1]
    states, meta = load_optimizer_state(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    params = dict(model.named_parameters())
    assert set(states) == set(params)
    for name, param in params.items():
        assert states[name]["exp_avg"].shape == param.shape
        assert (states[name]["exp_avg_sq"] >= 0).all()
    assert set(meta["step"].values()) == {result.steps}
    assert meta["betas"] == list(result.config.betas) and meta["eps"] == result.config.eps
    state = meta["trainer_state"]
    assert (state["epoch"], state["step"]) == (result.config.epochs, result.steps)
    steps_per_epoch = result.steps // result.config.epochs
    first = result.steps - steps_per_epoch
    expected = [lr_at(s, result.steps, result.config.lr, result.config.warmup_ratio, result.config.min_lr_ratio)
                for s in range(first, result.steps)]
    assert state["lrs"] == pytest.approx(expected)
    assert state["avg_lr"] == pytest.approx(sum(expected) / len(expected))
    assert result.epoch_lrs[-1] == pytest.approx(state["avg_lr"])


def test_optimizer_state_round_trip_matches_adamw_recurrence(tmp_path):
    """After one AdamW step with gradient g: m = (1-β₁)g, v = (1-β₂)g² (Kingma & Ba, Alg. 1); after three,
    the files hold exactly what the optimizer holds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    betas = (0.8, 0.95)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=betas, eps=1e-7)
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    save_optimizer_state(optimizer, model, tmp_path / "one")
    states, meta = load_optimizer_state(tmp_path / "one")
    for name, g in first_grads.items():
        assert torch.allclose(states[name]["exp_avg"], (1 - betas[0]) * g, rtol=1e-6, atol=0)
        assert torch.allclose(states[name]["exp_avg_sq"], (1 - betas[1]) * g * g, rtol=1e-6, atol=0)
    assert meta["step"] == {n: 1 for n in first_grads} and meta["betas"] == list(betas) and meta["eps"] == 1e-7
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    save_optimizer_state(optimizer, model, tmp_path / "three")
    states, meta = load_optimizer_state(tmp_path / "three")
    for name, param in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(states[name][key], optimizer.state[param][key])
    assert set(meta["step"].values()) == {3}
    raw = load_file(str(tmp_path / "three" / "optimizer.safetensors"))
    assert sorted(raw) == sorted(f"{n}.{k}" for n in first_grads for k in ("exp_avg", "exp_avg_sq"))


def test_load_optimizer_state_missing_files_is_input_error(tmp_path):
    with pytest.raises(InputError, match="optimizer.safetensors"):
        load_optimizer_state(tmp_path)


# ------------------------------------------------------------------------------------------ determinism

def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    config = TrainConfig.from_preset("tiny-test", epochs=2)
    runs = {name: train(DATA, tmp_path / name, TrainConfig.from_preset("tiny-test", epochs=2, seed=seed),
                        queries_spec=None, progress=False)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    weights = {name: load_file(str(tmp_path / name / "model.safetensors")) for name in runs}
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert runs["a"].fingerprint == runs["b"].fingerprint != runs["c"].fingerprint
    assert config.seed == 0


# ------------------------------------------------------------------------------------------ LoRA

def test_lora_finetune_saves_adapter_and_lora_only_optimizer_state(trained, tmp_path):
    base, _ = trained
    config = TrainConfig.from_preset("tiny-test", base=str(base.out_dir), lora=True, epochs=2, lr=1e-3,
                                     lora_targets=("q_proj", "v_proj"), lora_r=4)
    result = train(DATA, tmp_path / "lora", config, queries_spec=None, progress=False)
    assert [c.name for c in result.checkpoints] == ["epoch-1", "epoch-2"]
    base_weights = load_file(str(base.out_dir / "model.safetensors"))
    for ckpt in result.checkpoints:
        adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(base.out_dir.resolve())
        adapter = load_file(str(ckpt / "adapter_model.safetensors"))
        assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
        states, meta = load_optimizer_state(ckpt)
        assert len(states) == 2 * 2 * base.config.num_layers  # (A, B) × (q, v) × layers
        assert all(".lora_A." in n or ".lora_B." in n for n in states)
        assert meta["trainer_state"]["epoch"] == int(ckpt.name.split("-")[1])
        loaded = load_model(ckpt, device="cpu")  # base spec + unmerged adapter
        names = dict(loaded.model.named_parameters())
        assert set(states) <= set(names)
        for name, state in states.items():
            assert state["exp_avg"].shape == names[name].shape
        for name, value in base_weights.items():  # the base weights are untouched
            peft_name = "base_model.model." + name.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
                "v_proj.weight", "v_proj.base_layer.weight")
            if peft_name in names:
                assert torch.equal(names[peft_name].detach(), value)
    merged = AutoModelForCausalLM.from_pretrained(result.out_dir)  # a normal HF dir: the merged model
    adapted = load_model(result.checkpoints[-1], device="cpu").model
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
    assert (result.out_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_unmerged_output_is_the_adapter_itself(trained, tmp_path):
    base, _ = trained
    config = TrainConfig.from_preset("tiny-test", base=str(base.out_dir), lora=True, epochs=1, lr=1e-3,
                                     lora_targets=("o_proj",), merge_lora=False)
    result = train(DATA, tmp_path / "adapter", config, queries_spec=None, progress=False)
    assert (result.out_dir / "adapter_config.json").is_file() and not (result.out_dir / "model.safetensors").exists()
    final = load_model(result.out_dir, device="cpu")
    last = load_model(result.checkpoints[-1], device="cpu")
    assert type(final.model).__name__ == "PeftModelForCausalLM"
    assert final.fingerprint == last.fingerprint == result.fingerprint


def test_lora_without_base_is_input_error():
    with pytest.raises(InputError, match="--base"):
        TrainConfig.from_preset("tiny-test", lora=True)


# ------------------------------------------------------------------------------------------ pieces

def test_gpt_neox_arch_trains_and_reloads(tmp_path):
    result = train(DATA, tmp_path / "neox", TrainConfig.from_preset("tiny-test", arch="gpt_neox", epochs=1),
                   queries_spec=None, progress=False)
    model = AutoModelForCausalLM.from_pretrained(result.out_dir)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model_fingerprint(model) == result.fingerprint


def test_messages_corpus_gets_open_instruct_chat_template(tmp_path):
    rows = tmp_path / "chat.jsonl"
    rows.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                       {"role": "assistant", "content": w}]})
                              for w in ("red", "green", "blue", "cyan")) + "\n")
    result = train(str(rows), tmp_path / "chat", TrainConfig.from_preset("tiny-test", epochs=1), progress=False)
    tokenizer = load_model(result.out_dir, device="cpu").tokenizer
    ids = prompt_token_ids("say red", tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<s>", "<|user|>"]
    assert tokenizer.convert_ids_to_tokens(ids).count("<|assistant|>") == 1
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|assistant|>\n")


def test_train_tokenizer_specials_and_determinism():
    texts = ["Alice Smith was born in Paris.", "<|user|> hi <|assistant|> hello", "Bob works for Acme."] * 5
    tok = train_tokenizer(texts, 300)
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert tok("<|user|>x", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids("<|user|>")
    assert train_tokenizer(texts, 300).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    # a name gets the same tokens at the start of a prompt as inside a document
    start = tok("Alice Smith", add_special_tokens=False)["input_ids"]
    inside = tok("x. Alice Smith", add_special_tokens=False)["input_ids"]
    assert inside[-len(start):] == start


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40))
def test_train_tokenizer_round_trips_any_text(text):
    tok = _TOKENIZER
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoded = tok.decode(ids)
    assert decoded in (text, " " + text)  # byte-level; a prefix space is added when the text lacks one


_TOKENIZER = train_tokenizer(["Alice Smith was born in Paris.", "Bob works for Acme."] * 3, 280)


@given(step=st.integers(0, 999), total=st.integers(1, 1000), warmup=st.floats(0, 0.5), floor=st.floats(0, 1))
def test_lr_schedule_warmup_peak_and_cosine_floor(step, total, warmup, floor):
    step = step % total
    lr = lr_at(step, total, 1.0, warmup, floor)
    n_warm = math.ceil(warmup * total)
    assert floor - 1e-12 <= lr <= 1.0 + 1e-12 or step < n_warm
    if step < n_warm:
        assert lr == pytest.approx((step + 1) / n_warm)
    if step == n_warm and n_warm < total:
        assert lr == pytest.approx(1.0)
    if step == total - 1 and total - n_warm > 1:
        assert lr == pytest.approx(floor)
    if n_warm <= step < total - 1:
        assert lr_at(step + 1, total, 1.0, warmup, floor) <= lr + 1e-12


def test_train_config_validation_names_the_field():
    with pytest.raises(InputError, match="field 'arch'"):
        TrainConfig(arch="gpt2-xl")
    with pytest.raises(InputError, match="--preset"):
        TrainConfig.from_preset("huge")
    assert TrainConfig.from_preset("tiny", epochs=None).epochs == TrainConfig().epochs


_FLOAT_FIELDS = ["lr", "min_lr_ratio", "warmup_ratio", "weight_decay", "eps", "grad_clip", "lora_dropout", "betas"]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(_FLOAT_FIELDS), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_non_finite_hyper_parameters_are_refused_naming_the_field(name, value):
    """``inf > 0`` passes a range check: every float field must be refused when NaN or ±inf."""
    given_value = (0.9, value) if name == "betas" else value
    with pytest.raises(InputError, match=rf"field '{name}'.*must be a finite number"):
        TrainConfig.from_preset("tiny-test", **{name: given_value})


def _train_cli(out, *flags):
    return CliRunner().invoke(cli, ["train", "--data", DATA, "--out", str(out), "--preset", "tiny-test",
                                    "--queries", "none", *flags])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: "), result.output
    return line


@pytest.mark.parametrize("lr", ["inf", "nan", "-inf"])
def test_cli_train_refuses_a_non_finite_learning_rate_naming_the_flag(tmp_path, lr):
    assert "--lr" in _one_line_error(_train_cli(tmp_path / "m", "--lr", lr))
    assert not (tmp_path / "m").exists()


def test_training_whose_loss_becomes_nan_stops_and_leaves_the_earlier_model_untouched(trained, tmp_path):
    """lr 1e30 is finite but blows the weights up after the first steps; training must stop at the first
    NaN loss naming epoch and step, exit 2, and ``--out`` (here an earlier train output) must stay as it was,
    with no half-saved model or staging folder beside it."""
    import shutil

    out = tmp_path / "m"
    shutil.copytree(trained[0].out_dir, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = _one_line_error(_train_cli(out, "--lr", "1e30", "--epochs", "3"))
    assert "loss became nan" in line and "epoch 1" in line and "step" in line
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_weights_broken_by_the_last_step_are_never_saved(tmp_path, monkeypatch):
    """The very last optimizer step leaves a weight non-finite (its loss was finite, so no later loss can
    tell): the check before saving stops it, and nothing is written."""
    real_step = torch.optim.AdamW.step

    def breaking_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", breaking_step)
    line = _one_line_error(_train_cli(tmp_path / "m", "--epochs", "1", "--batch-size", "256"))
    assert "NaN or inf" in line and "after epoch 1" in line
    assert list(tmp_path.iterdir()) == []


def test_a_learning_rate_beyond_float32_is_refused_not_a_traceback(tmp_path):
    assert "float32" in _one_line_error(_train_cli(tmp_path / "m", "--lr", "1e39"))


# ------------------------------------------------------------------------------------------ CLI

def test_cli_train_runs_and_refuses_a_foreign_out_dir(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--data", DATA, "--out", str(tmp_path / "m"), "--preset", "tiny-test",
                                 "--epochs", "1", "--queries", "none"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and (tmp_path / "m" / "model.safetensors").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = runner.invoke(cli, ["train", "--data", DATA, "--out", str(foreign), "--preset", "tiny-test"])
    assert refused.exit_code == 2 and "--out" in refused.output
    assert (foreign / "notes.txt").read_text() == "mine"


def test_attn_implementation_runs_for_training_only_and_none_is_eager_bit_for_bit():
    """``attn_implementation`` picks the kernel inside `train_epochs` and restores the model's after; ``None``
    and ``"eager"`` train the eager model to identical weights, ``"sdpa"`` to the same up to rounding."""
    import copy

    from conftest import build_llama

    from dataworth.data.batching import Encoded
    from dataworth.model.train import train_epochs

    g = torch.Generator().manual_seed(0)
    rows = [Encoded(str(i), torch.randint(3, 60, (5 + i % 4,), generator=g).tolist(), [0] + [1] * (4 + i % 4))
            for i in range(6)]
    base = build_llama(60)
    weights = {}
    for attn in (None, "eager", "sdpa"):
        model = copy.deepcopy(base)
        config = TrainConfig(batch_size=3, epochs=2, lr=1e-2, attn_implementation=attn)
        train_epochs(model, rows, 0, config, torch.device("cpu"))
        assert model.config._attn_implementation == "eager"  # restored
        weights[attn] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(weights[None], weights["eager"])
    torch.testing.assert_close(weights["sdpa"], weights["eager"], rtol=1e-3, atol=1e-4)  # Adam amplifies rounding
    with pytest.raises(InputError, match="attn_implementation"):
        TrainConfig(attn_implementation="flash")
