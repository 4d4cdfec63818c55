"""Issue 19's 2025 methods (rolora, fedsvd, fed_sb): each server step against a dense reference on toy states, every
message through the wire codec, the refusals, and a tiny end-to-end run of each."""

import json
import math

import pytest
import torch
from test_baselines import MODULES, RANK, REPO, TINY, _a, _b  # noqa: E402  (the same toy shapes and tiny preset)

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.client import FederatedClient
from fedsrd.server import FederatedServer

NEW = ["rolora", "fedsvd", "fed_sb", "fedrpca"]  # LoRA
FULL = ["ferret"]  # full-parameter


def _r(module):
    return f"{module}.lora_R.weight"


def _state(seed=0, b_zero=False, with_r=False):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (d_out, d_in) in MODULES.items():
        state[_a(module)] = torch.randn(RANK, d_in, generator=g)
        state[_b(module)] = torch.zeros(d_out, RANK) if b_zero else torch.randn(d_out, RANK, generator=g)
        if with_r:
            state[_r(module)] = torch.randn(RANK, RANK, generator=g)
    return state


def _local(state, seed, scale=0.3, only=None):
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g) if only is None or only in k else v.clone()
        for k, v in state.items()
    }


def _round(name, state, locals_, round=1, shared=False, **cfg_kwargs):
    """One round through the roles, every message encoded and decoded: (server, client view, uploads, result).
    `shared`: the server and the client view share one algorithm object, as in the simulation."""
    cfg = FedSRDConfig(algorithm=name, num_clients=max(len(locals_), 1), **cfg_kwargs)
    algo = get_algorithm(name, cfg)
    algo.shared_by_server_and_client = shared
    client = FederatedClient(algo, dict(state), cfg)
    server = FederatedServer(algo, dict(state), cfg)
    blobs = [client.make_update(loc, round=round, client_id=i, num_samples=10) for i, loc in enumerate(locals_)]
    result = server.step(round, blobs)
    client.receive(result.broadcast)  # raises if the client's state differs from the server's
    assert wire.state_digest(client.state) == wire.state_digest(server.state)
    return server, client, blobs, result


def _numel(blob):
    return sum(t.numel() for t in wire.decode(blob).tensors.values())


def _names(blob):
    return sorted(wire.decode(blob).tensors)


# ---- registry and config ---------------------------------------------------------------------------------------------
def test_every_new_algorithm_is_registered_with_its_table_row():
    from fedsrd import list_algorithms
    from fedsrd.algorithms import get_algorithm_class

    for name in NEW + FULL:
        assert name in list_algorithms()
        cls = get_algorithm_class(name)
        assert cls.name == name and cls.paper and cls.uploads and cls.downloads


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"fedsvd_every": 0}, "fedsvd_every"),
        ({"fed_sb_init_samples": 0}, "fed_sb_init_samples"),
        ({"ferret_num_seeds": 1}, "ferret_num_seeds"),
        ({"ferret_server_lr": 0.0}, "ferret_server_lr"),
        ({"fedrpca_beta": 0.0}, "fedrpca_beta"),
        ({"algorithm": "fedrpca", "robust_aggregation": "median"}, "robust_aggregation"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"FedSRDConfig.{field}"):
        FedSRDConfig(**kwargs)


# ---- RoLoRA ------------------------------------------------------------------------------------------------------
def test_rolora_alternates_factors_and_aggregates_exactly():
    algo = get_algorithm("rolora", FedSRDConfig(algorithm="rolora"))
    assert algo.trains("x.lora_B.default.weight", 1) and not algo.trains("x.lora_A.default.weight", 1)
    assert algo.trains("x.lora_A.default.weight", 2) and not algo.trains("x.lora_B.default.weight", 2)
    state = _state(b_zero=True)
    # round 1 (B): clients move B only; the average of B times the shared A is the average of the products
    locals_ = [_local(state, s, only="lora_B") for s in (1, 2, 3)]
    server, _, blobs, result = _round("rolora", state, locals_, round=1)
    assert all(all("lora_B" in k for k in _names(b)) for b in blobs)
    assert all("lora_B" in k for k in _names(result.broadcast))
    for module in MODULES:
        assert torch.equal(server.state[_a(module)], state[_a(module)])
        mean_product = sum(loc[_b(module)] @ loc[_a(module)] for loc in locals_) / 3
        torch.testing.assert_close(server.state[_b(module)] @ server.state[_a(module)], mean_product)
    # round 2 (A): the other factor
    after = server.state
    locals_ = [_local(after, s, only="lora_A") for s in (4, 5)]
    server2, _, blobs, result = _round("rolora", after, locals_, round=2)
    assert all(all("lora_A" in k for k in _names(b)) for b in blobs)
    for module in MODULES:
        assert torch.equal(server2.state[_b(module)], after[_b(module)])
        mean_product = sum(loc[_b(module)] @ loc[_a(module)] for loc in locals_) / 2
        torch.testing.assert_close(server2.state[_b(module)] @ server2.state[_a(module)], mean_product)
    assert _numel(result.broadcast) == sum(state[_a(m)].numel() for m in MODULES)  # one factor each way


def test_rolora_excludes_an_update_of_the_wrong_factor():
    state = _state()
    cfg = FedSRDConfig(algorithm="rolora", num_clients=2)
    algo = get_algorithm("rolora", cfg)
    client = FederatedClient(algo, dict(state), cfg)
    good = client.make_update(_local(state, 1), round=1, client_id=0, num_samples=1)
    bad_payload = {_a(m): state[_a(m)] + 1.0 for m in MODULES}  # A in a B-round
    bad = wire.encode(
        wire.Message(
            kind="update", algorithm="rolora", round=1, tensors=bad_payload, meta={"client_id": 1, "num_samples": 1}
        )
    )
    result = FederatedServer(algo, dict(state), cfg).step(1, [good, bad])
    assert result.accepted == [0]
    assert "aggregates lora_B only" in result.rejected["client 1"]


def test_rolora_local_phase_trains_only_the_rounds_factor(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer
    from fedsrd.trainer import FederatedTrainer

    data = Dataset.from_dict({"instruction": ["1+1", "2+2"], "input": ["", ""], "output": ["2", "4"]})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-2,
        per_device_train_batch_size=2,
    )
    cfg = FedSRDConfig(algorithm="rolora", num_clients=1, local_steps=2, lora_r=RANK, lora_target_modules=["q_proj"])
    trainer = FederatedTrainer(
        model=build_tiny_llama(),
        args=args,
        fed_config=cfg,
        client_datasets=[data],
        processing_class=build_tiny_tokenizer(),
    )
    for round, moves in ((1, "lora_B"), (2, "lora_A")):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        trainer.local_train(0, round)
        for n, p in trainer.model.named_parameters():
            if "lora_" in n:
                assert torch.equal(p, before[n]) != (moves in n), (round, n)


# ---- FedSVD --------------------------------------------------------------------------------------------------------
def test_fedsvd_uploads_b_and_broadcasts_the_svd_of_the_aggregate():
    state = _state(b_zero=True)
    locals_ = [_local(state, s, only="lora_B") for s in (1, 2, 3)]
    server, _, blobs, result = _round("fedsvd", state, locals_)
    assert all(all("lora_B" in k for k in _names(b)) for b in blobs)
    assert _names(result.broadcast) == sorted(state)  # A and B
    for module in MODULES:
        b_bar = sum(loc[_b(module)] for loc in locals_) / 3
        dense = b_bar @ state[_a(module)]  # the reference: SVD of the dense product
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        a_new, b_new = server.state[_a(module)], server.state[_b(module)]
        torch.testing.assert_close(b_new @ a_new, dense, atol=1e-5, rtol=1e-5)  # the model does not change
        torch.testing.assert_close(a_new @ a_new.T, torch.eye(RANK), atol=1e-5, rtol=0)  # orthonormal rows
        signs = torch.sign((a_new * vh[:RANK]).sum(dim=1, keepdim=True))  # singular vectors up to sign
        torch.testing.assert_close(a_new, signs * vh[:RANK], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b_new.norm(dim=0), s[:RANK], atol=1e-5, rtol=1e-5)


def test_fedsvd_refreshes_a_only_every_k_rounds_and_keeps_a_of_a_zero_b():
    state = _state(b_zero=True)
    locals_ = [_local(state, s, only="lora_B") for s in (1, 2)]
    server, _, _, result = _round("fedsvd", state, locals_, round=1, fedsvd_every=2)
    assert all("lora_B" in k for k in _names(result.broadcast))  # round 1 of every 2: B alone
    assert all(torch.equal(server.state[_a(m)], state[_a(m)]) for m in MODULES)
    server, _, _, result = _round("fedsvd", state, [dict(state)], round=2, fedsvd_every=2)  # nothing trained
    assert all(torch.equal(server.state[_a(m)], state[_a(m)]) for m in MODULES)  # B = 0: no SVD, A kept


# ---- Fed-SB --------------------------------------------------------------------------------------------------------
def test_lora_sb_initialisation_is_the_truncated_svd_of_the_first_step():
    from fedsrd.algorithms.fed_sb import first_step_update, lora_sb_factors

    g = torch.Generator().manual_seed(0)
    grad = torch.randn(7, 5, generator=g)
    update = first_step_update(grad, lr=0.01)
    assert torch.equal(update, -0.01 * torch.sign(grad))
    b, a, r = lora_sb_factors(update, rank=3, scaling=2.0)
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close((2.0 * b @ r @ a).double(), best, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.T @ b, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.eye(3), atol=1e-5, rtol=0)


def test_fed_sb_sends_only_r_and_averages_it_exactly():
    from fedsrd.algorithms.fed_sb import to_plain_lora

    state = _state(with_r=True)
    locals_ = [_local(state, s, only="lora_R") for s in (1, 2, 3)]
    server, _, blobs, result = _round("fed_sb", state, locals_)
    assert all(_names(b) == sorted(_r(m) for m in MODULES) for b in blobs)
    assert _names(result.broadcast) == sorted(_r(m) for m in MODULES)
    assert all(_numel(b) == len(MODULES) * RANK * RANK for b in blobs)  # r^2 per module
    plain = to_plain_lora(server.state)
    assert not any("lora_R" in k for k in plain)
    for module in MODULES:
        a, b = state[_a(module)], state[_b(module)]
        assert torch.equal(server.state[_a(module)], a) and torch.equal(server.state[_b(module)], b)
        mean_product = sum(b @ loc[_r(module)] @ a for loc in locals_) / 3  # sum_i p_i B R_i A
        torch.testing.assert_close(b @ server.state[_r(module)] @ a, mean_product)
        torch.testing.assert_close(plain[_b(module)] @ plain[_a(module)], mean_product)
    with pytest.raises(ValueError, match="only R may change"):
        server.algorithm.apply(server.state, {_a(next(iter(MODULES))): state[_a(next(iter(MODULES)))]})


def _fed_sb_trainer(tmp_path, model=None, samples=3):
    from datasets import Dataset
    from transformers import TrainingArguments

    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer
    from fedsrd.trainer import FederatedTrainer

    data = Dataset.from_dict({"instruction": ["1+1", "2+2", "3+3"], "input": ["", "", ""], "output": ["2", "4", "6"]})
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    cfg = FedSRDConfig(
        algorithm="fed_sb",
        num_clients=1,
        lora_r=RANK,
        lora_alpha=4,
        lora_dropout=0.0,
        lora_target_modules=["q_proj"],
        fed_sb_init_samples=samples,
    )
    return FederatedTrainer(
        model=model if model is not None else build_tiny_llama(),
        args=args,
        fed_config=cfg,
        client_datasets=[data],
        processing_class=build_tiny_tokenizer(),
    )


def test_fed_sb_adapter_computes_b_r_a_and_only_r_trains(tmp_path):
    from peft.tuners.lora import Linear as LoraLinear

    from fedsrd.algorithms.fed_sb import base_weight_gradients, first_step_update, lora_sb_factors

    trainer = _fed_sb_trainer(tmp_path)
    model = trainer.model
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained and all("lora_R" in n for n in trained)
    assert sum("lora_R" in k for k in trainer.global_state) == 2  # q_proj of both layers
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    with torch.no_grad():
        layer.lora_R["default"].weight.add_(0.5)  # any R: the layer computes W x + s B R A x
    x = torch.randn(3, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    r = layer.lora_R["default"].weight
    expected = layer.base_layer(x) + layer.scaling["default"] * x @ (b @ r @ a).T
    torch.testing.assert_close(layer(x), expected)
    # the initialisation is LoRA-SB's, from the summed gradient of client 0's first examples on the base model
    from peft import get_peft_model

    from fedsrd.models import build_tiny_llama

    plain = get_peft_model(build_tiny_llama(), trainer.fed_config.to_lora_config(target_modules=["q_proj"]))
    grads = base_weight_gradients(plain, trainer.client_datasets[0], 3)
    name, layer = next((n, m) for n, m in trainer.model.named_modules() if isinstance(m, LoraLinear))
    assert grads[name].abs().sum() > 0
    b, a, r = lora_sb_factors(first_step_update(grads[name], trainer.args.learning_rate), RANK, 2.0)
    with torch.no_grad():
        layer.lora_R["default"].weight.sub_(0.5)
    torch.testing.assert_close(
        layer.lora_B["default"].weight @ layer.lora_R["default"].weight @ layer.lora_A["default"].weight,
        b @ r @ a,
        atol=1e-6,
        rtol=1e-5,
    )


def test_fed_sb_refuses_a_peft_model(tmp_path):
    from peft import get_peft_model

    from fedsrd.models import build_tiny_llama

    peft_model = get_peft_model(build_tiny_llama(), FedSRDConfig(lora_r=RANK).to_lora_config(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="pass the base model"):
        _fed_sb_trainer(tmp_path, model=peft_model)


def test_fed_sb_refuses_untokenised_or_missing_init_data():
    from fedsrd.algorithms.fed_sb import base_weight_gradients

    with pytest.raises(ValueError, match="no PEFT LoRA Linear"):
        base_weight_gradients(torch.nn.Linear(2, 2), None, 1)


# ---- FedRPCA -------------------------------------------------------------------------------------------------------
def test_robust_pca_recovers_a_planted_low_rank_plus_sparse_matrix():
    from fedsrd.ops.rpca import robust_pca

    g = torch.Generator().manual_seed(0)  # Candes et al.'s regime: rank 2, 5% gross errors
    low = torch.randn(200, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 100, generator=g, dtype=torch.float64)
    sparse = torch.zeros(200, 100, dtype=torch.float64)
    where = torch.rand(200, 100, generator=g) < 0.05
    sparse[where] = 5.0 * torch.sign(torch.randn(int(where.sum()), generator=g, dtype=torch.float64))
    est_low, est_sparse = robust_pca(low + sparse)
    assert float((est_low - low).norm() / low.norm()) < 1e-5
    assert float((est_sparse - sparse).norm() / sparse.norm()) < 1e-5
    zero_l, zero_s = robust_pca(torch.zeros(4, 3))
    assert not zero_l.any() and not zero_s.any()


def test_robust_pca_of_a_tall_client_matrix_reaches_the_pcp_optimum():
    """At FedRPCA's shape (d x m, few clients) against a long run of the plain ADMM (Candes et al., fixed mu)."""
    from fedsrd.ops.rpca import _shrink, _svt, robust_pca

    g = torch.Generator().manual_seed(1)
    m = torch.randn(300, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 6, generator=g, dtype=torch.float64)
    m += 0.3 * torch.randn(300, 6, generator=g, dtype=torch.float64)
    lam = 1 / math.sqrt(300)

    def objective(low, sparse):
        return float(torch.linalg.matrix_norm(low, "nuc") + lam * sparse.abs().sum())

    mu, low, sparse, dual = m.numel() / (4 * float(m.abs().sum())), 0 * m, 0 * m, 0 * m
    for _ in range(3000):
        low = _svt(m - sparse + dual / mu, 1 / mu)
        sparse = _shrink(m - low + dual / mu, lam / mu)
        dual = dual + mu * (m - low - sparse)
    est_low, est_sparse = robust_pca(m)
    assert float((est_low + est_sparse - m).norm() / m.norm()) <= 1e-7  # the stopping rule
    assert objective(est_low, est_sparse) <= 1.005 * objective(low, sparse)


def test_fedrpca_scales_the_sparse_part_and_reduces_to_fedavg_at_beta_one():
    from fedsrd.ops.rpca import robust_pca

    state = _state()
    locals_ = [_local(state, s) for s in (1, 2, 3)]
    server, _, blobs, result = _round("fedrpca", state, locals_, fedrpca_beta=3.0)
    assert _names(result.broadcast) == sorted(state)
    for name in state:  # the dense reference: stack, decompose, average L, scale and average S
        m = torch.stack([(loc[name] - state[name]).reshape(-1).double() for loc in locals_], dim=1)
        low, sparse = robust_pca(m)
        expected = state[name].double() + (low.mean(dim=1) + 3.0 * sparse.mean(dim=1)).reshape(state[name].shape)
        torch.testing.assert_close(server.state[name], expected.float())
        assert float(sparse.abs().sum()) > 0  # the beta term did something
    fedrpca_one = _round("fedrpca", state, locals_, fedrpca_beta=1.0)[0]
    fedavg = _round("fedavg", state, locals_)[0]
    for name in state:
        torch.testing.assert_close(fedrpca_one.state[name], fedavg.state[name], atol=1e-5, rtol=1e-5)


# ---- Ferret --------------------------------------------------------------------------------------------------------
def test_ferret_bases_have_identity_second_moment_and_are_seeded():
    from fedsrd.algorithms.ferret import ferret_direction

    d = 64
    v = torch.stack([ferret_direction(seed, "w", d) for seed in range(2000)])
    assert torch.equal(ferret_direction(3, "w", d), v[3]) and not torch.equal(ferret_direction(3, "u", d), v[3])
    torch.testing.assert_close(v.T @ v / 2000, torch.eye(d) / d, atol=0.15 / d, rtol=0)  # E[v v^T] = I / d
    assert float(v.abs().max()) <= 1.8 / math.sqrt(d)  # bounded: the code's truncated normal, rescaled by sqrt(3)


def test_ferret_projection_and_reconstruction_against_a_dense_reference():
    from fedsrd.algorithms.ferret import ferret_direction, project, reconstruct_block, seeds_per_block

    g = torch.Generator().manual_seed(0)
    delta = 0.01 * torch.randn(4, 5, generator=g)
    pool = list(range(100, 130))
    indices = [1, 4, 7, 20]
    coords = project(delta, "w", pool, indices)
    v = torch.stack([ferret_direction(pool[k], "w", 20) for k in indices])  # n x d
    torch.testing.assert_close(coords[indices], 20 / 4 * v @ delta.reshape(-1))  # gamma = (d / n) <Delta, v>
    assert int((coords != 0).sum()) == 4
    torch.testing.assert_close(reconstruct_block(coords, "w", pool, (4, 5)), (coords[indices] @ v).reshape(4, 5))
    # with every seed of a large pool the reconstruction approaches Delta (unbiased)
    big = list(range(4000))
    estimate = reconstruct_block(project(delta, "w", big, list(range(4000))), "w", big, (4, 5))
    assert float((estimate - delta).norm() / delta.norm()) < 0.2
    assert seeds_per_block({"a": 2.0, "b": 1.0, "c": 0.0}, 10) == {"a": 10, "b": 5, "c": 2}


def test_ferret_round_through_the_wire_averages_coordinates():
    from fedsrd.algorithms.ferret import coord_name, reconstruct_block

    state = {"model.layers.0.mlp.up_proj.weight": torch.zeros(6, 4), "model.layers.0.mlp.down_proj.weight":
             torch.zeros(4, 6)}  # fmt: skip
    locals_ = [{k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(s)) for k, v in state.items()}
               for s in (1, 2)]  # fmt: skip
    server, _, blobs, result = _round("ferret", state, locals_, ferret_num_seeds=16, ferret_server_lr=2.0)
    uploads = [wire.decode(b).tensors for b in blobs]
    broadcast = wire.decode(result.broadcast).tensors
    pool = server.algorithm.pool()
    for name in state:
        key = coord_name(name)
        assert all(isinstance(u[key], wire.SparseTensor) for u in uploads)
        mean = sum(u[key].to_dense() for u in uploads) / 2
        torch.testing.assert_close(broadcast[key].to_dense(), mean)
        expected = 2.0 * reconstruct_block(mean, name, pool, tuple(state[name].shape))
        torch.testing.assert_close(server.state[name], expected)
    # the largest block uses every seed, the other at least two
    nnz = sorted(int((u[coord_name(n)].to_dense() != 0).sum()) for n in state for u in uploads[:1])
    assert nnz[-1] == 16 and nnz[0] >= 2


def test_ferret_truncated_normal_has_trunc_normals_distribution():
    """`truncated_normal` (rejection from the uniform) against torch's trunc_normal_ and scipy's truncnorm."""
    from scipy import stats

    from fedsrd.algorithms.ferret import truncated_normal, truncated_normal_variance

    n = 100_000
    for bound in (1.0, 2.5):  # bounds where the truncated normal is far from uniform, and many pairs are rejected
        ours = truncated_normal(n, bound, torch.Generator().manual_seed(1)).double().numpy()
        reference = torch.nn.init.trunc_normal_(torch.empty(n), 0, 1, -bound, bound,
                                                generator=torch.Generator().manual_seed(2)).double().numpy()
        assert ours.shape == (n,) and abs(ours).max() <= bound
        assert stats.kstest(ours, stats.truncnorm(-bound, bound).cdf).pvalue > 1e-3
        assert stats.ks_2samp(ours, reference).pvalue > 1e-3
        # the test has the power to tell: a plain uniform on the same bound fails it
        g = torch.Generator().manual_seed(3)
        uniform = torch.empty(n, dtype=torch.float64).uniform_(-bound, bound, generator=g)
        assert stats.kstest(uniform.numpy(), stats.truncnorm(-bound, bound).cdf).pvalue < 1e-6
    # a weight matrix's bound 1/sqrt(d): the moments of the truncated normal (nearly uniform there)
    d = 147_456
    bound = 1 / math.sqrt(d)
    ours = truncated_normal(d * 4, bound, torch.Generator().manual_seed(4)).double()
    var = truncated_normal_variance(float(torch.tensor(bound, dtype=torch.float32)))
    assert abs(float(ours.mean())) < 4 * math.sqrt(var / ours.numel())
    assert float(ours.var()) == pytest.approx(var, rel=0.01)
    assert float(ours.pow(4).mean()) / var**2 == pytest.approx(9 / 5, rel=0.02)  # (a uniform's kurtosis)
    assert float(ours.abs().max()) <= bound * (1 + 1e-6)


def test_ferret_truncated_normal_is_deterministic_and_fills_any_size():
    from fedsrd.algorithms.ferret import ferret_direction, truncated_normal

    for numel, bound in ((1, 1.0), (3, 4.0), (1000, 3.0), (5000, 1 / math.sqrt(5000))):
        a = truncated_normal(numel, bound, torch.Generator().manual_seed(7))
        b = truncated_normal(numel, bound, torch.Generator().manual_seed(7))
        assert a.shape == (numel,) and a.dtype == torch.float32 and torch.equal(a, b)
        assert not torch.equal(a, truncated_normal(numel, bound, torch.Generator().manual_seed(8))) or numel == 1
    # the same (seed, name) gives the same bits from a fresh generator, another name others
    assert torch.equal(ferret_direction(5, "w", 4096), ferret_direction(5, "w", 4096))
    assert not torch.equal(ferret_direction(5, "w", 4096), ferret_direction(5, "u", 4096))


def test_ferret_reconstructs_once_per_round_in_one_process(monkeypatch):
    """Server and client copy share the algorithm (as in the simulation): each block's bases are drawn once per round,
    and the reused step is the one a fresh reconstruction gives, bit for bit."""
    from fedsrd.algorithms import ferret

    calls = []
    original = ferret.reconstruct_block
    monkeypatch.setattr(ferret, "reconstruct_block", lambda *a: calls.append(a[1]) or original(*a))
    state = {"model.layers.0.mlp.up_proj.weight": torch.zeros(6, 4), "model.layers.0.mlp.down_proj.weight":
             torch.zeros(4, 6)}  # fmt: skip
    locals_ = [{k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(s)) for k, v in state.items()}
               for s in (1, 2)]  # fmt: skip
    server, client, _, result = _round("ferret", state, locals_, ferret_num_seeds=16, shared=True)
    assert sorted(calls) == sorted(state)  # one reconstruction per block: the server's; the client copy reused it
    assert server.algorithm._steps == {}  # nothing kept between rounds
    fresh = get_algorithm("ferret", server.config)  # a process of its own recomputes: the same bits
    recomputed = fresh.apply(state, wire.decode(result.broadcast).tensors)
    assert all(torch.equal(recomputed[k], client.state[k]) for k in state) and len(calls) == 2 * len(state)
    # a different broadcast for the same block is not taken for the kept one
    broadcast = dict(wire.decode(result.broadcast).tensors)
    key = ferret.coord_name("model.layers.0.mlp.up_proj.weight")
    fresh.shared_by_server_and_client = True
    fresh.apply(state, broadcast)
    broadcast[key] = broadcast[key].to_dense() * 2
    doubled = fresh.apply(state, broadcast)
    torch.testing.assert_close(doubled["model.layers.0.mlp.up_proj.weight"],
                               2 * recomputed["model.layers.0.mlp.up_proj.weight"])  # fmt: skip


def test_ferret_coordinates_are_the_same_bits_whatever_the_thread_count():
    """A client's coordinates may not depend on torch's thread count (the simulation runs with the machine's threads,
    each process of an Accelerate team with one): `stable_dot` sums in fixed rows; torch.dot splits by thread."""
    from fedsrd.algorithms.ferret import project, stable_dot

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(300_001, generator=gen), torch.randn(300_001, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append((stable_dot(x, y), project(x[:300_000].reshape(500, 600), "w", [11, 12, 13], [0, 2])))
    finally:
        torch.set_num_threads(threads)
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert results[0][0] == pytest.approx(float(torch.dot(x.double(), y.double())), rel=1e-6)


def test_ferret_keeps_no_reconstruction_where_each_broadcast_is_applied_once(monkeypatch):
    """A Flower ServerApp or SuperNode (server and client in processes of their own) applies each broadcast once: no
    float32 copy of the trained matrices may wait there through the next round; the server and the client each draw
    the bases, and agree bit for bit."""
    from fedsrd.algorithms import ferret

    calls = []
    original = ferret.reconstruct_block
    monkeypatch.setattr(ferret, "reconstruct_block", lambda *a: calls.append(a[1]) or original(*a))
    state = {"model.layers.0.mlp.up_proj.weight": torch.zeros(6, 4)}
    locals_ = [{k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in state.items()}]
    server, client, _, _ = _round("ferret", state, locals_, ferret_num_seeds=16)
    assert server.algorithm._steps == {} and len(calls) == 2  # the server's apply and the client's, nothing kept
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(server.state[name], client.state[name])


# ---- end to end ----------------------------------------------------------------------------------------------------
def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", NEW)
def test_tiny_run_and_saved_adapter_reloads(name, tmp_path):
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedsrd.algorithms.fed_sb import to_plain_lora
    from fedsrd.cli import run_train
    from fedsrd.models import build_tiny_llama

    argv = ["--config", str(TINY), "--output_dir", str(tmp_path), "--algorithm", name, "--disable_tqdm", "true",
            "--local_steps", "2", "--train_size", "16", "--eval_size", "4", "--max_length", "48", "--eval_every", "0",
            "--fed_sb_init_samples", "4"]  # fmt: skip
    trainer = run_train(argv)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    assert all(r["upload_bytes"] > 0 and r["download_bytes"] > 0 for r in history[1:])
    assert math.isfinite(history[-1]["eval_loss"])
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    if name == "fed_sb":  # R folded into A: a plain PEFT adapter
        saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
        assert any("lora_R" in k for k in saved)
        peft_config = trainer.model.peft_config["default"]
        reloaded = get_peft_model(build_tiny_llama(seed=0), peft_config)
        set_peft_model_state_dict(reloaded, to_plain_lora(saved))
    else:
        reloaded = PeftModel.from_pretrained(build_tiny_llama(seed=0), str(tmp_path / "final"))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(trainer.model, ids), atol=1e-4, rtol=1e-4)
    if name == "rolora":  # round 1 moved B only, round 2 A only: A after round 1 is still the initial A
        assert history[1]["upload_bytes"] > 0


@pytest.mark.parametrize("name", FULL)
def test_tiny_full_parameter_run_saves_a_loadable_model(name, tmp_path):
    from transformers import AutoModelForCausalLM

    from fedsrd.cli import run_train

    argv = ["--config", str(REPO / "examples" / "configs" / "krso_tiny.yaml"), "--output_dir", str(tmp_path),
            "--algorithm", name, "--disable_tqdm", "true", "--local_steps", "2", "--train_size", "16", "--eval_size",
            "4", "--max_length", "48", "--eval_every", "0", "--ferret_num_seeds", "20",
            "--learning_rate", "0.05"]  # fmt: skip
    trainer = run_train(argv)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    assert all(0 < r["upload_bytes"] < 20_000 for r in history[1:])  # coordinates, not weights (~300 KB dense)
    assert math.isfinite(history[-1]["eval_loss"]) and history[-1]["eval_loss"] < history[0]["eval_loss"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    torch.testing.assert_close(_logits(reloaded, ids), _logits(trainer.model, ids), atol=1e-4, rtol=1e-4)


def test_full_parameter_table_measures_ferret():
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("full_parameter", REPO / "benchmarks" / "full_parameter.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r["algorithm"]: r for r in bench.main(["--preset", "tiny", "--clients", "2", "--algorithms", "fedfft",
                                                   "ferret"])["rows"]}  # fmt: skip
    assert rows["ferret"]["upload_mb"] < 0.1 * rows["fedfft"]["upload_mb"]
    assert rows["ferret"]["download_mb"] < 0.1 * rows["fedfft"]["download_mb"]


def test_comm_table_measures_the_new_algorithms(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("comm_table", REPO / "benchmarks" / "comm_table.py")
    comm_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comm_table)
    comm_table.main(["--preset", "tiny", "--rounds", "2", "--json", "--algorithms", "fedavg", *NEW])
    rows = {r["algorithm"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    fedavg = rows["fedavg"]
    assert rows["rolora"]["upload_mb"] < 0.6 * fedavg["upload_mb"]  # one factor a round, each way
    assert rows["rolora"]["download_mb"] < 0.6 * fedavg["download_mb"]
    assert rows["fedsvd"]["upload_mb"] < 0.6 * fedavg["upload_mb"]  # B up
    assert rows["fedsvd"]["download_mb"] == pytest.approx(fedavg["download_mb"], rel=0.02)  # A and B down
    assert rows["fed_sb"]["upload_mb"] < 0.2 * fedavg["upload_mb"]  # r x r per module
    assert rows["fedrpca"]["upload_mb"] == pytest.approx(fedavg["upload_mb"], rel=0.02)  # FedAvg's messages
    assert rows["fedrpca"]["download_mb"] == pytest.approx(fedavg["download_mb"], rel=0.02)
