"""Robust aggregation: what bounds one client's influence on a server step (docs/reliability.md, "Poisoned updates").

Two defences, both over the clients' *changes* (what each update proposes to add to the global state):

* **Norm clipping** (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021, without
  the noise). Each client's change c_i is scaled to ``min(1, C / ||c_i||)``; with the adaptive bound
  ``C = k * median_i ||c_i||`` (the round's lower median, so one client of two or more cannot raise it), a client moves
  a weighted mean by at most ``p_i * C``, whatever it sends.
* **Coordinate-wise median and trimmed mean** (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018). For
  each coordinate, sort the m clients' values, drop the ``t`` lowest and ``t`` highest and average the rest
  (median: ``t = (m - 1) // 2``). One client of m >= 3 then moves a coordinate by at most the spread of the honest
  values there. Unweighted: a robust statistic ignores the clients' sample weights.

For algorithms that aggregate LoRA *products* (FedSRD), a client's change is ``(B + dB)(A + dA) - B A``;
`product_change_terms` gives the norm of ``s`` times that update, for any scale ``s``, from the factors alone
(r x r Gram matrices: O(r^2 (d_out + d_in)) work, never a d_out x d_in matrix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedsrd.ops.sparse import SparseTensor

Terms = tuple[float, float, float]  # (xx, xy, yy): ||s X + s^2 Y||^2 = s^2 xx + 2 s^3 xy + s^4 yy


def lower_median(values: Sequence[float]) -> float:
    """The lower median: the (m-1)//2-th smallest value (one of two clients cannot raise it)."""
    if not values:
        raise ValueError("lower_median: expected at least one value, got none.")
    return float(sorted(values)[(len(values) - 1) // 2])


def adaptive_bound(norms: Sequence[float], multiplier: float) -> float:
    """The adaptive clipping bound ``multiplier * lower_median(norms)``."""
    return float(multiplier) * lower_median(norms)


# ---- changes of a payload (sum-aggregated algorithms) ------------------------------------------------------------


def _change(name: str, value, global_state: Mapping[str, torch.Tensor], uploads_deltas: bool) -> torch.Tensor:
    """The change one uploaded tensor proposes (a sparse upload: the change at its positions)."""
    relative = not uploads_deltas and name in global_state
    if isinstance(value, SparseTensor):
        values = value.values.to(torch.float32)
        return values - global_state[name].reshape(-1)[value.indices] if relative else values
    value = value.to(torch.float32)
    return value - global_state[name] if relative else value


def change_norm(payload: Mapping, global_state: Mapping[str, torch.Tensor], uploads_deltas: bool) -> float:
    """The L2 norm (over every tensor) of the change `payload` proposes: the upload itself for delta uploads (and
    names outside the state), else upload - global."""
    total = sum(float((_change(n, v, global_state, uploads_deltas).double() ** 2).sum()) for n, v in payload.items())
    return total**0.5


def scale_change(
    payload: Mapping, global_state: Mapping[str, torch.Tensor], scale: float, uploads_deltas: bool
) -> dict:
    """`payload` with the change it proposes multiplied by `scale` (sparse uploads keep their positions and mask)."""
    out = {}
    for name, value in payload.items():
        scaled = _change(name, value, global_state, uploads_deltas) * scale
        relative = not uploads_deltas and name in global_state
        if isinstance(value, SparseTensor):
            if relative:
                scaled = scaled + global_state[name].reshape(-1)[value.indices]
            out[name] = SparseTensor(shape=value.shape, indices=value.indices, values=scaled, mask=value.mask)
        else:
            out[name] = scaled + global_state[name] if relative else scaled
    return out


# ---- coordinate-wise robust statistics ---------------------------------------------------------------------------


def trim_count(num_clients: int, trim_fraction: float) -> int:
    """Values dropped at each end of every coordinate: ``floor(trim_fraction * m)``, at most ``(m - 1) // 2``."""
    return min(int(trim_fraction * num_clients), (num_clients - 1) // 2)


def trimmed_mean(tensors: Sequence[torch.Tensor], trim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise mean of `tensors` without the `trim` lowest and `trim` highest values of each coordinate.

    Returns the mean (float32) and, per client, how many of its coordinates were dropped (int64, length m).
    ``trim = (m - 1) // 2`` is the coordinate-wise median (the mean of the two middle values for even m).
    """
    m = len(tensors)
    if m == 0:
        raise ValueError("trimmed_mean: expected at least one tensor, got none.")
    if not 0 <= 2 * trim < m:
        raise ValueError(f"trimmed_mean: trim={trim} must leave at least one of {m} values per coordinate.")
    stacked = torch.stack([t.to(torch.float32).reshape(-1) for t in tensors])  # m x n
    if trim == 0:
        return stacked.mean(dim=0).reshape(tensors[0].shape), torch.zeros(m, dtype=torch.int64)
    order = torch.sort(stacked, dim=0, stable=True).indices  # ties: the lower client index ranks first
    kept = torch.gather(stacked, 0, order[trim : m - trim])
    dropped = torch.cat([order[:trim], order[m - trim :]]).reshape(-1)
    counts = torch.bincount(dropped, minlength=m)
    return kept.mean(dim=0).reshape(tensors[0].shape), counts


# ---- product changes (FedSRD) ------------------------------------------------------------------------------------


def _inner(l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor, r2: torch.Tensor) -> float:
    """``<l1 @ r1, l2 @ r2>_F = trace((l1^T l2)(r2 r1^T))``, from k x k Gram matrices only."""
    return float(((l1.T @ l2) * (r1 @ r2.T)).sum())


def product_change_terms(a: torch.Tensor, b: torch.Tensor, delta_a: torch.Tensor, delta_b: torch.Tensor) -> Terms:
    """For one LoRA module (A r x d_in, B d_out x r) and a client's factor deltas, the terms of
    ``||(B + s dB)(A + s dA) - B A||_F^2 = s^2 xx + 2 s^3 xy + s^4 yy``, where the change is ``s X + s^2 Y`` with
    ``X = dB A + B dA = [dB, B] [A; dA]`` and ``Y = dB dA``. Computed in float64 from the factors."""
    a, b, da, db = (t.to(torch.float64) for t in (a, b, delta_a, delta_b))
    left, right = torch.cat([db, b], dim=1), torch.cat([a, da], dim=0)
    xx = _inner(left, right, left, right)
    xy = _inner(left, right, db, da)
    yy = _inner(db, da, db, da)
    return max(xx, 0.0), xy, max(yy, 0.0)


def scaled_norm(terms: Sequence[Terms], scale: float) -> float:
    """``sqrt(sum_modules s^2 xx + 2 s^3 xy + s^4 yy)``: the product change's norm with both factor deltas x `scale`."""
    s = float(scale)
    total = sum(s * s * xx + 2 * s**3 * xy + s**4 * yy for xx, xy, yy in terms)
    return max(total, 0.0) ** 0.5


def largest_scale_within(terms: Sequence[Terms], bound: float, grid: int = 256, steps: int = 60) -> float:
    """The scale ``s`` in [0, 1] at the first point where `scaled_norm` reaches `bound` (1 if it never does).

    The norm is a quartic in ``s`` (zero at 0), not always monotone, so a grid finds the first crossing and bisection
    narrows it; the returned ``s`` always satisfies ``scaled_norm(terms, s) <= bound``.
    """
    if scaled_norm(terms, 1.0) <= bound:
        return 1.0
    low = 0.0
    for j in range(1, grid + 1):
        high = j / grid
        if scaled_norm(terms, high) > bound:
            break
        low = high
    for _ in range(steps):
        mid = 0.5 * (low + high)
        if scaled_norm(terms, mid) <= bound:
            low = mid
        else:
            high = mid
    return low
