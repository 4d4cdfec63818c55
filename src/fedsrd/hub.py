"""Publishing the global adapter to the Hugging Face Hub, through `huggingface_hub.HfApi`.

One commit per saved round on `main` (so `main` is always the latest global adapter), and a branch or tag per round
(`round-0007`) pointing at that round's commit. Each commit holds the PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`), a model card (`README.md`), `fed_config.json` and `history.json` so far. Only the main
process pushes; clients never do.

`FederatedTrainer` attaches `HubPushCallback` when `TrainingArguments.push_to_hub` is set (repo: `hub_model_id`,
token: `hub_token`, privacy: `hub_private_repo`; `FedSRDConfig.hub_round_refs` / `hub_revision_template` name the
per-round refs) and keeps `transformers.Trainer` itself from creating a repo or pushing a client's weights. The card
is `fedsrd.model_card`'s (the same every saved folder carries), with the repo's name and the round's revision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from fedsrd.federation.callbacks import FederatedCallback
from fedsrd.model_card import build_model_card, write_model_card
from fedsrd.report import comm_summary, without_local_paths

logger = logging.getLogger(__name__)

ROUND_REFS = ("branch", "tag")
# Saved next to the global adapter for some algorithms (FedSA-LoRA): each client's own adapter. Never published.
PRIVATE_PATTERNS = ["personal/*"]


class HubPushCallback(FederatedCallback):
    """Pushes each saved round's global adapter to one Hub repo (see the module docstring).

    A failed push of a middle round is logged and training goes on (the round is on disk, and the next push brings
    `main` up to date); a failed push of the last round raises. `api` defaults to `huggingface_hub.HfApi()`.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        round_refs: str = "branch",
        revision_template: str = "round-{round:04d}",
        latest_revision: str = "main",
        fed_config: Any = None,
        api: Any = None,
    ) -> None:
        if not repo_id:
            raise ValueError("HubPushCallback: repo_id is empty; set TrainingArguments.hub_model_id.")
        if round_refs not in ROUND_REFS:
            raise ValueError(f"HubPushCallback: round_refs must be one of {ROUND_REFS}, got {round_refs!r}.")
        self.repo_id = repo_id
        self.token = token
        self.private = private
        self.round_refs = round_refs
        self.revision_template = revision_template
        self.latest_revision = latest_revision
        self.fed_config = fed_config
        self._api = api
        self._repo_ready = False

    @classmethod
    def from_training_args(cls, args: Any, fed_config: Any, api: Any = None) -> HubPushCallback:
        """Hub settings from `TrainingArguments` (as `Trainer` reads them) and `FedSRDConfig`."""
        repo_id = args.hub_model_id or Path(args.output_dir).absolute().name
        return cls(
            repo_id,
            token=args.hub_token,
            private=args.hub_private_repo,
            round_refs=fed_config.hub_round_refs,
            revision_template=fed_config.hub_revision_template,
            latest_revision=args.hub_revision or "main",
            fed_config=fed_config,
            api=api,
        )

    @property
    def api(self) -> Any:
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi()
        return self._api

    def on_round_end(self, args, state, control, round=None, record=None, saved_dir=None, is_last=False, **kwargs):
        if saved_dir is None or record is None or args.process_index != 0:
            return
        try:
            self.push(saved_dir, round, record)
        except Exception as err:  # the Hub is remote: never lose a long run to one failed middle push
            if is_last:
                raise
            logger.warning("Hub push of round %s to %s failed (%r); the next saved round will retry.", round,
                           self.repo_id, err)

    def push(self, folder: str | Path, round: int, record: dict[str, Any]) -> Any:
        """Write the card, `fed_config.json` and `history.json` into `folder`, commit it to `main`, point the
        round's branch/tag at the commit. Returns the `CommitInfo`; adds `hub_commit`/`hub_revision` to `record`."""
        folder = Path(folder)
        ref = self.revision_template.format(round=round)
        # Nothing published names a local path (the base model's directory, data files): `without_local_paths`.
        history = without_local_paths(_history_before(folder.parent, round) + [record])
        fed_config = _as_dict(self.fed_config) or _read_json(folder.parent / "fed_config.json") or {}
        fed_config = without_local_paths(fed_config)
        write_model_card(folder, fed_config, history, repo_id=self.repo_id, revision=ref, round_refs=self.round_refs)
        (folder / "history.json").write_text(json.dumps(history, indent=2))
        if fed_config:
            (folder / "fed_config.json").write_text(json.dumps(fed_config, indent=2))
        repo_id = self._ensure_repo()
        comm = comm_summary(history)
        with _public_copy(folder) as public:
            info = self._upload(repo_id, public, round, fed_config, comm)
        self._point_ref(repo_id, ref, info.oid)
        record["hub_commit"] = info.oid
        record["hub_revision"] = ref
        logger.info("Pushed round %s to %s (%s, commit %s)", round, repo_id, ref, info.oid)
        return info

    def _upload(self, repo_id: str, folder: Path, round: int, fed_config: dict, comm: dict) -> Any:
        return self.api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=self.latest_revision,
            commit_message=f"Round {round}: global adapter",
            commit_description=f"{fed_config.get('algorithm', '?')}; {comm['cumulative_mb']:.2f} MB communicated "
            f"in {comm['rounds']} rounds.",
            ignore_patterns=PRIVATE_PATTERNS,
            token=self.token,
        )

    def _ensure_repo(self) -> str:
        if not self._repo_ready:
            url = self.api.create_repo(self.repo_id, token=self.token, private=self.private, exist_ok=True)
            self.repo_id = getattr(url, "repo_id", None) or self.repo_id  # "name" -> "user/name"
            self._repo_ready = True
        return self.repo_id

    def _point_ref(self, repo_id: str, ref: str, commit: str) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        if self.round_refs == "branch":
            create, delete, name = self.api.create_branch, self.api.delete_branch, {"branch": ref}
        else:
            create, delete, name = self.api.create_tag, self.api.delete_tag, {"tag": ref}
        try:
            create(repo_id, **name, revision=commit, token=self.token)
        except HfHubHTTPError as err:
            if getattr(getattr(err, "response", None), "status_code", None) != 409:
                raise
            # The ref is left from an earlier run into this repo: move it to this round's commit.
            delete(repo_id, **name, token=self.token)
            create(repo_id, **name, revision=commit, token=self.token)


@contextlib.contextmanager
def _public_copy(folder: Path) -> Iterator[Path]:
    """`folder` as it may be published: a staging copy beside it (hard links where the file system allows) whose
    ``adapter_config.json`` names the base model without its local directory. The saved round itself keeps the
    local path, which `fedsrd eval` uses to find the base."""
    with tempfile.TemporaryDirectory(prefix=".hub-", dir=folder.parent) as stage:
        public = Path(stage) / folder.name
        shutil.copytree(folder, public, copy_function=_link_or_copy)
        config_path = public / "adapter_config.json"
        config = _read_json(config_path)
        if config:
            config_path.unlink()  # a hard link: never write through it into the saved round
            config_path.write_text(json.dumps(without_local_paths(config), indent=2, sort_keys=True))
        yield public


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _history_before(out_dir: Path, round: int) -> list[dict[str, Any]]:
    history = _read_json(out_dir / "history.json") or []
    return [r for r in history if isinstance(r, dict) and r.get("round", -1) < round]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _as_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if is_dataclass(config):
        return asdict(config)
    return dict(config)


__all__ = ["PRIVATE_PATTERNS", "ROUND_REFS", "HubPushCallback", "build_model_card"]
