"""Prompts and SFT tokenisation: the Alpaca or chat template, and labels on the completion tokens only.

Padding is left to the collator, e.g. ``transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)``.
"""

from __future__ import annotations

from typing import Any

import datasets

IGNORE_INDEX = -100  # label value ignored by the cross-entropy loss

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_TEMPLATES: tuple[str, ...] = ("alpaca", "chat")


def build_prompt(instruction: str, input: str = "", *, template: str = "alpaca",
                 tokenizer: Any = None) -> str:
    """The prompt text that precedes the response.

    ``"alpaca"`` is the Stanford Alpaca template (the no-input variant when ``input`` is empty),
    ending in ``"### Response:\\n"``. ``"chat"`` renders one user turn (instruction, then a blank
    line and the input if any) with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.
    """
    if template == "alpaca":
        if input:
            return ALPACA_PROMPT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("build_prompt: template='chat' needs a tokenizer with a chat_template; "
                             "use template='alpaca' for base models")
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    raise ValueError(f"build_prompt: unknown template {template!r}; expected one of "
                     f"{list(PROMPT_TEMPLATES)}")


def _truncate(prompt_ids: list[int], completion_ids: list[int], max_length: int,
              bos_token_id: int | None) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into ``max_length`` tokens (see :func:`tokenize_for_sft`)."""
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    reserved = min(len(completion_ids), max(1, max_length // 4))
    if len(prompt_ids) <= max_length - reserved:
        return prompt_ids, completion_ids[: max_length - len(prompt_ids)]
    # The prompt alone is too long: keep its end (the "### Response:" cue) and a leading BOS.
    prompt_budget = max_length - reserved
    keep_bos = bos_token_id is not None and prompt_ids[0] == bos_token_id and prompt_budget > 1
    head = prompt_ids[:1] if keep_bos else []
    tail = prompt_ids[len(prompt_ids) - (prompt_budget - len(head)):]
    return head + tail, completion_ids[:reserved]


def tokenize_for_sft(dataset: datasets.Dataset, tokenizer: Any, *, template: str = "alpaca",
                     max_length: int = 512, instruction_column: str = "instruction",
                     input_column: str = "input",
                     output_column: str = "output") -> datasets.Dataset:
    """Tokenise instruction data for supervised fine-tuning with a completion-only loss.

    The prompt (:func:`build_prompt`) and the completion are tokenised separately: the prompt
    with the tokenizer's special tokens (e.g. a BOS; for ``template="chat"`` without, since the
    chat template writes its own), the completion without them and followed by
    ``tokenizer.eos_token_id``. ``labels`` are ``-100`` on every prompt token and equal the ids on
    the completion, so the loss covers only the response (and EOS).

    Truncation to ``max_length`` (rows are never dropped):

    * prompt + completion fits: nothing is cut;
    * otherwise, if the whole prompt fits beside ``r = min(len(completion), max(1, max_length // 4))``
      completion tokens, the prompt is kept whole (its start included) and the completion's
      tail is cut;
    * otherwise the prompt is cut from the left (a leading BOS is kept) to make room for exactly
      ``r`` completion tokens, so every row keeps its response cue and at least one label.

    Columns of the result are ``input_ids``, ``attention_mask`` and ``labels`` (unpadded; pad with
    ``transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)``).

    Raises:
        ValueError: the dataset is empty, lacks ``instruction_column`` or ``output_column``
            (``input_column`` is optional and read as ``""`` when absent), ``max_length < 2``, or the
            tokenizer has no ``eos_token_id``.
    """
    present = list(dataset.column_names)
    missing = [column for column in (instruction_column, output_column) if column not in present]
    if missing:
        raise ValueError(f"tokenize_for_sft: dataset is missing column(s) {missing}; "
                         f"present columns are {present}")
    if len(dataset) == 0:
        raise ValueError("tokenize_for_sft: dataset is empty; expected at least one row")
    if max_length < 2:
        raise ValueError(f"tokenize_for_sft: max_length must be >= 2, got {max_length}")
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("tokenize_for_sft: tokenizer.eos_token_id is None; set an eos_token")
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"tokenize_for_sft: unknown template {template!r}; expected one of "
                         f"{list(PROMPT_TEMPLATES)}")
    has_input = input_column in present
    bos_token_id = getattr(tokenizer, "bos_token_id", None)

    def tokenize_batch(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        instructions = batch[instruction_column]
        inputs = batch[input_column] if has_input else [""] * len(instructions)
        prompts = [build_prompt(str(instruction or ""), str(input_text or ""), template=template,
                                tokenizer=tokenizer)
                   for instruction, input_text in zip(instructions, inputs)]
        outputs = batch[output_column]
        if any(output is None for output in outputs):
            raise ValueError(f"tokenize_for_sft: column {output_column!r} has a missing (None) "
                             "value; every row needs a response")
        prompt_ids = tokenizer(prompts, add_special_tokens=template != "chat")["input_ids"]
        completion_ids = tokenizer([str(o) for o in outputs], add_special_tokens=False)["input_ids"]
        result: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, completion in zip(prompt_ids, completion_ids):
            prompt, completion = _truncate(list(prompt), list(completion) + [eos_token_id],
                                           max_length, bos_token_id)
            result["input_ids"].append(prompt + completion)
            result["attention_mask"].append([1] * (len(prompt) + len(completion)))
            result["labels"].append([IGNORE_INDEX] * len(prompt) + completion)
        return result

    return dataset.map(tokenize_batch, batched=True, remove_columns=present,
                       desc="Tokenizing for SFT")
