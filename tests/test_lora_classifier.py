"""LoRA algorithms on a sequence classifier, as PEFT's SEQ_CLS task: the adapter and the new head (modules_to_save)
train together; fedavg, fedprox, fedsrd and fedsrd_e carry the head through the round dense (averaged with the round's
weights), the others refuse a classifier before training."""

import json
import math

import pytest
import torch
from test_classification import _args, _sentences, _tiny_bert

from fedsrd import FedSRDConfig, wire
from fedsrd.algorithms import get_algorithm
from fedsrd.algorithms.families import HeadMean, head_keys, head_supporting_algorithms, is_head_key
from fedsrd.algorithms.fedprox import state_key
from fedsrd.client import FederatedClient
from fedsrd.models import build_tiny_tokenizer
from fedsrd.ops.sparse import SparseTensor
from fedsrd.server import FederatedServer
from fedsrd.trainer import FederatedTrainer

HEAD_W, HEAD_B = "base_model.model.classifier.weight", "base_model.model.classifier.bias"
TARGETS = ["query", "value", "dense"]  # "dense": attention output, FFN and the pooler (not the classifier)


def _trainer(tmp_path, algorithm: str, **fed_kwargs) -> FederatedTrainer:
    tokenizer = build_tiny_tokenizer()
    fed = FedSRDConfig(algorithm=algorithm, num_rounds=2, num_clients=2, local_steps=4, fed_seed=0, lora_r=4,
                       lora_target_modules=TARGETS, **fed_kwargs)  # fmt: skip
    return FederatedTrainer(
        model=_tiny_bert(len(tokenizer)), args=_args(tmp_path), fed_config=fed,
        client_datasets=[_sentences(24, 1), _sentences(24, 2)], eval_dataset={"sst": _sentences(16, 3)},
        processing_class=tokenizer,
    )  # fmt: skip


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    runs = {}
    for name in ("fedavg", "fedsrd"):
        out = tmp_path_factory.mktemp(name)
        trainer = _trainer(out, name)
        initial = {k: v.clone() for k, v in trainer.global_state.items()}
        trainer.train()
        runs[name] = (trainer, out, initial, json.loads((out / "history.json").read_text()))
    return runs


@pytest.mark.parametrize("name", ["fedavg", "fedsrd"])
def test_lora_on_a_classifier_trains_the_adapter_and_the_head(lora_runs, name):
    from peft import get_peft_model_state_dict

    trainer, _, initial, history = lora_runs[name]
    assert type(trainer.model).__name__ == "PeftModelForSequenceClassification"
    assert head_keys(trainer.global_state) == [HEAD_B, HEAD_W]
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert math.isfinite(record["train_loss"]) and 0.0 <= record["eval_accuracy"] <= 1.0
    state = trainer.global_state
    assert not torch.equal(state[HEAD_W], initial[HEAD_W]) and not torch.equal(state[HEAD_B], initial[HEAD_B])
    moved = [k for k in state if "lora_B" in k and not torch.equal(state[k], initial[k])]
    assert moved  # the adapter trained too
    # every party's model holds the server's global state: the adapter PEFT would save has the same digest
    model_state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(trainer.model).items()}
    assert sorted(model_state) == sorted(state)
    assert wire.state_digest(model_state) == wire.state_digest(state)


@pytest.mark.parametrize("name", ["fedavg", "fedsrd"])
def test_head_bytes_are_counted_in_the_upload(lora_runs, name):
    trainer, _, _, history = lora_runs[name]
    head_bytes = sum(trainer.global_state[k].numel() * 4 for k in head_keys(trainer.global_state))
    per_client = history[-1]["upload_bytes"] / 2
    lora_values = sum(v.numel() for k, v in trainer.global_state.items() if "lora_" in k)
    if name == "fedavg":  # every factor and the head, dense float32
        assert per_client >= 4 * lora_values + head_bytes
    else:  # the head dense beside the ~95% sparse factor deltas
        assert head_bytes < per_client < 4 * lora_values + head_bytes


@pytest.mark.parametrize("name", ["fedavg", "fedsrd"])
def test_saved_adapter_reloads_with_peft_and_gives_the_same_logits(lora_runs, name):
    from peft import PeftModel

    trainer, out, _, _ = lora_runs[name]
    tokenizer = build_tiny_tokenizer()
    reloaded = PeftModel.from_pretrained(_tiny_bert(len(tokenizer)), str(out / "final")).eval()
    batch = tokenizer(["good film", "the plot was awful it"], return_tensors="pt", padding=True)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**batch).logits
        got = reloaded(**batch).logits
    assert torch.equal(got, expected)
    assert torch.equal(reloaded.base_model.model.classifier.modules_to_save["default"].weight,
                       trainer.global_state[HEAD_W])  # fmt: skip


# ---- the round through the roles: head dense, averaged, same digest on both sides ---------------------------------
def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (d_out, d_in) in {"m.layer.0.query": (6, 5), "m.layer.0.value": (4, 6)}.items():
        state[f"{module}.lora_A.weight"] = torch.randn(3, d_in, generator=g)
        state[f"{module}.lora_B.weight"] = torch.randn(d_out, 3, generator=g)
    state[HEAD_W], state[HEAD_B] = torch.randn(2, 6, generator=g), torch.randn(2, generator=g)
    return state


def _locals(state, n=3):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        out.append({k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in state.items()})
    return out


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedsrd", "fedsrd_e"])
@pytest.mark.parametrize("streaming", ["off", "on"])
def test_head_travels_dense_and_its_weighted_mean_is_everyones(name, streaming):
    state, samples = _state(), [10, 30, 60]
    locals_ = _locals(state)
    cfg = FedSRDConfig(algorithm=name, num_clients=3, aggregation="samples", server_streaming=streaming)
    algo = get_algorithm(name, cfg)
    client, server = FederatedClient(algo, dict(state), cfg), FederatedServer(algo, dict(state), cfg)
    blobs = [client.make_update(loc, round=1, client_id=i, num_samples=samples[i]) for i, loc in enumerate(locals_)]
    for blob in blobs:
        tensors = wire.decode(blob).tensors
        assert not isinstance(tensors[HEAD_W], SparseTensor) and not isinstance(tensors[HEAD_B], SparseTensor)
    result = server.step(1, blobs)
    broadcast = wire.decode(result.broadcast).tensors
    assert {HEAD_W, HEAD_B} <= set(broadcast) and not isinstance(broadcast[HEAD_W], SparseTensor)
    client.receive(result.broadcast)  # raises if the client's state differs from the server's
    assert wire.state_digest(client.state) == wire.state_digest(server.state)
    weights = [s / sum(samples) for s in samples]
    for key in (HEAD_W, HEAD_B):
        mean = sum(w * loc[key] for w, loc in zip(weights, locals_, strict=True))
        torch.testing.assert_close(server.state[key], mean, rtol=0, atol=1e-6)


def test_fedsrd_clipping_bounds_the_head_change_too():
    state = _state()
    cfg = FedSRDConfig(algorithm="fedsrd", num_clients=1)
    algo = get_algorithm("fedsrd", cfg)
    local = dict(state)
    local[HEAD_W] = state[HEAD_W] + 3.0  # only the head changed
    update = algo.client_update(state, local, 1, torch.Generator().manual_seed(0))
    norm = math.sqrt(12 * 9.0)
    assert algo.update_norm(state, update) == pytest.approx(norm, rel=1e-6)
    clipped = algo.clip_update(state, update, 1.0)
    assert algo.update_norm(state, clipped) <= 1.0
    assert float(clipped[HEAD_W].norm()) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_fedavg_robust_rules_cover_the_head(rule):
    state = _state()
    locals_ = _locals(state)
    cfg = FedSRDConfig(algorithm="fedavg", num_clients=3, robust_aggregation=rule, trim_fraction=0.4)  # 3 -> 1
    algo = get_algorithm("fedavg", cfg)
    client, server = FederatedClient(algo, dict(state), cfg), FederatedServer(algo, dict(state), cfg)
    blobs = [client.make_update(loc, round=1, client_id=i, num_samples=1) for i, loc in enumerate(locals_)]
    client.receive(server.step(1, blobs).broadcast)
    median = torch.stack([loc[HEAD_W] for loc in locals_]).median(dim=0).values  # trimming 1 of 3: the median
    torch.testing.assert_close(server.state[HEAD_W], median)


def test_head_mean_rejects_a_missing_or_misshapen_head():
    state = _state()
    head = HeadMean(state)
    with pytest.raises(KeyError, match="lacks"):
        head.check({HEAD_W: state[HEAD_W]})
    with pytest.raises(ValueError, match="shape"):
        head.check({HEAD_W: torch.zeros(3, 6), HEAD_B: state[HEAD_B]})
    changes = HeadMean(state, changes=True)  # FedSRD: a head an upload lacks did not change
    assert torch.equal(changes.check({HEAD_W: state[HEAD_W]})[HEAD_B], torch.zeros(2))


def test_head_keys_and_fedprox_state_keys():
    assert is_head_key(HEAD_W) and is_head_key("base_model.model.score.weight")
    assert not is_head_key("base_model.model.classifier.lora_A.weight")
    assert not is_head_key("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight")
    assert state_key("base_model.model.classifier.modules_to_save.default.weight") == HEAD_W
    assert state_key("base_model.model.x.q.lora_A.default.weight") == "base_model.model.x.q.lora_A.weight"


def test_fedprox_proximal_term_covers_the_head(tmp_path):
    trainer = _trainer(tmp_path, "fedprox", fedprox_mu=1.0)
    model = trainer.model
    zero = trainer.algorithm.extra_loss(model, trainer.global_state)
    assert float(zero.detach()) == 0.0
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    term = trainer.algorithm.extra_loss(model, trainer.global_state)
    assert float(term.detach()) == pytest.approx(0.5 * trainer.global_state[HEAD_W].numel())


# ---- refusals -------------------------------------------------------------------------------------------------------
def test_supporting_algorithms_are_the_head_carrying_lora_ones_and_full_parameter_ones():
    supported = head_supporting_algorithms()
    assert {"fedavg", "fedprox", "fedsrd", "fedsrd_e", "fedfft", "fedkrso", "fedkseed"} <= set(supported)
    assert not {"ffa_lora", "fedsa_lora", "flora", "fedex_lora", "rolora", "topk", "fedsrd_ef"} & set(supported)


@pytest.mark.parametrize("name", ["fedsa_lora", "flora", "ffa_lora", "topk", "fedsrd_ef"])
def test_lora_algorithms_without_the_head_refuse_a_classifier(tmp_path, name):
    with pytest.raises(ValueError, match=rf"algorithm '{name}'.*classifier.*\(fedavg, fedprox, fedsrd, fedsrd_e\)"):
        _trainer(tmp_path, name)


def test_differential_privacy_and_client_ranks_are_refused_on_a_classifier(tmp_path):
    with pytest.raises(ValueError, match="dp_mode='central'.*sequence classifier"):
        _trainer(tmp_path, "fedavg", dp_mode="central", dp_clip_norm=1.0, dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="client_lora_ranks"):
        _trainer(tmp_path, "fedsrd", client_lora_ranks=[2, 4])


def test_cli_classification_task_with_fedsrd(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    from fedsrd.cli import run_train
    from fedsrd.models import load_sequence_classifier

    data = tmp_path / "sst"
    data.mkdir()
    for split, n, seed in (("train", 32, 1), ("dev", 8, 2)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sentences(n, seed)))
    out = tmp_path / "out"
    trainer = run_train([
        "--task", "classification", "--model_name_or_path", "tiny-bert", "--data", str(data), "--partition", "iid",
        "--train_size", "0", "--num_clients", "2", "--num_rounds", "2", "--local_steps", "2", "--algorithm", "fedsrd",
        "--max_length", "32", "--output_dir", str(out), "--per_device_train_batch_size", "4", "--use_cpu", "true",
        "--report_to", "none", "--disable_tqdm", "true", "--learning_rate", "1e-3",
    ])  # fmt: skip
    history = json.loads((out / "history.json").read_text())
    assert "eval_accuracy" in history[-1] and math.isfinite(history[-1]["eval_loss"])
    assert json.loads((out / "final" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    head = trainer.model.base_model.model.classifier.modules_to_save["default"].weight.detach()
    base, _ = load_sequence_classifier("tiny-bert", num_labels=2, seed=trainer.args.seed)  # as the CLI built it
    reloaded = PeftModel.from_pretrained(base, str(out / "final"))
    assert torch.equal(reloaded.base_model.model.classifier.modules_to_save["default"].weight, head)
    reloaded_state = {k: v.float() for k, v in get_peft_model_state_dict(reloaded).items()}
    assert wire.state_digest(reloaded_state) == wire.state_digest(trainer.global_state)


def test_fedsrd_partial_upload_without_the_head_counts_as_no_head_change():
    state, locals_ = _state(), _locals(_state(), n=2)
    cfg = FedSRDConfig(algorithm="fedsrd", num_clients=2, train_one_factor=True)  # partial uploads are valid
    algo = get_algorithm("fedsrd", cfg)
    client, server = FederatedClient(algo, dict(state), cfg), FederatedServer(algo, dict(state), cfg)
    blobs = [client.make_update(loc, round=1, client_id=i, num_samples=1) for i, loc in enumerate(locals_)]
    msg = wire.decode(blobs[1])
    tensors = {k: v for k, v in msg.tensors.items() if k not in (HEAD_W, HEAD_B)}
    blobs[1] = wire.encode(wire.Message(kind="update", algorithm="fedsrd", round=1, tensors=tensors, meta=msg.meta))
    client.receive(server.step(1, blobs).broadcast)
    expected = state[HEAD_W] + 0.5 * (locals_[0][HEAD_W] - state[HEAD_W])
    torch.testing.assert_close(server.state[HEAD_W], expected, rtol=0, atol=1e-6)
