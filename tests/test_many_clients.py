"""Hundreds of clients per round: the cheaper exact SVD path, the streaming server step, client state on disk."""

from __future__ import annotations

import pytest
import torch

from fedsrd.algorithms.fedsrd import FedSRD, LoraModule
from fedsrd.config import FedSRDConfig
from fedsrd.ops import lowrank
from fedsrd.ops.lowrank import (
    choose_svd_path,
    dense_truncated_svd,
    factored_difference,
    solve_left_update,
    stack_factors,
    truncated_svd,
    truncated_svd_flops,
)

MODULE = LoraModule("layer", "layer.lora_A.weight", "layer.lora_B.weight")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() - ref.double()) / torch.linalg.norm(ref.double()))


def trained_like(d_out: int, d_in: int, r: int, m: int, seed: int = 0):
    """Global (B, A) and m clients' factor deltas after a round (B small, A kaiming-like, small moves)."""
    gen = torch.Generator().manual_seed(seed)
    b = 0.01 * torch.randn(d_out, r, generator=gen)
    a = (torch.rand(r, d_in, generator=gen) * 2 - 1) / d_in**0.5
    deltas_b = [1e-3 * torch.randn(d_out, r, generator=gen) for _ in range(m)]
    deltas_a = [1e-4 * torch.randn(r, d_in, generator=gen) for _ in range(m)]
    return b, a, deltas_b, deltas_a


# ---------------------------------------------------------------------------------------------------------------------
# 1. the cheaper exact path
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 32), (32, 80), (64, 64)])
@pytest.mark.parametrize("m", [1, 3, 12])
def test_factored_and_dense_truncated_svd_agree(shape, m):
    d_out, d_in = shape
    r = 4
    b, a, deltas_b, deltas_a = trained_like(d_out, d_in, r, m)
    left, right = stack_factors([b + d for d in deltas_b], [a + d for d in deltas_a], [1.0 / m] * m)
    exact = truncated_svd(left.double(), right.double(), r)
    for fn in (truncated_svd, dense_truncated_svd):
        got = fn(left, right, r)
        assert rel_err(got[0] @ got[1], exact[0] @ exact[1]) < 1e-5
        # the step's output (dB of a B-round) agrees too
        step = solve_left_update(factored_difference(got, (b, a)), a)
        reference = solve_left_update(factored_difference(exact, (b.double(), a.double())), a.double())
        assert rel_err(step, reference) < 1e-4


def test_the_choice_switches_where_the_flop_count_says():
    d, r = 96, 4
    choices = [choose_svd_path(d, d, k, r) for k in range(r, 3 * d)]
    flops = [truncated_svd_flops(d, d, k, r) for k in range(r, 3 * d)]
    assert choices[0] == "factored" and choices[-1] == "dense"
    # one switch, exactly where the counts cross
    switch = choices.index("dense")
    assert all(c == "factored" for c in choices[:switch]) and all(c == "dense" for c in choices[switch:])
    assert flops[switch - 1]["factored"] <= flops[switch - 1]["dense"]
    assert flops[switch]["factored"] > flops[switch]["dense"]
    assert r + switch < d  # the factored QRs stop paying off before m r reaches the module's width
    # forced paths are honoured whatever the shapes
    assert choose_svd_path(d, d, r, r, "dense") == "dense" and choose_svd_path(d, d, 4 * d, r, "factored") == "factored"
    with pytest.raises(ValueError, match="path must be one of"):
        choose_svd_path(d, d, r, r, "fastest")


def _spy_paths(monkeypatch) -> list[str]:
    used: list[str] = []
    for name, fn in (("truncated_svd", lowrank.truncated_svd), ("dense_truncated_svd", lowrank.dense_truncated_svd)):

        def spy(*args, _fn=fn, _name=name, **kwargs):
            used.append("factored" if _name == "truncated_svd" else "dense")
            return _fn(*args, **kwargs)

        monkeypatch.setattr(lowrank, name, spy)
    return used


@pytest.mark.parametrize("path", ["auto", "factored", "dense"])
def test_fedsrd_step_runs_the_chosen_path_and_every_path_gives_the_same_step(monkeypatch, path):
    d, r = 40, 4
    used = _spy_paths(monkeypatch)
    chosen, results = [], {}
    for m in (2, 16):  # m r = 8: factored is cheaper; m r = 64 > d: dense is
        b, a, deltas_b, deltas_a = trained_like(d, d, r, m, seed=m)
        updates = [{MODULE.b_key: db, MODULE.a_key: da} for db, da in zip(deltas_b, deltas_a, strict=True)]
        algo = FedSRD(FedSRDConfig(algorithm="fedsrd", server_step_path=path))
        results[m] = solve_left_update(algo.target_change(MODULE, a, b, updates, [1.0 / m] * m), a)
        chosen.append(used[-1])
        reference = FedSRD(FedSRDConfig(algorithm="fedsrd", server_step_path="factored"))
        b64, a64 = b.double(), a.double()
        updates64 = [{k: v.double() for k, v in u.items()} for u in updates]
        exact = solve_left_update(reference.target_change(MODULE, a64, b64, updates64, [1.0 / m] * m), a64)
        assert rel_err(results[m], exact) < 1e-4
    expected = {"auto": ["factored", "dense"], "factored": ["factored"] * 2, "dense": ["dense"] * 2}[path]
    assert chosen == expected


def test_server_step_path_is_validated():
    with pytest.raises(ValueError, match="server_step_path"):
        FedSRDConfig(algorithm="fedsrd", server_step_path="fast")
