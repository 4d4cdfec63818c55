"""Hub publishing without a network: the exact HfApi calls (a mock), the generated model card, and the pushed folder
loading with plain PEFT."""

import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from fedsrd import FedSRDConfig
from fedsrd.hub import PRIVATE_PATTERNS, HubPushCallback, build_model_card
from fedsrd.wire import MB


def fake_api(pushed: list | None = None):
    """A mock HfApi whose upload_folder returns commit ids c1, c2, ... and records each pushed folder's files."""
    api = mock.MagicMock(name="HfApi")
    api.create_repo.return_value = SimpleNamespace(repo_id="me/tiny-fed", url="https://huggingface.co/me/tiny-fed")

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        if pushed is not None:
            pushed.append({p.name: p.read_bytes() for p in folder.iterdir()})
        return SimpleNamespace(oid=f"c{api.upload_folder.call_count}")

    api.upload_folder.side_effect = upload_folder
    return api


def tiny_peft(seed: int = 0):
    from peft import get_peft_model

    from fedsrd.models import build_tiny_llama

    config = FedSRDConfig(lora_r=2, lora_alpha=4, lora_dropout=0.0).to_lora_config(target_modules="all-linear")
    torch.manual_seed(seed)
    return get_peft_model(build_tiny_llama(), config)


def record(round: int, scores: float) -> dict:
    up, down = 3 * MB, MB
    return {"round": round, "train_loss": 1.0, "upload_bytes": 2 * up, "download_bytes": 2 * down,
            "upload_mb_per_client": 3.0, "download_mb_per_client": 1.0, "cumulative_mb": 8.0 * round,
            "eval_loss": 2.0 - round / 10, "lm_eval/synthetic/avg": scores,
            "lm_eval/fedsrd_units/exact_match": scores}


def simulate_rounds(tmp_path: Path, callback: HubPushCallback, rounds: int = 2):
    """What run_federation does around the callback: save round_NNNN/, call on_round_end, append history.json."""
    out = tmp_path / "run"
    out.mkdir()
    history = [{"round": 0, "upload_bytes": 0, "download_bytes": 0, "cumulative_mb": 0.0, "eval_loss": 2.5}]
    args = SimpleNamespace(process_index=0)
    models = []
    for r in range(1, rounds + 1):
        model = tiny_peft(seed=r)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01 * r)
        saved = out / f"round_{r:04d}"
        model.save_pretrained(str(saved))
        rec = record(r, 0.25 * r)
        callback.on_round_end(args, None, None, round=r, record=rec, saved_dir=saved, is_last=r == rounds,
                              model=model)
        history.append(rec)
        (out / "history.json").write_text(json.dumps(history))
        models.append(model)
    return out, history, models


class StagedCopyOf:
    """Equal to the path of `folder`'s staging copy for publishing (run/.hub-XXXX/round_NNNN: hub._public_copy)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __eq__(self, other: object) -> bool:
        path = Path(str(other))
        return path.name == self.folder.name and path.parent.parent == self.folder.parent and \
            path.parent.name.startswith(".hub-")

    def __repr__(self) -> str:
        return f"StagedCopyOf({self.folder})"


def test_one_commit_per_saved_round_and_a_branch_each(tmp_path):
    api = fake_api()
    fed = FedSRDConfig(algorithm="fedavg", num_rounds=2, num_clients=2)
    callback = HubPushCallback("tiny-fed", token="hf_x", private=True, fed_config=fed, api=api)
    _, history, _ = simulate_rounds(tmp_path, callback)
    folder = [StagedCopyOf(tmp_path / "run" / f"round_{r:04d}") for r in (1, 2)]
    assert api.mock_calls == [
        mock.call.create_repo("tiny-fed", token="hf_x", private=True, exist_ok=True),
        mock.call.upload_folder(repo_id="me/tiny-fed", folder_path=folder[0], revision="main",
                                commit_message="Round 1: global adapter", commit_description=mock.ANY,
                                ignore_patterns=["personal/*"], token="hf_x"),
        mock.call.create_branch("me/tiny-fed", branch="round-0001", revision="c1", token="hf_x"),
        mock.call.upload_folder(repo_id="me/tiny-fed", folder_path=folder[1], revision="main",
                                commit_message="Round 2: global adapter", commit_description=mock.ANY,
                                ignore_patterns=["personal/*"], token="hf_x"),
        mock.call.create_branch("me/tiny-fed", branch="round-0002", revision="c2", token="hf_x"),
    ]
    assert [r.get("hub_revision") for r in history] == [None, "round-0001", "round-0002"]
    assert history[2]["hub_commit"] == "c2"


def test_tags_and_refs_left_from_an_earlier_run_are_moved(tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    api = fake_api()
    conflict = HfHubHTTPError("tag exists", response=mock.MagicMock(status_code=409, headers={}))
    api.create_tag.side_effect = [conflict, None, None]
    fed = FedSRDConfig(num_rounds=2, num_clients=2, hub_round_refs="tag", hub_revision_template="r{round}")
    callback = HubPushCallback.from_training_args(
        SimpleNamespace(hub_model_id="me/tiny-fed", output_dir=str(tmp_path), hub_token=None,
                        hub_private_repo=None, hub_revision=None), fed, api=api)
    simulate_rounds(tmp_path, callback)
    assert [c for c in api.mock_calls if "tag" in c[0]] == [
        mock.call.create_tag("me/tiny-fed", tag="r1", revision="c1", token=None),
        mock.call.delete_tag("me/tiny-fed", tag="r1", token=None),
        mock.call.create_tag("me/tiny-fed", tag="r1", revision="c1", token=None),
        mock.call.create_tag("me/tiny-fed", tag="r2", revision="c2", token=None),
    ]
    assert not api.create_branch.called


def test_pushed_folder_loads_with_plain_peft_and_carries_card_history_config(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    from fedsrd.models import build_tiny_llama

    pushed: list[dict] = []
    fed = FedSRDConfig(algorithm="fedavg", num_rounds=2, num_clients=2)
    out, history, models = simulate_rounds(tmp_path, HubPushCallback("me/tiny-fed", fed_config=fed,
                                                                     api=fake_api(pushed)))
    assert set(pushed[1]) == {"adapter_config.json", "adapter_model.safetensors", "README.md", "history.json",
                              "fed_config.json"}
    remote = tmp_path / "remote"  # what a download of main would give after round 2
    remote.mkdir()
    for name, data in pushed[1].items():
        (remote / name).write_bytes(data)
    loaded = PeftModel.from_pretrained(build_tiny_llama(), str(remote))
    expected = get_peft_model_state_dict(models[-1])
    got = get_peft_model_state_dict(loaded)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert [r["round"] for r in json.loads(pushed[1]["history.json"])] == [0, 1, 2]
    assert json.loads(pushed[1]["fed_config.json"])["algorithm"] == "fedavg"


def test_model_card_has_what_a_user_needs(tmp_path):
    from huggingface_hub import ModelCard

    model = tiny_peft()
    model.save_pretrained(str(tmp_path / "round_0002"))
    fed = FedSRDConfig(algorithm="fedavg", num_rounds=5, num_clients=4, local_steps=3, lora_r=2)
    history = [record(1, 0.25), {**record(2, 0.5), "lm_eval_unavailable": {"LawBench": "not in lm-eval"}}]
    card = build_model_card(tmp_path / "round_0002", fed, history, repo_id="me/tiny-fed", revision="round-0002")
    text = str(card)
    parsed = ModelCard(text)
    assert parsed.data.base_model == "tiny-llama" and parsed.data.library_name == "peft"
    assert "fedavg" in parsed.data.tags
    assert "trained by **4 clients**" in text and "round 2 of 5" in text
    assert "**3.000 MB up + 1.000 MB down** (mean over 2 rounds)" in text
    assert "Cumulative: **16.000 MB** over all clients (8.000 MB per client)" in text
    assert "| lm_eval/synthetic/avg | 0.5000 | 2 |" in text and "| eval_loss | 1.8000 | 2 |" in text
    assert "- LawBench: not in lm-eval" in text
    assert "- `local_steps`: 3" in text and "- `lora_r`: 2" in text
    assert 'PeftModel.from_pretrained(base, "me/tiny-fed", revision="round-0002")' in text
    assert 'AutoModelForCausalLM.from_pretrained("tiny-llama")' in text


def test_card_explains_a_base_delta_and_personal_adapters_stay_private(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    folder = tmp_path / "round_0001"
    tiny_peft().save_pretrained(str(folder))
    (folder / "base_delta.safetensors").write_bytes(b"")
    (folder / "personal" / "client_0000").mkdir(parents=True)
    text = str(build_model_card(folder, FedSRDConfig(algorithm="fedavg"), [record(1, 0.1)], repo_id="me/x",
                                revision="round-0001"))
    assert 'add_base_delta(base, hf_hub_download("me/x", "base_delta.safetensors", revision="round-0001"))' in text
    files = ["adapter_model.safetensors", "base_delta.safetensors", "personal/client_0000/adapter_model.safetensors"]
    assert list(filter_repo_objects(files, ignore_patterns=PRIVATE_PATTERNS)) == files[:2]


def test_only_the_main_process_pushes_and_only_saved_rounds(tmp_path):
    api = fake_api()
    callback = HubPushCallback("me/tiny-fed", api=api)
    callback.on_round_end(SimpleNamespace(process_index=1), None, None, round=1, record=record(1, 0.1),
                          saved_dir=tmp_path, is_last=True)
    callback.on_round_end(SimpleNamespace(process_index=0), None, None, round=1, record=record(1, 0.1),
                          saved_dir=None, is_last=False)
    assert api.mock_calls == []


def test_a_failed_middle_push_is_logged_a_failed_last_push_raises(tmp_path, caplog):
    api = fake_api()
    api.upload_folder.side_effect = OSError("no network")
    callback = HubPushCallback("me/tiny-fed", fed_config=FedSRDConfig(num_rounds=2), api=api)
    with pytest.raises(OSError, match="no network"):
        simulate_rounds(tmp_path, callback)  # round 1 only warns; round 2 is the last
    assert "Hub push of round 1" in caplog.text


def test_trainer_never_lets_transformers_touch_the_hub_and_pushes_the_global_adapter(tmp_path, monkeypatch):
    import huggingface_hub
    import transformers.trainer
    from datasets import Dataset
    from transformers import TrainingArguments

    from fedsrd import FederatedTrainer
    from fedsrd.models import build_tiny_llama, build_tiny_tokenizer

    def no_hub(*args, **kwargs):
        raise AssertionError("transformers.Trainer contacted the Hub")

    monkeypatch.setattr(transformers.trainer, "hf_api", no_hub)
    api = fake_api()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    rows = [{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), push_to_hub=True, hub_model_id="me/tiny-fed",
                             per_device_train_batch_size=2, report_to="none", use_cpu=True, disable_tqdm=True)
    fed = FedSRDConfig(num_rounds=2, num_clients=2, local_steps=1, lora_r=2, lora_alpha=4, save_every=1)
    trainer = FederatedTrainer(model=build_tiny_llama(), args=args, fed_config=fed,
                               client_datasets=[Dataset.from_list(rows[:2]), Dataset.from_list(rows[2:])],
                               processing_class=build_tiny_tokenizer(), max_length=64)
    assert trainer.args.push_to_hub is False
    assert sum(isinstance(c, HubPushCallback) for c in trainer.callback_handler.callbacks) == 1
    assert api.mock_calls == []  # nothing before training
    trainer.train()
    uploads = [c.kwargs for c in api.upload_folder.call_args_list]
    assert [Path(u["folder_path"]).name for u in uploads] == ["round_0001", "round_0002"]
    assert [c.kwargs["branch"] for c in api.create_branch.call_args_list] == ["round-0001", "round-0002"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r.get("hub_commit") for r in history] == ["c1", "c2"]
    card = (tmp_path / "run" / "round_0002" / "README.md").read_text()
    assert "round 2 of 2" in card and "me/tiny-fed" in card


def test_card_of_a_full_parameter_model_and_of_a_local_folder(tmp_path):
    from fedsrd.models import build_tiny_llama

    folder = tmp_path / "final"
    build_tiny_llama().save_pretrained(str(folder))  # what fedkrso / fedfft / fedkseed save: a whole model
    fed = FedSRDConfig(algorithm="fedkrso", krso_rank=3, num_rounds=1)
    text = str(build_model_card(folder, fed, [record(1, 0.1)]))  # no repo: the card a saved folder carries
    assert "A full fine-tune of" in text and "library_name: transformers" in text and "PeftModel" not in text
    assert "| `krso_rank` | 3 |" in text and "- `lora_r`" not in text and "revision=" not in text
    assert 'AutoModelForCausalLM.from_pretrained("final")' in text
