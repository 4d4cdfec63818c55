"""The algorithm registry. Adding an algorithm: one file in this package and one line in `_BUILTIN`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedsrd.algorithms.base import Algorithm, BaseDelta, Payload, State

if TYPE_CHECKING:
    from fedsrd.config import FedSRDConfig

_REGISTRY: dict[str, type[Algorithm]] = {}

# name -> module that defines it (imported lazily, so a broken optional algorithm cannot break the others)
_BUILTIN: dict[str, str] = {
    "fedavg": "fedsrd.algorithms.fedavg",
    "fedsrd": "fedsrd.algorithms.fedsrd",
    "fedsrd_e": "fedsrd.algorithms.fedsrd",
    "fedsrd_ef": "fedsrd.algorithms.fedsrd_ef",
    "fedprox": "fedsrd.algorithms.fedprox",
    "ffa_lora": "fedsrd.algorithms.ffa_lora",
    "flexlora": "fedsrd.algorithms.flexlora",
    "fed_dare": "fedsrd.algorithms.fed_dare",
    "topk": "fedsrd.algorithms.topk",
    "flora": "fedsrd.algorithms.flora",
    "fedsa_lora": "fedsrd.algorithms.fedsa_lora",
    "fedex_lora": "fedsrd.algorithms.fedex_lora",
    "fedfft": "fedsrd.algorithms.fedfft",
    "fedkrso": "fedsrd.algorithms.fedkrso",
    "fedkseed": "fedsrd.algorithms.fedkseed",
    # ---- clients of different LoRA ranks ----
    "hetlora": "fedsrd.algorithms.hetlora",
    # issue 19 (newalgos): the 2025 exact-aggregation methods and FedRPCA, Ferret
    "rolora": "fedsrd.algorithms.rolora",
    "fedsvd": "fedsrd.algorithms.fedsvd",
    "fed_sb": "fedsrd.algorithms.fed_sb",
    "ferret": "fedsrd.algorithms.ferret",
    "fedrpca": "fedsrd.algorithms.fedrpca",
}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make `cls` available under `cls.name`."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__}: an algorithm needs a non-empty class attribute `name`.")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"algorithm {cls.name!r} is already registered by {existing.__module__}.{existing.__name__}.")
    _REGISTRY[cls.name] = cls
    return cls


def list_algorithms() -> list[str]:
    """Names of every registered algorithm, sorted."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def get_algorithm_class(name: str) -> type[Algorithm]:
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {list_algorithms()}.")
    return _REGISTRY[name]


def get_algorithm(name: str, config: FedSRDConfig) -> Algorithm:
    """An instance of the algorithm `name` configured by `config`."""
    return get_algorithm_class(name)(config)


__all__ = [
    "Algorithm",
    "BaseDelta",
    "Payload",
    "State",
    "get_algorithm",
    "get_algorithm_class",
    "list_algorithms",
    "register_algorithm",
]
