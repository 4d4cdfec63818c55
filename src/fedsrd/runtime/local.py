"""The single-process simulation: every sampled client trains in turn on one model, every message is bytes."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm
from transformers.trainer_utils import TrainOutput

from fedsrd.client import BaseWeightWriter, FederatedClient
from fedsrd.ops import derive_seed
from fedsrd.server import FederatedServer

if TYPE_CHECKING:
    from fedsrd.trainer import FederatedTrainer

logger = logging.getLogger(__name__)
MB = 1024 * 1024


def sample_clients(seed: int, round: int, num_clients: int, per_round: int) -> list[int]:
    """The clients that train in `round`: all of them, or `per_round` drawn by (seed, round), in id order."""
    if per_round >= num_clients:
        return list(range(num_clients))
    import random

    rng = random.Random(derive_seed(seed, "sample", round))
    return sorted(rng.sample(range(num_clients), per_round))


def run_federation(trainer: FederatedTrainer) -> TrainOutput:
    cfg = trainer.fed_config
    args = trainer.args
    out_dir = Path(args.output_dir)
    server = FederatedServer(trainer.algorithm, trainer.global_state, cfg)
    # Every party starts from the same seeded adapter, so round 0 needs no bytes on the wire.
    client_view = FederatedClient(trainer.algorithm, dict(trainer.global_state), cfg)
    base_writer = BaseWeightWriter(trainer.model)  # FLoRA, FedEx-LoRA: the merges into the (one) model's base
    is_main = args.process_index == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fed_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    table = RoundTable(enabled=is_main)
    cumulative_mb = 0.0
    start = time.time()
    if trainer.eval_dataset and not trainer.history:
        # Round 0: the starting point of every curve (no bytes have moved yet).
        trainer.history.append(
            {"round": 0, "upload_bytes": 0, "download_bytes": 0, "cumulative_mb": 0.0, **evaluate_global(trainer)}
        )
        table.add(trainer.history[0])
    bar = tqdm(range(1, cfg.num_rounds + 1), desc="rounds", disable=not is_main or args.disable_tqdm)
    for round in bar:
        t0 = time.time()
        clients = sample_clients(cfg.seed, round, cfg.num_clients, cfg.sampled_per_round)
        trainer.call_round_event("on_round_begin", round=round, clients=clients)
        updates: list[bytes] = []
        for cid in clients:
            trainer.global_state = client_view.state
            trainer.load_global_state(client_view.start_state(cid))  # + this client's own tensors (FedSA-LoRA)
            output = trainer.local_train(cid, round)
            local_state = _adapter_state(trainer)
            client_view.keep_personal(cid, local_state)
            updates.append(
                client_view.make_update(
                    local_state,
                    round=round,
                    client_id=cid,
                    num_samples=len(trainer.client_datasets[cid]),
                    metrics={"train_loss": float(output.training_loss)},
                )
            )
        result = server.step(round, updates)
        # The broadcast goes to every party, so all of them hold the current global adapter.
        client_view.receive(result.broadcast)
        base_writer.add(client_view.base_delta)  # once per round: every client folds it into its own copy
        upload = sum(len(u) for u in updates)
        download = len(result.broadcast) * cfg.num_clients
        cumulative_mb += (upload + download) / MB
        trainer.global_state = server.state
        # What is evaluated and saved: the global adapter (FedSA-LoRA: with the mean of the clients' own B).
        trainer.load_global_state(trainer.algorithm.export_state(server.state, client_view.personal_states))
        record: dict[str, Any] = {
            "round": round,
            "clients": clients,
            "train_loss": result.metrics.get("train_loss", math.nan),
            "upload_bytes": upload,
            "download_bytes": download,
            "upload_mb_per_client": upload / MB / len(clients),
            "download_mb_per_client": download / MB / cfg.num_clients,
            "cumulative_mb": cumulative_mb,
            "rejected": result.rejected,
        }
        last = round == cfg.num_rounds
        if trainer.eval_dataset and ((cfg.eval_every and round % cfg.eval_every == 0) or last):
            record.update(evaluate_global(trainer))
        saved_dir = None
        if is_main and ((cfg.save_every and round % cfg.save_every == 0) or last):
            saved_dir = out_dir / f"round_{round:04d}"
            trainer.save_global_model(saved_dir)  # adapter folder; full-parameter algorithms: model folder
            save_extras(trainer, client_view, base_writer, saved_dir)
        if is_main and last:
            trainer.save_global_model(out_dir / "final")
            save_extras(trainer, client_view, base_writer, out_dir / "final")
        # Callbacks may add to the record (e.g. benchmark scores) before it is written to history.json.
        trainer.call_round_event("on_round_end", round=round, record=record, saved_dir=saved_dir, is_last=last)
        record["seconds"] = time.time() - t0
        trainer.history.append(record)
        if is_main:
            (out_dir / "history.json").write_text(json.dumps(trainer.history, indent=2))
        table.add(record)
        bar.set_postfix(loss=record["train_loss"], eval=record.get("eval_loss", float("nan")), mb=round_mb(record))
        trainer.callback_handler.on_log(args, trainer.state, trainer.control, _log_entry(record))
    if is_main:
        plot_history(trainer.history, out_dir / "eval_loss_vs_mb.png")
    final = trainer.history[-1]
    metrics = {k: v for k, v in final.items() if k.startswith("eval_")}
    metrics["train_runtime"] = time.time() - start
    metrics["total_mb"] = cumulative_mb
    return TrainOutput(global_step=cfg.num_rounds, training_loss=final["train_loss"], metrics=metrics)


def save_extras(
    trainer: FederatedTrainer, client_view: FederatedClient, base_writer: BaseWeightWriter, directory: Path
) -> None:
    """What a user needs beside the saved adapter to rebuild the run's model(s).

    ``base_delta.safetensors``: the base weights' total change, for algorithms that merge into them (FLoRA,
    FedEx-LoRA; `fedsrd.client.add_base_delta`). ``personal/client_NNNN/``: each client's own adapter, the global
    tensors plus its personal ones (FedSA-LoRA: the shared A with that client's B), a plain PEFT adapter folder.
    """
    from fedsrd.server import save_adapter

    base_writer.save(directory)
    if client_view.personal_states:
        peft_config = trainer.model.peft_config[trainer.model.active_adapter]
        for cid, personal in sorted(client_view.personal_states.items()):
            folder = directory / "personal" / f"client_{cid:04d}"
            save_adapter({**client_view.state, **personal}, folder)
            peft_config.save_pretrained(str(folder))


def _adapter_state(trainer: FederatedTrainer) -> dict:
    return trainer.local_state()  # the adapter; full-parameter algorithms: weight changes + optimizer state


def evaluate_global(trainer: FederatedTrainer) -> dict[str, float]:
    """Held-out loss of the global adapter on each eval set, and their mean as `eval_loss`."""
    scores: dict[str, float] = {}
    for name, ds in trainer.eval_dataset.items():
        metrics = trainer.evaluate(eval_dataset=ds, metric_key_prefix=f"eval_{name}")
        scores[f"eval_{name}_loss"] = float(metrics[f"eval_{name}_loss"])
        if f"eval_{name}_accuracy" in metrics:  # sequence classifiers
            scores[f"eval_{name}_accuracy"] = float(metrics[f"eval_{name}_accuracy"])
    losses = [v for k, v in scores.items() if k.endswith("_loss")]
    scores["eval_loss"] = sum(losses) / len(losses)
    accuracies = [v for k, v in scores.items() if k.endswith("_accuracy")]
    if accuracies:
        scores["eval_accuracy"] = sum(accuracies) / len(accuracies)
    return scores


def round_mb(record: dict) -> float:
    return (record["upload_bytes"] + record["download_bytes"]) / MB


def _log_entry(record: dict) -> dict[str, float]:
    keys = ("round", "train_loss", "eval_loss", "upload_bytes", "download_bytes", "cumulative_mb")
    entry = {f"fed/{k}": float(record[k]) for k in keys if k in record}
    entry.update({f"fed/{k}": float(v) for k, v in record.items() if k.startswith("eval_") and k != "eval_loss"})
    return entry


class RoundTable:
    """Prints one row per round: train loss, held-out loss per domain, upload and download MB."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.columns: list[str] | None = None

    def add(self, record: dict) -> None:
        if not self.enabled:
            return
        evals = [k for k in record if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss"]
        if self.columns is None:
            self.columns = ["round", "train_loss", *evals, "eval_loss", "up_MB", "down_MB"]
            tqdm.write(" | ".join(f"{c:>12}" for c in self.columns))
        values = {
            **record,
            "train_loss": record.get("train_loss", math.nan),
            "up_MB": record["upload_bytes"] / MB,
            "down_MB": record["download_bytes"] / MB,
        }
        cells = []
        for c in self.columns:
            v = values.get(c)
            cells.append(f"{v:>12}" if isinstance(v, int) else f"{v:>12.4f}" if isinstance(v, float) else f"{'-':>12}")
        tqdm.write(" | ".join(cells))


def plot_history(history: list[dict], path: Path) -> None:
    """PNG of held-out loss against cumulative MB (upload + download, all clients)."""
    points = [(r["cumulative_mb"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel("cumulative communication (MB, up + down)")
    ax.set_ylabel("held-out loss (mean over eval sets)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
