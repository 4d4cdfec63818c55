"""One data owner's side of a federation on an engine: its data, model and `FederatedTrainer`, and on its own disk
its copy of the global state.

Engine-neutral: the Flower ClientApp (`fedsrd.integrations.flower`) hands it plain dicts and bytes. The node's files
live in ``<state-dir>/<federation id>/client_NNNN/``, so a process that starts fresh for every message (Flower's
deployment runtime does that), a restarted SuperNode, or a resumed run finds the state it held:

    global_state.safetensors    its copy of the global adapter; metadata: round, digest
    personal.safetensors        its client-kept tensors (`Algorithm.personal`, FedSA-LoRA), if any
    adapter_config.json         the PEFT config every party shares
    base_log/round_NNNN.bin     broadcasts it applied (algorithms that write base weights: FLoRA, FedEx-LoRA), replayed
                                onto the freshly loaded base weights before training
    adapter/                    after the run: this client's adapter (global + personal tensors), a PEFT folder
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from fedsrd import wire
from fedsrd.algorithms import State, get_algorithm
from fedsrd.base_weights import BaseWeightWriter
from fedsrd.build import build_trainer, load_data
from fedsrd.client import FederatedClient
from fedsrd.federation.client_phase import client_phase
from fedsrd.federation.files import atomic_write_bytes
from fedsrd.integrations.catchup import OutOfSync, apply_catch_up, encode_full_state
from fedsrd.integrations.settings import RunSettings
from fedsrd.ops.aligned import aligned

if TYPE_CHECKING:
    from fedsrd.trainer import FederatedTrainer

logger = logging.getLogger(__name__)

STATE_DIR_ENV = "FEDSRD_NODE_STATE_DIR"
_FEDERATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def default_state_dir() -> Path:
    """``$FEDSRD_NODE_STATE_DIR``, else ``$FLWR_HOME/fedsrd-state``, else ``~/.flwr/fedsrd-state``."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "fedsrd-state"


def node_client_id(node_config: Mapping[str, Any], num_clients: int) -> int:
    """This node's client id: node config ``client-id``, else ``partition-id`` (what Flower's simulation sets)."""
    key = next((k for k in ("client-id", "partition-id") if k in node_config), None)
    if key is None:
        raise ValueError(
            "node config: expected 'partition-id' (this data owner's client id, 0..num_clients-1), e.g. "
            "flower-supernode --node-config 'partition-id=0 num-partitions=2'."
        )
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).lstrip("-").isdigit():
        raise ValueError(f"node config {key!r}: expected an integer, got {value!r}.")
    client_id = int(value)
    if not 0 <= client_id < num_clients:
        raise ValueError(f"node config {key!r}: expected 0..{num_clients - 1} (num_clients - 1), got {client_id}.")
    partitions = node_config.get("num-partitions")
    if partitions is not None and int(partitions) != num_clients:
        raise ValueError(
            f"node config 'num-partitions' is {partitions} but the run has num_clients={num_clients}; they must agree."
        )
    return client_id


NOISE_SECRET_KEY = "dp-noise-secret"  # node config: this owner's secret for its DP noise (distributed DP)
MIN_NOISE_SECRET_CHARS = 16


def node_noise_secret(node_config: Mapping[str, Any], fed: Any) -> str | None:
    """Node config ``dp-noise-secret``: mixed into this client's DP noise seed so the server, which knows the run seed,
    cannot regenerate and subtract the share (docs/privacy.md, "Distributed DP with secure aggregation"). Required
    with dp_mode 'local' (with or without secure aggregation): the server is a party the noise must hide from."""
    value = node_config.get(NOISE_SECRET_KEY)
    secret = None if value is None or value == "" else str(value)
    if secret is not None and len(secret) < MIN_NOISE_SECRET_CHARS:
        raise ValueError(
            f"node config {NOISE_SECRET_KEY!r}: expected at least {MIN_NOISE_SECRET_CHARS} random characters (e.g. "
            f"python -c 'import secrets; print(secrets.token_hex(32))'), got {len(secret)}."
        )
    if secret is None and fed.dp_mode == "local":
        where = "the sum" if fed.secure_aggregation != "off" else "each upload"
        raise ValueError(
            f"node config {NOISE_SECRET_KEY!r} is required with dp_mode 'local' on Flower: without it each client's "
            f"noise share is drawn from the run seed, which the server knows, so it could redraw the shares and "
            f"remove them from {where}. Give every SuperNode its "
            f"own, e.g. --node-config '{NOISE_SECRET_KEY}=\"<64 hex digits>\"' from "
            "python -c 'import secrets; print(secrets.token_hex(32))'."
        )
    return secret


class NodeStore:
    """The files of one client in one federation (see the module docstring)."""

    GLOBAL = "global_state.safetensors"
    PERSONAL = "personal.safetensors"
    ADAPTER_CONFIG = "adapter_config.json"
    BASE_LOG = "base_log"

    def __init__(self, root: Path) -> None:
        self.root = root

    def load_global(self) -> tuple[State, int] | None:
        """(state, round) of the saved global copy, or None if there is none or it does not match its digest."""
        from safetensors import safe_open
        from safetensors.torch import load

        path = self.root / self.GLOBAL
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
            state = {k: aligned(v.to(torch.float32)) for k, v in load(data).items()}
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            round, digest = int(meta["round"]), meta["digest"]
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            logger.warning("ignoring unreadable %s: %s", path, err)
            return None
        if wire.state_digest(state) != digest:
            logger.warning("ignoring %s: its tensors do not match the recorded digest", path)
            return None
        return state, round

    def save_global(self, state: State, round: int) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        meta = {"round": str(round), "digest": wire.state_digest(tensors)}
        atomic_write_bytes(self.root / self.GLOBAL, save(tensors, metadata=meta))

    def load_personal(self) -> State:
        from safetensors.torch import load

        path = self.root / self.PERSONAL
        return {k: aligned(v.to(torch.float32)) for k, v in load(path.read_bytes()).items()} if path.is_file() else {}

    def save_personal(self, state: State) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        atomic_write_bytes(self.root / self.PERSONAL, save(tensors))

    def adapter_config(self) -> str:
        path = self.root / self.ADAPTER_CONFIG
        return path.read_text() if path.is_file() else ""

    def log_broadcast(self, round: int, data: bytes) -> None:
        atomic_write_bytes(self.root / self.BASE_LOG / f"round_{round:04d}.bin", data)

    def logged_broadcasts(self, after: int, up_to: int) -> list[tuple[int, bytes]]:
        """The logged broadcasts of rounds after+1..up_to, in order; raises if one is missing."""
        out = []
        for r in range(after + 1, up_to + 1):
            path = self.root / self.BASE_LOG / f"round_{r:04d}.bin"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the base-weight log misses round {r}; cannot rebuild the base.")
            out.append((r, path.read_bytes()))
        return out


class FederationNode:
    """A client of the federation as one SuperNode runs it.

    The model, tokenizer, this client's data and the `FederatedTrainer` are built on first need and kept for the
    life of the object; the global copy is re-read from disk at every `open`, so several processes may serve the same
    node one after another (Flower's deployment runtime starts one per message; the simulation reuses workers).
    """

    def __init__(self, settings: RunSettings, node_config: Mapping[str, Any]) -> None:
        self.settings = settings
        fed = settings.fed
        self.client_id = node_client_id(node_config, fed.num_clients)
        self.data_source = str(node_config.get("data") or "") or None
        self.state_dir = Path(str(node_config.get("state-dir") or "") or default_state_dir())
        self.noise_secret = node_noise_secret(node_config, fed)  # distributed DP: never leaves this node
        self.algorithm = get_algorithm(fed.algorithm, fed)
        self.federation_id: str | None = None
        self.client: FederatedClient | None = None
        self.store: NodeStore | None = None
        self._trainer: FederatedTrainer | None = None
        self._init_state: State = {}
        self._base_writer: BaseWeightWriter | None = None
        self._base_folded: tuple[str | None, int] = (None, 0)  # (federation, round) folded into the base weights

    # ---- state on disk ----------------------------------------------------------------------------------------
    def open(self, federation_id: str) -> FederatedClient:
        """Load this node's copy of the global state in `federation_id` (the initial adapter if it has none)."""
        if not _FEDERATION_ID.match(federation_id):
            raise ValueError(f"federation id: expected 1-64 characters [A-Za-z0-9_-], got {federation_id!r}.")
        self.federation_id = federation_id
        self.store = NodeStore(self.state_dir / federation_id / f"client_{self.client_id:04d}")
        loaded = self.store.load_global()
        if loaded is None:
            trainer = self.trainer  # the initial state comes from the seed: build the model
            state, round = dict(self._init_state), 0
            self.store.save_global(state, round)
            if self.algorithm.uses_lora:
                peft_config = trainer.model.peft_config[trainer.model.active_adapter]
                peft_config.save_pretrained(str(self.store.root))
        else:
            state, round = loaded
        self.client = FederatedClient(self.algorithm, state, self.settings.fed)
        self.client.round = round
        self.client.noise_secret = self.noise_secret
        personal = self.store.load_personal()
        if personal:
            self.client.personal_states[self.client_id] = personal
        return self.client

    def held(self) -> dict[str, Any]:
        """What this node holds: client id, round and digest of its global copy."""
        assert self.client is not None, "call open() first"
        return {"client-id": self.client_id, "round": self.client.round, "digest": wire.state_digest(self.client.state)}

    def initial_state_message(self) -> bytes:
        """The seeded initial adapter as a full-state message (the server starts from it)."""
        self.trainer  # noqa: B018 - builds the model and the initial adapter
        return encode_full_state(self.algorithm, self._init_state, 0, self.settings.fed.positions)

    def catch_up(self, kind: str, blobs: list[tuple[int, bytes]], expect_round: int, expect_digest: str) -> int:
        """Apply what the server sent and save; raise `OutOfSync` unless the node then holds `expect_*`."""
        assert self.client is not None and self.store is not None, "call open() first"
        client = self.client
        # Base-weight writers keep every broadcast they apply, to fold into freshly loaded base weights later.
        log = self.store.log_broadcast if self.algorithm.writes_base_weights else None
        try:
            apply_catch_up(client, kind, blobs, on_applied=log)
        finally:
            self.store.save_global(client.state, client.round)
        digest = wire.state_digest(client.state)
        if (client.round, digest) != (expect_round, expect_digest):
            raise OutOfSync(
                f"after the catch-up the node holds round {client.round} ({digest[:12]}), the server expected round "
                f"{expect_round} ({expect_digest[:12]})",
                client.round,
                digest,
            )
        return sum(len(data) for _, data in blobs)

    # ---- local training ---------------------------------------------------------------------------------------
    def train(self, round: int) -> tuple[bytes, dict[str, float]]:
        """One local phase from the held global state (Trainer's loop); returns the encoded update and metrics."""
        assert self.client is not None and self.store is not None, "call open() first"
        trainer = self.trainer
        self._fold_base_weights()
        update, metrics = client_phase(trainer, self.client, self.client_id, round)  # as in the simulation
        if self.client_id in self.client.personal_states:
            self.store.save_personal(self.client.personal_states[self.client_id])
        return update, metrics

    def save_adapter(self) -> Path | None:
        """Write this client's adapter (global + its personal tensors) as a PEFT folder ``adapter/`` in its store.

        Full-parameter algorithms have no adapter (their global state is in ``global_state.safetensors``): None.
        """
        assert self.client is not None and self.store is not None, "call open() first"
        if not self.algorithm.uses_lora:
            return None
        from fedsrd.server import save_adapter

        config_text = self.store.adapter_config()
        adapter_config = json.loads(config_text) if config_text else None
        cfg = self.client.config
        if adapter_config is not None and cfg.client_lora_ranks is not None:  # this client's own rank's adapter
            rank = cfg.client_rank(self.client_id)
            alpha = adapter_config["lora_alpha"] * rank / cfg.lora_r  # the global adapter's scaling
            adapter_config = {**adapter_config, "r": rank, "lora_alpha": alpha}
        return save_adapter(self.client.start_state(self.client_id), self.store.root / "adapter", adapter_config)

    @property
    def trainer(self) -> FederatedTrainer:
        if self._trainer is None:
            self._trainer = self._build_trainer()
            self._init_state = {k: v.clone() for k, v in self._trainer.global_state.items()}
            self._base_writer = BaseWeightWriter(self._trainer.model)
            self._base_folded = (None, 0)
        return self._trainer

    def _build_trainer(self) -> FederatedTrainer:
        """Model, tokenizer and this client's data, built as `fedsrd train` builds them (`fedsrd.build`)."""
        s, fed = self.settings, self.settings.fed
        s.training.output_dir = str(self.state_dir / "trainer" / f"client_{self.client_id:04d}")
        s.training.push_to_hub = False  # the coordinator, not each data owner, publishes the global adapter
        fed.lm_eval_tasks = []
        dataset = self._own_dataset()
        # Only this client's slot is ever trained (local_train(client_id, ...)); the others point at the same data so
        # the trainer's one-dataset-per-client contract and per-client seeding stay as in the simulation.
        return build_trainer(
            fed, s.training, s.model_data, seed=s.data_seed, client_datasets=[dataset] * fed.num_clients
        )

    def _own_dataset(self) -> Any:
        """Node config ``data`` (a local path or Hub dataset), else partition ``client_id`` of the run's data."""
        from fedsrd.data import load_instruction_data

        md = self.settings.model_data
        if self.data_source:
            ds = load_instruction_data(self.data_source, split="train")
            return ds if not md.train_size or len(ds) <= md.train_size else ds.select(range(md.train_size))
        clients, _ = load_data(md, self.settings.fed.num_clients, self.settings.data_seed)
        return clients[self.client_id]

    def _fold_base_weights(self) -> None:
        """Algorithms that write base weights: fold the logged broadcasts up to the held round into the model."""
        if not self.algorithm.writes_base_weights:
            return
        assert self.client is not None and self.store is not None
        federation, done = self._base_folded
        if federation not in (None, self.federation_id) and done > 0:
            self._trainer = None  # the in-memory base carries another federation's writes: load it afresh
            self.trainer  # noqa: B018
            done = 0
        if done > self.client.round:
            raise OutOfSync(
                f"the in-memory base weights hold round {done}, past the global copy's round {self.client.round}",
                self.client.round,
                wire.state_digest(self.client.state),
            )
        for round, data in self.store.logged_broadcasts(after=done, up_to=self.client.round):
            msg = wire.decode(data, kind="broadcast", algorithm=self.algorithm.name)
            self._base_writer.add(self.algorithm.base_delta(msg.tensors))
            done = round
        self._base_folded = (self.federation_id, done)
