"""The full-parameter family (fedkrso, fedfft, fedkseed): seeded projections, the FedKRSO optimizer, the server math
through the codec, bytes, FedKSeed's zeroth-order steps and replay, and tiny end-to-end runs via the CLI preset."""

import json
import math
from pathlib import Path

import pytest
import torch

from fedsrd import FedSRDConfig, get_algorithm, wire
from fedsrd.algorithms.fedkrso import ROUND_TAG, KRSOAdamW, accumulator_name
from fedsrd.algorithms.fedkseed import COEFF, LOCAL_INCREMENT, KSeedZerothOrder
from fedsrd.client import FederatedClient
from fedsrd.ops import SparseTensor, derive_seed
from fedsrd.ops.projection import direction, projection, reconstruct, seed_pool
from fedsrd.server import FederatedServer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "tiny.yaml"
SHAPES = {"model.layers.0.q_proj.weight": (6, 5), "model.layers.1.down_proj.weight": (4, 9)}  # out x in
HEAD = {"classifier.weight": (2, 5), "classifier.bias": (2,)}


# ---- projections ---------------------------------------------------------------------------------------------------
def test_projection_is_bitwise_reproducible():
    a = projection(123, "model.layers.0.q_proj.weight", 4, 64)
    b = projection(123, "model.layers.0.q_proj.weight", 4, 64)  # a fresh generator instance
    assert a.dtype == torch.float32 and a.shape == (4, 64) and a.device.type == "cpu"
    assert torch.equal(a, b)
    # the same code path by hand: a CPU generator seeded by (seed, weight name), N(0, 1) scaled by 1/sqrt(r)
    g = torch.Generator(device="cpu").manual_seed(derive_seed(123, "model.layers.0.q_proj.weight"))
    assert torch.equal(a, torch.randn(4, 64, generator=g).mul_(0.5))
    if torch.cuda.is_available():  # drawn on the CPU, moved afterwards: the same bits on the device
        assert torch.equal(a.cuda().cpu(), a)
    assert not torch.equal(a, projection(124, "model.layers.0.q_proj.weight", 4, 64))
    assert not torch.equal(a, projection(123, "model.layers.0.k_proj.weight", 4, 64))


def test_projection_entries_are_n_0_1_over_r():
    r, d = 4, 20000
    p = projection(7, "w", r, d)
    n = p.numel()
    assert abs(float(p.mean())) < 4 * math.sqrt(1 / r / n)
    assert float(p.var()) == pytest.approx(1 / r, rel=0.03)
    # E[P^T P] = I over seeds
    mean = sum(projection(s, "w", r, 6).T @ projection(s, "w", r, 6) for s in range(3000)) / 3000
    assert torch.allclose(mean, torch.eye(6), atol=0.08)


def test_seed_pool_is_per_round_and_wide():
    a, b = seed_pool(0, "fedkrso", 1, size=10), seed_pool(0, "fedkrso", 2, size=10)
    assert len(set(a)) == 10 and not set(a) & set(b)
    assert max(a) > 2**40  # not the reference's 1..63 range
    assert seed_pool(0, "fedkrso", 1, size=10) == a


# ---- the FedKRSO optimizer ----------------------------------------------------------------------------------------
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(5, 6), torch.nn.Linear(6, 4)])
        self.classifier = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(torch.tanh(self.layers[1](torch.tanh(self.layers[0](x)))))


def _optimizer(model, seeds=(11, 22, 33), tau=2, lr=1e-2, weight_decay=0.0, rank=2, decay_head_biases=False):
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    model.classifier.bias.requires_grad_(True)
    projected = [(f"layers.{i}.weight", layer) for i, layer in enumerate(model.layers)]
    head = [("classifier.weight", model.classifier.weight), ("classifier.bias", model.classifier.bias)]
    return KRSOAdamW(
        projected,
        head,
        list(seeds),
        rank=rank,
        tau=tau,
        picker=torch.Generator().manual_seed(5),
        lr=lr,
        weight_decay=weight_decay,
        decay_head_biases=decay_head_biases,
    )


def _loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 5, generator=g), torch.randint(2, (8,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def test_gradient_in_projected_coordinates_is_the_projected_full_gradient():
    model = Toy()
    full = [layer.weight for layer in model.layers]
    for w in full:
        w.requires_grad_(True)
    grads = torch.autograd.grad(_loss(model), full)
    opt = _optimizer(model)
    _loss(model).backward()
    for i, grad in enumerate(grads):
        name = f"layers.{i}.weight"
        assert model.layers[i].weight.grad is None  # no full gradient is formed
        expected = grad @ opt.projections[name].T  # G P^T
        assert torch.allclose(opt.coordinates[name].grad, expected, atol=1e-6)
    opt.close()


def test_moments_reset_on_seed_switch_and_step_count_runs_on():
    model = Toy()
    opt = _optimizer(model, tau=2)
    b = opt.coordinates["layers.0.weight"]
    _loss(model, 0).backward()
    opt.step()
    assert opt.state[b]["exp_avg"].abs().sum() > 0 and opt.state[b]["step"] == 1
    first = dict(opt.projections)
    _loss(model, 1).backward()
    opt.step()  # the second step ends the subspace: new seed, new P, moments zeroed, counter kept
    assert len(opt.seed_history) == 2
    assert opt.state[b]["exp_avg"].abs().sum() == 0 and opt.state[b]["exp_avg_sq"].abs().sum() == 0
    assert opt.state[b]["step"] == 2
    head = opt.state[model.classifier.weight]
    assert head["exp_avg"].abs().sum() > 0  # the head's AdamW state is not reset
    expected = projection(opt.seeds[opt.seed_history[1]], "layers.0.weight", 2, 5)
    assert torch.equal(opt.projections["layers.0.weight"], expected)
    if opt.seed_history[0] != opt.seed_history[1]:
        assert not torch.equal(first["layers.0.weight"], opt.projections["layers.0.weight"])
    assert torch.count_nonzero(b) == 0  # B stays zero: every step went into W
    opt.close()


def test_weights_change_only_within_the_span_of_the_used_projections():
    model = Toy()
    start = [layer.weight.detach().clone() for layer in model.layers]
    opt = _optimizer(model, tau=2, seeds=(11, 22, 33, 44))
    for step in range(8):
        _loss(model, step).backward()
        opt.step()
    opt.close()
    used = set(opt.seed_history[:4])  # the periods that took steps (the 5th seed was drawn after the last)
    assert set(opt.accumulators) == used
    for i, layer in enumerate(model.layers):
        name = f"layers.{i}.weight"
        delta = layer.weight.detach() - start[i]
        accumulators = {k: opt.accumulators[k][name] for k in used}
        assert torch.allclose(delta, reconstruct(accumulators, opt.seeds, name, layer.in_features), atol=1e-6)
        basis = torch.cat([projection(opt.seeds[k], name, 2, layer.in_features) for k in used])  # rows of the P_k
        q, _ = torch.linalg.qr(basis.T)
        outside = delta - delta @ q @ q.T
        assert float(outside.abs().max()) < 1e-6 < float(delta.abs().max())
    uploaded = opt.upload_state()
    assert set(uploaded) == {accumulator_name(f"layers.{i}.weight", k) for i in range(2) for k in used}
    # after close() the forward no longer goes through the hooks
    x = torch.randn(3, 5)
    assert torch.equal(model(x), model.classifier(torch.tanh(model.layers[1](torch.tanh(model.layers[0](x))))))


@pytest.mark.parametrize("decay_head_biases", [False, True])  # True: the authors' code decays every head parameter
def test_head_is_plain_adamw(decay_head_biases):
    model, ref_model = Toy(), Toy()
    opt = _optimizer(model, lr=1e-2, weight_decay=0.1, decay_head_biases=decay_head_biases)
    ref = torch.optim.AdamW(
        [
            {"params": [ref_model.classifier.weight], "weight_decay": 0.1},
            {"params": [ref_model.classifier.bias], "weight_decay": 0.1 if decay_head_biases else 0.0},
        ],
        lr=1e-2,
    )
    for step in range(3):
        opt.zero_grad()
        ref.zero_grad()
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(step))
        model.classifier(x).square().sum().backward()
        ref_model.classifier(x).square().sum().backward()
        opt.step()
        ref.step()
    assert torch.allclose(model.classifier.weight, ref_model.classifier.weight, atol=1e-6)
    assert torch.allclose(model.classifier.bias, ref_model.classifier.bias, atol=1e-6)
    opt.close()


# ---- FedKRSO server and apply through the codec --------------------------------------------------------------------
def _krso_setup(**cfg):
    config = FedSRDConfig(algorithm="fedkrso", num_clients=3, krso_rank=2, krso_num_seeds=4, **cfg)
    algo = get_algorithm("fedkrso", config)
    shapes = {**SHAPES, **HEAD}
    state = algo.init_global_state({k: torch.randn(s) for k, s in shapes.items()})
    return config, algo, state


def _krso_local(seed_indices, seed, rank=2):
    g = torch.Generator().manual_seed(seed)
    local = {
        accumulator_name(n, k): 1e-2 * torch.randn(s[0], rank, generator=g)
        for n, s in SHAPES.items()
        for k in seed_indices
    }
    local.update({n: 1e-2 * torch.randn(s, generator=g) for n, s in HEAD.items()})
    local.update({n: torch.randn(s, generator=g) for n, s in SHAPES.items()})  # weight changes: not uploaded
    return local


def test_fedkrso_server_averages_per_seed_and_everyone_applies_the_same_bits():
    config, algo, state = _krso_setup()
    locals_ = [_krso_local([0, 2], 1), _krso_local([2], 2), _krso_local([1, 2], 3)]
    client = FederatedClient(algo, dict(state), config)
    server = FederatedServer(algo, dict(state), config)
    blobs = [client.make_update(loc, round=3, client_id=i, num_samples=1) for i, loc in enumerate(locals_)]
    result = server.step(3, blobs)
    client.receive(result.broadcast)  # raises if the client's state differs from the server's in any bit
    assert wire.state_digest(client.state) == wire.state_digest(server.state)
    broadcast = wire.decode(result.broadcast).tensors
    assert float(broadcast[ROUND_TAG]) == 3.0
    seeds = algo.round_seeds(3)
    for name, (d_out, d_in) in SHAPES.items():
        assert accumulator_name(name, 3) not in broadcast  # no client used seed 3: nothing sent
        mean = {
            k: sum(loc.get(accumulator_name(name, k), torch.zeros(d_out, 2)) for loc in locals_) / 3 for k in (0, 1, 2)
        }  # a client without seed k counts as zero
        for k, value in mean.items():
            assert torch.allclose(broadcast[accumulator_name(name, k)], value, atol=1e-7)
        expected = state[name] + sum(mean[k] @ projection(seeds[k], name, 2, d_in) for k in mean)
        assert torch.allclose(server.state[name], expected, atol=1e-6)
    for name in HEAD:
        assert torch.allclose(server.state[name], sum(loc[name] for loc in locals_) / 3, atol=1e-7)


def test_fedkrso_update_with_a_partial_seed_is_excluded():
    config, algo, state = _krso_setup()
    good, bad = _krso_local([0], 1), _krso_local([1], 2)
    del bad[accumulator_name("model.layers.1.down_proj.weight", 1)]
    client = FederatedClient(algo, dict(state), config)
    server = FederatedServer(algo, dict(state), config)
    blobs = [client.make_update(loc, round=1, client_id=i, num_samples=1) for i, loc in enumerate([good, bad])]
    result = server.step(1, blobs)
    assert result.accepted == [0] and "client 1" in result.rejected
    client.receive(result.broadcast)


def test_fedkrso_bytes_are_the_encoded_seed_accumulators():
    config, algo, state = _krso_setup()
    local = _krso_local([1, 3], 0)
    blob = FederatedClient(algo, dict(state), config).make_update(local, round=1, client_id=0, num_samples=5)
    uploaded = wire.decode(blob).tensors
    assert set(uploaded) == {accumulator_name(n, k) for n in SHAPES for k in (1, 3)} | set(HEAD)
    same = wire.Message(
        kind="update",
        algorithm="fedkrso",
        round=1,
        tensors={k: local[k] for k in uploaded},
        meta={"client_id": 0, "num_samples": 5},
    )
    assert len(blob) == len(wire.encode(same))
    values = 2 * 2 * sum(s[0] for s in SHAPES.values()) + sum(math.prod(s) for s in HEAD.values())  # 2 seeds x r
    assert 4 * values < len(blob) < 4 * values + 4096  # fp32 values + the container header


# ---- FedFFT ---------------------------------------------------------------------------------------------------------
def test_fedfft_averages_the_weight_changes():
    config = FedSRDConfig(algorithm="fedfft", num_clients=2, aggregation="samples")
    algo = get_algorithm("fedfft", config)
    state = algo.init_global_state({k: torch.randn(s) for k, s in SHAPES.items()})
    assert all(torch.count_nonzero(v) == 0 for v in state.values())
    locals_ = [{k: torch.randn(s) for k, s in SHAPES.items()} for _ in range(2)]
    client = FederatedClient(algo, dict(state), config)
    server = FederatedServer(algo, dict(state), config)
    blobs = [
        client.make_update(loc, round=1, client_id=i, num_samples=n) for i, (loc, n) in enumerate(zip(locals_, (1, 3)))
    ]
    client.receive(server.step(1, blobs).broadcast)
    for name in SHAPES:
        assert torch.allclose(client.state[name], 0.25 * locals_[0][name] + 0.75 * locals_[1][name], atol=1e-7)
    dense = 4 * sum(math.prod(s) for s in SHAPES.values())
    assert dense < len(blobs[0]) < dense + 2048
    initial = {k: torch.ones(s) for k, s in SHAPES.items()}
    assert torch.equal(
        algo.materialize(client.state, initial)[next(iter(SHAPES))], 1 + client.state[next(iter(SHAPES))]
    )


# ---- FedKSeed -------------------------------------------------------------------------------------------------------
def test_fedkseed_two_point_estimate_update_and_replay():
    torch.manual_seed(0)
    params = [
        ("layers.0.weight", torch.nn.Parameter(torch.randn(4, 3))),
        ("layers.1.weight", torch.nn.Parameter(torch.randn(5))),
    ]
    initial = {n: p.detach().clone() for n, p in params}
    seeds = seed_pool(0, "fedkseed", size=16)
    opt = KSeedZerothOrder(params, seeds, lr=1e-2, eps=1e-3, picker=torch.Generator().manual_seed(1))

    def loss_fn():  # quadratic: the two-point estimate is exactly z . w
        return 0.5 * sum(p.double().square().sum() for _, p in params)

    before = {n: p.detach().clone() for n, p in params}
    opt.zeroth_order_step(loss_fn)
    k = opt.seed_history[0]
    z = {n: direction(seeds[k], n, p.shape) for n, p in params}
    g = float(sum((z[n] * before[n]).sum() for n in z))
    assert float(opt.increments[k]) == pytest.approx(-1e-2 * g, rel=1e-4)
    for n, p in params:
        assert torch.allclose(p.detach(), before[n] - 1e-2 * g * z[n], atol=1e-5)
    for _ in range(20):
        opt.zeroth_order_step(loss_fn)
    assert torch.count_nonzero(opt.increments) == len(set(opt.seed_history))
    # the model replayed from the initial weights with the per-seed scalars is the trained one
    config = FedSRDConfig(algorithm="fedkseed", kseed_num_seeds=16, fed_seed=0)
    algo = get_algorithm("fedkseed", config)
    algo.init_global_state(initial)
    replayed = algo.materialize({COEFF: opt.upload_state()[LOCAL_INCREMENT]}, initial)
    for n, p in params:
        assert torch.allclose(replayed[n], p.detach(), atol=1e-5)


def test_fedkseed_skips_steps_whose_losses_differ_by_more_than_the_clip():
    torch.manual_seed(0)
    params = [("layers.0.weight", torch.nn.Parameter(torch.randn(4, 3)))]
    before = params[0][1].detach().clone()
    seeds = seed_pool(0, "fedkseed", size=16)

    def loss_fn():
        return 0.5 * params[0][1].double().square().sum()

    def run(clip):
        params[0][1].data.copy_(before)
        opt = KSeedZerothOrder(
            params, seeds, lr=1e-2, eps=1e-3, picker=torch.Generator().manual_seed(1), loss_difference_clip=clip
        )
        opt.zeroth_order_step(loss_fn)
        return opt

    k = run(0.0).seed_history[0]
    difference = abs(2e-3 * float((direction(seeds[k], "layers.0.weight", (4, 3)) * before).sum()))  # L+ - L-
    kept = run(2 * difference)
    assert kept.skipped_steps == 0 and torch.count_nonzero(kept.increments) == 1
    skipped = run(difference / 2)
    assert skipped.skipped_steps == 1 and skipped.seed_history == [k]
    assert torch.count_nonzero(skipped.increments) == 0
    assert torch.allclose(params[0][1].detach(), before, atol=1e-6)  # restored, not moved
    with pytest.raises(ValueError, match="loss_difference_clip"):
        KSeedZerothOrder(params, seeds, lr=1e-2, eps=1e-3, picker=torch.Generator(), loss_difference_clip=-1.0)
    with pytest.raises(ValueError, match="kseed_grad_clip"):
        FedSRDConfig(algorithm="fedkseed", kseed_grad_clip=-1.0)
    assert get_algorithm("fedkseed", FedSRDConfig(algorithm="fedkseed", kseed_grad_clip=0.5)).config.kseed_grad_clip


def test_recipe_config_follows_the_authors():
    """examples/configs/sst2_minilm.yaml is presented as the FedKRSO authors' GLUE recipe: no gradient clipping,
    weight decay on every head parameter, r = 4, K = 10, tau = 10, 100 local steps of batch 32, lr 2e-4 cosine."""
    from fedsrd.cli import parse_train_args

    fed, args, _ = parse_train_args(["--config", str(REPO / "examples" / "configs" / "sst2_minilm.yaml")])
    assert args.max_grad_norm == 0 and fed.krso_head_bias_decay
    assert (fed.algorithm, fed.krso_rank, fed.krso_num_seeds, fed.krso_tau) == ("fedkrso", 4, 10, 10)
    assert (fed.num_clients, fed.local_steps, args.per_device_train_batch_size) == (10, 100, 32)
    assert (args.learning_rate, str(args.lr_scheduler_type.value), args.weight_decay) == (2e-4, "cosine", 0.01)


def test_fedkseed_uploads_seed_scalar_pairs_and_broadcasts_cumulative_scalars():
    config = FedSRDConfig(algorithm="fedkseed", num_clients=2, kseed_num_seeds=4096)
    algo = get_algorithm("fedkseed", config)
    state = algo.init_global_state({k: torch.zeros(s) for k, s in SHAPES.items()})
    increments = [torch.zeros(4096), torch.zeros(4096)]
    increments[0][[3, 100, 4000]] = torch.tensor([0.5, -0.25, 1.0])
    increments[1][[100, 7]] = torch.tensor([0.25, 2.0])
    client = FederatedClient(algo, dict(state), config)
    server = FederatedServer(algo, dict(state), config)
    blobs = [
        client.make_update({LOCAL_INCREMENT: inc}, round=1, client_id=i, num_samples=1)
        for i, inc in enumerate(increments)
    ]
    upload = wire.decode(blobs[0]).tensors[COEFF]
    assert isinstance(upload, SparseTensor) and upload.indices.tolist() == [3, 100, 4000]
    empty = wire.encode(
        wire.Message(
            kind="update",
            algorithm="fedkseed",
            round=1,
            tensors={COEFF: SparseTensor.from_dense(torch.zeros(4096))},
            meta={"client_id": 0, "num_samples": 1},
        )
    )
    assert 3 * 4 <= len(blobs[0]) - len(empty) <= 3 * (4 + 2) + 8  # 3 pairs: fp32 scalar + varint seed index
    result = server.step(1, blobs)
    client.receive(result.broadcast)
    expected = (increments[0] + increments[1]) / 2
    assert torch.equal(client.state[COEFF], expected)
    assert len(result.broadcast) < 1024  # 4 non-zero scalars of 4096, sent sparse
    with pytest.raises(ValueError, match="lr_scheduler_type='constant'"):
        from transformers import TrainingArguments

        algo.check_training_args(TrainingArguments(output_dir="unused", lr_scheduler_type="cosine"))


# ---- end to end: the tiny preset with each algorithm ---------------------------------------------------------------
E2E = [
    "--train_size",
    "32",
    "--eval_size",
    "8",
    "--max_length",
    "64",
    "--local_steps",
    "4",
    "--krso_tau",
    "2",
    "--kseed_num_seeds",
    "64",
    "--disable_tqdm",
    "true",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fedsrd.cli import run_train

    out = {}
    for name in ("fedkrso", "fedfft", "fedkseed"):
        folder = tmp_path_factory.mktemp(name)
        trainer = run_train(["--config", str(TINY), "--output_dir", str(folder), "--algorithm", name, *E2E])
        out[name] = (trainer, folder, json.loads((folder / "history.json").read_text()))
    return out


@pytest.mark.parametrize("name", ["fedkrso", "fedfft", "fedkseed"])
def test_tiny_llama_two_rounds_finish_with_finite_losses(runs, name):
    from peft import PeftModel

    trainer, folder, history = runs[name]
    assert not isinstance(trainer.model, PeftModel)  # no LoRA for the full-parameter family
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["eval_loss"])
        assert record["upload_bytes"] > 0 and record["download_bytes"] > 0
    changed = any(
        not torch.equal(p.detach().cpu().float(), trainer.initial_weights[n])
        for n, p in trainer.model.named_parameters()
        if n in trainer.initial_weights
    )
    assert changed


def test_tiny_llama_bytes_per_method(runs):
    up = {name: runs[name][2][-1]["upload_bytes"] / 2 for name in runs}  # 2 clients
    trainer = runs["fedkrso"][0]
    dense = 4 * sum(v.numel() for v in trainer.initial_weights.values())
    out_dims = sum(v.shape[0] for v in trainer.initial_weights.values())
    assert dense < up["fedfft"] < dense + 16384
    # 4 local steps, tau = 2: at most 2 seeds, r = 4, fp32
    assert 4 * 4 * out_dims <= up["fedkrso"] <= 2 * 4 * 4 * out_dims + 16384
    assert up["fedkseed"] < 1024  # at most 4 (seed index, scalar) pairs


def test_saved_full_model_reloads_as_the_global_model(runs):
    from transformers import AutoModelForCausalLM

    trainer, folder, _ = runs["fedkrso"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder / "final")
    params = dict(trainer.model.named_parameters())
    for name, value in reloaded.named_parameters():
        assert torch.equal(value, params[name].detach().cpu()), name
    weights = trainer.algorithm.materialize(trainer.global_state, trainer.initial_weights)
    for name, value in weights.items():
        assert torch.equal(params[name].detach().cpu(), value)


def test_fedkseed_refuses_a_decaying_learning_rate(tmp_path):
    from fedsrd.cli import run_train

    with pytest.raises(ValueError, match="constant"):
        run_train(
            [
                "--config",
                str(TINY),
                "--output_dir",
                str(tmp_path),
                "--algorithm",
                "fedkseed",
                "--lr_scheduler_type",
                "cosine",
                *E2E,
            ]
        )


# ---- fp16 loss scaling (issue: an overflow must not freeze the local phase) ----------------------------------------
def _krso_trainer_with_loss_scaler(tmp_path, local_steps: int):
    """A FedKRSO trainer whose local phases run Accelerate's fp16 loss-scaling path (a CPU GradScaler: Accelerate
    creates none on a CPU), with an inf forced into one coordinate's gradient before the second optimizer step."""
    from transformers import TrainerCallback, TrainingArguments

    from fedsrd.data import load_synthetic
    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer
    from fedsrd.trainer import FederatedTrainer

    data = load_synthetic(("arithmetic", "units"), train_size=16, test_size=8, seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    cfg = FedSRDConfig(algorithm="fedkrso", num_clients=2, num_rounds=1, local_steps=local_steps, krso_tau=2)
    trainer = FederatedTrainer(
        model=build_tiny_llama(seed=0),
        args=args,
        fed_config=cfg,
        client_datasets=[d["train"] for d in data.values()],
        processing_class=build_tiny_tokenizer(),
        max_length=96,
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    class Overflow(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:
                next(iter(trainer.fed_optimizer.coordinates.values())).grad.fill_(float("inf"))

    trainer.add_callback(Overflow())
    return trainer


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])  # unscaled by the scaler's step, or by clipping first
def test_fedkrso_resumes_after_an_fp16_overflow(tmp_path, max_grad_norm):
    from fedsrd.trainer import _AlgorithmGradientsCleared

    trainer = _krso_trainer_with_loss_scaler(tmp_path, local_steps=8)
    trainer.args.max_grad_norm = max_grad_norm
    trainer.local_train(0, 1)
    assert trainer.fed_optimizer.num_steps == 7  # only the overflowing step was skipped
    assert trainer.accelerator.scaler.get_scale() < 2.0**8  # the scaler did see the overflow
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(c.grad is None for c in trainer.fed_optimizer.coordinates.values())
    assert all(torch.isfinite(a).all() for a in trainer.local_state().values())

    # without clearing the coordinates' gradients, the inf stays and every later step is skipped as well
    trainer.remove_callback(_AlgorithmGradientsCleared)
    trainer.local_train(1, 1)
    assert trainer.fed_optimizer.num_steps == 1
