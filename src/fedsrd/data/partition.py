"""Partitioning a dataset across clients: IID shards, Dirichlet label skew, one source per client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

_DIRICHLET_MAX_TRIES = 100


def _check_num_clients(dataset: datasets.Dataset, num_clients: int, caller: str) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"{caller}: num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > len(dataset):
        raise ValueError(f"{caller}: num_clients ({num_clients}) exceeds the number of rows "
                         f"({len(dataset)}); every client needs at least one row")


def partition_iid(dataset: datasets.Dataset, num_clients: int, *,
                  seed: int = 0) -> list[datasets.Dataset]:
    """Shuffle the rows (``numpy.random.default_rng(seed)``) and cut them into ``num_clients``
    contiguous shards whose sizes differ by at most one."""
    _check_num_clients(dataset, num_clients, "partition_iid")
    order = np.random.default_rng(seed).permutation(len(dataset))
    return [dataset.select(shard.tolist()) for shard in np.array_split(order, num_clients)]


def _dirichlet_split(labels: Sequence[Any], num_clients: int, alpha: float,
                     rng: np.random.Generator) -> list[list[int]]:
    """One draw of per-class client proportions ~ Dir(alpha); returns row indices per client."""
    by_class: dict[Any, list[int]] = {}
    for row, label in enumerate(labels):
        by_class.setdefault(label, []).append(row)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for rows in by_class.values():  # classes in first-appearance order: deterministic
        rows_arr = np.asarray(rows)
        rng.shuffle(rows_arr)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(rows_arr)).astype(int)
        for client, part in zip(clients, np.split(rows_arr, cuts)):
            client.extend(part.tolist())
    return clients


def partition_dirichlet(dataset: datasets.Dataset, num_clients: int, *, column: str,
                        alpha: float = 0.5, seed: int = 0,
                        min_size: int = 1) -> list[datasets.Dataset]:
    """Label-skewed split: for each value of ``column``, its rows are divided among the clients
    in proportions drawn from ``Dirichlet(alpha)`` (smaller ``alpha`` - more skew).

    Draws are repeated (same generator, ``numpy.random.default_rng(seed)``) until every client
    has at least ``min_size`` rows, at most 100 times. Each client's rows keep dataset order.

    Raises:
        ValueError: ``column`` is missing, ``alpha <= 0``, ``num_clients`` is out of range,
            ``num_clients * min_size`` exceeds the rows, or 100 draws all left a client short.
    """
    _check_num_clients(dataset, num_clients, "partition_dirichlet")
    if column not in dataset.column_names:
        raise ValueError(f"partition_dirichlet: column {column!r} not in dataset; present columns "
                         f"are {list(dataset.column_names)}")
    if not alpha > 0:
        raise ValueError(f"partition_dirichlet: alpha must be > 0, got {alpha}")
    if min_size < 0 or num_clients * min_size > len(dataset):
        raise ValueError(f"partition_dirichlet: min_size={min_size} is impossible for "
                         f"{num_clients} clients over {len(dataset)} rows")
    labels = dataset[column]
    rng = np.random.default_rng(seed)
    for _ in range(_DIRICHLET_MAX_TRIES):
        clients = _dirichlet_split(labels, num_clients, alpha, rng)
        if min(len(rows) for rows in clients) >= min_size:
            return [dataset.select(sorted(rows)) for rows in clients]
    raise ValueError(f"partition_dirichlet: no draw in {_DIRICHLET_MAX_TRIES} gave every client "
                     f">= {min_size} rows (alpha={alpha}, num_clients={num_clients}, "
                     f"rows={len(dataset)}); raise alpha or lower min_size")


def partition_by_source(sources: dict[str, datasets.Dataset]) -> list[datasets.Dataset]:
    """One client per source (e.g. per domain), in the dict's order."""
    if not sources:
        raise ValueError("partition_by_source: sources is empty; expected at least one dataset")
    for name, dataset in sources.items():
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"partition_by_source: source {name!r} is a {type(dataset).__name__}; "
                            "expected datasets.Dataset (pick a split of a DatasetDict)")
        if len(dataset) == 0:
            raise ValueError(f"partition_by_source: source {name!r} is empty; every client needs rows")
    return list(sources.values())
