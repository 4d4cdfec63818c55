"""The simulation's round loop: every sampled client trains in turn on one model, every message is bytes.

Under `accelerate launch --num_processes P` every process runs this same loop, and `fedsrd.runtime.distributed` shares
each round's clients (and the eval sets) out between them; the server step runs on the main process.
"""

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
from fedsrd.runtime.distributed import process_team
from fedsrd.server import FederatedServer

if TYPE_CHECKING:
    from fedsrd.trainer import FederatedTrainer

logger = logging.getLogger(__name__)
MB = 1024 * 1024


def sample_clients(seed: int, round: int, num_clients: int, per_round: int, attempt: int = 0) -> list[int]:
    """The clients that train in `round`: all of them, or `per_round` drawn by (seed, round[, retry]), in id order."""
    if per_round >= num_clients:
        return list(range(num_clients))
    import random

    parts = ("sample", round) if attempt == 0 else ("sample", round, "retry", attempt)
    rng = random.Random(derive_seed(seed, *parts))
    return sorted(rng.sample(range(num_clients), per_round))


def train_clients(
    trainer: FederatedTrainer, client_view: FederatedClient, clients: list[int], round: int
) -> tuple[list[bytes], dict[str, str]]:
    """Each client's local phase and encoded update. A client that raises or overruns `client_timeout_s` is dropped
    (with the reason), and the others go on."""
    cfg = trainer.fed_config
    updates: list[bytes] = []
    dropped: dict[str, str] = {}
    for cid in clients:
        t0 = time.time()
        try:
            trainer.global_state = client_view.state
            trainer.load_global_state(client_view.start_state(cid))  # + this client's own tensors (FedSA-LoRA)
            output = trainer.local_train(cid, round)
            local_state = _adapter_state(trainer)
            update = client_view.make_update(
                local_state,
                round=round,
                client_id=cid,
                num_samples=len(trainer.client_datasets[cid]),
                metrics={"train_loss": float(output.training_loss)},
            )
        except Exception as err:  # a failing client must not take the federation down
            dropped[str(cid)] = f"{type(err).__name__}: {err}"
            logger.warning("round %d: client %d dropped: %s", round, cid, dropped[str(cid)])
            continue
        elapsed = time.time() - t0
        if cfg.client_timeout_s is not None and elapsed > cfg.client_timeout_s:
            dropped[str(cid)] = f"timed out ({elapsed:.1f} s > client_timeout_s={cfg.client_timeout_s:g})"
            logger.warning("round %d: client %d dropped: %s", round, cid, dropped[str(cid)])
            continue
        client_view.keep_personal(cid, local_state)
        updates.append(update)
    return updates, dropped


def run_federation(trainer: FederatedTrainer) -> TrainOutput:
    cfg = trainer.fed_config
    args = trainer.args
    out_dir = Path(args.output_dir)
    server = FederatedServer(trainer.algorithm, trainer.global_state, cfg)
    # Every party starts from the same seeded adapter, so round 0 needs no bytes on the wire.
    client_view = FederatedClient(trainer.algorithm, dict(trainer.global_state), cfg)
    base_writer = BaseWeightWriter(trainer.model)  # FLoRA, FedEx-LoRA: the merges into the (one) model's base
    is_main = args.process_index == 0
    team = process_team(trainer)  # this process alone, or under `accelerate launch` P processes sharing the clients
    if is_main:
        from fedsrd.checkpoint import prepare_output_dir

        prepare_output_dir(out_dir, resume=cfg.resume or trainer.resume_requested)  # a new run: old files go
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fed_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    table = RoundTable(enabled=is_main)
    cumulative_mb = 0.0
    first_round = 1
    if cfg.resume or trainer.resume_requested:
        resumed = restore_round_checkpoint(out_dir, server, client_view, base_writer, trainer)
        if resumed is not None:
            first_round, cumulative_mb = resumed[0] + 1, resumed[1]
            logger.info("resuming after round %d from %s", resumed[0], out_dir / "checkpoints")
    start = time.time()
    if trainer.eval_dataset and not trainer.history and cfg.eval_at_start:
        # Round 0: the starting point of every curve (no bytes have moved yet).
        trainer.history.append(
            {"round": 0, "upload_bytes": 0, "download_bytes": 0, "cumulative_mb": 0.0, **team.evaluate_global(trainer)}
        )
        table.add(trainer.history[0])
    bar = tqdm(
        range(first_round, cfg.num_rounds + 1),
        desc="rounds",
        initial=first_round - 1,
        total=cfg.num_rounds,
        disable=not is_main or args.disable_tqdm,
    )
    for round in bar:
        t0 = time.time()
        upload = 0
        for attempt in range(cfg.round_retries + 1):
            clients = sample_clients(cfg.seed, round, cfg.num_clients, cfg.sampled_per_round, attempt)
            trainer.call_round_event("on_round_begin", round=round, clients=clients)
            updates, dropped = team.train_clients(trainer, client_view, clients, round)
            upload += sum(len(u) for u in updates)
            try:
                result = team.server_step(server, round, updates, min_updates=cfg.min_clients)  # on the main process
                break
            except RuntimeError as err:  # too few valid updates; the state is unchanged
                if attempt == cfg.round_retries:
                    raise RuntimeError(
                        f"round {round}: fewer than min_clients={cfg.min_clients} usable updates after "
                        f"{attempt + 1} attempt(s); dropped clients: {dropped}; {err}. The last complete round's "
                        f"checkpoint is in {out_dir / 'checkpoints'} (rerun with --resume true)."
                    ) from err
                logger.warning("round %d: %s; retrying with a fresh sample (%d/%d)", round, err, attempt + 1,
                               cfg.round_retries)
        # The broadcast goes to every party, so all of them hold the current global adapter.
        client_view.receive(result.broadcast)
        base_writer.add(client_view.base_delta)  # once per round: every client folds it into its own copy
        download = len(result.broadcast) * cfg.num_clients
        cumulative_mb += (upload + download) / MB
        trainer.global_state = client_view.state  # the server's state, bit for bit (receive checked the digest)
        # What is evaluated and saved: the global adapter (FedSA-LoRA: with the mean of the clients' own B).
        trainer.load_global_state(trainer.algorithm.export_state(client_view.state, client_view.personal_states))
        record: dict[str, Any] = {
            "round": round,
            "clients": clients,
            "train_loss": result.metrics.get("train_loss", math.nan),
            "learning_rate": trainer.round_learning_rate(round),
            "upload_bytes": upload,
            "download_bytes": download,
            "upload_mb_per_client": upload / MB / len(clients),
            "download_mb_per_client": download / MB / cfg.num_clients,
            "cumulative_mb": cumulative_mb,
            "rejected": result.rejected,
            "dropped": dropped,
        }
        last = round == cfg.num_rounds
        if trainer.eval_dataset and ((cfg.eval_every and round % cfg.eval_every == 0) or last):
            record.update(team.evaluate_global(trainer))
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
            if cfg.checkpoint:
                write_round_checkpoint(out_dir, round, server, client_view, base_writer, trainer, cumulative_mb)
        table.add(record)
        bar.set_postfix(loss=record["train_loss"], eval=record.get("eval_loss", float("nan")), mb=round_mb(record))
        trainer.callback_handler.on_log(args, trainer.state, trainer.control, _log_entry(record))
    if is_main:
        plot_history(trainer.history, out_dir / "eval_loss_vs_mb.png")
    final = trainer.history[-1]
    metrics = {k: v for k, v in final.items() if k.startswith("eval_")}
    metrics["train_runtime"] = time.time() - start
    metrics["total_mb"] = cumulative_mb
    metrics["num_processes"] = team.num_processes
    return TrainOutput(global_step=cfg.num_rounds, training_loss=final["train_loss"], metrics=metrics)


def write_round_checkpoint(
    out_dir: Path,
    round: int,
    server: FederatedServer,
    client_view: FederatedClient,
    base_writer: BaseWeightWriter,
    trainer: FederatedTrainer,
    cumulative_mb: float,
) -> None:
    """Everything a resumed run needs after `round`: global state, clients' own tensors, base-weight writes, history.

    Per-round randomness is derived from (seed, round, client), so no RNG state has to be kept.
    """
    from fedsrd import wire
    from fedsrd.checkpoint import save_checkpoint

    tensors = {f"global/{k}": v for k, v in server.state.items()}
    for cid, personal in client_view.personal_states.items():
        tensors.update({f"personal/{cid}/{k}": v for k, v in personal.items()})
    tensors.update({f"base/{k}": v for k, v in base_writer.checkpoint_tensors().items()})
    for cid, memory in client_view.memories.items():  # error feedback residuals (fedsrd_ef)
        tensors.update({f"memory/{cid}/{k}": v for k, v in memory.items()})
    tensors.update({f"server_memory/{k}": v for k, v in server.memory.items()})
    meta = {
        "fed_config": trainer.fed_config.to_dict(),
        "digest": wire.state_digest(server.state),
        "cumulative_mb": cumulative_mb,
        "history": trainer.history,
    }
    save_checkpoint(out_dir, round, tensors, meta)


def restore_round_checkpoint(
    out_dir: Path,
    server: FederatedServer,
    client_view: FederatedClient,
    base_writer: BaseWeightWriter,
    trainer: FederatedTrainer,
) -> tuple[int, float] | None:
    """Load the last complete round's checkpoint into the roles and the model; (round, cumulative MB) or None."""
    from fedsrd import wire
    from fedsrd.checkpoint import load_checkpoint

    loaded = load_checkpoint(out_dir)
    if loaded is None:
        logger.warning("resume requested but %s has no checkpoint; starting from round 1", out_dir)
        return None
    round, tensors, meta = loaded
    saved, current = meta["fed_config"], trainer.fed_config.to_dict()
    for key in ("algorithm", "num_clients", "clients_per_round", "fed_seed", "lora_r", "lora_target_modules"):
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"resume: the checkpoint in {out_dir} was written with {key}={saved.get(key)!r}, but this run has "
                f"{key}={current.get(key)!r}; use the same settings or another output_dir."
            )
    state = {k[len("global/") :]: v for k, v in tensors.items() if k.startswith("global/")}
    if wire.state_digest(state) != meta["digest"]:
        raise ValueError(f"resume: checkpoint round {round} in {out_dir} fails its digest check.")
    personal: dict[int, dict] = {}
    memories: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(("personal/", "memory/")):
            kind, cid, name = key.split("/", 2)
            (personal if kind == "personal" else memories).setdefault(int(cid), {})[name] = value
    server.memory = {k[len("server_memory/") :]: v for k, v in tensors.items() if k.startswith("server_memory/")}
    client_view.memories = dict(sorted(memories.items()))
    base_writer.restore({k[len("base/") :]: v for k, v in tensors.items() if k.startswith("base/")})
    server.state, server.round = state, round
    client_view.state, client_view.round = dict(state), round
    client_view.personal_states = dict(sorted(personal.items()))
    trainer.global_state = state
    trainer.history = meta["history"]
    trainer.load_global_state(trainer.algorithm.export_state(state, personal))
    return round, float(meta["cumulative_mb"])


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
    return summarize_eval(evaluate_sets(trainer, list(trainer.eval_dataset)))


def evaluate_sets(trainer: FederatedTrainer, names: list[str]) -> dict[str, float]:
    """Held-out loss (and accuracy, for sequence classifiers) of the model as loaded on the eval sets `names`."""
    scores: dict[str, float] = {}
    for name in names:
        metrics = trainer.evaluate(eval_dataset=trainer.eval_dataset[name], metric_key_prefix=f"eval_{name}")
        scores[f"eval_{name}_loss"] = float(metrics[f"eval_{name}_loss"])
        if f"eval_{name}_accuracy" in metrics:  # sequence classifiers
            scores[f"eval_{name}_accuracy"] = float(metrics[f"eval_{name}_accuracy"])
    return scores


def summarize_eval(scores: dict[str, float]) -> dict[str, float]:
    """Per-set scores (in the eval sets' order) with their means added: `eval_loss`, and `eval_accuracy`."""
    scores = dict(scores)
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
    entry.update({f"fed/{k}": float(v) for k, v in record.items()
                  if k.startswith("lm_eval/") and isinstance(v, (int, float)) and not isinstance(v, bool)})
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
