"""FedSRD-EF: error feedback's bookkeeping (nothing is lost), its switches, and resume with the residuals."""

import json

import pytest
import torch
from test_reliability import QUIET, TINY  # noqa: E402  (the tiny preset and quiet flags)

from fedsrd import FedSRDConfig, wire
from fedsrd.algorithms import get_algorithm
from fedsrd.cli import run_train
from fedsrd.ops import generator_for


def _state(seed: int, modules=("m0", "m1"), d_out=12, d_in=10, r=3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in modules:
        state[f"{m}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.1
    return state


def _dense(payload):
    return {k: (v.to_dense(torch.float32) if isinstance(v, wire.SparseTensor) else v) for k, v in payload.items()}


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
def test_upload_residual_loses_nothing_over_two_rounds(value_dtype):
    algo = get_algorithm("fedsrd_ef", FedSRDConfig(algorithm="fedsrd_ef", value_dtype=value_dtype))
    glob = _state(0)
    true_deltas = [{k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i + 10)) * 0.01
                    for k, v in glob.items()} for i in range(2)]  # fmt: skip
    memory, sent_total = {}, {k: torch.zeros_like(v) for k, v in glob.items()}
    for rnd, delta in enumerate(true_deltas, start=1):
        local = {k: glob[k] + delta[k] for k in glob}
        payload, memory = algo.client_update_with_memory(glob, local, memory, rnd, torch.Generator().manual_seed(0))
        for k, v in _dense(payload).items():
            sent_total[k] += v
        sparse = [v for v in payload.values() if isinstance(v, wire.SparseTensor)]
        assert sparse and all(v.nnz < v.numel for v in sparse)  # it really prunes
    for k in glob:
        # sent values (as the server decodes them) + kept residual == the sum of the true deltas
        torch.testing.assert_close(sent_total[k] + memory[k], true_deltas[0][k] + true_deltas[1][k],
                                   rtol=0, atol=1e-6)  # fmt: skip
    # the values sent are exactly representable in the wire dtype: the decoder sees what the residual assumed
    again = wire.decode(wire.encode(wire.Message(kind="update", algorithm="fedsrd_ef", round=2, tensors=payload),
                                    value_dtype=value_dtype))  # fmt: skip
    for k, v in _dense(again.tensors).items():
        torch.testing.assert_close(v, _dense(payload)[k], rtol=0, atol=0)


def test_download_residual_keeps_what_the_drop_removed():
    cfg = FedSRDConfig(algorithm="fedsrd_ef", download_drop=0.8)
    ef = get_algorithm("fedsrd_ef", cfg)
    exact = get_algorithm("fedsrd", FedSRDConfig(algorithm="fedsrd", download_drop=0.0))  # the undropped delta
    glob = _state(1)
    updates = [{k: wire.SparseTensor.from_dense(torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) * 0.01)
                for k, v in glob.items()} for i in range(3)]  # fmt: skip
    weights = [1 / 3] * 3
    old = {k: torch.full(v.shape, 0.001) for k, v in glob.items() if k.endswith("lora_B.weight")}
    old["m0.lora_A.weight"] = torch.full(glob["m0.lora_A.weight"].shape, -0.002)  # an A residual, kept in B rounds
    payload, kept = ef.server_step_with_memory(glob, updates, weights, 1, generator_for(0, "s", 1), old)
    full = _dense(exact.server_step(glob, updates, weights, 1, generator_for(0, "s", 1)))
    assert set(payload) == {k for k in glob if k.endswith("lora_B.weight")}  # a B-round
    for k, sent in _dense(payload).items():
        torch.testing.assert_close(sent + kept[k], full[k] + old[k], rtol=0, atol=1e-6)
        dropped = int((sent == 0).sum())
        assert 0 < dropped < sent.numel()  # some dropped, survivors not rescaled (checked by the sum above)
    torch.testing.assert_close(kept["m0.lora_A.weight"], old["m0.lora_A.weight"])  # untouched until an A-round


def test_switches_off_give_fedsrd_without_l1_rescale():
    glob = _state(2)
    local = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in glob.items()}
    off = get_algorithm("fedsrd_ef", FedSRDConfig(algorithm="fedsrd_ef", ef_upload=False, ef_download=False))
    paper = get_algorithm("fedsrd", FedSRDConfig(algorithm="fedsrd"))
    rng = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    payload, kept = off.client_update_with_memory(glob, local, {}, 1, rng())
    assert kept == {}
    assert _dense(payload).keys() == _dense(paper.client_update(glob, local, 1, rng())).keys()
    for k, v in _dense(payload).items():
        torch.testing.assert_close(v, _dense(paper.client_update(glob, local, 1, rng()))[k])
    upd = [payload]
    bc, mem = off.server_step_with_memory(glob, upd, [1.0], 1, rng(), {})
    assert mem == {}
    ref = paper.server_step(glob, upd, [1.0], 1, rng())
    for k, v in _dense(bc).items():
        torch.testing.assert_close(v, _dense(ref)[k])


def test_a_residual_of_another_shape_is_refused():
    algo = get_algorithm("fedsrd_ef", FedSRDConfig(algorithm="fedsrd_ef"))
    glob = _state(3)
    with pytest.raises(ValueError, match="kept residual of 'm0.lora_B.weight' has shape"):
        algo.client_update_with_memory(glob, glob, {"m0.lora_B.weight": torch.zeros(2, 2)}, 1, torch.Generator())


@pytest.mark.parametrize("switches", [("true", "true"), ("false", "true"), ("true", "false")])
def test_tiny_federation_runs_with_each_switch(tmp_path, switches):
    out = tmp_path / "run"
    run_train(["--config", TINY, "--algorithm", "fedsrd_ef", "--num_rounds", "2", "--local_steps", "2",
               "--ef_upload", switches[0], "--ef_download", switches[1], "--eval_every", "0",
               "--output_dir", str(out), *QUIET])  # fmt: skip
    history = json.loads((out / "history.json").read_text())
    rounds = [r for r in history if r["round"] >= 1]
    assert len(rounds) == 2 and all(0 < r["upload_mb_per_client"] < r["download_mb_per_client"] * 10 for r in rounds)
    from safetensors.torch import load_file

    ckpt = sorted((out / "checkpoints").glob("round_*"))[-1]
    names = load_file(str(ckpt / "tensors.safetensors")).keys()  # the residuals are checkpointed with the run
    assert any(n.startswith("memory/") for n in names) == (switches[0] == "true")
    assert any(n.startswith("server_memory/") for n in names) == (switches[1] == "true")


def test_resume_restores_the_residuals_bit_for_bit(tmp_path):
    """Client residuals (memory/), the server's product-space residual (server_memory/) and the ridge-damped solve:
    a run cut after round 2 and resumed ends on the uninterrupted run's bits (the ridge's small solves are where
    misaligned checkpoint tensors once changed the last bit: `fedsrd.ops.aligned`)."""
    from fedsrd.server import load_adapter_state

    common = ["--config", TINY, "--algorithm", "fedsrd_ef", "--ef_download_space", "product", "--decompose_ridge",
              "0.1", "--local_steps", "2", "--eval_every", "0", *QUIET]  # fmt: skip
    run_train([*common, "--num_rounds", "3", "--output_dir", str(tmp_path / "full")])
    run_train([*common, "--num_rounds", "2", "--output_dir", str(tmp_path / "cut")])
    # same run, continued to round 3 from round 2's checkpoint (residuals included)
    run_train([*common, "--num_rounds", "3", "--output_dir", str(tmp_path / "cut"), "--resume", "true"])
    full = load_adapter_state(tmp_path / "full" / "final")
    resumed = load_adapter_state(tmp_path / "cut" / "final")
    assert full and wire.state_digest(full) == wire.state_digest(resumed)


def test_magnitude_selection_sends_the_largest_entries_and_keeps_the_rest():
    from fedsrd.ops.sparsify import magnitude_keep

    x = torch.tensor([[0.1, -5.0, 0.3], [2.0, 0.0, -0.2]])
    kept = magnitude_keep(x, 0.34)  # ceil(0.34 * 6) = 3 entries: -5, 2, 0.3
    assert kept.indices.tolist() == [1, 2, 3] and kept.values.tolist() == pytest.approx([-5.0, 0.3, 2.0])
    assert kept.mask is None  # positions travel explicitly
    with pytest.raises(ValueError, match="keep fraction"):
        magnitude_keep(x, 0.0)

    cfg = FedSRDConfig(algorithm="fedsrd_ef", download_drop=0.9, ef_download_selection="magnitude")
    ef = get_algorithm("fedsrd_ef", cfg)
    glob = _state(4)
    updates = [{k: wire.SparseTensor.from_dense(torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) * 0.01)
                for k, v in glob.items()} for i in range(2)]  # fmt: skip
    payload, kept_memory = ef.server_step_with_memory(glob, updates, [0.5, 0.5], 1, torch.Generator(), {})
    for key, sent in payload.items():
        dense = sent.to_dense(torch.float32)
        corrected = dense + kept_memory[key]
        assert sent.nnz == -(-corrected.numel() // 10)  # ceil(10%)
        smallest_sent = dense[dense != 0].abs().min()
        assert float(kept_memory[key].abs().max()) <= float(smallest_sent)  # what stays is never larger
    # the encoded broadcast carries positions (no seed) and decodes to the same values
    msg = wire.decode(wire.encode(wire.Message(kind="broadcast", algorithm="fedsrd_ef", round=1, tensors=payload)))
    for key, sent in payload.items():
        torch.testing.assert_close(msg.tensors[key].to_dense(torch.float32), sent.to_dense(torch.float32))


def test_unknown_download_selection_is_a_config_error():
    with pytest.raises(ValueError, match="FedSRDConfig.ef_download_selection"):
        FedSRDConfig(algorithm="fedsrd_ef", ef_download_selection="largest")


def test_both_factors_download_solves_b_then_a_for_the_rest():
    from fedsrd.algorithms.fedsrd import lora_modules
    from fedsrd.ops.lowrank import factored_difference, solve_left_update, solve_right_update

    glob = _state(6)
    updates = [{k: wire.SparseTensor.from_dense(torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) * 0.01)
                for k, v in glob.items()} for i in range(3)]  # fmt: skip
    weights = [1 / 3] * 3
    exact = get_algorithm("fedsrd", FedSRDConfig(algorithm="fedsrd", download_drop=0.0, download_both_factors=True))
    for rnd in (1, 2):  # the same in B- and A-rounds: both factors every round
        payload = _dense(exact.server_step(glob, updates, weights, rnd, torch.Generator()))
        assert set(payload) == set(glob)
        for module in lora_modules(glob):
            a, b = glob[module.a_key], glob[module.b_key]
            delta_w = exact.target_change(module, a, b, updates, weights)
            db = solve_left_update(delta_w, a)
            da = solve_right_update(factored_difference(delta_w, (db, a)), b + db)
            torch.testing.assert_close(payload[module.b_key], db)
            torch.testing.assert_close(payload[module.a_key], da)
            # with both solved, the new product is closer to the target than the B-only update
            target = delta_w[0] @ delta_w[1] + b @ a
            both = (b + db) @ (a + da)
            b_only = (b + db) @ a
            assert torch.linalg.norm(target - both) < torch.linalg.norm(target - b_only)
    dropped = get_algorithm("fedsrd", FedSRDConfig(algorithm="fedsrd", download_drop=0.9, download_both_factors=True))
    sparse = dropped.server_step(glob, updates, weights, 1, torch.Generator().manual_seed(0))
    assert all(v.mask is not None and v.nnz < v.numel for v in sparse.values())  # seeded DARE masks, positions free
    with pytest.raises(ValueError, match="FedSRDConfig.download_both_factors"):
        FedSRDConfig(algorithm="fedsrd_ef", download_both_factors=True)


def test_ridge_damped_solves_match_pinv_at_zero_and_shrink_weak_directions():
    from fedsrd.ops.lowrank import solve_left_update, solve_right_update

    g = torch.Generator().manual_seed(7)
    b = torch.randn(20, 3, generator=g, dtype=torch.float64)
    b[:, 2] *= 1e-4  # one weak direction: pinv amplifies it by ~1e4
    a = torch.randn(3, 15, generator=g, dtype=torch.float64)
    delta = (torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(4, 15, generator=g, dtype=torch.float64))
    torch.testing.assert_close(solve_right_update(delta, b, 0.0), torch.linalg.pinv(b) @ delta[0] @ delta[1])
    torch.testing.assert_close(solve_left_update(delta, a, 0.0), delta[0] @ delta[1] @ torch.linalg.pinv(a))
    plain, damped = solve_right_update(delta, b), solve_right_update(delta, b, 0.01)
    lam = 0.01 * torch.trace(b.T @ b) / 3
    torch.testing.assert_close(damped, torch.linalg.solve(b.T @ b + lam * torch.eye(3, dtype=b.dtype), b.T) @ delta[0]
                               @ delta[1])  # fmt: skip
    assert damped[2].norm() < 1e-2 * plain[2].norm()  # the weak direction is no longer amplified
    damped_left = solve_left_update(delta, a, 0.01)
    lam_a = 0.01 * torch.trace(a @ a.T) / 3
    expected = delta[0] @ delta[1] @ a.T @ torch.linalg.inv(a @ a.T + lam_a * torch.eye(3, dtype=a.dtype))
    torch.testing.assert_close(damped_left, expected)
    with pytest.raises(ValueError, match="FedSRDConfig.decompose_ridge"):
        FedSRDConfig(algorithm="fedsrd", decompose_ridge=-1.0)


# ---- train_one_factor: clients train the factor the round's download updates (not in the paper) ------------------
@pytest.mark.parametrize("name", ["fedsrd", "fedsrd_e"])
def test_train_one_factor_rounds_are_exact_averages_of_the_trained_factor(name):
    """With the frozen factor common to all, the aggregated change lies in the download's space: without pruning or
    drop, a B-round's broadcast is exactly mean_i dB_i and an A-round's mean_i dA_i (no projection loss)."""
    from test_fedsrd import run_round, toy_global_state

    cfg = FedSRDConfig(algorithm=name, train_one_factor=True, upload_sparsity_alpha=0.0, upload_sparsity_coeff=0.0,
                       download_drop=0.0)  # fmt: skip
    algo = get_algorithm(name, cfg)
    assert algo.update_is_partial()
    assert algo.trains("m.lora_B.weight", 1) and not algo.trains("m.lora_A.weight", 1)
    assert algo.trains("m.lora_A.weight", 2) and not algo.trains("m.lora_B.weight", 2)
    state = toy_global_state()
    for round in (1, 2, 3):
        factor = "lora_B" if round % 2 == 1 else "lora_A"
        gen = torch.Generator().manual_seed(round)
        locals_ = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) if factor in k else v.clone()
                    for k, v in state.items()} for _ in range(4)]  # fmt: skip
        upload = algo.client_update(state, locals_[0], round, torch.Generator())
        assert upload and all(factor in k for k in upload)  # the frozen factor does not travel
        payload, new_state = run_round(algo, state, round, locals_)
        for key in state:
            if factor in key:
                mean = sum(x[key] for x in locals_) / 4
                assert (new_state[key] - mean).abs().max() < 1e-5 * (1 + mean.abs().max()), key
            else:
                assert torch.equal(new_state[key], state[key]), key
        state = new_state


def test_train_one_factor_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="FedSRDConfig.train_one_factor"):
        FedSRDConfig(algorithm="fedavg", train_one_factor=True)
    with pytest.raises(ValueError, match="FedSRDConfig.train_one_factor"):
        FedSRDConfig(algorithm="fedsrd", train_one_factor=True, download_both_factors=True)
    assert get_algorithm("fedsrd", FedSRDConfig(algorithm="fedsrd")).trains("m.lora_A.weight", 1)  # paper: both


# ---- ef_download_space "product": the remainder of the round's target is kept in product space --------------------
def _product(memory, module):
    return memory[f"{module}.lora_B.weight.residual_left"] @ memory[f"{module}.lora_A.weight.residual_right"]


def test_product_residual_is_what_the_broadcast_did_not_apply():
    """E_new = (dW + E_old) - applied in both round kinds, exactly when the kept rank holds it (here the module's
    full rank, 10), and the kept rank is capped by ef_residual_rank (checked with the default cap, 2 r)."""
    r = 3
    cfg = FedSRDConfig(algorithm="fedsrd_ef", ef_upload=False, ef_download_space="product", download_drop=0.8,
                       ef_residual_rank=10, decompose_ridge=0.1)  # fmt: skip
    ef = get_algorithm("fedsrd_ef", cfg)
    glob = _state(4, r=r)
    memory: dict = {}
    captured = {}  # each module's dW (Eq. 11) as the step computed it
    target_change = ef.target_change

    def spy(module, a, b, *args, **kwargs):
        captured[module.b_key] = target_change(module, a, b, *args, **kwargs)
        return captured[module.b_key]

    ef.target_change = spy
    for rnd in (1, 2, 3):
        updates = [{k: wire.SparseTensor.from_dense(torch.randn(v.shape, generator=torch.Generator().manual_seed(
            10 * rnd + i)) * 0.05) for k, v in glob.items()} for i in range(3)]  # fmt: skip
        payload, kept = ef.server_step_with_memory(glob, updates, [1 / 3] * 3, rnd, generator_for(0, "s", rnd), memory)
        assert set(payload) == {k for k in glob if k.endswith("lora_B.weight" if rnd % 2 else "lora_A.weight")}
        new = dict(glob)
        for k, v in _dense(payload).items():
            new[k] = glob[k] + v
        for m in ("m0", "m1"):
            dw = captured[f"{m}.lora_B.weight"]
            wanted = dw[0] @ dw[1] + (_product(memory, m) if memory else 0)
            applied = new[f"{m}.lora_B.weight"] @ new[f"{m}.lora_A.weight"] - glob[f"{m}.lora_B.weight"] @ glob[
                f"{m}.lora_A.weight"]  # fmt: skip
            torch.testing.assert_close(applied + _product(kept, m), wanted, rtol=0, atol=2e-5)
        glob, memory = new, kept
    capped = get_algorithm("fedsrd_ef", FedSRDConfig(algorithm="fedsrd_ef", ef_download_space="product"))
    _, kept = capped.server_step_with_memory(glob, updates, [1 / 3] * 3, 4, generator_for(0, "s", 4), memory)
    assert kept["m0.lora_B.weight.residual_left"].shape == (12, 2 * r)


def test_product_space_first_round_broadcasts_fedsrds_unbiased_drop():
    """With no residual yet, the broadcast is FedSRD's: the same solve, the same seeded drop, survivors x 1/(1-p)."""
    glob = _state(5)
    updates = [{k: wire.SparseTensor.from_dense(torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) * 0.01)
                for k, v in glob.items()} for i in range(2)]  # fmt: skip
    ef = get_algorithm("fedsrd_ef", FedSRDConfig(algorithm="fedsrd_ef", ef_download_space="product"))
    paper = get_algorithm("fedsrd", FedSRDConfig(algorithm="fedsrd"))
    got, kept = ef.server_step_with_memory(glob, updates, [0.5, 0.5], 1, generator_for(0, "s", 1), {})
    ref = paper.server_step(glob, updates, [0.5, 0.5], 1, generator_for(0, "s", 1))
    assert got.keys() == ref.keys() and kept  # a residual is kept
    for k, v in _dense(got).items():
        torch.testing.assert_close(v, _dense(ref)[k])


def test_product_space_options_are_validated():
    with pytest.raises(ValueError, match="FedSRDConfig.ef_download_space"):
        FedSRDConfig(algorithm="fedsrd_ef", ef_download_space="products")
    with pytest.raises(ValueError, match="FedSRDConfig.ef_download_space.*'random'"):
        FedSRDConfig(algorithm="fedsrd_ef", ef_download_space="product", ef_download_selection="magnitude")
    with pytest.raises(ValueError, match="FedSRDConfig.ef_residual_rank"):
        FedSRDConfig(algorithm="fedsrd_ef", ef_residual_rank=-1)
    ef = get_algorithm("fedsrd_ef", FedSRDConfig(algorithm="fedsrd_ef", ef_download_space="product"))
    bad = {"m0.lora_B.weight.residual_left": torch.zeros(5, 2), "m0.lora_A.weight.residual_right": torch.zeros(2, 10)}
    glob = _state(6)
    upd = [{k: wire.SparseTensor.from_dense(torch.zeros_like(v)) for k, v in glob.items()}]
    with pytest.raises(ValueError, match="product-space residual .* does not fit a 12 x 10 module"):
        ef.server_step_with_memory(glob, upd, [1.0], 1, torch.Generator(), bad)


def test_tensors_read_from_bytes_are_aligned_so_resume_gives_the_same_bits(tmp_path):
    """MKL picks kernels by address alignment, so a state read from a checkpoint at an odd offset gave a resumed
    run other bits than the uninterrupted one (seen with decompose_ridge); every reader now returns aligned tensors
    (the bit-identical resume itself: test_resume_restores_the_residuals_bit_for_bit, with decompose_ridge)."""
    from fedsrd.checkpoint import load_checkpoint, save_checkpoint
    from fedsrd.ops.aligned import ALIGNMENT, aligned

    buf = torch.zeros(70)
    odd = buf[2:66].view(4, 16)  # 8 bytes past an aligned start
    assert odd.data_ptr() % ALIGNMENT and aligned(odd).data_ptr() % ALIGNMENT == 0
    assert torch.equal(aligned(odd), odd) and aligned(buf) is buf
    state = {f"t{i}": torch.randn(i + 1, 3) for i in range(5)}
    decoded = wire.decode(wire.encode(wire.Message(kind="update", algorithm="fedavg", round=1, tensors=state)))
    assert all(v.data_ptr() % ALIGNMENT == 0 for v in decoded.tensors.values())
    save_checkpoint(tmp_path, 1, state, {"runtime": "test"})
    _, loaded, _ = load_checkpoint(tmp_path)
    assert loaded.keys() == state.keys() and all(v.data_ptr() % ALIGNMENT == 0 for v in loaded.values())
    assert all(torch.equal(loaded[k], state[k]) for k in state)
