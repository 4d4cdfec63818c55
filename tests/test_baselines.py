"""The baselines (fedprox, ffa_lora, flexlora, fed_dare, topk, flora, fedsa_lora, fedex_lora): server math against dense
references on toy states, bytes from the codec, the contract extensions, and a tiny end-to-end run of each."""

import json
import math
from pathlib import Path

import pytest
import torch

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.base_weights import BASE_DELTA_FILE, BaseWeightWriter, add_base_delta, check_base_writable
from fedsrd.client import FederatedClient
from fedsrd.ops import SparseTensor
from fedsrd.server import FederatedServer

BASELINES = ["fedprox", "ffa_lora", "flexlora", "fed_dare", "topk", "flora", "fedsa_lora", "fedex_lora"]
MODULES = {"base_model.model.layers.0.q_proj": (6, 5), "base_model.model.layers.0.down_proj": (4, 9)}  # d_out, d_in
RANK = 2
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny.yaml"


def _a(module):
    return f"{module}.lora_A.weight"


def _b(module):
    return f"{module}.lora_B.weight"


def _state(seed=0, b_zero=False, modules=MODULES, rank=RANK):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (d_out, d_in) in modules.items():
        state[_a(module)] = torch.randn(rank, d_in, generator=g)
        state[_b(module)] = torch.zeros(d_out, rank) if b_zero else torch.randn(d_out, rank, generator=g)
    return state


def _local(state, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _round(name, state, locals_, round=1, **cfg_kwargs):
    """One round through the roles: every upload and the broadcast go through the codec. Returns
    (algorithm, server, client view, encoded uploads, round result)."""
    cfg = FedSRDConfig(algorithm=name, num_clients=max(len(locals_), 1), **cfg_kwargs)
    algo = get_algorithm(name, cfg)
    client = FederatedClient(algo, dict(state), cfg)
    server = FederatedServer(algo, dict(state), cfg)
    blobs = [client.make_update(loc, round=round, client_id=i, num_samples=10) for i, loc in enumerate(locals_)]
    result = server.step(round, blobs)
    client.receive(result.broadcast)  # raises if the client's state differs from the server's
    assert wire.state_digest(client.state) == wire.state_digest(server.state)
    return algo, server, client, blobs, result


def _decoded(blob):
    return wire.decode(blob).tensors


def _dense(x):
    return x.to_dense() if isinstance(x, SparseTensor) else x


def _mean_product(locals_, module, weights=None):
    weights = weights or [1.0 / len(locals_)] * len(locals_)
    return sum(w * loc[_b(module)] @ loc[_a(module)] for w, loc in zip(weights, locals_, strict=True))


def _best_rank(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank] @ vh[:rank]


def _base_product(base_delta, module):
    return sum(left @ right for left, right in base_delta[module])


# ---- registry and config ---------------------------------------------------------------------------------------------
def test_every_baseline_is_registered_with_its_table_row():
    from fedsrd import list_algorithms
    from fedsrd.algorithms import get_algorithm_class

    for name in BASELINES:
        assert name in list_algorithms()
        cls = get_algorithm_class(name)
        assert cls.name == name and cls.paper and cls.uploads and cls.downloads


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"fedprox_mu": -1.0}, "fedprox_mu"),
        ({"fed_dare_drop": 1.0}, "fed_dare_drop"),
        ({"topk_density": 0.0}, "topk_density"),
        ({"topk_density": 1.5}, "topk_density"),
    ],
)
def test_bad_baseline_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"FedSRDConfig.{field}"):
        FedSRDConfig(**kwargs)


# ---- FedProx ---------------------------------------------------------------------------------------------------------
def _tiny_peft(targets=("q_proj",), r=RANK, alpha=4):
    from peft import get_peft_model

    from fedsrd.models import build_tiny_llama

    cfg = FedSRDConfig(lora_r=r, lora_alpha=alpha, lora_dropout=0.0)
    torch.manual_seed(0)
    return get_peft_model(build_tiny_llama(seed=0), cfg.to_lora_config(target_modules=list(targets)))


def test_fedprox_term_and_its_gradient():
    from peft import get_peft_model_state_dict

    model = _tiny_peft()
    global_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    algo = get_algorithm("fedprox", FedSRDConfig(algorithm="fedprox", fedprox_mu=0.3))
    term = algo.extra_loss(model, global_state)
    term.backward()
    from fedsrd.algorithms.fedprox import state_key

    expected_value = 0.0
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert p.grad is None
            continue
        diff = p.detach() - global_state[state_key(name)]
        expected_value += 0.15 * float(diff.square().sum())
        torch.testing.assert_close(p.grad, 0.3 * diff)  # d/dw mu/2 ||w - w_g||^2 = mu (w - w_g)
    assert float(term.detach()) == pytest.approx(expected_value, rel=1e-5)
    assert (
        get_algorithm("fedprox", FedSRDConfig(algorithm="fedprox", fedprox_mu=0.0)).extra_loss(model, global_state)
        is None
    )


def test_fedprox_state_key_drops_adapter_name_and_wrappers():
    from fedsrd.algorithms.fedprox import state_key

    assert (
        state_key("module.base_model.model.x.q_proj.lora_A.default.weight") == "base_model.model.x.q_proj.lora_A.weight"
    )


def test_fedprox_aggregates_like_fedavg():
    state = _state()
    locals_ = [_local(state, s) for s in (1, 2)]
    _, prox, _, _, _ = _round("fedprox", state, locals_)
    _, avg, _, _, _ = _round("fedavg", state, locals_)
    assert wire.state_digest(prox.state) == wire.state_digest(avg.state)


# ---- FFA-LoRA --------------------------------------------------------------------------------------------------------
def test_ffa_lora_freezes_a_and_only_b_travels():
    state = _state(b_zero=True)
    algo = get_algorithm("ffa_lora", FedSRDConfig(algorithm="ffa_lora"))
    assert algo.trainable("x.lora_B.default.weight") and not algo.trainable("x.lora_A.default.weight")
    current = state
    for round in (1, 2):
        locals_ = [_local(current, 10 * round + s) for s in (1, 2, 3)]
        for loc in locals_:  # local training cannot move A (requires_grad is off); make sure the server ignores it
            for module in MODULES:
                loc[_a(module)] = current[_a(module)].clone()
        _, server, _, blobs, result = _round("ffa_lora", current, locals_, round=round)
        for blob in blobs:
            assert all("lora_B" in k for k in _decoded(blob))
        assert all("lora_B" in k for k in _decoded(result.broadcast))
        for module in MODULES:
            assert torch.equal(server.state[_a(module)], state[_a(module)])  # A: its shared initialisation, forever
            torch.testing.assert_close(server.state[_b(module)], sum(loc[_b(module)] for loc in locals_) / 3)
        current = server.state


# ---- FlexLoRA --------------------------------------------------------------------------------------------------------
def test_flexlora_is_the_best_rank_r_approximation_of_the_mean_product():
    state = _state()
    locals_ = [_local(state, s, scale=1.0) for s in (1, 2, 3)]
    _, server, _, _, result = _round("flexlora", state, locals_)
    broadcast = _decoded(result.broadcast)
    assert set(broadcast) == set(state)  # both factors, dense
    for module in MODULES:
        product = server.state[_b(module)] @ server.state[_a(module)]
        torch.testing.assert_close(product, _best_rank(_mean_product(locals_, module), RANK), atol=1e-5, rtol=1e-5)


def test_flexlora_heterogeneous_ranks():
    from fedsrd.algorithms.flexlora import aggregate_heterogeneous

    g = torch.Generator().manual_seed(0)
    ranks, scalings, weights = [2, 3, 4], [8.0, 16 / 3, 4.0], [0.5, 0.3, 0.2]
    bs = [torch.randn(7, r, generator=g) for r in ranks]
    as_ = [torch.randn(r, 6, generator=g) for r in ranks]
    aggregate = sum(w * s * b @ a for w, s, b, a in zip(weights, scalings, bs, as_, strict=True))
    for (b, a), r, s in zip(aggregate_heterogeneous(bs, as_, weights, scalings, ranks), ranks, scalings, strict=True):
        assert b.shape == (7, r) and a.shape == (r, 6)
        torch.testing.assert_close(s * b @ a, _best_rank(aggregate, r), atol=1e-4, rtol=1e-4)


# ---- Fed-DARE and Top-k ----------------------------------------------------------------------------------------------
BIG = {"base_model.model.layers.0.q_proj": (64, 48), "base_model.model.layers.0.v_proj": (32, 48)}


def test_fed_dare_drops_rescales_and_broadcasts_the_union():
    state = _state(modules=BIG, rank=8)
    locals_ = [_local(state, s) for s in (1, 2, 3, 4)]
    algo, server, _, blobs, result = _round("fed_dare", state, locals_)
    uploads = [_decoded(b) for b in blobs]
    broadcast = _decoded(result.broadcast)
    numel = sum(v.numel() for v in state.values())
    for upload, loc in zip(uploads, locals_, strict=True):
        kept = sum(upload[k].nnz for k in state)
        assert abs(kept / numel - 0.1) < 0.02  # p = 0.9 by default
        for k, sparse in upload.items():
            delta = (loc[k] - state[k]).reshape(-1)
            torch.testing.assert_close(sparse.values, delta[sparse.indices] / 0.1)  # survivors x 1/(1-p)
    masks = [{k: set(u[k].indices.tolist()) for k in state} for u in uploads]
    assert masks[0] != masks[1]  # each client draws its own mask
    for k in state:
        assert set(broadcast[k].indices.tolist()) == set().union(*(m[k] for m in masks))  # the union of the masks
        expected = state[k] + sum(_dense(u[k]) for u in uploads) / 4
        torch.testing.assert_close(server.state[k], expected)
    density = sum(broadcast[k].nnz for k in state) / numel
    assert abs(density - (1 - 0.9**4)) < 0.03


def test_topk_keeps_the_largest_magnitudes_at_the_configured_density():
    state = _state(modules=BIG, rank=8)
    locals_ = [_local(state, s) for s in (1, 2)]
    _, server, _, blobs, result = _round("topk", state, locals_, topk_density=0.25)
    for blob, loc in zip(blobs, locals_, strict=True):
        upload = _decoded(blob)
        for k, sparse in upload.items():
            delta = (loc[k] - state[k]).reshape(-1)
            assert sparse.nnz == math.ceil(0.25 * delta.numel())
            threshold = delta.abs()[sparse.indices].min()
            dropped = torch.ones_like(delta, dtype=torch.bool)
            dropped[sparse.indices] = False
            assert bool((delta.abs()[dropped] <= threshold).all())
            torch.testing.assert_close(sparse.values, delta[sparse.indices])  # no rescale
    broadcast = _decoded(result.broadcast)
    uploads = [_decoded(b) for b in blobs]
    for k in state:
        union = set(uploads[0][k].indices.tolist()) | set(uploads[1][k].indices.tolist())
        assert set(broadcast[k].indices.tolist()) == union
        torch.testing.assert_close(server.state[k], state[k] + (_dense(uploads[0][k]) + _dense(uploads[1][k])) / 2)


# ---- FLoRA -----------------------------------------------------------------------------------------------------------
def test_flora_stacking_keeps_the_exact_mean_of_products_and_reinitialises():
    state = _state(b_zero=True)
    locals_ = [_local(state, s) for s in (1, 2, 3)]
    algo, server, client, _, result = _round("flora", state, locals_)
    for module, (_, d_in) in MODULES.items():
        merged = _base_product(client.base_delta, module)
        assert len(client.base_delta[module]) == 3  # the rank grows: 3 clients x r
        torch.testing.assert_close(merged, _mean_product(locals_, module), atol=1e-5, rtol=1e-5)
        assert not server.state[_b(module)].any()  # LoRA restarts: B = 0 ...
        a = server.state[_a(module)]  # ... and a fresh A, drawn as PEFT does, the same on every party
        assert not torch.equal(a, state[_a(module)]) and float(a.abs().max()) <= 1 / math.sqrt(d_in)
        assert torch.equal(a, client.state[_a(module)])
    _, later, _, _, _ = _round("flora", state, locals_, round=2)
    assert not torch.equal(
        later.state[_a("base_model.model.layers.0.q_proj")], server.state[_a("base_model.model.layers.0.q_proj")]
    )


def test_fedex_residual_is_mean_product_minus_product_of_means():
    state = _state()
    locals_ = [_local(state, s) for s in (1, 2, 3, 4)]
    weights = [0.1, 0.2, 0.3, 0.4]
    cfg = FedSRDConfig(algorithm="fedex_lora", num_clients=4, aggregation="samples")
    algo = get_algorithm("fedex_lora", cfg)
    client = FederatedClient(algo, dict(state), cfg)
    server = FederatedServer(algo, dict(state), cfg)
    blobs = [client.make_update(loc, round=1, client_id=i, num_samples=i + 1) for i, loc in enumerate(locals_)]
    result = server.step(1, blobs)
    client.receive(result.broadcast)
    for module in MODULES:
        b_bar = sum(w * loc[_b(module)] for w, loc in zip(weights, locals_, strict=True))
        a_bar = sum(w * loc[_a(module)] for w, loc in zip(weights, locals_, strict=True))
        torch.testing.assert_close(client.state[_b(module)], b_bar)
        torch.testing.assert_close(client.state[_a(module)], a_bar)
        residual = _base_product(client.base_delta, module)
        torch.testing.assert_close(
            residual, _mean_product(locals_, module, weights) - b_bar @ a_bar, atol=1e-5, rtol=1e-4
        )
        assert len(client.base_delta[module]) == 3  # m - 1 rank-r pairs
    # One client: FedAvg exactly, no residual on the wire.
    _, _, single, _, _ = _round("fedex_lora", state, locals_[:1])
    assert single.base_delta == {}


def test_base_weight_writer_adds_scaled_products_and_round_trips(tmp_path):
    from fedsrd.models import build_tiny_llama

    model = _tiny_peft(alpha=6)  # scaling 3
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    weight = model.get_submodule(module).get_base_layer().weight
    before = weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(64, 2, generator=g), torch.randn(2, 64, generator=g)) for _ in range(2)]
    writer = BaseWeightWriter(model)
    writer.add({module: pairs})
    expected = 3.0 * sum(left @ right for left, right in pairs)
    torch.testing.assert_close(weight.detach() - before, expected, atol=1e-5, rtol=1e-5)
    path = writer.save(tmp_path)
    assert path.name == BASE_DELTA_FILE
    plain = add_base_delta(build_tiny_llama(seed=0), path)
    torch.testing.assert_close(plain.get_parameter("model.layers.0.self_attn.q_proj.weight"), weight.detach())


# ---- FedSA-LoRA ------------------------------------------------------------------------------------------------------
def test_fedsa_shares_a_and_keeps_each_clients_b_by_client_id():
    state = _state(b_zero=True)
    cfg = FedSRDConfig(algorithm="fedsa_lora", num_clients=3)
    algo = get_algorithm("fedsa_lora", cfg)
    client, server = FederatedClient(algo, dict(state), cfg), FederatedServer(algo, dict(state), cfg)
    trained_b = {}
    for round, ids in ((1, [0, 1]), (2, [2, 1])):
        blobs, locals_ = [], []
        for cid in ids:
            start = client.start_state(cid)
            for module in MODULES:  # a client resumes from its own B (zero before its first round)
                expected_b = trained_b.get(cid, {}).get(module, state[_b(module)])
                assert torch.equal(start[_b(module)], expected_b)
                assert torch.equal(start[_a(module)], client.state[_a(module)])
            local = _local(start, 100 * round + cid)
            client.keep_personal(cid, local)
            trained_b[cid] = {m: local[_b(m)] for m in MODULES}
            locals_.append(local)
            blobs.append(client.make_update(local, round=round, client_id=cid, num_samples=1))
            assert all("lora_A" in k for k in _decoded(blobs[-1]))
        result = server.step(round, blobs)
        assert all("lora_A" in k for k in _decoded(result.broadcast))
        client.receive(result.broadcast)
        for module in MODULES:
            torch.testing.assert_close(client.state[_a(module)], sum(loc[_a(module)] for loc in locals_) / 2)
            assert not client.state[_b(module)].any()  # the global B never moves: nobody can compute it
    assert sorted(client.personal_states) == [0, 1, 2]
    exported = algo.export_state(client.state, client.personal_states)
    for module in MODULES:
        torch.testing.assert_close(exported[_b(module)], sum(trained_b[c][module] for c in range(3)) / 3)
        assert torch.equal(exported[_a(module)], client.state[_a(module)])


# ---- bytes from the codec --------------------------------------------------------------------------------------------
def test_message_sizes_follow_what_each_algorithm_sends():
    state = _state(modules=BIG, rank=8)
    numel = sum(v.numel() for v in state.values())
    numel_b = sum(v.numel() for k, v in state.items() if "lora_B" in k)
    locals_ = [_local(state, s) for s in (1, 2, 3)]
    header = 4096  # container header: names, shapes, offsets, JSON meta

    def sizes(name, **kwargs):
        _, _, _, blobs, result = _round(name, state, locals_, **kwargs)
        return max(len(b) for b in blobs), len(result.broadcast)

    for name in ("fedavg", "fedprox", "flexlora"):
        up, down = sizes(name)
        assert 4 * numel < up < 4 * numel + header and 4 * numel < down < 4 * numel + header
    up, down = sizes("ffa_lora")
    assert 4 * numel_b < up < 4 * numel_b + header and 4 * numel_b < down < 4 * numel_b + header
    up, down = sizes("fedsa_lora")
    assert 4 * (numel - numel_b) < up < 4 * (numel - numel_b) + header and down < 4 * (numel - numel_b) + header
    up, down = sizes("flora")  # every client's factors, stacked
    assert 4 * numel < up < 4 * numel + header and 3 * 4 * numel < down < 3 * 4 * numel + 3 * header
    up, down = sizes("fedex_lora")  # averaged factors + (m - 1) residual pairs
    assert 4 * numel < up < 4 * numel + header and 3 * 4 * numel < down < 3 * 4 * numel + 3 * header
    bitmap = sum(math.ceil(v.numel() / 8) for v in state.values())
    up, down = sizes("topk", topk_density=0.1)
    kept = sum(math.ceil(0.1 * v.numel()) for v in state.values())
    assert 4 * kept < up <= 4 * kept + bitmap + header
    up, _ = sizes("fed_dare")
    assert up < 0.15 * 4 * numel + bitmap + header


def test_half_precision_wire_keeps_every_party_identical():
    state = _state()
    locals_ = [_local(state, s) for s in (1, 2, 3)]
    for name in BASELINES:
        _round(name, state, locals_, value_dtype="float16")  # the client's digest check would raise


# ---- quantized bases -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flora", "fedex_lora"])
def test_base_writing_methods_refuse_quantized_bases(name, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer
    from fedsrd.trainer import FederatedTrainer

    model = build_tiny_llama()
    model.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes 4-bit model
    data = Dataset.from_dict({"instruction": ["1+1"], "input": [""], "output": ["2"]})
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=name):
        FederatedTrainer(
            model=model,
            args=args,
            fed_config=FedSRDConfig(algorithm=name, num_clients=1),
            client_datasets=[data],
            processing_class=build_tiny_tokenizer(),
        )
    fedavg = get_algorithm("fedavg", FedSRDConfig())
    check_base_writable(model, fedavg)  # a frozen-base method does not mind


def test_quantization_is_detected_from_config_and_parameters():
    from fedsrd.base_weights import quantization_reason
    from fedsrd.models import build_tiny_llama

    assert quantization_reason(build_tiny_llama()) is None
    model = build_tiny_llama()
    model.config.quantization_config = {"quant_method": "gptq"}
    assert "quantization_config" in quantization_reason(model)
    model = build_tiny_llama()
    model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.uint8), False)
    assert "uint8" in quantization_reason(model)


# ---- end to end ------------------------------------------------------------------------------------------------------
def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", BASELINES)
def test_tiny_run_and_saved_outputs_load(name, tmp_path):
    from peft import PeftModel

    from fedsrd.cli import run_train
    from fedsrd.models import build_tiny_llama

    argv = [
        "--config",
        str(TINY),
        "--output_dir",
        str(tmp_path),
        "--algorithm",
        name,
        "--disable_tqdm",
        "true",
        "--local_steps",
        "2",
        "--train_size",
        "16",
        "--eval_size",
        "4",
        "--max_length",
        "48",
        "--eval_every",
        "0",
    ]
    trainer = run_train(argv)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    assert all(r["upload_bytes"] > 0 and r["download_bytes"] > 0 for r in history[1:])
    assert math.isfinite(history[-1]["eval_loss"])
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    base = build_tiny_llama(seed=0)
    if trainer.algorithm.writes_base_weights:
        add_base_delta(base, tmp_path / "final" / BASE_DELTA_FILE)
    else:
        assert not (tmp_path / "final" / BASE_DELTA_FILE).exists()
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(trainer.model, ids), atol=1e-4, rtol=1e-4)
    if name == "fedsa_lora":
        for cid in (0, 1):
            personal = PeftModel.from_pretrained(
                build_tiny_llama(seed=0), str(tmp_path / "final" / "personal" / f"client_{cid:04d}")
            )
            assert math.isfinite(float(_logits(personal, ids).sum()))


def test_fedprox_term_enters_the_training_loss_once_per_optimizer_step(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer
    from fedsrd.trainer import FederatedTrainer

    data = Dataset.from_dict({"instruction": ["1+1", "2+2"], "input": ["", ""], "output": ["2", "4"]})
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, gradient_accumulation_steps=2, disable_tqdm=True
    )
    cfg = FedSRDConfig(algorithm="fedprox", num_clients=1, fedprox_mu=5.0, lora_r=RANK, lora_dropout=0.0)
    trainer = FederatedTrainer(
        model=build_tiny_llama(),
        args=args,
        fed_config=cfg,
        client_datasets=[data],
        processing_class=build_tiny_tokenizer(),
    )
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.add_(0.1)
    batch = trainer.data_collator([trainer.client_datasets[0][i] for i in range(2)])
    extra = float(trainer.algorithm.extra_loss(trainer.model, trainer.global_state).detach())
    items = int((batch["labels"][:, 1:] != -100).sum())
    trainer.model.eval()
    eval_loss = float(trainer.compute_loss(trainer.model, batch, num_items_in_batch=items).detach())
    trainer.model.train()
    train_loss = float(trainer.compute_loss(trainer.model, batch, num_items_in_batch=items).detach())
    # Trainer does not divide a loss normalised by num_items_in_batch by the 2 accumulation steps, so the term is halved
    # here to count once per optimizer step; evaluation never sees it.
    assert train_loss - eval_loss == pytest.approx(extra / 2, rel=1e-4)


def test_comm_table_measures_every_algorithm(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("comm_table", REPO / "benchmarks" / "comm_table.py")
    comm_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comm_table)
    comm_table.main(["--preset", "tiny", "--rounds", "1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["algorithm"]: r for r in result["rows"]}
    from fedsrd import list_algorithms
    from fedsrd.algorithms import get_algorithm_class

    lora = {n for n in list_algorithms() if getattr(get_algorithm_class(n), "uses_lora", True)}
    assert set(rows) == lora and set(BASELINES) | {"fedavg", "fedsrd", "fedsrd_e"} <= lora
    dense_mb = result["config"]["lora_parameters"] * 4 / 1024**2
    assert dense_mb < rows["fedavg"]["upload_mb"] < 1.3 * dense_mb  # + container headers, large for tiny tensors
    assert rows["ffa_lora"]["upload_mb"] < 0.6 * rows["fedavg"]["upload_mb"]
    assert rows["flora"]["download_mb"] == pytest.approx(4 * rows["fedavg"]["download_mb"], rel=0.05)
    assert rows["fed_dare"]["upload_mb"] < 0.5 * rows["fedavg"]["upload_mb"]
