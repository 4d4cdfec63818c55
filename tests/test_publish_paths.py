"""Failure 8 of issue 16: nothing published names a local path (adapter_config.json's base model, the model card,
history.json, fed_config.json): relative or Hub names only; the saved round keeps its local path for `fedsrd eval`."""

import json
from types import SimpleNamespace

from test_hub import fake_api, tiny_peft

from fedsrd import FedSRDConfig
from fedsrd.hub import HubPushCallback
from fedsrd.report import public_name, without_local_paths


def test_public_name_keeps_hub_names_urls_and_relative_paths():
    assert public_name("/home/me/models/gemma-3-270m") == "gemma-3-270m"
    assert public_name("~/data/x.jsonl") == "x.jsonl" and public_name("jsonl:/srv/d/x.jsonl") == "jsonl:x.jsonl"
    for kept in ("google/gemma-3-270m", "https://huggingface.co/google/gemma", "data/x.jsonl", "tiny-llama"):
        assert public_name(kept) == kept
    assert without_local_paths({"/a/b/c.jsonl": ["x", "/tmp/y/"], "n": 1}) == {"c.jsonl": ["x", "y"], "n": 1}


def test_pushed_files_name_no_local_path(tmp_path):
    base_dir = tmp_path / "models" / "my-base"
    run = tmp_path / "run"
    saved = run / "round_0001"
    model = tiny_peft()
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(str(saved))
    fed = FedSRDConfig(num_rounds=1, num_clients=2, lm_eval_tasks=[f"jsonl:{tmp_path}/private/tasks.jsonl"],
                       lm_eval_include_path=str(tmp_path / "my_tasks"))  # fmt: skip
    record = {"round": 1, "upload_bytes": 1, "download_bytes": 1, "cumulative_mb": 0.0, "eval_loss": 1.0,
              f"eval_{tmp_path}/private/dev.jsonl_loss": 1.0, "data": str(tmp_path / "private" / "train.jsonl")}
    pushed: list[dict] = []
    callback = HubPushCallback("me/tiny-fed", fed_config=fed, api=fake_api(pushed))
    callback.on_round_end(SimpleNamespace(process_index=0), None, None, round=1, record=record, saved_dir=saved,
                          is_last=True)  # fmt: skip
    files = pushed[0]
    assert {"adapter_config.json", "README.md", "history.json", "fed_config.json"} <= set(files)
    for name, data in files.items():
        if name.endswith((".json", ".md")):
            assert str(tmp_path) not in data.decode() and "/private/" not in data.decode(), name
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "my-base"
    assert 'from_pretrained("my-base")' in files["README.md"].decode()
    assert json.loads(files["fed_config.json"])["lm_eval_tasks"] == ["jsonl:tasks.jsonl"]
    # the saved round keeps its local base path (fedsrd eval finds the base model from it)
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    assert not any(p.name.startswith(".hub-") for p in run.iterdir())  # the staging copy is gone
