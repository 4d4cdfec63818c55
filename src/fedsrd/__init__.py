"""fedsrd: communication-efficient federated fine-tuning of LLMs on transformers + PEFT."""

from fedsrd.algorithms import Algorithm, get_algorithm, list_algorithms, register_algorithm
from fedsrd.config import FedSRDConfig

__version__ = "0.1.0"

_LAZY = {
    "FederatedTrainer": "fedsrd.trainer",
    "FederatedCallback": "fedsrd.federation.callbacks",
    "merge_adapters": "fedsrd.server",
    "FederatedServer": "fedsrd.server",
    "FederatedClient": "fedsrd.client",
    "load_synthetic": "fedsrd.data",
    "load_instruction_data": "fedsrd.data",
    "tokenize_for_sft": "fedsrd.data",
    "tokenize_for_classification": "fedsrd.data",
    "partition_iid": "fedsrd.data",
    "partition_dirichlet": "fedsrd.data",
    "partition_by_source": "fedsrd.data",
    "load_causal_lm": "fedsrd.models",
}


def __getattr__(name: str):
    # transformers/peft are imported on first use, so `import fedsrd` stays light (e.g. for a server on files alone).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedsrd' has no attribute {name!r}")


__all__ = ["Algorithm", "FedSRDConfig", "get_algorithm", "list_algorithms", "register_algorithm", *_LAZY]
