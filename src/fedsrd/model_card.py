"""The model card of a saved global model: what the Hub push publishes and what every saved folder carries.

`build_model_card` writes the base model, the algorithm (its paper, what travels each way) and *that algorithm's own
options* (the fields of its `Algorithm.options` class, with their help text), the common settings, the bytes moved
(MB per client per round, cumulative), the held-out and lm-eval scores, the per-round table and how to load the
result with plain PEFT (or transformers, for the full-parameter algorithms). Nothing in it names a local path.

`write_model_card` puts it in a folder as ``README.md``: `fedsrd.federation.Federation` calls it for every saved
``round_NNNN/`` and ``final/`` (replacing PEFT's empty template), and `fedsrd.hub.HubPushCallback` for what it pushes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from fedsrd.algorithms import Algorithm, get_algorithm_class
from fedsrd.base_weights import BASE_DELTA_FILE
from fedsrd.report import (
    comm_summary,
    final_scores,
    headline_score_keys,
    privacy_summary,
    public_name,
    unavailable_benchmarks,
    without_local_paths,
)

CARD_FILE = "README.md"
# Settings every card lists (FedSRDConfig field names); an algorithm's own options come from its options class.
COMMON_SETTINGS = ("num_rounds", "num_clients", "clients_per_round", "local_steps", "aggregation", "lora_r",
                   "lora_alpha", "lora_dropout", "lora_target_modules", "value_dtype", "positions")  # fmt: skip
FULL_PARAMETER_SKIPPED = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
_TASKS = {  # PEFT task type -> (pipeline tag, transformers auto class)
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
}


def algorithm_options(algorithm: str) -> list[tuple[str, str]]:
    """``(option, help)`` for each option the algorithm `algorithm` reads beyond the common ones (its
    `Algorithm.options` class); empty for an algorithm without options or one not registered in this process."""
    try:
        cls: type[Algorithm] = get_algorithm_class(algorithm)
    except ValueError:
        return []
    if cls.options is None:
        return []
    return [(f.name, str(f.metadata.get("help", ""))) for f in fields(cls.options)]


def build_model_card(
    model_dir: str | Path,
    fed_config: Mapping[str, Any] | Any,
    history: Sequence[dict[str, Any]],
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    round_refs: str = "branch",
) -> Any:
    """The `huggingface_hub.ModelCard` of a saved global model (see the module docstring). Without `repo_id` (a local
    folder) the loading snippet names the folder and no Hub revision."""
    from huggingface_hub import ModelCard, ModelCardData

    model_dir = Path(model_dir)
    cfg = without_local_paths(_as_dict(fed_config) or {})
    history = without_local_paths(list(history))
    algorithm = str(cfg.get("algorithm", "unknown"))
    uses_lora = _uses_lora(algorithm)
    adapter_config = _read_json(model_dir / "adapter_config.json") or {}
    model_config = _read_json(model_dir / "config.json") or {}
    base_path = adapter_config.get("base_model_name_or_path") or model_config.get("_name_or_path") or "BASE_MODEL"
    base = public_name(str(base_path))
    task = str(adapter_config.get("task_type") or ("SEQ_CLS" if _is_classifier(model_config) else "CAUSAL_LM"))
    pipeline_tag, auto_class = _TASKS.get(task, _TASKS["CAUSAL_LM"])
    done = max((int(r["round"]) for r in history), default=0)
    total = cfg.get("num_rounds", "?")
    comm = comm_summary(history)
    scores = final_scores(history)
    privacy = privacy_summary(history, cfg)
    name = repo_id or model_dir.name
    ref = revision or "main"
    data = ModelCardData(
        base_model=base,
        library_name="peft" if uses_lora else "transformers",
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(["fedsrd", "federated-learning", *(["lora", "peft"] if uses_lora else []), algorithm])),
    )
    base_ref = f"[`{base}`](https://huggingface.co/{base})" if "/" in base else f"`{base}`"
    what = f"A LoRA adapter for {base_ref}" if uses_lora else f"A full fine-tune of {base_ref}"
    where = "This revision is" if repo_id else f"This folder (`{model_dir.name}`) holds"
    lines = [
        f"# {name}",
        "",
        f"{what} trained by **{cfg.get('num_clients', '?')} clients** with federated learning (algorithm "
        f"**{algorithm}**, library fedsrd), none of them sharing its data. {where} the global "
        f"{'adapter' if uses_lora else 'model'} after **round {done} of {total}**.",
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
    lines += _algorithm_lines(algorithm)
    common = [k for k in COMMON_SETTINGS if uses_lora or k not in FULL_PARAMETER_SKIPPED]
    lines += [f"- `{key}`: {'all' if cfg[key] is None and key == 'clients_per_round' else cfg[key]}"
              for key in common if key in cfg]  # fmt: skip
    options = [(option, help) for option, help in algorithm_options(algorithm) if option in cfg]
    lines += ["", f"### Options of `{algorithm}`", ""]
    if options:
        lines += ["| option | value | meaning |", "|---|---|---|"]
        lines += [f"| `{option}` | {_value(cfg[option])} | {help.replace('|', '/')} |" for option, help in options]
    else:
        lines.append(f"`{algorithm}` has no options of its own.")
    table = _history_table(history)
    if len(table) > 22:  # long runs: fold the per-round table
        table = ["<details><summary>Every round</summary>", "", *table, "", "</details>"]
    lines += ["", *table, ""]
    lines += _usage_lines(model_dir, base, name, repo_id, ref, uses_lora, auto_class)
    if repo_id:
        lines += [f"`main` holds the latest round; every pushed round also has its own {round_refs} (`{revision}` is "
                  "this one). Prompts use the Alpaca template (`### Instruction:` / `### Input:` / `### Response:`).",
                  ""]  # fmt: skip
    else:
        lines += ["Prompts use the Alpaca template (`### Instruction:` / `### Input:` / `### Response:`).", ""]
    lines += [
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


def write_model_card(
    model_dir: str | Path, fed_config: Mapping[str, Any] | Any, history: Sequence[dict[str, Any]], **kwargs: Any
) -> Path:
    """Write `build_model_card`'s card as ``README.md`` in `model_dir` (replacing PEFT's template); its path."""
    path = Path(model_dir) / CARD_FILE
    build_model_card(model_dir, fed_config, history, **kwargs).save(path)
    return path


def _algorithm_lines(algorithm: str) -> list[str]:
    try:
        cls = get_algorithm_class(algorithm)
    except ValueError:
        return []
    described = [("Paper", cls.paper), ("Uploads", cls.uploads), ("Downloads", cls.downloads)]
    return [f"- {label}: {text}" for label, text in described if text]


def _usage_lines(
    model_dir: Path, base: str, name: str, repo_id: str | None, ref: str, uses_lora: bool, auto_class: str
) -> list[str]:
    revision = f', revision="{ref}"' if repo_id else ""
    if not uses_lora and not (model_dir / "config.json").is_file():  # a Flower server's folder: no model, the state
        return [
            "## Use it",
            "",
            "`global_state.safetensors` holds each trained weight's change from the shared initial weights; "
            "`fedsrd.FederatedTrainer.load_global_state` turns it into the model's weights on any party.",
            "",
        ]
    if not uses_lora:
        return [
            "## Use it with transformers",
            "",
            "```python",
            f"from transformers import {auto_class}, AutoTokenizer",
            "",
            f'model = {auto_class}.from_pretrained("{name}"{revision})',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}"{revision})',
            "```",
            "",
        ]
    return [
        "## Use it with plain PEFT",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f'base = {auto_class}.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        *_base_delta_lines(model_dir, name, repo_id, ref),
        f'model = PeftModel.from_pretrained(base, "{name}"{revision})',
        "```",
        "",
    ]


def _base_delta_lines(model_dir: Path, name: str, repo_id: str | None, ref: str) -> list[str]:
    """FLoRA / FedEx-LoRA also change the base weights: the card shows how to apply that change first."""
    if not (model_dir / BASE_DELTA_FILE).is_file():
        return []
    lines = ["# this algorithm also changed the base weights: apply that change before loading the adapter"]
    if repo_id:
        lines += [
            "from huggingface_hub import hf_hub_download",
            "from fedsrd.base_weights import add_base_delta",
            f'base = add_base_delta(base, hf_hub_download("{name}", "{BASE_DELTA_FILE}", revision="{ref}"))',
        ]
    else:
        lines += [
            "from fedsrd.base_weights import add_base_delta",
            f'base = add_base_delta(base, "{name}/{BASE_DELTA_FILE}")',
        ]
    return lines


# How epsilon was accounted, by sampling model (fedsrd.ops.privacy.accounting_summary; docs/privacy.md, "Accounting").
_ACCOUNTING_TEXT = {
    "full_participation": "every client every round: the Gaussian mechanism, epsilon for adding or removing one client",
    "fixed_size": "each round a fixed-size sample of clients without replacement, Wang et al., AISTATS 2019; "
                  "epsilon for replacing one client's data by another's",
    "poisson": "rounds accounted as Poisson-subsampled Gaussian mechanisms, epsilon for adding or removing one client: "
               "the usual approximation for this library's fixed-size client sample, not a guarantee for it",
}


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
        f"(dp-accounting; {_ACCOUNTING_TEXT[privacy['accounting']['sampling']]}).",
        "",
    ]
    if privacy["budget_exhausted"]:
        lines += ["Training stopped early: the next round would have exceeded `dp_stop_at_epsilon`.", ""]
    return lines


def _history_table(history: Sequence[dict[str, Any]]) -> list[str]:
    score_keys = headline_score_keys(list(dict.fromkeys(k for r in history for k in r)))[:4]
    if any(isinstance(r.get("dp_epsilon"), (int, float)) for r in history):
        score_keys = [*score_keys, "dp_epsilon"]
    head = ["round", "up MB / client", "down MB / client", "cumulative MB", "held-out loss", *score_keys]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in history:
        cells = [
            str(r["round"]),
            _mb(r.get("upload_mb_per_client")),
            _mb(r.get("download_mb_per_client")),
            _mb(r.get("cumulative_mb")),
            _num(r.get("eval_loss")),
            *(_num(r.get(k)) for k in score_keys),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _uses_lora(algorithm: str) -> bool:
    try:
        return bool(get_algorithm_class(algorithm).uses_lora)
    except ValueError:
        return True


def _is_classifier(model_config: Mapping[str, Any]) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in model_config.get("architectures") or ())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _as_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if is_dataclass(config):
        return asdict(config)
    return dict(config)


def _value(value: Any) -> str:
    return f"`{json.dumps(value)}`" if isinstance(value, (bool, type(None))) else str(value)


def _mb(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and value != value) else f"{value:.3f}"


def _num(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.4f}"
