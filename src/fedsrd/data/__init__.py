"""Instruction data for federated fine-tuning, one module per concern:

* `fedsrd.data.synthetic` - synthetic domains with short, verifiable answers (:func:`synthetic_domain`,
  :func:`load_synthetic`), deterministic by seed;
* `fedsrd.data.sources` - local files or directories and Hub datasets (:func:`load_instruction_data`);
* `fedsrd.data.sft` - prompt templates (:func:`build_prompt`) and completion-only labels (:func:`tokenize_for_sft`);
* `fedsrd.data.classification` - a sentence (pair) and a label for a classifier (:func:`tokenize_for_classification`);
* `fedsrd.data.partition` - IID shards, Dirichlet label skew and one source per client (:func:`partition_iid`,
  :func:`partition_dirichlet`, :func:`partition_by_source`).

Every name is importable from `fedsrd.data` itself, as before the split.
"""

from fedsrd.data.classification import CLASSIFICATION_TEXT_COLUMNS, tokenize_for_classification
from fedsrd.data.partition import partition_by_source, partition_dirichlet, partition_iid
from fedsrd.data.sft import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    PROMPT_TEMPLATES,
    build_prompt,
    tokenize_for_sft,
)
from fedsrd.data.sources import load_instruction_data
from fedsrd.data.synthetic import SYNTHETIC_DOMAINS, load_synthetic, synthetic_domain

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CLASSIFICATION_TEXT_COLUMNS",
    "IGNORE_INDEX",
    "PROMPT_TEMPLATES",
    "SYNTHETIC_DOMAINS",
    "build_prompt",
    "load_instruction_data",
    "load_synthetic",
    "partition_by_source",
    "partition_dirichlet",
    "partition_iid",
    "synthetic_domain",
    "tokenize_for_classification",
    "tokenize_for_sft",
]
