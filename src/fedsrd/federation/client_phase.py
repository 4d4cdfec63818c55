"""The client phase, written once for the simulation, the Accelerate team and the Flower node: load the global state
with this client's own tensors, run the local phase (Trainer's loop), encode the update, keep what stays on the
client (its personal tensors; its error-feedback memory is kept by `FederatedClient.make_update`)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsrd.client import FederatedClient
    from fedsrd.trainer import FederatedTrainer

logger = logging.getLogger(__name__)


def client_phase(
    trainer: FederatedTrainer, client: FederatedClient, client_id: int, round: int
) -> tuple[bytes, dict[str, float]]:
    """One client's local phase from `client`'s global copy; (encoded update, metrics). Personal tensors are kept in
    `client.personal_states` only once the update is encoded (a failing phase leaves them as they were)."""
    trainer.global_state = client.state
    cfg = client.config
    trainer.use_client_rank(cfg.client_rank(client_id) if cfg.client_lora_ranks is not None else None)
    try:  # this client's own LoRA rank (client_lora_ranks): its adapter is active for the local phase only
        trainer.load_global_state(client.start_state(client_id))  # + this client's own tensors (FedSA-LoRA)
        output = trainer.local_train(client_id, round)
        local_state = trainer.local_state()  # the adapter; full-parameter algorithms: weight changes + optimizer state
    finally:
        trainer.use_client_rank(None)
    num_samples = len(trainer.client_datasets[client_id])
    metrics = {"train_loss": float(output.training_loss)}
    update = client.make_update(local_state, round=round, client_id=client_id, num_samples=num_samples, metrics=metrics)
    client.keep_personal(client_id, local_state)
    return update, {**metrics, "num_examples": float(num_samples)}


def train_clients(
    trainer: FederatedTrainer, client: FederatedClient, clients: list[int], round: int
) -> tuple[dict[int, bytes], dict[str, str]]:
    """Each client's phase in turn: the encoded updates by client id, and the dropped clients' reasons. A client that
    raises or overruns `client_timeout_s` is dropped (its update and personal tensors discarded), the others go on."""
    timeout = trainer.fed_config.client_timeout_s
    updates: dict[int, bytes] = {}
    dropped: dict[str, str] = {}
    for cid in clients:
        t0 = time.time()
        personal_before = client.personal_states.get(cid)
        memory_before = client.memories.get(cid)
        try:
            update, _ = client_phase(trainer, client, cid, round)
        except Exception as err:  # a failing client must not take the federation down
            dropped[str(cid)] = f"{type(err).__name__}: {err}"
            logger.warning("round %d: client %d dropped: %s", round, cid, dropped[str(cid)])
            continue
        elapsed = time.time() - t0
        if timeout is not None and elapsed > timeout:
            _put_back(client.personal_states, cid, personal_before)
            _put_back(client.memories, cid, memory_before)
            dropped[str(cid)] = f"timed out ({elapsed:.1f} s > client_timeout_s={timeout:g})"
            logger.warning("round %d: client %d dropped: %s", round, cid, dropped[str(cid)])
            continue
        updates[cid] = update
    return updates, dropped


def _put_back(states: dict, cid: int, before) -> None:
    if before is None:
        states.pop(cid, None)
    else:
        states[cid] = before
