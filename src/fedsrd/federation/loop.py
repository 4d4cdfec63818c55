"""The round loop, written once: every runtime (simulation, Accelerate team, Flower coordinator) runs `Federation.run`
and provides only a `Transport`, how messages travel and where its files go.

One round:

    sample clients (fedsrd.federation.sampling) -> on_round_begin -> Transport.deliver (the clients' local phases,
    their encoded updates) -> Transport.server_step (retried with a fresh sample while fewer than min_clients usable
    updates arrive) -> Transport.distribute (the broadcast) -> the round's record (fedsrd.federation.history) ->
    evaluation and round_NNNN/ when due -> on_round_end (control honoured) -> the saved folder's model card
    (fedsrd.model_card) -> Transport.commit (history.json, checkpoint)

and after the last round (or the round a callback stopped the federation): Transport.finish (final/, Flower's final
sync), final/'s model card, then ``on_train_end``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from fedsrd.config import FedSRDConfig
from fedsrd.federation.callbacks import RoundEvents
from fedsrd.federation.history import MB, RoundTable, per_client_costs, round_mb, round_record, total_mb
from fedsrd.federation.sampling import sample_clients
from fedsrd.model_card import write_model_card
from fedsrd.schedule import round_learning_rate

if TYPE_CHECKING:
    from fedsrd.server import RoundResult

logger = logging.getLogger(__name__)


@dataclass
class Delivery:
    """What a transport brought back from one round's sampled clients."""

    updates: list[bytes]  # encoded updates, in client-id order
    senders: list[int]  # the client each update came from
    dropped: dict[str, str] = field(default_factory=dict)  # sampled clients whose update never arrived: why
    rejected: dict[str, str] = field(default_factory=dict)  # replies that arrived but were refused: why
    download_bytes: int = 0  # bytes sent to the clients before they trained (Flower's catch-up)
    transport: dict[str, Any] = field(default_factory=dict)  # what only this transport knows, for the record
    # Where the uploads are not `updates` (secure aggregation: masked vectors and protocol messages): their bytes/count.
    upload_bytes: int | None = None
    num_uploads: int | None = None


class Transport(ABC):
    """How one runtime moves a round's messages and writes its files. `Federation.run` calls these in order."""

    is_main: bool = True  # this process writes the files (false on the other processes of an Accelerate team)
    can_evaluate: bool = False  # it holds a model and eval sets

    @abstractmethod
    def deliver(self, round: int, clients: list[int]) -> Delivery:
        """Have `clients` train from the current global state; their encoded updates."""

    @abstractmethod
    def server_step(self, round: int, delivery: Delivery, min_updates: int) -> RoundResult:
        """`FederatedServer.step` on the delivered updates (RuntimeError if fewer than `min_updates` are usable)."""

    @abstractmethod
    def distribute(self, round: int, result: RoundResult) -> int:
        """Hand the broadcast to the clients (now, or whenever each next needs it); the bytes sent now."""

    def evaluate(self) -> dict[str, float]:
        """Held-out scores of the global model, ``eval_*`` keys (only called where `can_evaluate`)."""
        return {}

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the global model (adapter folder, or what the runtime has) to `directory`."""

    @abstractmethod
    def commit(self, round: int, history: list[dict[str, Any]]) -> None:
        """After a round's record is final: write ``history.json`` and the checkpoint."""

    @abstractmethod
    def finish(self, history: list[dict[str, Any]]) -> None:
        """After the last round: the final save (and whatever else ends the run); may amend the last record."""


class Federation:
    """The rounds of one federation: sampling, retries, records, evaluation/saving policy and callbacks."""

    def __init__(
        self,
        config: FedSRDConfig,
        transport: Transport,
        events: RoundEvents,
        history: list[dict[str, Any]],
        out_dir: Path,
        base_learning_rate: float,
        progress: bool = False,
    ) -> None:
        self.config = config
        self.transport = transport
        self.events = events
        self.history = history
        self.out_dir = Path(out_dir)
        self.base_learning_rate = base_learning_rate
        self.progress = progress
        self.table = RoundTable(enabled=transport.is_main, epsilon=config.dp_mode != "off")
        for record in history:
            self.table.add(record)

    def run(self, first_round: int) -> list[dict[str, Any]]:
        """Rounds `first_round`..num_rounds (fewer if a callback stops the federation); the history."""
        cfg = self.config
        self.check_privacy_budget(first_round)
        self.events.train_begin()
        bar = tqdm(
            range(first_round, cfg.num_rounds + 1), desc="rounds", initial=first_round - 1, total=cfg.num_rounds,
            disable=not (self.transport.is_main and self.progress),
        )  # fmt: skip
        for round in bar:
            record = self.run_round(round)
            bar.set_postfix(loss=record["train_loss"], eval=record.get("eval_loss"), mb=round_mb(record))
            if record["should_training_stop"]:
                if round < cfg.num_rounds and self.transport.is_main and not record.get("dp_budget_exhausted"):
                    logger.warning("a callback stopped the federation after round %d of %d", round, cfg.num_rounds)
                break
        bar.close()
        self.transport.finish(self.history)
        final = self.out_dir / "final"
        if self.transport.is_main and final.is_dir():
            write_model_card(final, self.config, self.history)
        self.events.train_end()
        return self.history

    def run_round(self, round: int) -> dict[str, Any]:
        cfg = self.config
        t0 = time.time()
        upload = download = uploads = 0
        for attempt in range(cfg.round_retries + 1):
            clients = sample_clients(cfg.seed, round, cfg.num_clients, cfg.sampled_per_round, attempt)
            self.events.call("on_round_begin", round=round, clients=clients)
            delivery = self.transport.deliver(round, clients)
            upload += sum(len(u) for u in delivery.updates) if delivery.upload_bytes is None else delivery.upload_bytes
            download += delivery.download_bytes
            uploads += len(delivery.updates) if delivery.num_uploads is None else delivery.num_uploads
            try:
                result = self.transport.server_step(round, delivery, cfg.min_clients)
                break
            except RuntimeError as err:  # too few usable updates; the server state is unchanged
                if attempt == cfg.round_retries:
                    raise RuntimeError(
                        f"round {round}: fewer than min_clients={cfg.min_clients} usable updates after "
                        f"{attempt + 1} attempt(s); dropped clients: {delivery.dropped}; {err}. The last complete "
                        f"round's checkpoint is in {self.out_dir / 'checkpoints'} (resume to continue)."
                    ) from err
                logger.warning(
                    "round %d: %s; retrying with a fresh sample (%d/%d)", round, err, attempt + 1, cfg.round_retries
                )
        download += self.transport.distribute(round, result)
        rejected = dict(delivery.rejected)
        for key, reason in result.rejected.items():  # keyed by sender ("3"), or "client 3" if it broke the step
            rejected[key.removeprefix("client ")] = reason
        lr = round_learning_rate(
            cfg.round_lr_scheduler, self.base_learning_rate, round, cfg.num_rounds, cfg.round_lr_min
        )
        record = round_record(
            round=round, clients=clients, accepted=result.accepted, rejected=rejected, dropped=delivery.dropped,
            train_loss=result.metrics.get("train_loss"), learning_rate=lr, upload_bytes=upload,
            download_bytes=download, broadcast_bytes=len(result.broadcast), num_uploads=uploads,
            cumulative_mb=total_mb(self.history) + (upload + download) / MB, robust=result.robust,
            transport=delivery.transport, dp_epsilon=cfg.dp_epsilon_after(round),
            dp_delta=None if cfg.dp_mode == "off" else cfg.dp_delta, dp_accounting=cfg.dp_accounting,
            per_client=per_client_costs(
                delivery.senders,
                delivery.updates if len(delivery.updates) == len(delivery.senders) else [None] * len(delivery.senders),
                {cid: cfg.client_rank(cid) for cid in delivery.senders
                 if cfg.client_lora_ranks is not None and 0 <= cid < cfg.num_clients},
                result.download_bytes_by_rank, result.trainable_bytes_by_rank,
            ),
        )  # fmt: skip
        last = round == cfg.num_rounds
        if self.transport.can_evaluate and ((cfg.eval_every and round % cfg.eval_every == 0) or last):
            record.update(self.transport.evaluate())
        saved_dir = None
        if self.transport.is_main and ((cfg.save_every and round % cfg.save_every == 0) or last):
            saved_dir = self.out_dir / f"round_{round:04d}"
            self.transport.save(saved_dir)
        # Callbacks may add to the record (e.g. benchmark scores) before it is written to history.json.
        self.events.call("on_round_end", round=round, record=record, saved_dir=saved_dir, is_last=last)
        if saved_dir is not None and "hub_commit" not in record:  # a Hub push already wrote the card it published
            write_model_card(saved_dir, cfg, [*self.history, record])
        record["should_training_stop"] = self.events.should_stop()
        if self.budget_spent_before(round + 1) and not last:
            record["dp_budget_exhausted"] = record["should_training_stop"] = True
            if self.transport.is_main:
                logger.warning(
                    "round %d: privacy budget: epsilon %.4g now, round %d would take it to %.4g > dp_stop_at_epsilon "
                    "%g; the federation ends here", round, record["dp_epsilon"], round + 1,
                    cfg.dp_epsilon_after(round + 1), cfg.dp_stop_at_epsilon,
                )  # fmt: skip
        record["seconds"] = time.time() - t0
        self.history.append(record)
        self.transport.commit(round, self.history)
        self.table.add(record)
        self.events.call("on_log", logs=log_entry(record))
        return record


    # ---- differential privacy (docs/privacy.md) -----------------------------------------------------------------
    def budget_spent_before(self, round: int) -> bool:
        """Whether running `round` would take epsilon above dp_stop_at_epsilon."""
        cfg = self.config
        if cfg.dp_mode == "off" or cfg.dp_stop_at_epsilon is None:
            return False
        return cfg.dp_epsilon_after(round) > cfg.dp_stop_at_epsilon

    def check_privacy_budget(self, first_round: int) -> None:
        """Before any training: the noise multiplier resolves (dp_target_epsilon reachable) and the budget allows the
        first round to run."""
        cfg = self.config
        if cfg.dp_mode == "off":
            return
        z = cfg.resolved_dp_noise_multiplier  # raises ValueError if dp_target_epsilon cannot be met
        if self.budget_spent_before(first_round):
            raise ValueError(
                f"FedSRDConfig.dp_stop_at_epsilon: round {first_round} would take epsilon to "
                f"{cfg.dp_epsilon_after(first_round):.4g} > {cfg.dp_stop_at_epsilon:g} (noise multiplier {z:.4g}, "
                f"sampling rate {cfg.dp_sampling_rate:.4g}); no round can run within the budget."
            )
        if self.transport.is_main:
            how = cfg.dp_accounting
            logger.info(
                "differential privacy (%s): noise multiplier %.4g, clip %g, sampling rate %.4g; epsilon after %d "
                "rounds: %.4g at delta %g (%s accountant, %s sampling, %s adjacency)", cfg.dp_mode, z, cfg.dp_clip_norm,
                cfg.dp_sampling_rate, cfg.num_rounds, cfg.dp_epsilon_after(cfg.num_rounds), cfg.dp_delta,
                how["accountant"], how["sampling"], how["neighboring"],
            )  # fmt: skip


def log_entry(record: dict[str, Any]) -> dict[str, float]:
    """A round's metrics as ``fed/*`` numbers for `on_log` (experiment trackers)."""
    keys = ("round", "train_loss", "eval_loss", "upload_bytes", "download_bytes", "cumulative_mb", "dp_epsilon")
    entry = {f"fed/{k}": float(record[k]) for k in keys if isinstance(record.get(k), int | float)}
    entry.update({f"fed/{k}": float(v) for k, v in record.items() if k.startswith("eval_") and k != "eval_loss"})
    entry.update(
        {
            f"fed/{k}": float(v)
            for k, v in record.items()
            if k.startswith("lm_eval/") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    return entry
