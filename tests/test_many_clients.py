"""Hundreds of clients per round: the cheaper exact SVD path, the streaming server step, client state on disk."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fedsrd import get_algorithm, wire
from fedsrd.algorithms.base import BatchAggregation
from fedsrd.algorithms.fedsrd import FedSRD, FedSRDe, LoraModule
from fedsrd.client import FederatedClient
from fedsrd.config import FedSRDConfig
from fedsrd.ops import generator_for, lowrank, normalized_weights, weighted_sum
from fedsrd.ops.lowrank import (
    choose_svd_path,
    dense_truncated_svd,
    factored_difference,
    solve_left_update,
    stack_factors,
    truncated_svd,
    truncated_svd_flops,
)
from fedsrd.ops.sketch import OnePassSketch, recommended_corange_size
from fedsrd.server import FederatedServer

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


# ---------------------------------------------------------------------------------------------------------------------
# 2. the streaming step
# ---------------------------------------------------------------------------------------------------------------------


def _adapter(d_out=12, d_in=20, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"m.layers.0.{p}.lora_{f}.weight": (0.1 * torch.randn(r, d_in, generator=g)) if f == "A"
        else 0.01 * torch.randn(d_out, r, generator=g)
        for p in ("q_proj", "v_proj") for f in ("A", "B")
    }  # fmt: skip


def _blobs(algorithm: str, cfg: FedSRDConfig, state, n: int, round: int = 1) -> list[bytes]:
    algo = get_algorithm(algorithm, cfg)
    client = FederatedClient(algo, state, cfg)
    blobs = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        local = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        blobs.append(client.make_update(local, round=round, client_id=i, num_samples=5 + 3 * i))
    return blobs


def _step(algorithm: str, blobs, state, round: int = 1, **options):
    cfg = FedSRDConfig(algorithm=algorithm, num_clients=64, **options)
    server = FederatedServer(get_algorithm(algorithm, cfg), dict(state), cfg)
    return server, server.step(round, blobs)


def test_running_weighted_sum_equals_the_batch_sum():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=g) for _ in range(9)]
    raw = [float(w) for w in torch.randint(1, 50, (9,), generator=g)]
    algo = get_algorithm("fedavg", FedSRDConfig())
    aggregation = algo.begin_aggregate({"x": torch.zeros(7, 5)}, 1, torch.Generator(), {})
    for t, w in zip(tensors, raw, strict=True):
        aggregation.fold({"x": t}, w)
    streamed = aggregation.finish()[0]["x"]
    torch.testing.assert_close(streamed, weighted_sum(tensors, normalized_weights(raw)), rtol=1e-6, atol=1e-7)
    # FedAvg's subclasses with their own step fall back to holding the updates
    assert isinstance(get_algorithm("flexlora", FedSRDConfig()).begin_aggregate({}, 1, None, {}), BatchAggregation)


@pytest.mark.parametrize("aggregation", ["uniform", "samples"])
def test_streaming_server_step_equals_the_batch_step_for_fedavg(aggregation):
    state = _adapter()
    blobs = _blobs("fedavg", FedSRDConfig(num_clients=64), state, 12)
    batch, batch_result = _step("fedavg", blobs, state, aggregation=aggregation)
    stream, stream_result = _step("fedavg", blobs, state, aggregation=aggregation, server_streaming="on")
    assert stream_result.accepted == batch_result.accepted == list(range(12))
    for k in state:
        torch.testing.assert_close(stream.state[k], batch.state[k], rtol=1e-6, atol=1e-7)


def _with_nan(blob: bytes, name: str) -> bytes:
    from safetensors.torch import load, save

    n = struct.unpack("<Q", blob[:8])[0]
    metadata = json.loads(blob[8 : 8 + n])["__metadata__"]
    tensors = load(blob)
    tensors[name].view(-1)[0] = float("nan")
    return save(tensors, metadata=metadata)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedsrd"])
def test_streaming_rejects_hostile_updates_before_folding(algorithm):
    state = _adapter()
    cfg = FedSRDConfig(algorithm=algorithm, num_clients=64)
    good = _blobs(algorithm, cfg, state, 6)
    name = next(k for k in wire.decode(good[0]).tensors)
    hostile = [
        _with_nan(_blobs(algorithm, cfg, state, 7)[6], name) if algorithm == "fedavg" else b"not a message",
        _blobs(algorithm, cfg, state, 1, round=2)[0],  # another round
        good[2],  # a second update from client 2
    ]
    _, clean = _step(algorithm, good, state, server_streaming="on")
    server, result = _step(algorithm, good + hostile, state, server_streaming="on")
    assert result.accepted == clean.accepted == list(range(6))
    assert set(result.rejected) == {"#6", "#7", "#8"}
    assert result.broadcast == clean.broadcast


def test_streaming_fedsrd_clips_like_the_batch_step():
    state = _adapter()
    cfg = FedSRDConfig(algorithm="fedsrd", num_clients=64)
    blobs = _blobs("fedsrd", cfg, state, 8)
    options = {"adaptive_clip_multiplier": 1.0, "download_drop": 0.0}  # about half of the clients clipped
    _, batch = _step("fedsrd", blobs, state, **options)
    _, stream = _step("fedsrd", blobs, state, server_streaming="on", **options)
    assert stream.robust["clipped"] and stream.robust["clipped"] == batch.robust["clipped"]
    assert stream.robust["clip_bound"] == batch.robust["clip_bound"]


def _module_updates(d_out, d_in, r, m, seed=0):
    b, a, deltas_b, deltas_a = trained_like(d_out, d_in, r, m, seed)
    updates = [{MODULE.b_key: db, MODULE.a_key: da} for db, da in zip(deltas_b, deltas_a, strict=True)]
    return {MODULE.a_key: a, MODULE.b_key: b}, updates


def _streamed(algo, state, updates, round, weights):
    aggregation = algo.begin_aggregate(state, round, generator_for(0, "step"), {})
    for update, weight in zip(updates, weights, strict=True):
        aggregation.fold(update, weight)
    return aggregation.finish()[0]


def _rel_err_of_steps(algo, state, updates, round, raw):
    exact = algo.server_step(state, updates, normalized_weights(raw), round, generator_for(0, "step"))
    streamed = _streamed(algo, state, updates, round, raw)
    assert set(exact) == set(streamed)
    return max(rel_err(streamed[k].to_dense(), exact[k].to_dense()) for k in exact)


@pytest.mark.parametrize("round", [1, 2])
def test_fedsrd_e_streams_exactly(round):
    state, updates = _module_updates(40, 56, 4, 30)
    raw = [1.0 + (i % 5) for i in range(30)]
    for ridge in (0.0, 0.1):
        algo = FedSRDe(FedSRDConfig(algorithm="fedsrd_e", download_drop=0.0, decompose_ridge=ridge))
        assert _rel_err_of_steps(algo, state, updates, round, raw) < 1e-5


@pytest.mark.parametrize("round", [1, 2])
def test_fedsrd_sketched_step_is_close_to_the_exact_step(round):
    state, updates = _module_updates(64, 80, 4, 40)  # m r = 160 > 64: the cross term does not fit in the sketch
    algo = FedSRD(FedSRDConfig(algorithm="fedsrd", download_drop=0.0, sketch_oversampling=8))
    assert _rel_err_of_steps(algo, state, updates, round, [1.0] * 40) < 1e-3
    few_state, few = _module_updates(64, 80, 4, 3)  # m r = 12 <= k: the sketch holds the cross term whole
    assert _rel_err_of_steps(algo, few_state, few, round, [1.0] * 3) < 1e-4


@pytest.mark.parametrize("round", [1, 2])
def test_fedsrd_sketched_step_at_the_default_size_is_within_1e_3_of_the_exact_step_and_deterministic(round):
    """The default `sketch_oversampling` where the cross term does not fit (m r = 480 > k + r = 200): the issue's
    target of a relative error below 1e-3 against the exact step; and the same inputs give the same bits."""
    state, updates = _module_updates(320, 288, 4, 120)
    algo = FedSRD(FedSRDConfig(algorithm="fedsrd", download_drop=0.0))
    assert algo.config.sketch_oversampling == 192
    assert _rel_err_of_steps(algo, state, updates, round, [1.0 + (i % 3) for i in range(120)]) < 1e-3
    first, again = (_streamed(algo, state, updates[:40], round, [1.0] * 40) for _ in range(2))
    assert all(torch.equal(first[k].to_dense(), again[k].to_dense()) for k in first)


@pytest.mark.parametrize("algorithm", ["fedsrd", "fedsrd_e"])
def test_streamed_target_in_float64_serves_download_both_factors(algorithm):
    """The streamed target is finished in float64 (`StreamingTarget.finish_dtype`); both factors' solves take it and
    send float32 deltas close to the batch step's (3 rank-4 clients: the sketch holds the cross term whole)."""
    state, updates = _module_updates(40, 56, 4, 3)
    algo = get_algorithm(algorithm, FedSRDConfig(algorithm=algorithm, download_drop=0.0, download_both_factors=True))
    for round in (1, 2):
        exact = algo.server_step(state, updates, [1 / 3] * 3, round, generator_for(0, "step"))
        streamed = _streamed(algo, state, updates, round, [1.0] * 3)
        assert set(streamed) == set(exact) == set(state)
        for k in exact:
            assert streamed[k].to_dense().dtype == torch.float32
            assert rel_err(streamed[k].to_dense(), exact[k].to_dense()) < 1e-3  # the float32 batch step rounds


def _low_rank_plus_noise(d_out, d_in, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(d_out, rank, generator=g, dtype=torch.float64) * torch.logspace(1, 0, rank).double()
    right = torch.randn(rank, d_in, generator=g, dtype=torch.float64)
    return left, right, noise * torch.randn(d_out, d_in, generator=g, dtype=torch.float64), g


@pytest.mark.parametrize(
    "d_out, d_in, k",
    [(90, 70, 14), (420, 360, 4 + FedSRDConfig().sketch_oversampling)],  # the default: k = r + 192 at LoRA rank 4
)
def test_sketch_error_is_within_the_bound_on_a_low_rank_plus_noise_matrix(d_out, d_in, k):
    """Tropp et al. 2017, Thm. 4.3 and Prop. 6.1: rank 6 plus noise, sketched with k Gaussian directions and
    l = 2k + 1 (as `StreamingTarget` does), also at the default size."""
    rank = 6
    l = min(recommended_corange_size(k), d_out)  # noqa: E741  (StreamingTarget caps l at the rows)
    f = lambda s, t: s / (t - s - 1)  # noqa: E731
    for seed in range(3):
        left, right, noise, g = _low_rank_plus_noise(d_out, d_in, rank, 1e-2, seed)
        w = left @ right + noise
        sketch = OnePassSketch(d_out, d_in, k, l, g, dtype=torch.float64)
        sketch.fold(left, right)  # folded in two terms, as client updates are
        sketch.fold(noise, torch.eye(d_in, dtype=torch.float64))
        sigma = torch.linalg.svdvals(w)
        tail2 = lambda j, sigma=sigma: float((sigma[j:] ** 2).sum())  # noqa: E731  tau_{j+1}^2
        expected_sq = (1 + f(k, l)) * min((1 + f(p, k)) * tail2(p) for p in range(1, k - 1))
        q, x = sketch.reconstruct()
        error = float(torch.linalg.norm(w - q @ x))
        assert error**2 <= 4 * expected_sq  # the bound is on the mean square; 4x for one draw
        t_left, t_right = sketch.truncated(rank)
        assert float(torch.linalg.norm(w - t_left @ t_right)) <= tail2(rank) ** 0.5 + 2 * error
        # and it is small: the noise's own size, far below the signal
        assert float(torch.linalg.norm(w - t_left @ t_right)) < 2 * float(torch.linalg.norm(noise))


def test_streaming_options_are_validated():
    with pytest.raises(ValueError, match="server_streaming"):
        FedSRDConfig(server_streaming="yes")
    with pytest.raises(ValueError, match="sketch_oversampling"):
        FedSRDConfig(sketch_oversampling=-1)
    with pytest.raises(ValueError, match="robust_aggregation"):
        FedSRDConfig(server_streaming="on", robust_aggregation="median")


def test_streaming_refuses_what_it_does_not_fold_before_training():
    # differential privacy: the noise goes on the whole round's aggregate (the batch step)
    with pytest.raises(ValueError, match=r"server_streaming: 'on' is not combined with differential privacy"):
        FedSRDConfig(algorithm="fedavg", dp_mode="central", dp_clip_norm=1.0, dp_noise_multiplier=1.0,
                     server_streaming="on")  # fmt: skip
    FedSRDConfig(algorithm="fedavg", dp_mode="central", dp_clip_norm=1.0, dp_noise_multiplier=1.0)  # batch: fine
    # clients of different ranks
    with pytest.raises(ValueError, match=r"server_streaming: .*client_lora_ranks"):
        FedSRDConfig(algorithm="fedsrd", num_clients=4, lora_r=8, client_lora_ranks=[4, 8, 8, 8], server_streaming="on")
    FedSRDConfig(algorithm="fedsrd", num_clients=4, lora_r=8, client_lora_ranks=[8, 8, 8, 8], server_streaming="on")


@pytest.mark.parametrize("round", [1, 2])
@pytest.mark.parametrize("algorithm", ["fedsrd_e", "fedsrd"])
def test_streaming_folds_a_missing_factor_as_zero_with_train_one_factor(algorithm, round):
    state = _adapter()
    options = {"train_one_factor": True}
    blobs = _blobs(algorithm, FedSRDConfig(algorithm=algorithm, num_clients=64, **options), state, 6, round=round)
    sent = [wire.decode(b).tensors for b in blobs]
    assert all(all(("lora_B" if round == 1 else "lora_A") in k for k in t) for t in sent)  # one factor each
    batch, batch_result = _step(algorithm, blobs, state, round=round, **options)
    stream, stream_result = _step(algorithm, blobs, state, round=round, server_streaming="on", **options)
    assert stream_result.accepted == batch_result.accepted == list(range(6))
    for k in state:  # 6 rank-4 clients: the sketch holds the cross term whole, so FedSRD streams exactly too
        torch.testing.assert_close(stream.state[k], batch.state[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 3. client state on disk
# ---------------------------------------------------------------------------------------------------------------------


def test_disk_client_store_round_trips_bits_and_writes_atomically(tmp_path, monkeypatch):
    import os

    from fedsrd.federation.client_store import DiskClientStore, read_snapshot, uses_disk_store

    store = DiskClientStore(tmp_path / "store")
    g = torch.Generator().manual_seed(0)
    states = {cid: {"x": torch.randn(3, 4, generator=g), "y": torch.randn(5, generator=g)} for cid in (7, 2, 11)}
    for cid, state in states.items():
        store[cid] = state
    assert list(store) == [2, 7, 11] and len(store) == 3 and 7 in store and 3 not in store
    assert all(torch.equal(store[cid][k], states[cid][k]) for cid in states for k in ("x", "y"))
    snapshot = store.snapshot(tmp_path / "snap")
    # a crash in the middle of a write leaves the old file
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        store[7] = {"x": torch.zeros(3, 4), "y": torch.zeros(5)}
    monkeypatch.undo()
    assert torch.equal(store[7]["x"], states[7]["x"])
    # later writes do not change the snapshot (hard links, replaced files)
    store[7] = {"x": torch.zeros(3, 4), "y": torch.zeros(5)}
    del store[2]
    store.restore(tmp_path / "snap", snapshot)
    assert list(store) == [2, 7, 11] and torch.equal(store[7]["x"], states[7]["x"])
    assert torch.equal(read_snapshot(tmp_path / "snap", snapshot)[2]["y"], states[2]["y"])
    (tmp_path / "snap" / "client_000011.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="does not match the digest"):
        store.restore(tmp_path / "snap", snapshot)
    assert uses_disk_store("auto", 256, 256) and not uses_disk_store("auto", 255, 256)
    assert uses_disk_store("disk", 2, 256) and not uses_disk_store("memory", 10**4, 256)
    with pytest.raises(ValueError, match="client_state_store"):
        FedSRDConfig(client_state_store="ssd")


def test_disk_client_store_survives_a_kill_and_resumes_bit_identically(tmp_path):
    """fedsrd_ef's residuals on disk; SIGKILL in round 2 after client 0 has replaced its residual file; resume."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from fedsrd.server import load_adapter_state

    repo = Path(__file__).resolve().parents[1]
    args = ["--config", str(repo / "examples" / "configs" / "tiny.yaml"), "--algorithm", "fedsrd_ef",
            "--num_rounds", "3", "--local_steps", "2", "--eval_every", "0", "--save_every", "0",
            "--client_state_store", "disk", "--disable_tqdm", "true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", _RUN, *args, "--output_dir", str(reference)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", _RUN, *args, "--output_dir", str(killed), "--slow", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (killed / "in_round_2").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "round 2 never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    meta = json.loads((killed / "checkpoints" / "round_0001" / "meta.json").read_text())
    store = killed / "client_states" / "process_0" / "memory"
    client0 = store / "client_000000.safetensors"
    assert meta["client_states"]["memory"]["0"] != hashlib_of(client0)  # round 2 already replaced client 0's file
    assert "memory/0/" not in " ".join(meta)  # residuals are files, not checkpoint tensors
    subprocess.run([sys.executable, "-c", _RUN, *args, "--output_dir", str(killed), "--resume", "true"], check=True,
                   env=env, capture_output=True)  # fmt: skip
    assert wire.state_digest(load_adapter_state(killed / "final")) == wire.state_digest(
        load_adapter_state(reference / "final")
    )
    final = [json.loads((out / "checkpoints" / "round_0003" / "meta.json").read_text()) for out in (reference, killed)]
    assert final[0]["client_states"] == final[1]["client_states"]  # every residual file has the same bytes
    assert final[0]["client_states"]["memory"]


def hashlib_of(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# The main job; with --slow 1 it announces round 2's second client and sleeps there (client 0 has finished round 2).
_RUN = """
import sys, time
from pathlib import Path
from fedsrd.trainer import FederatedTrainer
from fedsrd.cli import run_train

argv = sys.argv[1:]
if "--slow" in argv:
    argv = argv[: argv.index("--slow")] + argv[argv.index("--slow") + 2 :]
    original = FederatedTrainer.local_train

    def slow(self, client_id, round):
        if round == 2 and client_id == 1:
            Path(self.args.output_dir, "in_round_2").touch()
            time.sleep(600)
        return original(self, client_id, round)

    FederatedTrainer.local_train = slow
run_train(argv)
"""


# ---------------------------------------------------------------------------------------------------------------------
# 4. the benchmark
# ---------------------------------------------------------------------------------------------------------------------


def test_many_clients_benchmark_quick_mode_runs_and_reports_every_configuration():
    """`benchmarks/many_clients.py --quick` at the smallest sizes that still take every path: a batch step that saves
    the exact reference (fedsrd_auto: the factored path at m = 2, the dense one at m = 8), FedAvg's upload, a
    streamed step compared with it (fedsrd_sketch), each in a process of its own, and the simulation with client
    state on disk (the default is a 3072 x 3072 module, m up to 1024 and 256 clients)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "src")}
    script = str(repo / "benchmarks" / "many_clients.py")
    configs, clients, d, r = ("fedavg", "fedsrd_auto", "fedsrd_sketch"), (2, 8), 16, 2
    proc = subprocess.run([sys.executable, script, "--quick", "--dim", str(d), "--rank", str(r), "--clients",
                           *map(str, clients), "--configs", *configs, "--simulation", "6", "2", "1", "--json"],
                          capture_output=True, text=True, env=env, check=True)  # fmt: skip
    assert "estimated cost:" in proc.stdout.splitlines()[1]  # printed before anything runs
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "many_clients" and result["threads"] == 1
    rows = {(row["config"], row["clients"]): row for row in result["rows"]}
    assert set(rows) == {(c, m) for c in configs for m in clients}
    assert not any("not_run" in row for row in rows.values())
    for (config, _), row in rows.items():
        assert row["dim"] == d and row["rank"] == r and row["ms"] > 0 and row["peak_mib"] is not None
        streamed = config == "fedsrd_sketch"  # the time per client folded, and the memory held while folding
        assert ("fold_ms" in row) == ("fold_peak_mib" in row) == streamed
    for m in clients:
        assert rows[("fedsrd_auto", m)]["path"] == choose_svd_path(d, d, r * m, r)
        sketch = rows[("fedsrd_sketch", m)]
        assert sketch["path"] == "sketch" and sketch["sketch_oversampling"] == FedSRDConfig().sketch_oversampling
        assert sketch["rel_err"] < 1e-3 and sketch["fold_ms"] > 0
        assert sketch["fold_peak_mib"] is not None and sketch["fold_peak_mib"] <= sketch["peak_mib"]  # streaming memory
    assert rows[("fedsrd_auto", 2)]["path"] == "factored" and rows[("fedsrd_auto", 8)]["path"] == "dense"
    simulation = result["simulation"]
    assert simulation["clients"] == 6 and simulation["wall_s"] > 0 and simulation["client_state_files"] > 0
    assert simulation["peak_rss_mib"] > 0


def test_many_clients_benchmark_says_why_a_configuration_did_not_run():
    from test_benchmarks import load_benchmark

    many_clients = load_benchmark("many_clients")
    row = many_clients.run_worker("fedsrd_auto", 16, 2, 2, None, None, None, timeout_s=0.01)
    assert row == {"not_run": "timed out after 0.01 s (--config-timeout-s)"}
    row = many_clients.run_worker("no_such_config", 16, 2, 2, None, None, None, timeout_s=600)
    assert row["not_run"].startswith("failed: ") and "no_such_config" in row["not_run"]


def test_run_all_has_a_many_clients_section_with_a_quick_variant():
    from test_benchmarks import load_benchmark

    run_all = load_benchmark("run_all")
    full, quick = (run_all.sections("data/", q)["many_clients"] for q in (False, True))
    assert full == {"cmd": ["many_clients.py"], "needs_data": False}
    assert quick["cmd"] == ["many_clients.py", "--quick"]


def test_sketch_accuracy_benchmark_compares_with_the_exact_and_the_float64_step(monkeypatch, capsys):
    """`benchmarks/sketch_accuracy.py` at a tiny size: its float64 reference agrees with the exact float32 step, and a
    sketch that holds the whole cross term (k = d) finished in float64 reproduces the reference."""
    import sys

    from test_benchmarks import load_benchmark

    bench = load_benchmark("sketch_accuracy")
    argv = ["sketch_accuracy.py", "--dim", "40", "--rank", "2", "--clients", "3", "--variants", "4:float32",
            "64:float64", "--json"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(row["round"], row["step"]): row for row in result["rows"]}
    assert set(rows) == {(k, s) for k in "BA" for s in ("exact float32", "sketch 4:float32", "sketch 64:float64")}
    for kind in "BA":
        assert rows[(kind, "exact float32")]["rel_err_f64"] < 1e-4
        whole = rows[(kind, "sketch 64:float64")]
        assert whole["finish_dtype"] == "float64" and whole["rel_err_f64"] < 1e-6 and whole["fold_ms"] > 0
        assert rows[(kind, "sketch 4:float32")]["rel_err"] > 0
    from fedsrd.algorithms.fedsrd import StreamingTarget

    assert StreamingTarget.finish_dtype == torch.float64  # set back after the float32 variant
