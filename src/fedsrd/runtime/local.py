"""The simulation: every sampled client trains in turn on one model, every message is bytes.

The round loop is `fedsrd.federation.Federation`; this module is the simulation's `Transport` (clients trained by
this process, or shared out among the processes of an Accelerate team by `fedsrd.runtime.distributed`; the server
step on the main process) and its files (``history.json``, ``round_NNNN/``, ``final/``, checkpoints).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.trainer_utils import TrainOutput

from fedsrd import wire
from fedsrd.base_weights import BaseWeightWriter
from fedsrd.checkpoint import check_resume, load_checkpoint, prepare_output_dir, save_checkpoint
from fedsrd.client import FederatedClient
from fedsrd.federation import Delivery, Federation, Transport
from fedsrd.federation.client_store import DiskClientStore, read_snapshot, uses_disk_store
from fedsrd.federation.history import MB, start_record, write_history
from fedsrd.federation.sampling import sample_clients
from fedsrd.runtime.distributed import ProcessTeam, process_team
from fedsrd.server import FederatedServer, save_adapter

if TYPE_CHECKING:
    from fedsrd.server import RoundResult
    from fedsrd.trainer import FederatedTrainer

logger = logging.getLogger(__name__)

__all__ = ["MB", "SimulationTransport", "run_federation", "sample_clients"]

CLIENT_STATES = "client_states"  # <output_dir>/client_states/: on-disk client states; in checkpoints, their snapshot


class SimulationTransport(Transport):
    """The simulation's messages: the clients' phases on this process (or shared out among a team's processes), the
    server step once, the broadcast applied by every party's copy at once."""

    def __init__(
        self,
        trainer: FederatedTrainer,
        team: ProcessTeam,
        server: FederatedServer,
        client_view: FederatedClient,
        base_writer: BaseWeightWriter,
        out_dir: Path,
    ) -> None:
        self.trainer = trainer
        self.team = team
        self.server = server
        self.client_view = client_view
        self.base_writer = base_writer
        self.out_dir = out_dir
        self.is_main = trainer.args.process_index == 0
        self.can_evaluate = bool(trainer.eval_dataset)

    def deliver(self, round: int, clients: list[int]) -> Delivery:
        updates, dropped = self.team.train_clients(self.trainer, self.client_view, clients, round)
        return Delivery(updates=list(updates.values()), senders=list(updates), dropped=dropped)

    def server_step(self, round: int, delivery: Delivery, min_updates: int) -> RoundResult:
        return self.team.server_step(self.server, round, delivery.updates, min_updates=min_updates,
                                     senders=delivery.senders)

    def distribute(self, round: int, result: RoundResult) -> int:
        # The broadcast goes to every party, so all of them hold the current global adapter.
        trainer, view = self.trainer, self.client_view
        view.receive(result.broadcast)
        self.base_writer.add(view.base_delta)  # once per round: every client folds it into its own copy
        trainer.global_state = view.state  # the server's state, bit for bit (receive checked the digest)
        # What is evaluated and saved: the global adapter (FedSA-LoRA: with the mean of the clients' own B).
        trainer.load_global_state(trainer.algorithm.export_state(view.state, view.personal_states))
        return len(result.broadcast) * trainer.fed_config.num_clients

    def evaluate(self) -> dict[str, float]:
        return self.team.evaluate_global(self.trainer)

    def save(self, directory: Path) -> None:
        self.trainer.save_global_model(directory)  # adapter folder; full-parameter algorithms: model folder
        save_extras(self.trainer, self.client_view, self.base_writer, directory)

    def commit(self, round: int, history: list[dict[str, Any]]) -> None:
        if not self.is_main:
            return
        write_history(self.out_dir / "history.json", history)
        if self.trainer.fed_config.checkpoint:
            write_round_checkpoint(self.out_dir, round, self.server, self.client_view, self.base_writer, self.trainer)

    def finish(self, history: list[dict[str, Any]]) -> None:
        if not self.is_main:
            return
        self.save(self.out_dir / "final")
        plot_history(history, self.out_dir / "eval_loss_vs_mb.png")


def run_federation(trainer: FederatedTrainer) -> TrainOutput:
    """Run (or resume) the federation of `trainer` in this process, or as one process of an Accelerate team."""
    cfg = trainer.fed_config
    if cfg.secure_aggregation != "off":  # secure aggregation on Flower
        raise ValueError(
            f"FedSRDConfig.secure_aggregation={cfg.secure_aggregation!r} runs only on the Flower deployment runtime "
            "(fedsrd.integrations.flower, docs/flower.md): in the simulation one process trains every client and holds "
            "every update, so there is no one to hide an update from. Use secure_aggregation='off' here."
        )
    args = trainer.args
    out_dir = Path(args.output_dir)
    server = FederatedServer(trainer.algorithm, trainer.global_state, cfg)
    trainer.algorithm.shared_by_server_and_client = True  # the server and `client_view` below apply each broadcast
    # Every party starts from the same seeded adapter, so round 0 needs no bytes on the wire.
    client_view = FederatedClient(trainer.algorithm, dict(trainer.global_state), cfg)
    if uses_disk_store(cfg.client_state_store, cfg.num_clients, cfg.client_state_disk_threshold):
        # Clients' own tensors and residuals in files, not in this process's memory (one folder per process).
        stores = out_dir / CLIENT_STATES / f"process_{args.process_index}"
        client_view.personal_states = DiskClientStore(stores / "personal")
        client_view.memories = DiskClientStore(stores / "memory")
    base_writer = BaseWeightWriter(trainer.model)  # FLoRA, FedEx-LoRA: the merges into the (one) model's base
    team = process_team(trainer)  # this process alone, or under `accelerate launch` P processes sharing the clients
    transport = SimulationTransport(trainer, team, server, client_view, base_writer, out_dir)
    resume = cfg.resume or trainer.resume_requested
    if transport.is_main:
        prepare_output_dir(out_dir, resume=resume)  # a new run: old files go
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fed_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    first_round = 1
    if resume:
        resumed = restore_round_checkpoint(out_dir, server, client_view, base_writer, trainer)
        if resumed is not None:
            first_round = resumed + 1
            logger.info("resuming after round %d from %s", resumed, out_dir / "checkpoints")
    start = time.time()
    if trainer.eval_dataset and not trainer.history and cfg.eval_at_start:
        # Round 0: the starting point of every curve (no bytes have moved yet).
        trainer.history.append({**start_record(), **team.evaluate_global(trainer)})
    events = trainer.round_events(agree=team.agree)
    federation = Federation(cfg, transport, events, trainer.history, out_dir, trainer.base_learning_rate,
                            progress=not args.disable_tqdm)
    federation.run(first_round)
    final = trainer.history[-1]
    metrics = {k: v for k, v in final.items() if k.startswith("eval_")}
    metrics["train_runtime"] = time.time() - start
    metrics["total_mb"] = final["cumulative_mb"]
    metrics["num_processes"] = team.num_processes
    train_loss = final["train_loss"]
    return TrainOutput(
        global_step=final["round"], training_loss=float("nan") if train_loss is None else train_loss, metrics=metrics
    )


def write_round_checkpoint(
    out_dir: Path,
    round: int,
    server: FederatedServer,
    client_view: FederatedClient,
    base_writer: BaseWeightWriter,
    trainer: FederatedTrainer,
) -> None:
    """Everything a resumed run needs after `round`: global state, clients' own tensors, base-weight writes,
    error-feedback memories, history. Per-round randomness is derived from (seed, round, client), so no RNG state
    has to be kept."""
    tensors = {f"global/{k}": v for k, v in server.state.items()}
    on_disk = {kind: store for kind, store in _client_stores(client_view).items() if isinstance(store, DiskClientStore)}
    if not isinstance(client_view.personal_states, DiskClientStore):
        for cid, personal in client_view.personal_states.items():
            tensors.update({f"personal/{cid}/{k}": v for k, v in personal.items()})
    tensors.update({f"base/{k}": v for k, v in base_writer.checkpoint_tensors().items()})
    if not isinstance(client_view.memories, DiskClientStore):
        for cid, memory in client_view.memories.items():  # error feedback residuals (fedsrd_ef)
            tensors.update({f"memory/{cid}/{k}": v for k, v in memory.items()})
    tensors.update({f"server_memory/{k}": v for k, v in server.memory.items()})
    meta = {
        "runtime": "simulation",
        "fed_config": trainer.fed_config.to_dict(),
        "digest": wire.state_digest(server.state),
        "cumulative_mb": trainer.history[-1]["cumulative_mb"] if trainer.history else 0.0,
        "history": trainer.history,
    }

    def snapshot_stores(directory: Path) -> dict:  # on-disk client states: linked into the checkpoint, digests in meta
        snapshots = {kind: store.snapshot(directory / CLIENT_STATES / kind) for kind, store in on_disk.items()}
        return {CLIENT_STATES: snapshots}

    save_checkpoint(out_dir, round, tensors, meta, add_files=snapshot_stores if on_disk else None)


def _client_stores(client_view: FederatedClient) -> dict:
    return {"personal": client_view.personal_states, "memory": client_view.memories}


def _restore_client_states(client_view: FederatedClient, loaded: dict[str, dict[int, dict]], meta: dict) -> None:
    """Put the checkpoint's per-client states (tensors ``personal/``, ``memory/``, or on-disk snapshots) into the
    client view's stores, whichever kind each is now."""
    snapshots = meta.get(CLIENT_STATES, {})
    for kind, store in _client_stores(client_view).items():
        source = Path(meta["checkpoint_dir"]) / CLIENT_STATES / kind
        states = dict(sorted(loaded[kind].items()))
        if isinstance(store, DiskClientStore):
            store.restore(source, snapshots.get(kind, {}))
            for cid, state in states.items():
                store[cid] = state
        else:
            if kind in snapshots:
                states.update(read_snapshot(source, snapshots[kind]))
            setattr(client_view, "personal_states" if kind == "personal" else "memories", dict(sorted(states.items())))


def restore_round_checkpoint(
    out_dir: Path,
    server: FederatedServer,
    client_view: FederatedClient,
    base_writer: BaseWeightWriter,
    trainer: FederatedTrainer,
) -> int | None:
    """Load the last complete round's checkpoint into the roles and the model; its round, or None."""
    loaded = load_checkpoint(out_dir)
    if loaded is None:
        logger.warning("resume requested but %s has no checkpoint; starting from round 1", out_dir)
        return None
    round, tensors, meta = loaded
    if meta.get("runtime", "simulation") != "simulation":
        raise ValueError(
            f"resume: the checkpoint in {out_dir / 'checkpoints'} was written by the {meta['runtime']} runtime; the "
            "simulation resumes only its own checkpoints (they keep every client's tensors)."
        )
    check_resume(meta["fed_config"], trainer.fed_config.to_dict(), out_dir / "checkpoints")
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
    _restore_client_states(client_view, {"personal": personal, "memory": memories}, meta)
    base_writer.restore({k[len("base/") :]: v for k, v in tensors.items() if k.startswith("base/")})
    server.state, server.round = state, round
    client_view.state, client_view.round = dict(state), round
    trainer.global_state = state
    trainer.history = meta["history"]
    trainer.load_global_state(trainer.algorithm.export_state(state, client_view.personal_states))
    return round


def save_extras(
    trainer: FederatedTrainer, client_view: FederatedClient, base_writer: BaseWeightWriter, directory: Path
) -> None:
    """What a user needs beside the saved adapter to rebuild the run's model(s).

    ``base_delta.safetensors``: the base weights' total change, for algorithms that merge into them (FLoRA,
    FedEx-LoRA; `fedsrd.base_weights.add_base_delta`). ``personal/client_NNNN/``: each client's own adapter,
    the global tensors plus its personal ones (FedSA-LoRA: the shared A with that client's B), a plain PEFT folder.
    """
    base_writer.save(directory)
    if client_view.personal_states:
        peft_config = trainer.model.peft_config[trainer.model.active_adapter]
        for cid, personal in sorted(client_view.personal_states.items()):
            folder = directory / "personal" / f"client_{cid:04d}"
            save_adapter({**client_view.state, **personal}, folder)
            peft_config.save_pretrained(str(folder))


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
