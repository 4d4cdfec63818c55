"""Pure tensor math shared by the algorithms: no models, files or processes here."""

from fedsrd.ops.aggregate import normalized_weights, weighted_sum
from fedsrd.ops.seeding import derive_seed, generator_for
from fedsrd.ops.sparse import SeededMask, SparseTensor, densify, round_to_dtype

__all__ = [
    "SeededMask",
    "SparseTensor",
    "densify",
    "derive_seed",
    "generator_for",
    "normalized_weights",
    "round_to_dtype",
    "weighted_sum",
]
