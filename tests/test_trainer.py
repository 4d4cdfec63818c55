"""FederatedTrainer's local-training seams: the completion-only loss equals Trainer's default loss."""

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, TrainingArguments

from fedsrd import FedSRDConfig
from fedsrd.data import load_synthetic
from fedsrd.models import build_tiny_llama, build_tiny_tokenizer
from fedsrd.trainer import FederatedTrainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_tiny_tokenizer()
    data = load_synthetic(("arithmetic", "units"), train_size=16, test_size=8, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("t")), report_to="none", use_cpu=True,
                             per_device_train_batch_size=4)
    trainer = FederatedTrainer(
        model=build_tiny_llama(seed=0), args=args,
        fed_config=FedSRDConfig(num_clients=2, num_rounds=1, local_steps=1, lora_r=4, lora_dropout=0.0),
        client_datasets=[d["train"] for d in data.values()], eval_dataset={k: d["test"] for k, d in data.items()},
        processing_class=tok, max_length=96,
    )
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True)
    batch = collator([trainer.client_datasets[0][i] for i in range(4)])
    return trainer, batch


@pytest.mark.parametrize("num_items", [None, 7])
def test_completion_only_logits_give_the_same_loss(setup, num_items):
    trainer, batch = setup
    model = trainer.model
    with torch.no_grad():
        b = {k: v for k, v in batch.items()}
        trainer.skip_prompt_logits = False
        reference = trainer.compute_loss(model, dict(b), num_items_in_batch=num_items)
        trainer.skip_prompt_logits = True
        assert trainer._can_skip_prompt_logits(model, b)
        fast = trainer.compute_loss(model, dict(b), num_items_in_batch=num_items)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_completion_only_logits_give_the_same_gradients(setup):
    trainer, batch = setup
    model = trainer.model
    grads = []
    for skip in (False, True):
        trainer.skip_prompt_logits = skip
        model.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_prompt_tokens_are_masked(setup):
    trainer, batch = setup
    labels = batch["labels"]
    assert (labels == -100).any() and (labels != -100).any()
