"""Which clients train in a round: the same draw in every runtime, seeded by (run seed, round[, retry])."""

from __future__ import annotations

import random

from fedsrd.ops import derive_seed


def sample_clients(seed: int, round: int, num_clients: int, per_round: int, attempt: int = 0) -> list[int]:
    """The clients that train in `round`: all of them, or `per_round` drawn by (seed, round[, retry]), in id order."""
    if per_round >= num_clients:
        return list(range(num_clients))
    parts = ("sample", round) if attempt == 0 else ("sample", round, "retry", attempt)
    rng = random.Random(derive_seed(seed, *parts))
    return sorted(rng.sample(range(num_clients), per_round))
