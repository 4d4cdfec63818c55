"""Publishing the global adapter to the Hugging Face Hub, through `huggingface_hub.HfApi`.

One commit per saved round on `main` (so `main` is always the latest global adapter), and a branch or tag per round
(`round-0007`) pointing at that round's commit. Each commit holds the PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`), a model card (`README.md`), `fed_config.json` and `history.json` so far. Only the main
process pushes; clients never do.

`FederatedTrainer` attaches `HubPushCallback` when `TrainingArguments.push_to_hub` is set (repo: `hub_model_id`,
token: `hub_token`, privacy: `hub_private_repo`; `FedSRDConfig.hub_round_refs` / `hub_revision_template` name the
per-round refs) and keeps `transformers.Trainer` itself from creating a repo or pushing a client's weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from fedsrd.base_weights import BASE_DELTA_FILE
from fedsrd.federation.callbacks import FederatedCallback
from fedsrd.report import (
    comm_summary,
    final_scores,
    headline_score_keys,
    privacy_summary,
    public_name,
    unavailable_benchmarks,
    without_local_paths,
)

logger = logging.getLogger(__name__)

ROUND_REFS = ("branch", "tag")
# Saved next to the global adapter for some algorithms (FedSA-LoRA): each client's own adapter. Never published.
PRIVATE_PATTERNS = ["personal/*"]
# Settings shown in the card for each algorithm, beyond the common ones (FedSRDConfig field names).
ALGORITHM_SETTINGS: dict[str, tuple[str, ...]] = {
    "fedsrd": ("upload_sparsity_alpha", "upload_sparsity_coeff", "upload_sparsity_cap", "upload_l1_rescale",
               "download_drop"),
    "fedsrd_e": ("upload_sparsity_alpha", "upload_sparsity_coeff", "upload_sparsity_cap", "upload_l1_rescale",
                 "download_drop"),
    "fedprox": ("fedprox_mu",),
    "fed_dare": ("fed_dare_drop",),
    "topk": ("topk_density",),
}
COMMON_SETTINGS = ("num_rounds", "num_clients", "clients_per_round", "local_steps", "aggregation", "lora_r",
                   "lora_alpha", "lora_dropout", "lora_target_modules", "value_dtype", "positions")


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
        card = build_model_card(folder, fed_config, history, repo_id=self.repo_id, revision=ref,
                                round_refs=self.round_refs)
        card.save(folder / "README.md")
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


# ---- model card ------------------------------------------------------------------------------------------------------
def build_model_card(
    adapter_dir: str | Path,
    fed_config: Mapping[str, Any] | Any,
    history: Sequence[dict[str, Any]],
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    round_refs: str = "branch",
) -> Any:
    """The `huggingface_hub.ModelCard` of a global adapter: base model, algorithm and settings, rounds, clients,
    communication (MB per client per round, cumulative), the score table, and how to load it with plain PEFT."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = without_local_paths(_as_dict(fed_config) or {})
    history = without_local_paths(list(history))
    adapter_config = _read_json(Path(adapter_dir) / "adapter_config.json") or {}
    base = public_name(adapter_config.get("base_model_name_or_path") or "BASE_MODEL")
    algorithm = str(cfg.get("algorithm", "unknown"))
    done = max((int(r["round"]) for r in history), default=0)
    total = cfg.get("num_rounds", "?")
    comm = comm_summary(history)
    scores = final_scores(history)
    privacy = privacy_summary(history, cfg)
    name = repo_id or Path(adapter_dir).name
    ref = revision or "main"
    data = ModelCardData(
        base_model=base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["fedsrd", "federated-learning", "lora", "peft", algorithm])),
    )
    base_ref = f"[`{base}`](https://huggingface.co/{base})" if "/" in base else f"`{base}`"
    lines = [
        f"# {name}",
        "",
        f"A LoRA adapter for {base_ref} trained by **{cfg.get('num_clients', '?')} clients** with federated "
        f"learning (algorithm **{algorithm}**, library fedsrd), none of them sharing its data. This revision is the "
        f"global adapter after **round {done} of {total}**.",
        "",
        "## Communication budget",
        "",
        f"Per client per round: **{_mb(comm['upload_mb_per_client_per_round'])} MB up + "
        f"{_mb(comm['download_mb_per_client_per_round'])} MB down** (mean over {comm['rounds']} rounds). "
        f"Cumulative: **{_mb(comm['cumulative_mb'])} MB** over all clients "
        f"({_mb(comm['per_client_cumulative_mb'])} MB per client). MB = 1024² bytes of the encoded messages.",
        "",
        "| | per client per round | cumulative (all clients) |",
        "|---|---|---|",
        f"| upload | {_mb(comm['upload_mb_per_client_per_round'])} MB | {_mb(comm['total_upload_mb'])} MB |",
        f"| download | {_mb(comm['download_mb_per_client_per_round'])} MB | {_mb(comm['total_download_mb'])} MB |",
        "",
        *_privacy_lines(privacy),
        "## Scores",
        "",
    ]
    if scores:
        lines += ["| metric | value | round |", "|---|---|---|"]
        lines += [f"| {key} | {value:.4f} | {r} |" for key, (value, r) in scores.items()]
    else:
        lines.append("No evaluation was run (set `eval_dataset` or `lm_eval_tasks`).")
    missing = unavailable_benchmarks(history)
    if missing:
        lines += ["", "Not evaluated:"] + [f"- {k}: {why}" for k, why in missing.items()]
    lines += ["", "## Training", "", f"- Base model: `{base}`", f"- Algorithm: `{algorithm}`"]
    lines += [f"- `{key}`: {'all' if cfg[key] is None and key == 'clients_per_round' else cfg[key]}"
              for key in (*COMMON_SETTINGS, *ALGORITHM_SETTINGS.get(algorithm, ())) if key in cfg]
    table = _history_table(history)
    if len(table) > 22:  # long runs: fold the per-round table
        table = ["<details><summary>Every round</summary>", "", *table, "", "</details>"]
    lines += ["", *table, ""]
    lines += [
        "## Use it with plain PEFT",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        *_base_delta_lines(adapter_dir, name, ref),
        f'model = PeftModel.from_pretrained(base, "{name}", revision="{ref}")',
        "```",
        "",
        f"`main` holds the latest round; every pushed round also has its own {round_refs} (`{revision}` is this "
        "one). Prompts use the Alpaca template (`### Instruction:` / `### Input:` / `### Response:`).",
        "",
        "<details><summary>Full FedSRDConfig</summary>",
        "",
        "```json",
        json.dumps(cfg, indent=2, default=str),
        "```",
        "",
        "</details>",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _privacy_lines(privacy: dict[str, Any] | None) -> list[str]:
    """The card's privacy section (docs/privacy.md): what the run can claim, or that it claims nothing."""
    if privacy is None:
        return [
            "## Privacy",
            "",
            "Trained without differential privacy: the clients' data never left them, but the updates and this adapter "
            "are not protected against inference about it.",
            "",
        ]
    eps = privacy["epsilon"]
    eps_text = "not yet accounted (no round run)" if eps is None else f"**epsilon = {eps:.3f}**"
    where = {
        "central": "the server clipped each client's change and added Gaussian noise to their sum (a trusted server)",
        "local": "each client clipped its change and added its share of the Gaussian noise before upload (distributed "
                 "DP: the guarantee is for whoever sees only the aggregate)",
    }[privacy["mode"]]
    lines = [
        "## Privacy",
        "",
        f"Client-level (epsilon, delta)-differential privacy (DP-FedAvg; McMahan et al., ICLR 2018): {eps_text} at "
        f"delta = {privacy['delta']:g} after {privacy['rounds']} rounds, for each client's whole dataset. Placement "
        f"`{privacy['mode']}`: {where}. Clip bound {privacy['clip_norm']:g}, noise multiplier "
        f"{_num(privacy['noise_multiplier'])}"
        + (f" (computed for a target epsilon of {privacy['target_epsilon']:g})" if privacy["target_epsilon"] else "")
        + f", sampling rate {privacy['sampling_rate']:.3g} per round, `{privacy['accountant']}` accountant "
        "(dp-accounting, Poisson-subsampled Gaussian rounds).",
        "",
    ]
    if privacy["budget_exhausted"]:
        lines += ["Training stopped early: the next round would have exceeded `dp_stop_at_epsilon`.", ""]
    return lines


def _base_delta_lines(adapter_dir: str | Path, repo_id: str, ref: str) -> list[str]:
    """FLoRA / FedEx-LoRA also change the base weights: the card shows how to apply that change first."""
    if not (Path(adapter_dir) / BASE_DELTA_FILE).is_file():
        return []
    return [
        "# this algorithm also changed the base weights: apply that change before loading the adapter",
        "from huggingface_hub import hf_hub_download",
        "from fedsrd.base_weights import add_base_delta",
        f'base = add_base_delta(base, hf_hub_download("{repo_id}", "{BASE_DELTA_FILE}", revision="{ref}"))',
    ]


def _history_table(history: Sequence[dict[str, Any]]) -> list[str]:
    score_keys = headline_score_keys(list(dict.fromkeys(k for r in history for k in r)))[:4]
    if any(isinstance(r.get("dp_epsilon"), (int, float)) for r in history):
        score_keys = [*score_keys, "dp_epsilon"]
    head = ["round", "up MB / client", "down MB / client", "cumulative MB", "held-out loss", *score_keys]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in history:
        cells = [str(r["round"]), _mb(r.get("upload_mb_per_client")), _mb(r.get("download_mb_per_client")),
                 _mb(r.get("cumulative_mb")), _num(r.get("eval_loss")), *(_num(r.get(k)) for k in score_keys)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


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


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _num(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.4f}"
