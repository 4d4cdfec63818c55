"""Clients of different LoRA ranks (`FedSRDConfig.client_lora_ranks`): configuration and refusals, each supporting
algorithm's server math against a dense reference on small tensors, truncation on the way down, the server's rank
check, and tiny end-to-end runs through the simulation, Accelerate and Flower."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.algorithms import get_algorithm_class, list_algorithms
from fedsrd.algorithms.fedsrd import lora_modules
from fedsrd.algorithms.hetlora import HetLoRA, product_norm
from fedsrd.algorithms.ranks import pad_tensor, truncate_payload, truncate_state
from fedsrd.client import FederatedClient
from fedsrd.ops import SparseTensor
from fedsrd.server import FederatedServer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny.yaml"
MODULES = {"base_model.model.layers.0.q_proj": (12, 10), "base_model.model.layers.0.down_proj": (8, 14)}  # out, in
R = 4  # the global adapter's rank (lora_r)
RANKS = [2, 3, 4]  # one per client
SUPPORTED = ["fedsrd", "fedsrd_e", "flexlora", "flora", "hetlora"]


def _a(module):
    return f"{module}.lora_A.weight"


def _b(module):
    return f"{module}.lora_B.weight"


def _state(seed=0, rank=R, b_zero=False):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (d_out, d_in) in MODULES.items():
        state[_a(module)] = torch.randn(rank, d_in, generator=g)
        state[_b(module)] = torch.zeros(d_out, rank) if b_zero else torch.randn(d_out, rank, generator=g)
    return state


def _local(start, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in start.items()}


def _config(name, ranks=RANKS, **kwargs):
    kwargs = {"adaptive_clip": "off", "download_drop": 0.0, **kwargs}  # nothing rescales or drops the exact math
    return FedSRDConfig(algorithm=name, num_clients=len(ranks), lora_r=R, client_lora_ranks=list(ranks), **kwargs)


def _round(name, state, round=1, ranks=RANKS, **kwargs):
    """One round through the roles with clients of `ranks`: every upload and the broadcast go through the codec.
    Returns (config, server, client view, the clients' local states, the decoded uploads, the round result)."""
    cfg = _config(name, ranks, **kwargs)
    algo = get_algorithm(name, cfg)
    client = FederatedClient(algo, dict(state), cfg)
    server = FederatedServer(algo, dict(state), cfg)
    locals_ = [_local(client.start_state(i), seed=10 + i) for i in range(len(ranks))]
    blobs = [client.make_update(loc, round=round, client_id=i, num_samples=10) for i, loc in enumerate(locals_)]
    result = server.step(round, blobs)
    assert result.accepted == list(range(len(ranks))), result.rejected
    client.receive(result.broadcast)  # raises if the client's state differs from the server's
    assert wire.state_digest(client.state) == wire.state_digest(server.state)
    uploads = [wire.decode(blob).tensors for blob in blobs]
    return cfg, server, client, locals_, uploads, result


def _dense(x):
    return (x.to_dense() if isinstance(x, SparseTensor) else x).double()


def _best_rank(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :rank] * s[:rank] @ vh[:rank]


def _rel_err(x, ref):
    return float(torch.linalg.norm(x.double() - ref.double()) / torch.linalg.norm(ref.double()))


# ---- configuration ---------------------------------------------------------------------------------------------------
def test_ranks_as_a_list_as_strings_or_as_a_cycle_rule():
    assert _config("fedsrd").client_lora_ranks == RANKS
    cfg = FedSRDConfig(algorithm="hetlora", num_clients=3, lora_r=8, client_lora_ranks=["2", "4", "8"])
    assert cfg.client_lora_ranks == [2, 4, 8] and [cfg.client_rank(i) for i in range(3)] == [2, 4, 8]
    cfg = FedSRDConfig(algorithm="flexlora", num_clients=5, lora_r=32, client_lora_ranks="cycle:4,8,16,32")
    assert cfg.client_lora_ranks == [4, 8, 16, 32, 4] and cfg.has_unequal_ranks
    assert cfg.client_lora_alpha(8) == cfg.lora_alpha * 8 / 32  # the same scaling alpha / r at every rank
    assert FedSRDConfig(num_clients=2).client_rank(1) == 8  # unset: every client trains lora_r


@pytest.mark.parametrize(
    "ranks, message",
    [
        ([2, 4], "got 2 rank\\(s\\) for num_clients=3"),
        ([2, 0, 4], "positive int"),
        ([2, 4, 1.5], "positive int"),
        ([2, 4, 16], "client 2 has rank 16, above lora_r=8"),
        ("random:2,4", "unknown rule 'random'"),
        ("cycle:2,x", "positive int"),
    ],
)
def test_bad_ranks_name_the_option_and_what_was_expected(ranks, message):
    with pytest.raises(ValueError, match="FedSRDConfig.client_lora_ranks") as err:
        FedSRDConfig(algorithm="hetlora", num_clients=3, lora_r=8, client_lora_ranks=ranks)
    assert err.match(message)


def test_algorithms_that_need_equal_ranks_refuse_unequal_ones_naming_those_that_can():
    assert sorted(a for a in list_algorithms() if get_algorithm_class(a).supports_unequal_ranks) == SUPPORTED
    for name in ["fedavg", "fedsrd_ef", "ffa_lora", "fedsa_lora", "fedex_lora", "topk"]:
        with pytest.raises(ValueError, match="client_lora_ranks: algorithm") as err:
            FedSRDConfig(algorithm=name, num_clients=3, lora_r=8, client_lora_ranks=[2, 4, 8])
        assert err.match(", ".join(SUPPORTED))
    FedSRDConfig(algorithm="fedavg", num_clients=3, lora_r=8, client_lora_ranks=[8, 8, 8])  # equal ranks: fine


def test_truncation_and_zero_padding():
    state = _state()
    cut = truncate_state(state, 2)
    for module in MODULES:
        assert torch.equal(cut[_a(module)], state[_a(module)][:2])
        assert torch.equal(cut[_b(module)], state[_b(module)][:, :2])
        padded_b, padded_a = pad_tensor(_b(module), cut[_b(module)], R), pad_tensor(_a(module), cut[_a(module)], R)
        torch.testing.assert_close(padded_b @ padded_a, cut[_b(module)] @ cut[_a(module)])  # pad(B) pad(A) = B A
    assert truncate_state(state, R) is state  # the global rank: nothing copied
    sparse = {_a(m): SparseTensor.from_dense(state[_a(m)]) for m in MODULES}
    part = truncate_payload(sparse, 3)
    assert all(part[k].shape == (3, state[k].shape[1]) for k in part)


# ---- FedSRD / FedSRD-e: the sum of the clients' product changes ----------------------------------------------------
def _fedsrd_reference(state, uploads, module, use_svd, b_round, starts=None):
    """Dense, float64: W = B A + sum_i p_i (B_i A_i - B_i^0 A_i^0) with B_i^0, A_i^0 the first r_i components (or
    client i's start state in `starts`); the rank-R SVD of W (FedSRD) or W (FedSRD-e); the least-squares factor delta
    of Eq. 12 or 13."""
    a, b = state[_a(module)].double(), state[_b(module)].double()
    w = b @ a
    for i, upload in enumerate(uploads):
        delta_a, delta_b = _dense(upload[_a(module)]), _dense(upload[_b(module)])
        r = delta_a.shape[0]
        b0, a0 = (b[:, :r], a[:r]) if starts is None else (starts[i][_b(module)], starts[i][_a(module)])
        b0, a0 = b0.double(), a0.double()
        w = w + ((b0 + delta_b) @ (a0 + delta_a) - b0 @ a0) / len(uploads)
    target = _best_rank(w, a.shape[0]) if use_svd else w
    delta_w = target - b @ a
    return delta_w @ torch.linalg.pinv(a) if b_round else torch.linalg.pinv(b) @ delta_w


@pytest.mark.parametrize("name", ["fedsrd", "fedsrd_e"])
@pytest.mark.parametrize("round", [1, 2])  # B-round, A-round
def test_fedsrd_aggregates_unequal_ranks_against_the_dense_reference(name, round):
    state = _state()
    _, server, _, _, uploads, result = _round(name, state, round=round)
    broadcast = wire.decode(result.broadcast).tensors
    for upload, rank in zip(uploads, RANKS, strict=True):  # each client uploaded at its own rank
        assert all(upload[_a(m)].shape[0] == rank and upload[_b(m)].shape[1] == rank for m in MODULES)
    for module in MODULES:
        key = _b(module) if round == 1 else _a(module)
        ref = _fedsrd_reference(state, uploads, module, use_svd=name == "fedsrd", b_round=round == 1)
        assert _rel_err(_dense(broadcast[key]), ref) < 1e-4
        torch.testing.assert_close(server.state[key].double(), state[key].double() + ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["fedsrd", "fedsrd_e"])
@pytest.mark.parametrize("round", [1, 2])
def test_fedsrd_svd_start_trains_from_the_best_rank_r_product_and_aggregates_its_changes(name, round):
    """rank_start='svd': a rank-r client starts from the best rank-r approximation of each module's B A (not the
    first r components), the server sums each client's product change from that start, and the client needs (and
    its download counts) the whole broadcast."""
    state = _state()
    cfg, server, client, _, uploads, result = _round(name, state, round=round, rank_start="svd")
    starts = [FederatedClient(get_algorithm(name, cfg), dict(state), cfg).start_state(i) for i in range(len(RANKS))]
    for i, rank in enumerate(RANKS):
        for module in MODULES:
            product = starts[i][_b(module)].double() @ starts[i][_a(module)].double()
            best = _best_rank(state[_b(module)] @ state[_a(module)], rank)
            assert _rel_err(product, best) < 1e-5  # the rank-R client: the global product itself
            if rank < R:
                sliced = state[_b(module)][:, :rank].double() @ state[_a(module)][:rank].double()
                assert _rel_err(sliced, best) > 1e-2  # random factors are not ordered: the slice is not the best
    broadcast = wire.decode(result.broadcast).tensors
    for module in MODULES:
        key = _b(module) if round == 1 else _a(module)
        ref = _fedsrd_reference(state, uploads, module, use_svd=name == "fedsrd", b_round=round == 1, starts=starts)
        assert _rel_err(_dense(broadcast[key]), ref) < 1e-4
    assert set(result.download_bytes_by_rank.values()) == {len(result.broadcast)}


def test_fedsrd_svd_start_is_the_slice_while_the_product_is_zero_and_is_refused_where_it_means_nothing():
    state = _state(b_zero=True)  # round 1 of a PEFT adapter: B = 0
    cfg = _config("fedsrd", rank_start="svd")
    client = FederatedClient(get_algorithm("fedsrd", cfg), dict(state), cfg)
    assert wire.state_digest(client.start_state(0)) == wire.state_digest(truncate_state(state, RANKS[0]))
    with pytest.raises(ValueError, match="rank_start.*every client trains lora_r"):
        _config("fedsrd", ranks=[R, R, R], rank_start="svd")
    with pytest.raises(ValueError, match="rank_start.*fedsrd and fedsrd_e only"):
        _config("flexlora", rank_start="svd")
    with pytest.raises(ValueError, match="rank_start: must be one of"):
        _config("fedsrd", rank_start="best")


def test_fedsrd_change_form_is_eq_9_when_ranks_are_equal():
    algo = get_algorithm("fedsrd", FedSRDConfig(algorithm="fedsrd", num_clients=3, lora_r=R))
    state = _state()
    (module,) = [m for m in lora_modules(state) if m.name.endswith("q_proj")]
    a, b = state[module.a_key], state[module.b_key]
    g = torch.Generator().manual_seed(3)
    deltas_b = [0.2 * torch.randn(b.shape, generator=g) for _ in range(3)]
    deltas_a = [0.2 * torch.randn(a.shape, generator=g) for _ in range(3)]
    updates = [{module.b_key: db, module.a_key: da} for db, da in zip(deltas_b, deltas_a, strict=True)]
    weights = [0.5, 0.3, 0.2]
    eq9 = algo.target_change(module, a, b, updates, weights)
    change_form = algo._unequal_rank_change(a, b, deltas_b, deltas_a, weights)
    assert _rel_err(change_form[0] @ change_form[1], eq9[0] @ eq9[1]) < 1e-5


def test_fedsrd_client_downloads_its_own_ranks_slice_of_the_delta():
    state = _state()
    _, _, _, _, _, result = _round("fedsrd", state, round=1)
    by_rank = result.download_bytes_by_rank
    assert by_rank["2"] < by_rank["3"] < by_rank["4"] <= len(result.broadcast)
    assert result.trainable_bytes_by_rank == {
        str(r): 4 * r * sum(d_out + d_in for d_out, d_in in MODULES.values()) for r in RANKS
    }


# ---- FlexLoRA: SVD of the summed products, truncation to each client's rank ----------------------------------------
def test_flexlora_unequal_ranks_are_the_svd_of_the_summed_products_cut_to_each_rank():
    state = _state()
    _, server, client, locals_, _, _ = _round("flexlora", state)
    for module in MODULES:
        summed = sum(loc[_b(module)].double() @ loc[_a(module)].double() for loc in locals_) / len(locals_)
        best = _best_rank(summed, R)
        glob = server.state[_b(module)].double() @ server.state[_a(module)].double()
        assert _rel_err(glob, best) < 1e-5
        for cid, rank in enumerate(RANKS):  # on the way down: the best rank-r_i approximation
            start = client.start_state(cid)
            assert start[_a(module)].shape == (rank, MODULES[module][1])
            assert _rel_err(start[_b(module)].double() @ start[_a(module)].double(), _best_rank(summed, rank)) < 1e-5


# ---- FLoRA: stacking slots of different ranks --------------------------------------------------------------------
def test_flora_stacks_slots_of_each_clients_rank_exactly():
    state = _state()
    _, server, client, locals_, _, result = _round("flora", state)
    names = wire.decode(result.broadcast).tensors
    assert any(".base_merge_0_r2." in k for k in names) and any(".base_merge_2_r4." in k for k in names)
    for module in MODULES:
        merged = sum(left.double() @ right.double() for left, right in client.base_delta[module])
        summed = sum(loc[_b(module)].double() @ loc[_a(module)].double() for loc in locals_) / len(locals_)
        assert _rel_err(merged, summed) < 1e-6
        for cid, rank in enumerate(RANKS):  # restart: B = 0 and the first r_i rows of the fresh A
            start = client.start_state(cid)
            assert torch.equal(start[_b(module)], torch.zeros(MODULES[module][0], rank))
            assert torch.equal(start[_a(module)], server.state[_a(module)][:rank])
    assert set(result.download_bytes_by_rank.values()) == {len(result.broadcast)}  # everyone merges every slot


# ---- HetLoRA: zero-padding, sparsity-weighted aggregation, truncation --------------------------------------------
def test_hetlora_aggregation_is_the_papers_formula():
    state = _state()
    _, server, client, locals_, _, result = _round("hetlora", state)
    for module in MODULES:
        norms = [float(torch.linalg.norm(loc[_b(module)].double() @ loc[_a(module)].double())) for loc in locals_]
        p = [n / sum(norms) for n in norms]  # p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F (uniform client weights)
        pairs = list(zip(p, locals_, strict=True))
        ref_b = sum(pk * pad_tensor(_b(module), loc[_b(module)], R).double() for pk, loc in pairs)  # sum p_k pad(B_k)
        ref_a = sum(pk * pad_tensor(_a(module), loc[_a(module)], R).double() for pk, loc in pairs)  # sum p_k pad(A_k)
        torch.testing.assert_close(server.state[_b(module)].double(), ref_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(server.state[_a(module)].double(), ref_a, rtol=1e-5, atol=1e-6)
        for cid, rank in enumerate(RANKS):  # truncation on the way down
            assert torch.equal(client.start_state(cid)[_a(module)], server.state[_a(module)][:rank])
            assert torch.equal(client.start_state(cid)[_b(module)], server.state[_b(module)][:, :rank])
    assert result.download_bytes_by_rank["2"] < result.download_bytes_by_rank["4"]
    b, a = state[_b(next(iter(MODULES)))], state[_a(next(iter(MODULES)))]
    assert product_norm(b, a) == pytest.approx(float(torch.linalg.norm(b @ a)), rel=1e-6)  # from the Gram matrices


def test_hetlora_self_pruning_zeroes_the_tail_once_its_norm_shrinks():
    cfg = _config("hetlora", hetlora_prune_lambda=0.1, hetlora_prune_gamma=0.5)
    algo = get_algorithm("hetlora", cfg)
    start = truncate_state(_state(), 4)
    local = _local(start, seed=1)
    rng = torch.Generator().manual_seed(0)
    upload, memory = algo.client_update_with_memory(start, local, {}, 1, rng)  # no previous round: nothing pruned
    module = next(iter(MODULES))
    assert bool(upload[_a(module)][2:].abs().sum() > 0) and float(memory[module + ".hetlora_rank"]) == 4
    bigger = {**memory, module + ".hetlora_tail": memory[module + ".hetlora_tail"] + 1.0}
    upload, memory = algo.client_update_with_memory(start, local, bigger, 2, rng)  # the tail shrank: prune to 2
    assert torch.equal(upload[_a(module)][2:], torch.zeros(2, MODULES[module][1]))
    assert torch.equal(upload[_b(module)][:, 2:], torch.zeros(MODULES[module][0], 2))
    assert float(memory[module + ".hetlora_rank"]) == 2
    assert upload[_a(module)].shape[0] == 4  # the configured rank still travels


def test_hetlora_regulariser_is_lambda_times_the_tail_norm_products():
    from peft import LoraConfig, get_peft_model

    from fedsrd.models import build_tiny_llama

    cfg = FedSRDConfig(algorithm="hetlora", hetlora_prune_lambda=0.5, hetlora_prune_gamma=0.5, lora_r=4)
    model = get_peft_model(build_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    expected = 0.0
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            expected += float((torch.linalg.norm(b[:, 2:]) * torch.linalg.norm(a[2:])).detach())
    term = HetLoRA(cfg).extra_loss(model, {})
    assert expected > 0 and float(term) == pytest.approx(0.5 * expected, rel=1e-5)
    assert term.requires_grad


# ---- the rank travels and is checked ------------------------------------------------------------------------------
def test_an_update_of_another_rank_than_its_clients_is_rejected_and_the_others_aggregated():
    state = _state()
    cfg = _config("hetlora", ranks=[2, 4])
    algo = get_algorithm("hetlora", cfg)
    server = FederatedServer(algo, dict(state), cfg)
    honest = FederatedClient(algo, dict(state), cfg)
    liar_cfg = _config("hetlora", ranks=[4, 4])  # client 0 trains rank 4 although it is configured for rank 2
    liar = FederatedClient(get_algorithm("hetlora", liar_cfg), dict(state), liar_cfg)
    blobs = [
        liar.make_update(_local(liar.start_state(0), 1), round=1, client_id=0, num_samples=5),
        honest.make_update(_local(honest.start_state(1), 2), round=1, client_id=1, num_samples=5),
    ]
    result = server.step(1, blobs)
    assert result.accepted == [1]
    assert "configured for rank 2" in result.rejected["#0"] and "has LoRA rank 4" in result.rejected["#0"]
    stranger = honest.make_update(_local(honest.start_state(1), 3), round=2, client_id=1, num_samples=5)
    rewritten = _with_client_id(stranger, 9)  # no client 9 among num_clients=2: no configured rank
    result = server.step(2, [rewritten, stranger], senders=None)
    assert "client_lora_ranks" in result.rejected["#0"] and result.accepted == [1]
    # Flower: the transport knows the sender, whose configured rank is checked whatever the update claims
    rank_4 = honest.make_update(_local(honest.start_state(1), 4), round=3, client_id=1, num_samples=5)
    result = server.step(3, [rank_4, rank_4], senders=[0, 1])
    assert "configured for rank 2" in result.rejected["0"] and result.accepted == [1]


def _with_client_id(blob: bytes, client_id: int) -> bytes:
    msg = wire.decode(blob)
    msg.meta["client_id"] = client_id
    return wire.encode(msg)


# ---- end to end: the simulation, Accelerate, Flower ---------------------------------------------------------------
TINY_ARGS = [
    "--num_clients", "3", "--partition", "iid", "--lora_r", "8", "--local_steps", "2", "--train_size", "24",
    "--eval_size", "4", "--max_length", "48", "--eval_every", "0", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.mark.parametrize(
    "name, ranks, extra",
    [
        ("hetlora", ["2", "4", "8"], ["--hetlora_prune_lambda", "0.01", "--hetlora_prune_gamma", "0.5"]),
        ("fedsrd", ["cycle:2,4,8"], []),
        ("fedsrd", ["2", "4", "8"], ["--rank_start", "svd", "--decompose_ridge", "0.1"]),
    ],
)
def test_tiny_run_with_ranks_2_4_8(name, ranks, extra, tmp_path):
    from peft import PeftModel

    from fedsrd.cli import run_train
    from fedsrd.models import build_tiny_llama

    argv = ["--config", str(TINY), "--output_dir", str(tmp_path), "--algorithm", name, *TINY_ARGS,
            "--client_lora_ranks", *ranks, *extra]  # fmt: skip
    trainer = run_train(argv)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2] and math.isfinite(history[-1]["eval_loss"])
    for record in history[1:]:
        assert record["accepted"] == [0, 1, 2] and not record["rejected"] and not record["dropped"]
        per_client = record["per_client"]
        assert [per_client[str(c)]["rank"] for c in range(3)] == [2, 4, 8]
        trained = [per_client[str(c)]["trainable_param_bytes"] for c in range(3)]
        assert trained[1] == 2 * trained[0] and trained[2] == 4 * trained[0]  # LoRA parameters grow with the rank
        uploads = [per_client[str(c)]["upload_bytes"] for c in range(3)]
        assert sum(uploads) == record["upload_bytes"]
        assert per_client["0"]["download_bytes"] <= per_client["2"]["download_bytes"] <= record["broadcast_bytes"]
    if name == "hetlora":  # self-pruning: every client keeps its modules' ranks and tail norms between uploads
        from fedsrd.checkpoint import load_checkpoint

        _, tensors, _ = load_checkpoint(tmp_path)
        kept = {key.split("/")[1] for key in tensors if key.startswith("memory/") and key.endswith(".hetlora_rank")}
        assert kept == {"0", "1", "2"}
    saved = tmp_path / "final"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8  # the global adapter, alone
    assert not any(p.is_dir() for p in saved.iterdir() if p.name.startswith("fedsrd_rank_"))
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    reloaded = PeftModel.from_pretrained(build_tiny_llama(seed=0), str(saved))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model(ids).logits, atol=1e-4, rtol=1e-4)


def test_two_accelerate_processes_give_the_single_process_run_with_unequal_ranks(tmp_path):
    spec = importlib.util.spec_from_file_location("accel_helpers", REPO / "tests" / "test_accelerate.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    extra = ["--algorithm", "hetlora", *TINY_ARGS, "--client_lora_ranks", "2", "4", "8"]
    one, two = tmp_path / "one", tmp_path / "two"
    helpers.run_in_this_process(one, *extra)
    proc = helpers.launch(helpers.tiny_args(two, *extra))
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert helpers.weight_digests(two) == helpers.weight_digests(one)
    assert helpers.history_without_timings(two) == helpers.history_without_timings(one)


@pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="flwr is not installed")
def test_flower_loopback_with_unequal_ranks_is_the_simulation(tmp_path, tmp_path_factory):
    from fedsrd.integrations.inprocess import serverapp_task_identity

    spec = importlib.util.spec_from_file_location("flower_helpers", REPO / "tests" / "test_flower.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    overrides = {"algorithm": "hetlora", "num-rounds": 2, "clients-per-round": 2, "lora-r": 4,
                 "client-lora-ranks": "2 4"}  # fmt: skip
    with serverapp_task_identity():
        history, _ = helpers._run_in_process(tmp_path, **overrides)
    assert helpers._final_digest(tmp_path / "server") == helpers._simulated_digest(tmp_path_factory, **overrides)
    assert {c: v["rank"] for c, v in history[-1]["per_client"].items()} == {"0": 2, "1": 4}
    for i, rank in enumerate([2, 4]):  # each data owner's own adapter: a PEFT folder of its own rank
        (folder,) = (tmp_path / f"node{i}").glob("*/client_*/adapter")
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == rank


def test_comm_table_measures_unequal_ranks_for_the_algorithms_that_support_them(capsys):
    spec = importlib.util.spec_from_file_location("comm_table", REPO / "benchmarks" / "comm_table.py")
    comm_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comm_table)
    comm_table.main(["--preset", "tiny", "--rounds", "1", "--algorithms", "fedavg", "hetlora", "fedsrd", "--json"])
    equal = {r["algorithm"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    comm_table.main(["--preset", "tiny", "--rounds", "1", "--client-ranks", "1", "2", "3", "4", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["algorithm"]: r for r in result["rows"]}
    assert sorted(rows) == SUPPORTED and result["config"]["client_ranks"] == [1, 2, 3, 4]
    for name in ("hetlora", "fedsrd"):  # mean rank 2.5 of 4: less up and down than every client at rank 4
        assert rows[name]["upload_mb"] < equal[name]["upload_mb"]
        assert rows[name]["download_mb"] < equal[name]["download_mb"]
    assert equal["hetlora"]["upload_mb"] == equal["fedavg"]["upload_mb"]  # equal ranks: FedAvg's message


def test_trainer_builds_one_adapter_per_rank_and_refuses_a_global_adapter_of_another_rank(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer
    from fedsrd.trainer import FederatedTrainer, client_adapter_name

    data = Dataset.from_dict({"instruction": ["1+1", "2+2"], "input": ["", ""], "output": ["2", "4"]})
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    cfg = FedSRDConfig(algorithm="hetlora", num_clients=2, lora_r=8, lora_alpha=16, client_lora_ranks=[2, 8])
    kwargs = {
        "args": args,
        "fed_config": cfg,
        "client_datasets": [data, data],
        "processing_class": build_tiny_tokenizer(),
    }
    trainer = FederatedTrainer(model=build_tiny_llama(), **kwargs)
    config = trainer.model.peft_config[client_adapter_name(2)]
    assert (config.r, config.lora_alpha) == (2, 4.0)  # the global adapter's scaling, 16 / 8
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(".default." in n for n in trained)  # the global adapter only, outside a client's phase
    trainer.use_client_rank(2)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(f".{client_adapter_name(2)}." in n for n in trained)
    trainer.use_client_rank(None)
    other = get_peft_model(build_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="the model's adapter has rank 4, but lora_r=8"):
        FederatedTrainer(model=other, **kwargs)


def test_fedsrd_with_unequal_ranks_and_no_ridge_warns_with_the_measured_divergence(caplog):
    with caplog.at_level(logging.WARNING, logger="fedsrd.config"):
        FedSRDConfig(algorithm="fedsrd", num_clients=3, lora_r=8, client_lora_ranks=[2, 4, 8])
    assert "decompose_ridge 0.1 trained stably" in caplog.text and "[2, 4, 8]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedsrd.config"):
        FedSRDConfig(algorithm="fedsrd", num_clients=3, lora_r=8, client_lora_ranks=[2, 4, 8], decompose_ridge=0.1)
        FedSRDConfig(algorithm="fedsrd", num_clients=3, lora_r=8)  # equal ranks: the paper's setting, no warning
    assert "decompose_ridge" not in caplog.text
