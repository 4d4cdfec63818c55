"""Secure aggregation on Flower (SecAgg+): the protocol's sum against known vectors, dropouts and the threshold,
refused configurations, and whole FedAvg-LoRA runs (in one process, and on a real SuperLink with three SuperNodes on
loopback) that end on the plain run's aggregate up to the protocol's quantization while the server never holds an
individual update.

Tolerance: every client sends q(x) with values clipped to [-c, c] and quantized to integers in [0, Q) by stochastic
rounding, so each of its values is off by less than one step 2c/Q; with uniform weights the mean of the clients' errors
is below 2c/Q per value as well (c = 8, Q = 2**22: 3.8e-6).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_flower import run_loopback_driver  # noqa: E402  (one loopback driver runner for both deployments)

from fedsrd import FedSRDConfig, list_algorithms, wire
from fedsrd.algorithms import get_algorithm_class
from fedsrd.ops.privacy import epsilon_after

HAS_FLWR = importlib.util.find_spec("flwr") is not None
needs_flwr = pytest.mark.skipif(not HAS_FLWR, reason="flwr is not installed (pip install -e '.[flower]')")
REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower-app"

CLIP, QRANGE = 8.0, 2**22
STEP = 2 * CLIP / QRANGE  # one quantization step: the aggregate's tolerance per value

RUN_CONFIG = {
    "model-name-or-path": "tiny-llama",
    "data": "synthetic",
    "domains": "arithmetic percent units",
    "train-size": 48,
    "max-length": 96,
    "algorithm": "fedavg",
    "num-rounds": 1,
    "num-clients": 3,
    "local-steps": 2,
    "lora-r": 4,
    "lora-alpha": 8,
    "lora-dropout": 0.0,
    "save-every": 0,
    "seed": 0,
    "learning-rate": 0.003,
    "per-device-train-batch-size": 8,
    "lr-scheduler-type": "constant",
    "report-to": "none",
    "use-cpu": True,
    "disable-tqdm": True,
    "node-timeout": 60.0,
}
SECAGG = "--secure_aggregation secaggplus"


# ---------------------------------------------------------------------------------------------------------------------
# refused configurations
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["fedsrd", "topk", "fed_dare", "flexlora", "fedkrso"])
def test_algorithms_whose_step_is_not_a_sum_are_refused(algorithm):
    with pytest.raises(ValueError, match="secure_aggregation") as err:
        FedSRDConfig(algorithm=algorithm, num_clients=3, secure_aggregation="secaggplus")
    assert "weighted sum" in str(err.value)
    assert "support it: fed_sb, fedavg, fedfft, fedprox, fedsa_lora, fedsvd, ffa_lora, rolora." in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"clip_update_norm": 1.0}, "clip_update_norm"),
        ({"adaptive_clip": "on"}, "adaptive_clip"),
        ({"robust_aggregation": "median"}, "robust_aggregation"),
        ({"clients_per_round": 2}, "secure_aggregation"),
        ({"secagg_num_shares": 2.0}, "secagg_num_shares"),
        ({"secagg_num_shares": 3.0, "secagg_reconstruction_threshold": 3.0}, "secagg_reconstruction_threshold"),
        ({"secagg_modulus_range": 3 * 2**22}, "secagg_modulus_range"),
        ({"secagg_quantization_range": 2**31}, "secagg_quantization_range"),
        ({"secure_aggregation": "secagg"}, "secure_aggregation"),
    ],
)
def test_bad_secure_aggregation_settings_are_refused(overrides, field):
    settings = {"algorithm": "fedavg", "num_clients": 4, "secure_aggregation": "secaggplus", **overrides}
    with pytest.raises(ValueError, match=f"FedSRDConfig.{field}"):
        FedSRDConfig(**settings)


def test_supported_algorithms_are_accepted():
    for algorithm in ("fedavg", "fedprox", "ffa_lora", "fedsa_lora", "fedfft", "fed_sb", "fedsvd", "rolora"):
        FedSRDConfig(algorithm=algorithm, num_clients=3, secure_aggregation="secaggplus")


def _state_for(algorithm: str) -> dict[str, torch.Tensor]:
    """A small global state of the kind `algorithm` trains: one full weight, or one LoRA module (with Fed-SB's R)."""
    gen = torch.Generator().manual_seed(5)
    if not get_algorithm_class(algorithm).uses_lora:
        return {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=gen)}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    state = {f"{prefix}.lora_A.weight": torch.randn(2, 4, generator=gen),
             f"{prefix}.lora_B.weight": torch.randn(6, 2, generator=gen)}  # fmt: skip
    if algorithm == "fed_sb":
        state[f"{prefix}.lora_R.weight"] = torch.randn(2, 2, generator=gen)
    return state


@pytest.mark.parametrize("algorithm", [a for a in list_algorithms() if get_algorithm_class(a).secure_sum])
def test_every_secure_sum_algorithm_steps_the_same_on_the_weighted_sum(algorithm):
    """`Algorithm.secure_sum`'s contract, which secure aggregation relies on: the server step on the clients'
    equal-shape dense uploads with their weights equals the step on their weighted sum with weight one."""
    from fedsrd import get_algorithm
    from fedsrd.ops import generator_for

    config = FedSRDConfig(algorithm=algorithm, num_clients=3)
    algo = get_algorithm(algorithm, config)
    state = algo.init_global_state(_state_for(algorithm))
    gen = torch.Generator().manual_seed(9)
    for round in (1, 2):  # RoLoRA's upload is B in odd rounds, A in even ones (`round_update_shapes`)
        shapes = algo.round_update_shapes(state, round)
        uploads = [{name: torch.randn(shape, generator=gen) for name, (shape, _) in shapes.items()} for _ in range(3)]
        weights = [0.5, 0.3, 0.2]
        summed = {name: sum(w * u[name] for w, u in zip(weights, uploads)) for name in shapes}
        each = algo.server_step(state, uploads, weights, round, generator_for(0, "server_step", round))
        once = algo.server_step(state, [summed], [1.0], round, generator_for(0, "server_step", round))
        assert sorted(each) == sorted(once)
        for name in each:
            torch.testing.assert_close(each[name], once[name], rtol=1e-5, atol=1e-6)


def test_the_simulation_refuses_secure_aggregation():
    from fedsrd.runtime.local import run_federation

    cfg = FedSRDConfig(algorithm="fedavg", num_clients=3, secure_aggregation="secaggplus")
    with pytest.raises(ValueError, match="only on the Flower deployment runtime"):
        run_federation(SimpleNamespace(fed_config=cfg))


# ---------------------------------------------------------------------------------------------------------------------
# the protocol against known vectors: our server stages + Flower's secaggplus_mod on each client
# ---------------------------------------------------------------------------------------------------------------------


def _stage(msg) -> str | None:
    """The SecAgg+ stage a message asks for; None for fedsrd's own messages (hello, train without SecAgg+, sync)."""
    return msg.content["secaggplus_configs"]["stage"] if "secaggplus_configs" in msg.content else None


if HAS_FLWR:
    from fedsrd.integrations.inprocess import InProcessGrid

    class StageGrid(InProcessGrid):
        """An InProcessGrid where `fail` holds (node id, stage) pairs whose delivery fails as a node that went away;
        `replies` are (stage, reply) pairs."""

        def __init__(self, run_config: dict, node_configs: list[dict], app=None, fail=()) -> None:
            failing = set(fail)
            super().__init__(run_config, node_configs, app, fail=lambda node, msg: (node, _stage(msg)) in failing)

        @property
        def replies(self) -> list:
            return [(_stage(msg), reply) for msg, reply in self.exchanges]

    class ModGrid(StageGrid):
        """A Grid whose nodes run Flower's `secaggplus_mod` around a fixed upload (FitRes-shaped, as our ClientApp's);
        `garble`: nodes whose masked vector is cut."""

        def __init__(self, uploads: dict[int, list[np.ndarray]], weights: dict[int, float], fail=(), garble=()):
            self.uploads, self.weights, self.garble = uploads, weights, set(garble)
            super().__init__({}, [{} for _ in uploads], app=self._app, fail=fail)
            assert list(self.contexts) == list(uploads)  # node ids 100, 101, ...

        def _train(self, msg, context):
            from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

            nid = msg.metadata.dst_node_id
            return Message(
                RecordDict(
                    {
                        "fitres.parameters": ArrayRecord([a.copy() for a in self.uploads[nid]]),
                        "fitres.num_examples": MetricRecord({"num_examples": self.weights[nid]}),
                        "fitres.metrics": ConfigRecord({}),
                        "fitres.status": ConfigRecord({"code": 0, "message": ""}),
                    }
                ),
                reply_to=msg,
            )

        def _app(self, msg, context):
            from flwr.client.mod import secaggplus_mod

            stage = _stage(msg)  # before the mod, which takes it out of the message
            reply = secaggplus_mod(msg, context, self._train)
            if context.node_id in self.garble and stage == "collect_masked_vectors":
                reply.content["secaggplus_configs"]["masked_params"] = [b"\x93NUMPY"]
            return reply


def _protocol(num_nodes=4, weights=None, seed=0, **cfg):
    from fedsrd.integrations.secagg import SecAggPlusServer

    g = torch.Generator().manual_seed(seed)
    specs = [("a", (3, 5)), ("b", (7,))]
    uploads = {
        100 + i: [torch.randn(s, generator=g).numpy().astype(np.float32) for _, s in specs] for i in range(num_nodes)
    }
    weights = weights or {n: 1000.0 for n in uploads}
    config = FedSRDConfig(algorithm="fedavg", num_clients=num_nodes, secure_aggregation="secaggplus", **cfg)
    return SecAggPlusServer, config, specs, uploads, weights


def _weighted_mean(uploads, weights, nodes):
    total = sum(weights[n] for n in nodes)
    return [sum(weights[n] * uploads[n][i].astype(np.float64) for n in nodes) / total for i in range(2)]


def _run(server_cls, config, specs, grid, nodes):
    from flwr.app import ConfigRecord, RecordDict

    server = server_cls(grid, config, specs, timeout=10)
    return server.run(1, {n - 100: n for n in nodes}, lambda cid: RecordDict({"fedsrd": ConfigRecord({"round": 1})}))


@needs_flwr
def test_the_server_learns_the_weighted_mean_up_to_one_quantization_step(task_identity):
    server_cls, config, specs, uploads, weights = _protocol(weights={100: 1000.0, 101: 500.0, 102: 250.0, 103: 1000.0})
    grid = ModGrid(uploads, weights)
    out = _run(server_cls, config, specs, grid, list(uploads))
    assert out.failure is None and out.senders == [0, 1, 2, 3] and out.dropped == {}
    expected = _weighted_mean(uploads, weights, list(uploads))
    # weights w / max_weight <= 1 are quantized too (to 1/Q): the error is below a step divided by sum_i w_i / max_w
    tolerance = STEP * len(uploads) / (sum(weights.values()) / 1000.0) + 1e-6
    for (name, shape), want in zip(specs, expected, strict=True):
        assert out.mean[name].shape == torch.Size(shape)
        assert np.max(np.abs(out.mean[name].numpy() - want)) <= tolerance
    assert out.weight_sum == pytest.approx(2750.0, rel=1e-5)
    # what reached the server from each client: keys, encrypted shares, a masked vector, shares; never the upload
    for stage, reply in grid.replies:
        assert all(len(r) == 0 for r in reply.content.array_records.values())
        if stage == "collect_masked_vectors":
            masked = reply.content["secaggplus_configs"]["masked_params"]
            from flwr.compat.common.parameter import bytes_to_ndarray

            values = bytes_to_ndarray(masked[1]).astype(np.float64) / QRANGE * 2 * CLIP - CLIP
            nid = reply.metadata.src_node_id
            assert np.max(np.abs(values.reshape(3, 5) - uploads[nid][0])) > 1.0  # masked: nowhere near the upload
    assert out.masked_bytes > 0 and out.protocol_up > 0 and out.protocol_down > 0


@needs_flwr
def test_a_client_dropping_after_sharing_its_keys_is_unmasked_from_its_neighbours_shares(task_identity):
    server_cls, config, specs, uploads, weights = _protocol(num_nodes=5)  # threshold round(0.67 * 5) = 3
    grid = ModGrid(uploads, weights, fail={(102, "collect_masked_vectors")}, garble={103})
    out = _run(server_cls, config, specs, grid, list(uploads))
    assert out.failure is None and out.senders == [0, 1, 4]
    assert "ClientApp failed" in out.dropped["2"] and "masked vector" in out.dropped["3"]
    for (name, _), want in zip(specs, _weighted_mean(uploads, weights, [100, 101, 104]), strict=True):
        assert np.max(np.abs(out.mean[name].numpy() - want)) <= STEP + 1e-6


@needs_flwr
def test_a_client_dropping_before_sharing_its_keys_is_left_out(task_identity):
    server_cls, config, specs, uploads, weights = _protocol()
    grid = ModGrid(uploads, weights, fail={(101, "share_keys")})
    out = _run(server_cls, config, specs, grid, list(uploads))
    assert out.failure is None and out.senders == [0, 2, 3] and "share_keys" in out.dropped["1"]
    for (name, _), want in zip(specs, _weighted_mean(uploads, weights, [100, 102, 103]), strict=True):
        assert np.max(np.abs(out.mean[name].numpy() - want)) <= STEP + 1e-6


@needs_flwr
def test_fewer_survivors_than_the_threshold_fail_the_round(task_identity):
    server_cls, config, specs, uploads, weights = _protocol(secagg_reconstruction_threshold=1.0)  # all 4 needed
    grid = ModGrid(uploads, weights, fail={(101, "collect_masked_vectors")})
    out = _run(server_cls, config, specs, grid, list(uploads))
    assert out.mean is None and "collect masked vectors" in out.failure and "threshold is 4" in out.failure


@needs_flwr
def test_fewer_than_three_reachable_clients_are_refused(task_identity):
    server_cls, config, specs, uploads, weights = _protocol(num_nodes=3)
    grid = ModGrid(uploads, weights)
    out = _run(server_cls, config, specs, grid, [100, 101])
    assert out.mean is None and "needs at least 3" in out.failure and grid.replies == []


@needs_flwr
def test_protocol_sizes_follow_flowers_workflow():
    from fedsrd.integrations.secagg import protocol_sizes

    def sizes(shares, threshold, n):
        cfg = FedSRDConfig(
            algorithm="fedavg",
            num_clients=n,
            secure_aggregation="secaggplus",
            secagg_num_shares=shares,
            secagg_reconstruction_threshold=threshold,
        )
        return protocol_sizes(cfg, n)

    assert sizes(1.0, 0.67, 3) == (3, 2)
    assert sizes(0.5, 0.5, 10) == (5, 2)  # round(0.5 * 10) = 5 (odd); round(0.5 * 5) = 2
    assert sizes(0.4, 1.0, 10) == (5, 5)  # 4 is even and below the sample: 5
    assert sizes(5.0, 3.0, 10) == (5, 3)


# ---------------------------------------------------------------------------------------------------------------------
# whole runs in one process: our ServerApp loop and ClientApp (with Flower's mod) on an InProcessGrid
# ---------------------------------------------------------------------------------------------------------------------


def _in_process(root: Path, fail=(), node_extra=None, **overrides):
    from fedsrd.integrations.flower import run_server

    rc = {**RUN_CONFIG, "output-dir": str(root / "server"), **overrides}
    nodes = [
        {"partition-id": i, "num-partitions": 3, "state-dir": str(root / f"node{i}"), **(node_extra or {}).get(i, {})}
        for i in range(3)
    ]
    grid = StageGrid(rc, nodes, fail=fail)
    return run_server(grid, rc), grid


def _final_state(server_dir: Path) -> dict[str, torch.Tensor]:
    from fedsrd.server import load_adapter_state

    return load_adapter_state(server_dir / "final")


@needs_flwr
def test_secure_round_equals_the_plain_round_and_the_server_never_decodes_an_update(
    tmp_path, task_identity, monkeypatch
):
    from fedsrd.server import FederatedServer

    plain_history, _ = _in_process(tmp_path / "plain")
    decoded = []
    original = FederatedServer.decode_update
    monkeypatch.setattr(
        FederatedServer, "decode_update", lambda self, *a, **k: decoded.append(a) or original(self, *a, **k)
    )
    history, grid = _in_process(tmp_path / "secure", args=SECAGG)
    assert decoded == []  # the server decoded no client's update: it only ever held the sum
    for stage, reply in grid.replies:  # and no train reply carried one: no payload, no arrays, only masked vectors
        assert not reply.has_error(), reply.error
        if stage is None:  # hello (client 0 sends the seeded initial adapter) and the final sync: no update
            assert reply.metadata.message_type != "train"
            continue
        assert "payload" not in reply.content and all(len(r) == 0 for r in reply.content.array_records.values())
        assert not any(k.startswith("fitres.") for k in reply.content)
    stages = [s for s, _ in grid.replies if s]
    assert stages == ["setup"] * 3 + ["share_keys"] * 3 + ["collect_masked_vectors"] * 3 + ["unmask"] * 3
    plain, secure = _final_state(tmp_path / "plain" / "server"), _final_state(tmp_path / "secure" / "server")
    assert sorted(plain) == sorted(secure)
    worst = max(float((plain[k] - secure[k]).abs().max()) for k in plain)
    assert 0 < worst <= STEP * 1.001 + 1e-7  # quantized, and within one step of the plain mean
    record, plain_record = history[1], plain_history[1]
    assert record["accepted"] == [0, 1, 2] and record["rejected"] == {} and record["dropped"] == {}
    assert record["train_loss"] == pytest.approx(plain_record["train_loss"])
    sa = record["transport"]["secure_aggregation"]
    assert record["upload_bytes"] == sa["masked_vector_bytes"] + sa["protocol_upload_bytes"]
    assert sa["masked_vector_bytes"] > plain_record["upload_bytes"]  # int64 masked values vs float32 updates
    assert record["robust"]["rule"] == "secure_sum"
    # the same config and seed give the same bits (the stochastic rounding is seeded per client and round)
    _in_process(tmp_path / "again", args=SECAGG)
    again = _final_state(tmp_path / "again" / "server")
    assert wire.state_digest(again) == wire.state_digest(secure)


@needs_flwr
def test_a_dropout_below_the_threshold_fails_the_round_and_keeps_the_state(tmp_path, task_identity):
    from fedsrd.integrations.checkpoint import load_checkpoint

    with pytest.raises(RuntimeError, match="secure aggregation stopped at collect masked vectors"):
        _in_process(
            tmp_path, fail={(101, "collect_masked_vectors")}, args=f"{SECAGG} --secagg_reconstruction_threshold 1.0"
        )
    ckpt = load_checkpoint(tmp_path / "server" / "checkpoints")
    assert ckpt.round == 0 and len(ckpt.history) == 1  # round 1 never committed; the global state is round 0's


@needs_flwr
def test_a_dropout_within_the_threshold_completes_with_the_survivors(tmp_path, task_identity):
    history, _ = _in_process(tmp_path, fail={(101, "collect_masked_vectors")}, args=SECAGG)
    record = history[1]
    assert record["accepted"] == [0, 2] and "ClientApp failed" in record["dropped"]["1"]


# ---------------------------------------------------------------------------------------------------------------------
# distributed DP: dp_mode "local" under SecAgg+ (docs/privacy.md, "Distributed DP with secure aggregation")
# ---------------------------------------------------------------------------------------------------------------------

DP = {"dp_clip_norm": 0.5, "dp_noise_multiplier": 1.0}
DP_ARGS = f"{SECAGG} --dp_mode local --dp_clip_norm 0.5"
SECRETS = {i: {"dp-noise-secret": f"node-{i}-secret-0123456789abcdef"} for i in range(3)}


def test_central_dp_with_secure_aggregation_is_still_refused():
    with pytest.raises(ValueError, match="FedSRDConfig.secure_aggregation: is not combined with central differential "
                                         "privacy") as err:  # fmt: skip
        FedSRDConfig(algorithm="fedavg", num_clients=3, secure_aggregation="secaggplus", dp_mode="central", **DP)
    assert "central DP clips each client's update, which secure aggregation hides from the server" in str(err.value)
    assert "set dp_mode 'local'" in str(err.value)


def test_local_dp_with_secure_aggregation_is_accepted_for_the_sum_algorithms():
    for algorithm in ("fedavg", "fedprox", "ffa_lora", "fedsa_lora", "fedfft", "fed_sb", "fedsvd", "rolora"):
        FedSRDConfig(algorithm=algorithm, num_clients=3, secure_aggregation="secaggplus", dp_mode="local", **DP)


@pytest.mark.parametrize("algorithm", ["topk", "fed_dare", "fedkrso", "fedkseed"])
def test_local_dp_with_secure_aggregation_refuses_steps_that_are_not_sums(algorithm):
    with pytest.raises(ValueError, match="FedSRDConfig.secure_aggregation: distributed differential privacy") as err:
        FedSRDConfig(algorithm=algorithm, num_clients=3, secure_aggregation="secaggplus", dp_mode="local", **DP)
    assert f"algorithm {algorithm!r} is not one" in str(err.value)
    admit = "The algorithms that admit both: fed_sb, fedavg, fedfft, fedprox, fedsa_lora, fedsvd, ffa_lora, rolora."
    assert admit in str(err.value)


def test_fedsrd_local_dp_is_refused_by_its_placement_before_secure_aggregation():
    with pytest.raises(ValueError, match="dp_mode: algorithm 'fedsrd' does not admit dp_mode='local'"):
        FedSRDConfig(algorithm="fedsrd", num_clients=3, secure_aggregation="secaggplus", dp_mode="local",
                     upload_mask="random", **DP)  # fmt: skip


@needs_flwr
def test_the_clipping_range_grows_to_hold_the_noise_shares():
    from fedsrd.integrations.secagg import DP_RANGE_SIGMAS, clipping_range

    def cfg(**kw):
        return FedSRDConfig(algorithm="fedavg", num_clients=3, secure_aggregation="secaggplus", **kw)

    assert clipping_range(cfg()) == 8.0
    assert clipping_range(cfg(dp_mode="local", **DP)) == 8.0  # C + 10 z C / sqrt(3) = 3.39: the configured 8 holds
    loud = cfg(dp_mode="local", dp_clip_norm=0.5, dp_noise_multiplier=10.0)
    assert clipping_range(loud) == pytest.approx(0.5 + DP_RANGE_SIGMAS * 10.0 * 0.5 / math.sqrt(3))  # 29.4
    assert clipping_range(cfg(dp_mode="local", secagg_clipping_range=50.0, **DP)) == 50.0  # a larger one is kept


@needs_flwr
def test_the_protocol_sums_noisy_changes_beyond_the_default_range(task_identity):
    # Noise shares of z C / sqrt(m) = 2.9 reach past the default range of 8; the grown range holds them whole.
    server_cls, config, specs, uploads, weights = _protocol(
        num_nodes=3, dp_mode="local", dp_clip_norm=0.5, dp_noise_multiplier=10.0
    )
    uploads = {n: [a * 2.9 for a in arrays] for n, arrays in uploads.items()}
    uploads[100][0][0, 0] = 20.0
    grid = ModGrid(uploads, weights)
    out = _run(server_cls, config, specs, grid, list(uploads))
    step = 2 * server_cls(grid, config, specs, timeout=1).range / QRANGE
    assert out.failure is None and max(np.abs(a).max() for u in uploads.values() for a in u) > 8.0
    for (name, _), want in zip(specs, _weighted_mean(uploads, weights, list(uploads)), strict=True):
        assert np.max(np.abs(out.mean[name].numpy() - want)) <= step + 1e-6


def test_a_noise_secret_changes_the_share_and_the_same_secret_repeats_it():
    from fedsrd import get_algorithm
    from fedsrd.client import FederatedClient

    cfg = FedSRDConfig(algorithm="fedavg", num_clients=3, dp_mode="local", **DP)
    g = torch.Generator().manual_seed(0)
    state = {"m.lora_A.weight": torch.randn(4, 6, generator=g), "m.lora_B.weight": torch.zeros(5, 4)}

    def share(secret):
        client = FederatedClient(get_algorithm("fedavg", cfg), state, cfg)
        client.noise_secret = secret
        noisy = client.privatize(dict(state), round=1, client_id=2)
        return torch.cat([(noisy[k] - state[k]).reshape(-1) for k in sorted(state)])

    public, a, b = share(None), share("a" * 32), share("b" * 32)
    assert torch.equal(a, share("a" * 32)) and not torch.equal(a, public) and not torch.equal(a, b)


def test_a_supernode_needs_its_own_noise_secret_under_distributed_dp():
    from fedsrd.integrations.node import node_noise_secret

    fed = FedSRDConfig(algorithm="fedavg", num_clients=3, secure_aggregation="secaggplus", dp_mode="local", **DP)
    with pytest.raises(ValueError, match="node config 'dp-noise-secret' is required with dp_mode 'local'"):
        node_noise_secret({"partition-id": 0}, fed)
    with pytest.raises(ValueError, match="at least 16 random characters"):
        node_noise_secret({"dp-noise-secret": "short"}, fed)
    assert node_noise_secret({"dp-noise-secret": "x" * 16}, fed) == "x" * 16
    plain = FedSRDConfig(algorithm="fedavg", num_clients=3, dp_mode="local", **DP)
    with pytest.raises(ValueError, match="remove them from each upload"):  # the server sees each upload: required too
        node_noise_secret({}, plain)
    assert node_noise_secret({}, FedSRDConfig(algorithm="fedavg", num_clients=3)) is None  # no DP: not needed


@needs_flwr
def test_distributed_dp_run_equals_the_plain_local_dp_run_with_the_same_epsilon(tmp_path, task_identity):
    # z = 10: each share has std 2.9 and some reach past the default range of 8, so this also checks the grown range
    dp = {"dp-noise-multiplier": 10.0}
    plain_history, _ = _in_process(tmp_path / "plain", node_extra=SECRETS, args=DP_ARGS.replace(SECAGG, ""), **dp)
    history, grid = _in_process(tmp_path / "secure", node_extra=SECRETS, args=DP_ARGS, **dp)
    assert [s for s, _ in grid.replies if s].count("collect_masked_vectors") == 3
    plain, secure = _final_state(tmp_path / "plain" / "server"), _final_state(tmp_path / "secure" / "server")
    from fedsrd.integrations.secagg import clipping_range
    from fedsrd.integrations.settings import parse_run_config

    step = 2 * clipping_range(parse_run_config({**RUN_CONFIG, "args": DP_ARGS, **dp}).fed) / QRANGE  # 1.4e-5
    worst = max(float((plain[k] - secure[k]).abs().max()) for k in plain)
    assert 0 < worst <= step * 1.001 + 1e-6  # same noise shares; the mean of 3 changes, each quantized once
    assert max(float(v.abs().max()) for v in plain.values()) > 1.0  # the noise is there (z C / m = 1.67)
    record, plain_record = history[1], plain_history[1]
    assert record["dp_epsilon"] == plain_record["dp_epsilon"] == epsilon_after(1, 10.0, 1.0, 1e-5)
    assert record["dp_delta"] == plain_record["dp_delta"]
    robust = record["robust"]
    assert robust["rule"] == "secure_sum" and robust["dp_denominator"] == 3 and robust["dp_noise_std"] == 0.0
    assert robust["dp_secure_sum_noise_multiplier"] == pytest.approx(10.0)
    _in_process(tmp_path / "again", node_extra=SECRETS, args=DP_ARGS, **dp)  # same config, seed and secrets: same bits
    assert wire.state_digest(_final_state(tmp_path / "again" / "server")) == wire.state_digest(secure)


@needs_flwr
def test_distributed_dp_dropout_the_server_adds_the_missing_share(tmp_path, task_identity, monkeypatch):
    from fedsrd import get_algorithm
    from fedsrd.integrations import flower
    from fedsrd.server import FederatedServer

    uploads, steps = {}, []
    reply, step_sum = flower._secagg_train_reply, FederatedServer.step_sum

    def keep(msg, node, update, metrics):  # the client side: its encoded (clipped, noised) update, before masking
        uploads[node.client_id] = update
        return reply(msg, node, update, metrics)

    monkeypatch.setattr(flower, "_secagg_train_reply", keep)

    def spy(self, *args, **kwargs):
        before = dict(self.state)
        result = step_sum(self, *args, **kwargs)
        steps.append((before, dict(self.state), self.config))
        return result

    monkeypatch.setattr(FederatedServer, "step_sum", spy)
    history, _ = _in_process(tmp_path, fail={(101, "collect_masked_vectors")}, node_extra=SECRETS, args=DP_ARGS,
                             **{"dp-noise-multiplier": 1.0})  # fmt: skip
    record = history[1]
    assert record["accepted"] == [0, 2] and "ClientApp failed" in record["dropped"]["1"] and sorted(uploads) == [0, 2]
    # the server divides by m = 3 and adds client 1's share z C / m * sqrt(1 / 3); the clients' shares in the sum it
    # unmasked amount to a multiplier z sqrt(2 / 3) against the server; epsilon is the plain run's
    robust = record["robust"]
    assert robust["dp_denominator"] == 3 and robust["dp_noise_std"] == pytest.approx(1.0 * 0.5 / 3 * math.sqrt(1 / 3))
    assert robust["dp_secure_sum_noise_multiplier"] == pytest.approx(math.sqrt(2 / 3))
    assert record["dp_epsilon"] == epsilon_after(1, 1.0, 1.0, 1e-5)
    # the plain server step on the same two uploads (the plain path pads client 1 and adds its share) gives the state
    (before, after, cfg), = steps
    plain = FederatedServer(get_algorithm(cfg.algorithm, cfg), before, cfg)
    plain.step(1, [uploads[0], uploads[2]], senders=[0, 2])
    assert plain.state.keys() == after.keys()
    worst = max(float((plain.state[k] - after[k]).abs().max()) for k in after)
    assert 0 < worst <= STEP * 1.001 + 1e-6
    assert max(float((before[k] - after[k]).abs().max()) for k in after) > 0.05  # the noise moved the state


@needs_flwr
def test_distributed_dp_fewer_survivors_than_the_threshold_fail_the_round_and_spend_nothing(tmp_path, task_identity):
    from fedsrd.integrations.checkpoint import load_checkpoint

    with pytest.raises(RuntimeError, match="secure aggregation stopped at collect masked vectors"):
        _in_process(tmp_path, fail={(101, "collect_masked_vectors")}, node_extra=SECRETS,
                    args=f"{DP_ARGS} --secagg_reconstruction_threshold 1.0", **{"dp-noise-multiplier": 1.0})
    ckpt = load_checkpoint(tmp_path / "server" / "checkpoints")
    assert ckpt.round == 0 and [r.get("dp_epsilon") for r in ckpt.history] == [None]


@needs_flwr
def test_distributed_dp_refuses_a_supernode_without_a_noise_secret(tmp_path, task_identity):
    with pytest.raises(TimeoutError, match="dp-noise-secret") as err:  # every hello fails: no training, no round
        _in_process(tmp_path, args=DP_ARGS, **{"dp-noise-multiplier": 1.0, "node-timeout": 2.0})
    assert "is required with dp_mode" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# a real deployment: SuperLink + 3 SuperNodes on loopback, the plain run then the secure one
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.flower
@needs_flwr
def test_deployment_on_loopback_secure_equals_plain(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from test_flower import _free_ports, _isolated_network

    for exe in ("flower-superlink", "flower-supernode", "flwr"):
        if not (Path(sys.executable).parent / exe).exists():
            pytest.skip(f"{exe} is not next to {sys.executable}")
    app_config = {
        "num-clients": 3,
        "clients-per-round": 3,
        "algorithm": "fedavg",
        "num-rounds": 1,
        "domains": "arithmetic percent units",
    }
    node_configs = [{"partition-id": i, "num-partitions": 3, "state-dir": str(tmp_path / f"node{i}")} for i in range(3)]
    # the plain reference runs in process (the same ServerApp and ClientApp messages, and bits, as a deployment:
    # test_flower), so the loopback deployment runs only the secure federation
    import tomllib

    from fedsrd.integrations.flower import run_server
    from fedsrd.integrations.inprocess import InProcessGrid, serverapp_task_identity

    defaults = dict(tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    plain_rc = {**defaults, **app_config, "output-dir": str(tmp_path / "plain")}
    plain_nodes = [{**c, "state-dir": str(tmp_path / f"plain_node{i}")} for i, c in enumerate(node_configs)]
    with serverapp_task_identity():
        run_server(InProcessGrid(plain_rc, plain_nodes), plain_rc)
    runs = [{**app_config, "output-dir": str(tmp_path / "secure"), "args": SECAGG}]
    isolated = _isolated_network()
    link_port, node_port = (9092, 9094) if isolated else _free_ports(2)
    driver = [
        sys.executable,
        "-m",
        "fedsrd.integrations.flower_loopback",
        str(APP),
        "--workdir",
        str(tmp_path / "flwr"),
        "--nodes",
        "3",
        "--link-port",
        str(link_port),
        "--node-port",
        str(node_port),
        "--timeout",
        "600",
        *[arg for c in node_configs for arg in ("--node-config", json.dumps(c))],
        *[arg for c in runs for arg in ("--run-config", json.dumps(c))],
    ]
    out = run_loopback_driver(driver, isolated, timeout=1500)
    statuses = [json.loads(line)["status"] for line in out.splitlines() if line.startswith('{"run_id"')]
    assert statuses == ["finished:completed"]
    plain, secure = _final_state(tmp_path / "plain"), _final_state(tmp_path / "secure")
    worst = max(float((plain[k] - secure[k]).abs().max()) for k in plain)
    assert 0 < worst <= STEP * 1.001 + 1e-7
    history = json.loads((tmp_path / "secure" / "history.json").read_text())
    assert history[1]["accepted"] == [0, 1, 2] and history[1]["transport"]["secure_aggregation"]["masked_vector_bytes"]
