"""Sequence classification data (GLUE style: a sentence or a pair, and a label) tokenised for a classifier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets

# Text columns tried in order when none are given: GLUE/SuperGLUE pair tasks, then single sentences.
CLASSIFICATION_TEXT_COLUMNS: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
    ("premise", "hypothesis"), ("question", "passage"), ("sentence",), ("text",))


def tokenize_for_classification(dataset: datasets.Dataset, tokenizer: Any, *,
                                text_columns: Sequence[str] | None = None,
                                label_column: str = "label",
                                max_length: int = 128) -> datasets.Dataset:
    """Tokenise a GLUE-style dataset for ``AutoModelForSequenceClassification``.

    ``text_columns`` names one text column or a pair (default: the first of
    :data:`CLASSIFICATION_TEXT_COLUMNS` the dataset has, e.g. ``sentence`` for SST-2 or
    ``question``/``sentence`` for QNLI). Texts are truncated to ``max_length`` tokens and left
    unpadded (pad with ``transformers.DataCollatorWithPadding``). The result has the tokenizer's
    model inputs (``input_ids``, ``attention_mask``, ``token_type_ids`` where it makes them) and
    ``labels``: the label column's values (class ids; floats for a regression task).

    Raises:
        ValueError: the dataset is empty, lacks a text or the label column (the message lists the
            columns present), has a missing label, or ``text_columns`` is not one or two names.
    """
    present = list(dataset.column_names)
    if len(dataset) == 0:
        raise ValueError("tokenize_for_classification: dataset is empty; expected at least one row")
    if text_columns is None:
        text_columns = next((cols for cols in CLASSIFICATION_TEXT_COLUMNS
                             if all(c in present for c in cols)), None)
        if text_columns is None:
            raise ValueError("tokenize_for_classification: no text column found; expected one of "
                             f"{[list(c) for c in CLASSIFICATION_TEXT_COLUMNS]} (or pass "
                             f"text_columns); present columns are {present}")
    text_columns = list(text_columns)
    if len(text_columns) not in (1, 2):
        raise ValueError(f"tokenize_for_classification: text_columns must name one column or a "
                         f"pair, got {text_columns}")
    missing = [c for c in (*text_columns, label_column) if c not in present]
    if missing:
        raise ValueError(f"tokenize_for_classification: dataset is missing column(s) {missing}; "
                         f"present columns are {present}")

    def tokenize_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        labels = batch[label_column]
        if any(label is None for label in labels):
            raise ValueError(f"tokenize_for_classification: column {label_column!r} has a missing "
                             "(None) value; every row needs a label")
        texts = [[str(t) if t is not None else "" for t in batch[c]] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        return {**encoded, "labels": labels}

    return dataset.map(tokenize_batch, batched=True, remove_columns=present,
                       desc="Tokenizing for classification")
