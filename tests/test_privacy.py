"""Client-level differential privacy (fedsrd.ops.privacy, docs/privacy.md): the accountant's epsilon against
independent references, the noise's calibration, clipping against a hostile client, target epsilon, the budget stop,
the refusals, and tiny end-to-end runs with DP in both placements."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.algorithms.fedsrd import lora_modules
from fedsrd.client import FederatedClient
from fedsrd.ops import generator_for
from fedsrd.ops.privacy import epsilon_after, noise_multiplier_for
from fedsrd.server import FederatedServer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny.yaml"
A_KEY, B_KEY = "layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"


# ---- the accountant -------------------------------------------------------------------------------------------------
def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of the Gaussian mechanism of sensitivity 1 and noise sigma at delta (Balle & Wang, "Improving
    the Gaussian Mechanism for Differential Privacy", ICML 2018, Theorem 8), by bisection."""

    def delta_of(eps: float) -> float:
        return _phi(0.5 / sigma - eps * sigma) - math.exp(eps) * _phi(-0.5 / sigma - eps * sigma)

    low, high = 0.0, 100.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (low, mid) if delta_of(mid) <= delta else (mid, high)
    return high


def test_epsilon_matches_dp_accounting_computed_independently():
    import dp_accounting
    from dp_accounting import rdp

    sigma, q, rounds, delta = 1.3, 0.1, 50, 1e-5
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    reference = rdp.RdpAccountant()  # the library's default orders, not ours
    for _ in range(rounds):
        reference.compose(event)

    def poisson(r: int, z: float) -> float:  # 1 of 10 clients a round, accounted as Poisson sampling at q = 0.1
        return epsilon_after(r, z, 0.1, delta, sampling="poisson")

    ours = poisson(rounds, sigma)
    assert ours == pytest.approx(reference.get_epsilon(delta), rel=0.03)
    assert poisson(rounds + 10, sigma) > ours > poisson(rounds - 10, sigma)
    assert poisson(0, sigma) == 0.0 and poisson(3, 0.0) == math.inf


def test_epsilon_of_full_participation_brackets_the_exact_gaussian_mechanism():
    # q = 1: T rounds of noise sigma are one Gaussian mechanism of noise sigma / sqrt(T) (its RDP alpha / (2 sigma^2)
    # adds up). RDP's epsilon is an upper bound on the exact one, and at most Mironov's classic conversion
    # min_alpha T alpha / (2 sigma^2) + log(1/delta) / (alpha - 1) (CSF 2017, Proposition 3).
    sigma, rounds, delta = 2.0, 4, 1e-5
    exact = _exact_gaussian_epsilon(sigma / math.sqrt(rounds), delta)
    classic = min(
        rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in [1 + i / 100 for i in range(1, 10000)]
    )
    ours = epsilon_after(rounds, sigma, 1.0, delta)
    assert exact < ours <= classic
    assert ours == pytest.approx(exact, rel=0.15)  # RDP is loose by a few percent here, not more
    pld = epsilon_after(rounds, sigma, 1.0, delta, "pld")
    assert exact * 0.999 < pld < ours and pld == pytest.approx(exact, rel=0.02)  # PLD: close to exact


def test_epsilon_is_within_abadi_et_al_moments_accountant_example():
    # Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), Sec. 3.1: q = 0.01, sigma = 4, T = 10000
    # steps, delta = 1e-5 gives epsilon ~ 1.26 by the moments accountant (9.34 by strong composition). The RDP
    # accountant is that analysis, tightened: at most 1.26, and not far below it.
    eps = epsilon_after(10000, 4.0, 0.01, 1e-5, sampling="poisson")
    assert 0.9 < eps <= 1.26


def test_target_epsilon_computes_a_multiplier_that_spends_at_most_the_target():
    cfg = FedSRDConfig(algorithm="fedavg", num_clients=10, clients_per_round=3, num_rounds=5, dp_mode="central",
                       dp_clip_norm=1.0, dp_target_epsilon=2.0)  # fmt: skip
    z = cfg.resolved_dp_noise_multiplier
    assert cfg.dp_sampling_rate == pytest.approx(0.3) and cfg.dp_sampling_accounting == "fixed_size"
    assert cfg.dp_epsilon_after(5) <= 2.0 < epsilon_after(5, 0.99 * z, 0.3, 1e-5, num_clients=10)  # the smallest, to 1%
    assert z == noise_multiplier_for(2.0, 5, 0.3, 1e-5, "rdp", "fixed_size", 10)
    approx = dataclasses.replace(cfg, dp_sampling_accounting="poisson")
    assert approx.resolved_dp_noise_multiplier == noise_multiplier_for(2.0, 5, 0.3, 1e-5, "rdp", "poisson") < z


# ---- what the sampler does: exactly m of N clients a round, without replacement -----------------------------------
def _fixed_size_reference(num_clients: int, per_round: int, z: float, rounds: int, delta: float, orders=None) -> float:
    """dp-accounting on the hand-built event: m of N without replacement, replace-one adjacency, the Gaussian's
    multiplier relative to the replace-one sensitivity 2C of the sum (z C / 2 C = z / 2)."""
    import dp_accounting
    from dp_accounting import rdp
    from dp_accounting.privacy_accountant import NeighboringRelation

    event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, per_round, dp_accounting.GaussianDpEvent(z / 2))
    reference = rdp.RdpAccountant(orders, neighboring_relation=NeighboringRelation.REPLACE_ONE)
    reference.compose(event, rounds)  # `count` composition: not the SelfComposedDpEvent that `epsilon_after` builds
    return reference.get_epsilon(delta)


def test_fixed_size_epsilon_is_dp_accountings_on_the_sampled_without_replacement_event():
    from fedsrd.ops.privacy import RDP_ORDERS

    ours = epsilon_after(100, 1.0, 0.1, 1e-5, num_clients=100)  # N = 100, m = 10, z = 1, 100 rounds
    assert ours == pytest.approx(_fixed_size_reference(100, 10, 1.0, 100, 1e-5, list(RDP_ORDERS)), rel=1e-9)
    assert ours == pytest.approx(_fixed_size_reference(100, 10, 1.0, 100, 1e-5), rel=0.03)  # the library's orders
    assert ours == pytest.approx(83.937, abs=1e-3)  # docs/privacy.md's table
    assert epsilon_after(100, 1.0, 0.1, 1e-5, "rdp", "fixed_size", 100) == ours


@pytest.mark.parametrize(("num_clients", "per_round", "rounds"), [(4, 2, 20), (100, 10, 100), (1000, 50, 200)])
def test_fixed_size_epsilon_is_at_least_the_poisson_approximations(num_clients, per_round, rounds):
    # Replace-one doubles the sensitivity (2 C) and the without-replacement bound is looser: 76.98 vs 16.79, 83.94 vs
    # 7.97 and 58.40 vs 5.37 at z = 1 for these three settings.
    for z in (1.0, 3.0):
        fixed = epsilon_after(rounds, z, per_round / num_clients, 1e-5, num_clients=num_clients)
        assert fixed >= epsilon_after(rounds, z, per_round / num_clients, 1e-5, sampling="poisson")


def test_full_participation_is_the_gaussian_mechanism_under_either_accounting():
    import dp_accounting
    from dp_accounting import rdp

    from fedsrd.ops.privacy import RDP_ORDERS, accounting_summary, round_event

    reference = rdp.RdpAccountant(list(RDP_ORDERS))  # add/remove, sensitivity C: what every release so far reported
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 20))
    for sampling in ("fixed_size", "poisson"):
        assert round_event(1.0, 1.0, sampling) == dp_accounting.GaussianDpEvent(1.0)
        assert epsilon_after(20, 1.0, 1.0, 1e-5, "rdp", sampling) == reference.get_epsilon(1e-5)
        assert accounting_summary(1.0, sampling)["neighboring"] == "add_or_remove_one"
    assert epsilon_after(20, 1.0, 1.0, 1e-5) == pytest.approx(30.1266, abs=1e-4)  # the docs table's q = 1 row
    assert noise_multiplier_for(4.0, 20, 1.0, 1e-5) == pytest.approx(5.178, abs=1e-3)
    assert epsilon_after(20, 1.0, 1.0, 1e-5, "pld") == epsilon_after(20, 1.0, 1.0, 1e-5, "pld", "poisson")


def test_fixed_size_calibration_spends_at_most_the_target_and_close_to_it():
    z = noise_multiplier_for(4.0, 100, 0.1, 1e-5, num_clients=100)
    eps = [epsilon_after(100, z * f, 0.1, 1e-5, num_clients=100) for f in (1.0, 0.99)]
    assert eps[0] <= 4.0 < eps[1]
    assert z == pytest.approx(5.024, abs=1e-3)  # docs/privacy.md's table; Poisson's approximation asks for 1.483
    assert z > noise_multiplier_for(4.0, 100, 0.1, 1e-5, sampling="poisson")


def test_pld_with_fixed_size_sampling_is_refused_naming_what_works():
    settings = {"algorithm": "fedavg", "num_clients": 10, "clients_per_round": 3, "dp_mode": "central",
                "dp_clip_norm": 1.0, "dp_noise_multiplier": 1.0}  # fmt: skip
    with pytest.raises(ValueError, match=r"dp_accountant: 'pld' cannot account fixed-size.*'rdp'.*'poisson'"):
        FedSRDConfig(**settings, dp_accountant="pld")
    with pytest.raises(ValueError, match="'pld' accountant cannot account fixed-size sampling"):
        epsilon_after(5, 1.0, 0.3, 1e-5, "pld", num_clients=10)
    assert FedSRDConfig(**settings, dp_accountant="pld", dp_sampling_accounting="poisson").dp_epsilon_after(2) > 0
    assert FedSRDConfig(**{**settings, "clients_per_round": 10}, dp_accountant="pld").dp_epsilon_after(2) > 0
    with pytest.raises(ValueError, match=r"dp_sampling_accounting: must be one of \('fixed_size', 'poisson'\)"):
        FedSRDConfig(**settings, dp_sampling_accounting="uniform")
    with pytest.raises(ValueError, match="fixed-size sampling accounting .* needs num_clients.*sampling='poisson'"):
        epsilon_after(5, 1.0, 0.3, 1e-5)  # a rate below 1 without N: no silent Poisson
    with pytest.raises(ValueError, match="must be a whole number of clients"):
        epsilon_after(5, 1.0, 0.15, 1e-5, num_clients=10)


def test_a_stored_run_without_the_option_reads_as_poisson_and_resumes_only_so():
    from fedsrd.checkpoint import check_resume

    cfg = FedSRDConfig(algorithm="fedavg", num_clients=10, clients_per_round=3, dp_mode="central", dp_clip_norm=1.0,
                       dp_noise_multiplier=1.0)  # fmt: skip
    old = {k: v for k, v in cfg.to_dict().items() if k != "dp_sampling_accounting"}  # written before the option
    with pytest.raises(ValueError, match="dp_sampling_accounting 'poisson' .*--dp_sampling_accounting poisson"):
        check_resume(old, cfg.to_dict(), "out/checkpoints")
    check_resume(old, dataclasses.replace(cfg, dp_sampling_accounting="poisson").to_dict(), "out/checkpoints")
    check_resume(cfg.to_dict(), cfg.to_dict(), "out/checkpoints")
    every = dataclasses.replace(cfg, clients_per_round=10).to_dict()  # q = 1: both accountings are one mechanism
    check_resume({k: v for k, v in every.items() if k != "dp_sampling_accounting"}, every, "out/checkpoints")
    plain = FedSRDConfig(algorithm="fedavg", num_clients=10, clients_per_round=3).to_dict()
    check_resume({k: v for k, v in plain.items() if k != "dp_sampling_accounting"}, plain, "out/checkpoints")


def test_resuming_a_private_run_with_other_privacy_settings_is_refused():
    from fedsrd.checkpoint import check_resume

    cfg = FedSRDConfig(algorithm="fedavg", num_clients=4, dp_mode="central", dp_clip_norm=1.0, dp_target_epsilon=8.0,
                       num_rounds=10)  # fmt: skip
    check_resume(cfg.to_dict(), cfg.to_dict(), "out/checkpoints")
    for change in ({"dp_clip_norm": 0.5}, {"dp_target_epsilon": 4.0}, {"dp_delta": 1e-6}, {"num_rounds": 20},
                   {"dp_mode": "off", "dp_target_epsilon": None}):  # fmt: skip
        with pytest.raises(ValueError, match=f"other privacy settings \\({next(iter(change))}: checkpoint"):
            check_resume(cfg.to_dict(), {**cfg.to_dict(), **change}, "out/checkpoints")
    fixed_z = dataclasses.replace(cfg, dp_target_epsilon=None, dp_noise_multiplier=1.0)
    check_resume(fixed_z.to_dict(), {**fixed_z.to_dict(), "num_rounds": 20}, "out/checkpoints")  # z does not move
    plain = FedSRDConfig(algorithm="fedavg", num_clients=4, num_rounds=10).to_dict()
    check_resume(plain, {**plain, "num_rounds": 20}, "out/checkpoints")


def test_fed_config_json_of_an_old_private_run_loads_as_it_was_accounted(tmp_path):
    from fedsrd.cli import _read_fed_config
    from fedsrd.report import privacy_summary

    cfg = FedSRDConfig(algorithm="fedavg", num_clients=10, clients_per_round=3, dp_mode="central", dp_clip_norm=1.0,
                       dp_noise_multiplier=1.0, dp_accountant="pld", dp_sampling_accounting="poisson")  # fmt: skip
    old = {k: v for k, v in cfg.to_dict().items() if k != "dp_sampling_accounting"}
    (tmp_path / "fed_config.json").write_text(json.dumps(old))
    loaded = FedSRDConfig(**_read_fed_config(tmp_path / "fed_config.json"))  # PLD and q < 1: valid only as Poisson
    assert loaded.dp_sampling_accounting == "poisson"
    assert privacy_summary([], old)["accounting"] == {"accountant": "pld", "sampling": "poisson",
                                                      "neighboring": "add_or_remove_one"}  # fmt: skip


# ---- the noise and the clip, at the roles --------------------------------------------------------------------------
def _state(r: int = 8, d_in: int = 2048, d_out: int = 1024, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A_KEY: 0.1 * torch.randn(r, d_in, generator=g), B_KEY: 0.1 * torch.randn(d_out, r, generator=g)}


def _config(**kw) -> FedSRDConfig:
    settings = {"algorithm": "fedavg", "num_clients": 4, "dp_mode": "central", "dp_clip_norm": 1.0,
                "dp_noise_multiplier": 2.0, **kw}  # fmt: skip
    return FedSRDConfig(**settings)


def _uploads(cfg: FedSRDConfig, state, locals_, round: int = 1) -> list[bytes]:
    client = FederatedClient(get_algorithm(cfg.algorithm, cfg), state, cfg)
    return [client.make_update(loc, round=round, client_id=i, num_samples=1) for i, loc in enumerate(locals_)]


def _step(cfg: FedSRDConfig, state, uploads: list[bytes], round: int = 1):
    server = FederatedServer(get_algorithm(cfg.algorithm, cfg), dict(state), cfg)
    return server, server.step(round, uploads)


def _change(server, state) -> torch.Tensor:
    return torch.cat([(server.state[k] - state[k]).reshape(-1) for k in sorted(state)])


@pytest.mark.parametrize("mode", ["central", "local"])
def test_the_noise_on_the_mean_has_the_calibrated_std(mode):
    # No client changes anything, so the global moves by the noise alone: z C / m per coordinate in both placements
    # (local: each of the m = 4 clients adds z C / sqrt(m), and the mean divides their sum by m).
    cfg, state = _config(dp_mode=mode), _state()
    uploads = _uploads(cfg, state, [state] * 4)
    if mode == "local":
        one = wire.decode(uploads[0]).tensors[A_KEY] - state[A_KEY]
        assert float(one.std()) == pytest.approx(2.0 * 1.0 / 2, rel=0.03)  # z C / sqrt(m)
    server, result = _step(cfg, state, uploads)
    change = _change(server, state)
    assert float(change.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(change.std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.03)  # z C / m, 24576 draws: ~0.5% error
    assert result.robust["dp_noise_std"] == (0.5 if mode == "central" else 0.0)


def test_local_dp_server_adds_the_missing_clients_noise_shares():
    cfg, state = _config(dp_mode="local"), _state()
    uploads = _uploads(cfg, state, [state] * 4)[:2]  # two of the four sampled clients dropped out
    server, result = _step(cfg, state, uploads)
    assert result.robust["dp_noise_std"] == pytest.approx(0.5 * math.sqrt(2 / 4))
    assert float(_change(server, state).std()) == pytest.approx(0.5, rel=0.03)  # still z C / m in all


@pytest.mark.parametrize("mode", ["central", "local"])
def test_clipping_bounds_a_hostile_clients_pull_to_clip_over_m(mode):
    cfg, state = _config(dp_mode=mode, dp_noise_multiplier=0.0), _state(d_in=64, d_out=48)
    hostile = {k: v + 100.0 for k, v in state.items()}
    server, result = _step(cfg, state, _uploads(cfg, state, [state, state, state, hostile]))
    moved = float(_change(server, state).norm())
    assert moved == pytest.approx(1.0 / 4, rel=1e-5)  # clipped to C, divided by m: C / m
    if mode == "central":  # the record names no client's norm (it depends on the client's data)
        assert result.robust["clip_bound"] == 1.0 and "norms" not in result.robust and "clipped" not in result.robust


def test_fedsrd_clips_the_product_change_and_noises_the_aggregated_product():
    cfg = _config(algorithm="fedsrd_e", upload_mask="random", upload_sparsity_alpha=0.5, dp_noise_multiplier=0.0)
    state = _state(r=4, d_in=96, d_out=64)
    algo = get_algorithm(cfg.algorithm, cfg)
    g = torch.Generator().manual_seed(1)
    hostile = {k: v + 50.0 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    server = FederatedServer(algo, dict(state), cfg)
    msgs = [server.decode_update(u, 1) for u in _uploads(cfg, state, [state, state, hostile])]  # 3 of m = 4
    before = algo.update_norm(state, msgs[2].tensors)
    kept, record = server.bound_influence(1, msgs, {})
    assert before > 10 and algo.update_norm(state, kept[2].tensors) <= 1.0 and record["clip_bound"] == 1.0
    padded, weights, _, _ = server._private_sum([m.tensors for m in kept])
    (module,) = lora_modules(state)
    a, b = state[A_KEY], state[B_KEY]
    left, right = algo.target_change(module, a, b, padded, weights, (0.0, torch.Generator()))
    assert float(torch.linalg.norm(left @ right)) <= 1.0 / 4 * (1 + 1e-4)  # the product moves by at most C / m
    zeros = [algo.null_update(state, kept[0].tensors)] * 4
    left, right = algo.target_change(module, a, b, zeros, [0.25] * 4, (0.3, torch.Generator().manual_seed(0)))
    noise = left @ right  # FedSRD-e: dW = W + Z - B A = Z, full rank
    assert noise.shape == (64, 96) and float(noise.std()) == pytest.approx(0.3, rel=0.03)
    assert int(torch.linalg.matrix_rank(noise)) == 64


def test_fedsrd_random_upload_mask_does_not_depend_on_the_data():
    cfg = FedSRDConfig(algorithm="fedsrd", upload_mask="random")
    state = _state(r=4, d_in=96, d_out=64)
    algo = get_algorithm("fedsrd", cfg)
    g = torch.Generator().manual_seed(2)
    one, two = ({k: v + torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(2))
    up1 = algo.client_update(state, one, 1, generator_for(0, "client_update", 1, 0))
    up2 = algo.client_update(state, two, 1, generator_for(0, "client_update", 1, 0))
    for key in (A_KEY, B_KEY):
        assert torch.equal(up1[key].indices, up2[key].indices) and up1[key].mask is not None
    assert not torch.equal(up1[A_KEY].values, up2[A_KEY].values)


def test_same_seed_same_bits_and_the_noise_is_seeded_per_round_and_client():
    cfg, state = _config(dp_mode="local"), _state(d_in=64, d_out=48)
    first, again = _uploads(cfg, state, [state] * 2), _uploads(cfg, state, [state] * 2)
    assert first == again and first[0] != first[1]
    assert _uploads(cfg, state, [state], round=2)[0] != first[0]
    central = _config()
    b1 = _step(central, state, _uploads(central, state, [state] * 3))[1].broadcast
    b2 = _step(central, state, _uploads(central, state, [state] * 3))[1].broadcast
    assert b1 == b2
    other = _config(fed_seed=7)
    assert _step(other, state, _uploads(other, state, [state] * 3))[1].broadcast != b1


def _case(algorithm: str) -> tuple[dict, dict, dict]:
    """(config settings, global state, a client's local state) for one algorithm, tiny."""
    g = torch.Generator().manual_seed(3)
    if algorithm == "fedkseed":
        from fedsrd.algorithms.fedkseed import COEFF, LOCAL_INCREMENT

        increment = torch.zeros(16)
        increment[[2, 5]] = torch.randn(2, generator=g)
        return {"kseed_num_seeds": 16}, {COEFF: torch.zeros(16)}, {LOCAL_INCREMENT: increment}
    if algorithm == "fedkrso":
        weight = "model.layers.0.mlp.up_proj.weight"
        local = {f"{weight}@1": torch.randn(16, 2, generator=g)}
        return {"krso_num_seeds": 3, "krso_rank": 2}, {weight: torch.zeros(16, 8)}, local
    if algorithm == "fedfft":
        state = {"model.layers.0.mlp.up_proj.weight": torch.zeros(16, 8)}
        return {}, state, {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    state = _state(r=4, d_in=24, d_out=16)
    extra = {"upload_mask": "random"} if algorithm.startswith("fedsrd") else {}
    return extra, state, {k: v + torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.mark.parametrize("mode", ["central", "local"])
@pytest.mark.parametrize(
    "algorithm",
    ["fedavg", "fedprox", "ffa_lora", "fedsa_lora", "fed_dare", "topk", "fedfft", "fedkrso", "fedkseed", "fedsrd",
     "fedsrd_e"],
)  # fmt: skip
def test_every_admitting_algorithm_runs_a_private_round_that_clients_decode_to_the_same_state(algorithm, mode):
    settings, state, local = _case(algorithm)
    cls = type(get_algorithm(algorithm, FedSRDConfig(algorithm=algorithm, **settings)))
    if mode not in cls.dp_support:
        with pytest.raises(ValueError, match="does not admit"):
            _config(algorithm=algorithm, dp_mode=mode, **settings)
        return
    cfg = _config(algorithm=algorithm, dp_mode=mode, dp_noise_multiplier=0.5, **settings)
    uploads = _uploads(cfg, state, [local, local, local])  # 3 of the m = 4 sampled
    server, result = _step(cfg, state, uploads)
    client = FederatedClient(get_algorithm(algorithm, cfg), dict(state), cfg)
    client.receive(result.broadcast)  # raises if the client's state differs from the server's
    assert wire.state_digest(client.state) == wire.state_digest(server.state)
    assert result.robust["dp_denominator"] == 4 and result.robust["dp_noise_std"] > 0
    if algorithm in ("fedkrso", "fedkseed"):  # the noise covers every seed, not only the ones the clients used
        payload = wire.decode(result.broadcast).tensors
        names = get_algorithm(algorithm, cfg).update_shapes(state)
        assert all(name in payload for name in names)


# ---- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"algorithm": "flexlora"}, r"dp_mode: algorithm 'flexlora' does not admit .*SVD.*fedavg"),
        ({"algorithm": "flora"}, r"dp_mode: algorithm 'flora' .*stacks"),
        ({"algorithm": "fedex_lora"}, r"dp_mode: algorithm 'fedex_lora' .*residual"),
        ({"algorithm": "fedsrd_ef", "upload_mask": "importance"}, r"dp_mode: algorithm 'fedsrd_ef' .*error feedback"),
        (
            {"algorithm": "fedsrd", "dp_mode": "local", "upload_mask": "random"},
            r"dp_mode: algorithm 'fedsrd' does not admit dp_mode='local'.*full-rank.*dp_mode='central'",
        ),
        ({"algorithm": "fedsrd"}, r"upload_mask: must be 'random' .*importance pruning"),
        ({"dp_clip_norm": None}, r"dp_clip_norm: must be set"),
        ({"dp_target_epsilon": 3.0}, r"exactly one of dp_noise_multiplier and dp_target_epsilon"),
        ({"aggregation": "samples"}, r"aggregation: must be 'uniform'"),
        ({"robust_aggregation": "median"}, r"robust_aggregation: must be 'none'"),
        ({"adaptive_clip": "on"}, r"adaptive_clip: must be 'auto' or 'off'"),
        ({"dp_mode": "secure"}, r"dp_mode: must be one of"),
        ({"dp_delta": 0.0}, r"dp_delta: must be in \(0, 1\)"),
        ({"dp_mode": "off", "algorithm": "fedavg", "upload_mask": "random"}, r"upload_mask: .*no 'random'.*fedsrd"),
    ],
)
def test_refused_combinations_say_why(settings, message):
    with pytest.raises(ValueError, match=message):
        _config(**settings)


def test_unreachable_target_epsilon_is_refused_before_training():
    cfg = _config(dp_noise_multiplier=None, dp_target_epsilon=1e-4, num_rounds=1000)
    with pytest.raises(ValueError, match="no noise multiplier"):
        _ = cfg.resolved_dp_noise_multiplier


# ---- end to end (the tiny preset) ------------------------------------------------------------------------------------
def _tiny(out: Path, *extra: str):
    from fedsrd.cli import run_train

    args = [
        "--config",
        str(TINY),
        "--output_dir",
        str(out),
        "--disable_tqdm",
        "true",
        "--eval_every",
        "0",
        "--save_every",
        "0",
        "--local_steps",
        "2",
        "--dp_clip_norm",
        "0.5",
        "--dp_noise_multiplier",
        "1.0",
    ]
    trainer = run_train([*args, *extra])
    return trainer, json.loads((out / "history.json").read_text())


def test_tiny_run_with_central_dp_on_fedsrd_records_epsilon_and_stops_at_the_budget(tmp_path):
    # 2 clients, both every round (q = 1): epsilon(2) ~ 7.09 <= 8 < epsilon(3), so round 3 never runs.
    _, history = _tiny(tmp_path, "--algorithm", "fedsrd", "--upload_mask", "random", "--dp_mode", "central",
                       "--num_rounds", "3", "--dp_stop_at_epsilon", "8")  # fmt: skip
    assert [r["round"] for r in history] == [0, 1, 2]
    for r in history[1:]:
        assert r["dp_epsilon"] == pytest.approx(epsilon_after(r["round"], 1.0, 1.0, 1e-5)) and r["dp_delta"] == 1e-5
        assert r["dp_accounting"] == {"accountant": "rdp", "sampling": "full_participation",
                                      "neighboring": "add_or_remove_one"}  # fmt: skip
    assert history[1]["dp_budget_exhausted"] is False and history[2]["dp_budget_exhausted"] is True
    assert history[2]["should_training_stop"] is True and history[2]["dp_epsilon"] <= 8 < epsilon_after(3, 1, 1, 1e-5)
    config = json.loads((tmp_path / "fed_config.json").read_text())
    assert config["dp_mode"] == "central"


def test_tiny_run_with_local_dp_records_epsilon_and_repeats_bit_for_bit(tmp_path):
    first, history = _tiny(tmp_path / "a", "--dp_mode", "local")
    again, _ = _tiny(tmp_path / "b", "--dp_mode", "local")
    assert [r["dp_epsilon"] is None for r in history] == [True, False, False]
    assert history[2]["dp_epsilon"] == pytest.approx(epsilon_after(2, 1.0, 1.0, 1e-5))
    assert wire.state_digest(first.global_state) == wire.state_digest(again.global_state)


def test_tiny_run_of_one_client_in_two_accounts_the_fixed_size_sample_and_an_old_checkpoint_resumes_as_poisson(
    tmp_path,
):
    from fedsrd.checkpoint import CHECKPOINTS, LATEST, META

    one_of_two = ("--dp_mode", "central", "--clients_per_round", "1")
    _, history = _tiny(tmp_path, *one_of_two, "--num_rounds", "1")
    assert history[1]["dp_accounting"] == {"accountant": "rdp", "sampling": "fixed_size", "neighboring": "replace_one"}
    assert history[1]["dp_epsilon"] == pytest.approx(epsilon_after(1, 1.0, 0.5, 1e-5, "rdp", "fixed_size", 2))
    # The checkpoint becomes one written before dp_sampling_accounting existed (its run accounted Poisson).
    root = tmp_path / CHECKPOINTS
    meta_path = root / (root / LATEST).read_text().strip() / META
    meta = json.loads(meta_path.read_text())
    del meta["fed_config"]["dp_sampling_accounting"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="resume with --dp_sampling_accounting poisson"):
        _tiny(tmp_path, *one_of_two, "--num_rounds", "2", "--resume", "true")
    _, resumed = _tiny(tmp_path, *one_of_two, "--num_rounds", "2", "--resume", "true", "--dp_sampling_accounting",
                       "poisson")  # fmt: skip
    assert [r["round"] for r in resumed] == [0, 1, 2] and resumed[2]["dp_accounting"]["sampling"] == "poisson"
    assert resumed[2]["dp_epsilon"] == pytest.approx(epsilon_after(2, 1.0, 0.5, 1e-5, "rdp", "poisson"))


def test_budget_that_no_round_fits_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="dp_stop_at_epsilon: round 1 would take epsilon"):
        _tiny(tmp_path, "--dp_mode", "central", "--dp_stop_at_epsilon", "1")


# ---- what a run shows: round table, report, model card -------------------------------------------------------------
def _dp_history() -> list[dict]:
    from fedsrd.federation.history import round_record, start_record

    def rec(r: int, eps: float) -> dict:
        made = round_record(round=r, clients=[0, 1], accepted=[0, 1], rejected={}, dropped={}, train_loss=1.0,
                            learning_rate=1e-3, upload_bytes=2048, download_bytes=2048, broadcast_bytes=1024,
                            num_uploads=2, cumulative_mb=0.01 * r, dp_epsilon=eps, dp_delta=1e-5,
                            robust={"dp_noise_multiplier": 1.0})  # fmt: skip
        return {**made, "eval_loss": 2.0}

    return [start_record(), rec(1, 4.7289), {**rec(2, 7.0879), "dp_budget_exhausted": True}]


def test_round_table_report_and_model_card_show_epsilon(tmp_path, capsys):
    from fedsrd.federation.history import RoundTable
    from fedsrd.hub import build_model_card
    from fedsrd.report import write_report

    history = _dp_history()
    table = RoundTable(enabled=True, epsilon=True)
    for r in history:
        table.add(r)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split("|")[-1].strip() == "epsilon" and lines[-1].split("|")[-1].strip() == "7.0879"
    cfg = _config(dp_clip_norm=0.5, dp_noise_multiplier=1.0, num_rounds=3, clients_per_round=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.json").write_text(json.dumps(history))
    (run / "fed_config.json").write_text(json.dumps(cfg.to_dict()))
    old = tmp_path / "old"  # a run from before dp_sampling_accounting: its epsilon was Poisson's approximation
    old.mkdir()
    (old / "history.json").write_text(json.dumps(history))
    (old / "fed_config.json").write_text(json.dumps({k: v for k, v in cfg.to_dict().items()
                                                     if k != "dp_sampling_accounting"}))  # fmt: skip
    report = write_report([run, old], tmp_path / "report").read_text()
    assert "DP epsilon (delta)" in report and "7.0879 (1e-05, central, replace-one)" in report
    assert "7.0879 (1e-05, central, add/remove, Poisson approx.)" in report
    card = str(build_model_card(run, cfg, history, repo_id="me/dp"))
    assert "**epsilon = 7.088** at delta = 1e-05 after 2 rounds" in card and "Clip bound 0.5" in card
    assert "sampling rate 0.5" in card and "next round would have exceeded `dp_stop_at_epsilon`" in card
    assert "fixed-size sample of clients without replacement" in card and "replacing one client's data" in card
    old_card = str(build_model_card(old, json.loads((old / "fed_config.json").read_text()), history))
    assert "Poisson-subsampled" in old_card and "not a guarantee" in old_card
    plain = str(build_model_card(run, FedSRDConfig(), history[:1], repo_id="me/plain"))
    assert "Trained without differential privacy" in plain


# ---- Flower: the same private round, the same bits ------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [
        {"algorithm": "fedsrd", "upload-mask": "random", "dp-mode": "central"},
        {"algorithm": "fedavg", "dp-mode": "local"},
    ],
)
def test_flower_private_run_is_the_simulation_run_bit_for_bit(settings, tmp_path, tmp_path_factory):
    pytest.importorskip("flwr")
    from test_flower import _final_digest, _run_in_process, _simulated_run

    from fedsrd.integrations.inprocess import serverapp_task_identity

    dp = {**settings, "num-rounds": 2, "dp-clip-norm": 0.5, "dp-noise-multiplier": 1.0}
    local = settings["dp-mode"] == "local"  # each node mixes its own secret into its noise share (required on Flower)
    secrets = {i: {"dp-noise-secret": f"node-{i}-secret-0123456789abcdef"} for i in range(2)} if local else None
    with serverapp_task_identity():
        history, _ = _run_in_process(tmp_path, node_extra=secrets, **dp)
    digest, sim_dir = _simulated_run(tmp_path_factory, **dp)
    # central: the same bits as the simulation; local: the nodes' secrets change their shares, so the noise the
    # server could redraw from the run seed (the simulation's) is not the noise the nodes added
    assert (_final_digest(tmp_path / "server") == digest) is not local
    simulated = json.loads((sim_dir / "history.json").read_text())
    eps = [epsilon_after(r, 1.0, 0.5, 1e-5, num_clients=2) for r in (1, 2)]  # one of two clients a round
    assert [r["dp_epsilon"] for r in history[1:]] == [r["dp_epsilon"] for r in simulated[1:]] == eps


def test_personal_tensors_are_not_averaged_into_the_published_adapter_under_dp():
    """FedSA-LoRA's exported adapter averages the clients' own B without privacy; under DP that mean would publish
    un-noised client data, so the export is the (noised) global state alone."""
    glob = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}
    personal = {0: {"m.lora_B.weight": torch.full((4, 2), 1.0)}, 1: {"m.lora_B.weight": torch.full((4, 2), 3.0)}}
    plain = get_algorithm("fedsa_lora", FedSRDConfig(algorithm="fedsa_lora"))
    assert torch.equal(plain.export_state(glob, personal)["m.lora_B.weight"], torch.full((4, 2), 2.0))
    for mode in ("central", "local"):
        private = get_algorithm("fedsa_lora", FedSRDConfig(algorithm="fedsa_lora", dp_mode=mode, dp_clip_norm=1.0,
                                                           dp_noise_multiplier=1.0))  # fmt: skip
        exported = private.export_state(glob, personal)
        assert torch.equal(exported["m.lora_B.weight"], glob["m.lora_B.weight"])
        assert torch.equal(exported["m.lora_A.weight"], glob["m.lora_A.weight"])
