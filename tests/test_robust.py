"""Robust aggregation (fedsrd.ops.robust, FederatedServer.bound_influence): one poisoned client of four moves the
global by a bounded amount; algorithms that cannot bound it refuse the option at config time."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fedsrd import FedSRDConfig, get_algorithm
from fedsrd.ops.robust import (
    largest_scale_within,
    product_change_terms,
    scaled_norm,
    trim_count,
    trimmed_mean,
)
from fedsrd.server import FederatedServer

REPO = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("poisoning", REPO / "benchmarks" / "poisoning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def test_trimmed_mean_is_the_median_at_most_trim_and_counts_what_it_drops():
    values = [torch.tensor([1.0, 5.0]), torch.tensor([2.0, 1.0]), torch.tensor([100.0, 2.0]), torch.tensor([3.0, 3.0])]
    median, dropped = trimmed_mean(values, trim=1)
    torch.testing.assert_close(median, torch.tensor([2.5, 2.5]))  # mean of the two middle values
    assert dropped.tolist() == [2, 1, 1, 0]  # coordinate 0 drops clients 0 and 2, coordinate 1 clients 1 and 0
    mean, none = trimmed_mean(values, trim=0)
    torch.testing.assert_close(mean, torch.stack(values).mean(0)) and none.sum() == 0
    assert trim_count(4, 0.25) == 1 and trim_count(3, 0.25) == 0 and trim_count(10, 0.49) == 4
    with pytest.raises(ValueError, match="at least one"):
        trimmed_mean(values, trim=2)


def test_product_change_norm_matches_the_dense_product_without_forming_it():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 20, generator=g, dtype=torch.float64), torch.randn(12, 4, generator=g, dtype=torch.float64)
    da, db = torch.randn(4, 20, generator=g, dtype=torch.float64), torch.randn(12, 4, generator=g, dtype=torch.float64)
    terms = [product_change_terms(a, b, da, db)]
    for s in (0.0, 0.3, 1.0, 2.0):
        dense = torch.linalg.norm((b + s * db) @ (a + s * da) - b @ a)
        assert scaled_norm(terms, s) == pytest.approx(float(dense), rel=1e-9, abs=1e-12)
    bound = 0.25 * scaled_norm(terms, 1.0)
    s = largest_scale_within(terms, bound)
    assert 0 < s < 1 and scaled_norm(terms, s) <= bound and scaled_norm(terms, s) == pytest.approx(bound, rel=1e-6)
    assert largest_scale_within(terms, 2 * scaled_norm(terms, 1.0)) == 1.0


@pytest.mark.parametrize(
    ("algorithm", "setting", "able"),
    [
        ("fedsrd", {"robust_aggregation": "median"}, "fedavg"),
        ("topk", {"robust_aggregation": "trimmed_mean"}, "fedfft"),
        ("flora", {"clip_update_norm": 1.0}, "fedsrd"),
        ("fedkseed", {"adaptive_clip": "on"}, "fed_dare"),
        ("flexlora", {"robust_aggregation": "median"}, "ffa_lora"),
    ],
)
def test_config_refuses_a_defence_the_algorithm_cannot_apply_and_names_those_that_can(algorithm, setting, able):
    with pytest.raises(ValueError, match=rf"FedSRDConfig\.{next(iter(setting))}: .*{algorithm}.*{able}"):
        FedSRDConfig(algorithm=algorithm, **setting)


def test_default_adaptive_clip_is_off_where_it_cannot_apply_and_values_are_checked():
    FedSRDConfig(algorithm="flora")  # adaptive_clip="auto": nothing to refuse
    assert FedSRDConfig().adaptive_clip == "auto" and FedSRDConfig().adaptive_clip_multiplier == 3.0
    for bad in ({"adaptive_clip": "maybe"}, {"adaptive_clip_multiplier": 0}, {"robust_aggregation": "krum"},
                {"trim_fraction": 0.5}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            FedSRDConfig(**bad)


def _poisoned_round(algorithm: str, attack: str, seed: int = 0, **defence):
    """The honest merge (no defence), the round with client 3 poisoned under `defence`, and what they need."""
    state = bench.initial_state(algorithm, seed)
    cfg = FedSRDConfig(algorithm=algorithm, num_clients=4)
    algo = get_algorithm(algorithm, cfg)
    locals_ = bench.honest_locals(state, seed)
    honest = [bench.encode_update(algo, state, loc, c, None) for c, loc in enumerate(locals_)]
    poisoned = [*honest[:3], bench.encode_update(algo, state, locals_[3], 3, attack)]
    reference, _ = bench.server_state(algorithm, state, honest, {"adaptive_clip": "off"})
    cfg = FedSRDConfig(algorithm=algorithm, num_clients=4, **defence)
    server = FederatedServer(get_algorithm(algorithm, cfg), dict(state), cfg)
    result = server.step(bench.ROUND, poisoned)
    return state, reference, server, result, honest


def _flat(state):
    return torch.cat([state[k].reshape(-1).double() for k in sorted(state)])


@pytest.mark.parametrize("attack", bench.ATTACKS)
@pytest.mark.parametrize("algorithm", ["fedavg", "fedfft", "topk"])
def test_default_clip_bounds_a_poisoned_clients_pull_on_a_weighted_mean(algorithm, attack):
    state, reference, server, result, honest = _poisoned_round(algorithm, attack)
    robust = result.robust
    assert list(robust["clipped"]) == ["3"] and robust["clipped"]["3"]["norm"] > robust["clip_bound"]
    assert robust["clip_bound"] == pytest.approx(3.0 * robust["median_norm"])
    # The step is (1/4) sum of the changes: the poisoned one, clipped to C, replaces client 3's honest change.
    algo = server.algorithm
    msg = server.decode_update(honest[3], bench.ROUND)
    honest_change = algo.update_norm(state, msg.tensors)
    distance = float((_flat(server.state) - _flat(reference)).norm())
    assert distance <= (robust["clip_bound"] + honest_change) / 4 * (1 + 1e-5)
    _, _, off, _, _ = _poisoned_round(algorithm, attack, adaptive_clip="off")
    assert float((_flat(off.state) - _flat(reference)).norm()) > 10 * distance  # without the defence: far off


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_coordinatewise_rules_stay_within_the_honest_values(rule):
    state, _, server, result, honest = _poisoned_round("fedavg", "max_value", robust_aggregation=rule,
                                                       adaptive_clip="off")  # fmt: skip
    uploads = [server.decode_update(blob, bench.ROUND).tensors for blob in honest[:3]]
    for name, value in server.state.items():
        stacked = torch.stack([u[name] for u in uploads])
        assert bool((value >= stacked.min(0).values - 1e-6).all() and (value <= stacked.max(0).values + 1e-6).all())
    assert result.robust["rule"] == rule and result.robust["trim_per_side"] == 1
    assert result.robust["trimmed_share"]["3"] == 1.0  # the attacker's every coordinate was dropped


def _product(state):
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    return [state[f"{m}.lora_B.weight"].double() @ state[f"{m}.lora_A.weight"].double() for m in modules]


@pytest.mark.parametrize("attack", bench.ATTACKS)
@pytest.mark.parametrize("algorithm", ["fedsrd", "fedsrd_e", "fedsrd_ef"])
def test_fedsrd_clips_each_clients_product_change_and_the_global_product_moves_a_bounded_amount(algorithm, attack):
    state, reference, server, result, honest = _poisoned_round(algorithm, attack)
    robust = result.robust
    bound = robust["clip_bound"]
    assert list(robust["clipped"]) == ["3"]
    # every client's product change is now at most the bound
    msg = server.decode_update(bench.encode_update(server.algorithm, state, bench.honest_locals(state, 0)[3], 3,
                                                   attack), bench.ROUND)  # fmt: skip
    clipped = server.algorithm.clip_update(state, msg.tensors, bound)
    assert server.algorithm.update_norm(state, clipped) <= bound * (1 + 1e-9)
    # The target change dW = W_target - B A has ||dW|| <= sum_i p_i ||dW_i|| <= C (x2 with the rank-r SVD: BA is
    # rank r, so ||SVD_r(W) - W|| <= ||W - BA||). Round 3 sends dB = drop(dW pinv(A)): the global product moves by
    # drop(dB) A, at most ||dW|| kappa(A) / (1 - p) (DARE keeps 1 - p, survivors x 1/(1-p)).
    factor = 2.0 if algorithm != "fedsrd_e" else 1.0
    moved = sum(float(torch.linalg.norm(new - old) ** 2)
                for new, old in zip(_product(server.state), _product(state), strict=True)) ** 0.5  # fmt: skip
    kappa = max(float(torch.linalg.cond(state[k].double())) for k in state if "lora_A" in k)
    limit = factor * bound * kappa / (1 - server.config.download_drop)
    assert moved <= limit
    _, _, off, _, _ = _poisoned_round(algorithm, attack, adaptive_clip="off")
    moved_off = sum(float(torch.linalg.norm(new - old) ** 2)
                    for new, old in zip(_product(off.state), _product(state), strict=True)) ** 0.5  # fmt: skip
    assert moved_off > 10 * moved  # the same attack without the defence


def test_a_fixed_bound_and_the_adaptive_one_combine_to_the_smaller():
    *_, result, _ = _poisoned_round("fedavg", "sign_flip_x50", clip_update_norm=1e-6)
    assert result.robust["clip_bound"] == 1e-6 and sorted(result.robust["clipped"]) == ["0", "1", "2", "3"]


def test_poisoning_benchmark_prints_a_table_and_json(capsys):
    result = bench.main(["--seeds", "1", "--algorithms", "fedavg", "fedsrd", "--json"])
    text = capsys.readouterr().out
    assert "| fedsrd | max_value |" in text and '"rows"' in text.splitlines()[-1]
    by = {(r["algorithm"], r["attack"], r["defence"]): r["relative"] for r in result["rows"]}
    assert by[("fedsrd", "max_value", "median")] is None  # refused, shown as n/a
    for algorithm in ("fedavg", "fedsrd"):
        for attack in bench.ATTACKS:
            assert by[(algorithm, attack, "clip (default)")] < 3 < by[(algorithm, attack, "off")]


def test_simulation_history_counts_every_clipped_update(tmp_path, monkeypatch):
    """A real tiny run with client 1 sending every value at 9999: the round's record names it under robust.clipped."""
    import json

    import fedsrd.runtime.local as local
    from fedsrd.cli import run_train

    original = local.FederatedClient.make_update

    def poisoned(self, local_state, *, round, client_id, **kw):
        if client_id == 1:
            local_state = {k: torch.full_like(v, 9999.0) if k in self.state else v for k, v in local_state.items()}
        return original(self, local_state, round=round, client_id=client_id, **kw)

    monkeypatch.setattr(local.FederatedClient, "make_update", poisoned)
    run_train(["--config", str(REPO / "examples/configs/tiny.yaml"), "--output_dir", str(tmp_path),
               "--disable_tqdm", "true", "--num_rounds", "1", "--num_clients", "3", "--local_steps", "1",
               "--domains", "arithmetic", "units", "percent", "--eval_every", "0", "--save_every", "0"])  # fmt: skip
    record = json.loads((tmp_path / "history.json").read_text())[-1]
    assert list(record["robust"]["clipped"]) == ["1"] and record["accepted"] == [0, 1, 2]
    assert record["robust"]["clipped"]["1"]["norm"] > record["robust"]["clip_bound"] > 0
