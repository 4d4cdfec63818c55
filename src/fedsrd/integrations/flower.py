"""Real deployment on Flower (``pip install 'fedsrd[flower]'``): a ServerApp and a ClientApp around the same
algorithm, wire codec, `FederatedServer`/`FederatedClient` and `FederatedTrainer` as the simulation.

A Flower app is two lines of user code::

    # server_app.py                                   # client_app.py
    from fedsrd.integrations.flower import make_server_app    from fedsrd.integrations.flower import make_client_app
    app = make_server_app()                           app = make_client_app()

and its settings are the main job's arguments in ``[tool.flwr.app.config]`` (`fedsrd.integrations.settings`).
Each SuperNode is one client: ``--node-config "partition-id=N"`` (its client id; with no ``data`` key it trains on
partition N of the run's data, as `fedsrd train` partitions it) and optionally ``data="/path/or/hub-name"`` (its own
data) and ``state-dir="/path"`` (where it keeps its copy of the global state, `fedsrd.integrations.node`).

One round, as in `fedsrd.runtime.local`: the server samples ``clients_per_round`` client ids by (seed, round); each
sampled node gets a ``train`` message carrying what it missed (`fedsrd.integrations.catchup`: the missed broadcasts
or the full state, whichever is smaller), applies it, checks the digest, runs Trainer's loop for ``local_steps`` and
replies with its encoded update; the server validates the updates, runs the server step and checkpoints. Every
payload is `fedsrd.wire` bytes in a Flower ``ArrayRecord`` and counted by its length. Message types:

    query.hello   server -> node: which client are you, what do you hold (and client 0: the initial adapter)
    train         catch-up bytes + round -> encoded update
    query.sync    catch-up bytes only (after the last round, so every client ends on the final global state)
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fedsrd.integrations.flower needs Flower: pip install 'fedsrd[flower]' (flwr==1.41.*)."
    ) from err

from fedsrd import wire
from fedsrd.algorithms import get_algorithm
from fedsrd.checkpoint import check_resume, prepare_output_dir
from fedsrd.federation import Delivery, Federation, RoundEvents, Transport, start_record
from fedsrd.federation.files import atomic_write_bytes
from fedsrd.federation.history import MB, write_history
from fedsrd.integrations import secagg as _secagg
from fedsrd.integrations.catchup import CatchUp, CatchUpError, OutOfSync, SyncLedger, decode_full_state
from fedsrd.integrations.catchup import encode_full_state as _encode_full_state
from fedsrd.integrations.checkpoint import ServerCheckpoint, load_checkpoint, save_checkpoint
from fedsrd.integrations.node import FederationNode
from fedsrd.integrations.secagg import (
    CONTROL_RECORD,
    SecAggPlusServer,
    SecureSum,
    is_secagg_message,
    secure_aggregation_mod,
)
from fedsrd.integrations.settings import RunSettings, parse_run_config
from fedsrd.server import FederatedServer, RoundResult, save_adapter

logger = logging.getLogger(__name__)

HELLO = f"{MessageType.QUERY}.hello"
TRAIN = MessageType.TRAIN
SYNC = f"{MessageType.QUERY}.sync"
CONFIG = CONTROL_RECORD  # ConfigRecord key: control fields (secagg reads it too)
PAYLOAD = "payload"  # ArrayRecord key: fedsrd.wire messages, one Array each
METRICS = "metrics"  # MetricRecord key
WIRE_STYPE = "fedsrd.wire"  # Array.stype of a fedsrd.wire message carried as raw bytes
NODE_CACHE_ENV = "FEDSRD_FLOWER_NODE_CACHE"  # how many nodes' models one ClientApp process keeps (default 4)

__all__ = ["FlowerCoordinator", "make_client_app", "make_server_app", "run_server"]


# ---------------------------------------------------------------------------------------------------------------------
# records: fedsrd.wire bytes in Flower records
# ---------------------------------------------------------------------------------------------------------------------


def bytes_record(blobs: Mapping[str, bytes]) -> ArrayRecord:
    """Encoded messages as one-dimensional uint8 Arrays (raw bytes: Flower chunks them, nothing re-encodes them)."""
    arrays = {k: Array(dtype="uint8", shape=(len(b),), stype=WIRE_STYPE, data=bytes(b)) for k, b in blobs.items()}
    return ArrayRecord(arrays)


def record_bytes(content: RecordDict) -> dict[str, bytes]:
    """The encoded messages in `content` (empty if it carries none); WireError if the payload is not ours."""
    if PAYLOAD not in content:
        return {}
    record = content[PAYLOAD]
    if not isinstance(record, ArrayRecord):
        raise wire.WireError(f"{PAYLOAD!r}: expected an ArrayRecord of {WIRE_STYPE} arrays, "
                             f"got {type(record).__name__}.")
    out = {}
    for key, array in record.items():
        if not isinstance(array, Array) or array.stype != WIRE_STYPE or array.dtype != "uint8":
            got = f"{array.stype}/{array.dtype}" if isinstance(array, Array) else type(array).__name__
            raise wire.WireError(f"payload {key!r}: expected a {WIRE_STYPE} uint8 array, got {got}.")
        out[key] = array.data
    return out


def _catch_up_blobs(plan: CatchUp) -> dict[str, bytes]:
    return {f"{plan.kind}-{r:06d}": data for r, data in plan.blobs}


def _read_catch_up(config: Mapping[str, Any], blobs: Mapping[str, bytes]) -> tuple[str, list[tuple[int, bytes]]]:
    kind = str(config.get("sync-kind", "none"))
    if kind not in ("none", "broadcasts", "full"):
        raise wire.WireError(f"sync-kind: expected none, broadcasts or full, got {kind!r}.")
    ordered = sorted((int(k.rsplit("-", 1)[1]), v) for k, v in blobs.items() if k.startswith(f"{kind}-"))
    return kind, ordered


def _reply(msg: Message, info: Mapping[str, Any], blobs: Mapping[str, bytes] | None = None, metrics=None) -> Message:
    content = RecordDict({CONFIG: ConfigRecord(dict(info))})
    if blobs:
        content[PAYLOAD] = bytes_record(blobs)
    if metrics:
        content[METRICS] = MetricRecord({k.replace("_", "-"): float(v) for k, v in metrics.items()})
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------------------------------------------------
# ClientApp
# ---------------------------------------------------------------------------------------------------------------------

_NODES: OrderedDict[str, FederationNode] = OrderedDict()


def _node(context: Context) -> FederationNode:
    """This process's `FederationNode` for the run and node config (model and data are built once, then reused)."""
    key = json.dumps([sorted(context.run_config.items()), sorted(context.node_config.items())], default=str)
    node = _NODES.get(key)
    if node is None:
        node = FederationNode(parse_run_config(context.run_config), context.node_config)
        _NODES[key] = node
        while len(_NODES) > max(1, int(os.environ.get(NODE_CACHE_ENV, "4"))):
            _NODES.popitem(last=False)
    _NODES.move_to_end(key)
    return node


_secagg.node_of = _node  # secure aggregation's client side seeds its rounding from this node's settings


def _open(msg: Message, context: Context) -> tuple[FederationNode, Mapping[str, Any]]:
    config = msg.content[CONFIG]
    node = _node(context)
    node.open(str(config["federation-id"]))
    return node, config


def _hello(msg: Message, context: Context) -> Message:
    node, config = _open(msg, context)
    blobs = {"init": node.initial_state_message()} if int(config.get("init-from", -1)) == node.client_id else {}
    return _reply(msg, {**node.held(), "status": "ok", "adapter-config": node.store.adapter_config()}, blobs)


def _catch_up(node: FederationNode, config: Mapping[str, Any], msg: Message) -> str | None:
    """Apply the message's catch-up; None, or why the node is out of sync."""
    kind, blobs = _read_catch_up(config, record_bytes(msg.content))
    try:
        node.catch_up(kind, blobs, int(config["sync-round"]), str(config["sync-digest"]))
    except OutOfSync as err:
        return str(err)
    return None


def _train(msg: Message, context: Context) -> Message:
    node, config = _open(msg, context)
    problem = _catch_up(node, config, msg)
    if problem is not None:
        return _reply(msg, {**node.held(), "status": "out-of-sync", "reason": problem})
    update, metrics = node.train(int(config["round"]))
    if is_secagg_message(msg):  # secure aggregation: the update goes to Flower's secaggplus_mod, never in clear
        return _secagg_train_reply(msg, node, update, metrics)
    return _reply(msg, {**node.held(), "status": "ok"}, {"update": update}, metrics)


def _secagg_train_reply(msg: Message, node: FederationNode, update: bytes, metrics: Mapping[str, float]) -> Message:
    """The train reply as `secaggplus_mod` reads it (a legacy FitRes: the update's tensors in name order and the
    client's weight); the mod replaces the tensors by the masked vector before anything leaves the node."""
    import numpy as np

    cfg = node.settings.fed
    decoded = wire.decode(update, kind="update", algorithm=node.algorithm.name)
    expected = sorted(node.algorithm.round_update_shapes(node.client.state, decoded.round))
    if sorted(decoded.tensors) != expected or any(isinstance(t, wire.SparseTensor) for t in decoded.tensors.values()):
        raise ValueError("secure aggregation needs a dense upload of every expected tensor; "
                         f"{node.algorithm.name} sent {sorted(decoded.tensors)}")
    arrays = _secagg.upload_arrays(node.algorithm, cfg, node.client.state, decoded.tensors)  # changes under local DP
    if cfg.aggregation == "samples":  # the sample count, capped by the client itself (the server cannot see it)
        weight = float(min(int(decoded.meta.get("num_samples", 0)), cfg.secagg_max_weight))
    else:  # uniform: every client the largest weight, so the quantization keeps its full precision
        weight = float(cfg.secagg_max_weight)
    limit = _secagg.clipping_range(cfg) * cfg.secagg_max_weight / max(weight, 1e-30)  # the mod scales, then clips
    outside = sum(int((np.abs(a) > limit).sum()) for a in arrays)
    if outside:  # the mod clips them: the sum is biased (and under DP no longer the Gaussian mechanism's)
        logger.warning("secure aggregation: %d uploaded value(s) of client %d lie outside the clipping range and are "
                       "clipped; raise secagg_clipping_range", outside, node.client_id)
    content = _reply(msg, {**node.held(), "status": "ok"}, None, metrics).content
    content["fitres.parameters"] = ArrayRecord(arrays)
    content["fitres.num_examples"] = MetricRecord({"num_examples": weight})
    content["fitres.metrics"] = ConfigRecord({})
    content["fitres.status"] = ConfigRecord({"code": 0, "message": ""})
    return Message(content, reply_to=msg)


def _sync(msg: Message, context: Context) -> Message:
    node, config = _open(msg, context)
    problem = _catch_up(node, config, msg)
    if problem is not None:
        return _reply(msg, {**node.held(), "status": "out-of-sync", "reason": problem})
    if bool(config.get("final", False)):
        node.save_adapter()
    return _reply(msg, {**node.held(), "status": "ok"})


def make_client_app() -> ClientApp:
    """The ClientApp of every data owner's SuperNode."""
    app = ClientApp(mods=[secure_aggregation_mod])  # passes every message but SecAgg+'s straight through
    app.query("hello")(_hello)
    app.train()(_train)
    app.query("sync")(_sync)
    return app


# ---------------------------------------------------------------------------------------------------------------------
# ServerApp
# ---------------------------------------------------------------------------------------------------------------------


def make_server_app(callbacks: Sequence[TrainerCallback] = ()) -> ServerApp:
    """The ServerApp of the coordinator: runs (or resumes) the federation described by the run config.

    `callbacks`: round callbacks (`fedsrd.federation.FederatedCallback`) run on the coordinator, which has no model.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context.run_config, callbacks=callbacks)

    return app


def run_server(
    grid: Grid, run_config: Mapping[str, Any], callbacks: Sequence[TrainerCallback] = ()
) -> list[dict[str, Any]]:
    """Run the federation on `grid`; returns the history (also written to ``<output_dir>/history.json``)."""
    return FlowerCoordinator(grid, parse_run_config(run_config), callbacks=callbacks).run()


def _say(text: str) -> None:
    print(f"fedsrd: {text}", flush=True)  # the ServerApp's stdout is what `flwr run --stream` shows


class FlowerCoordinator(Transport):
    """The server side of a federation on a Flower `Grid`: the round loop is `fedsrd.federation.Federation`, this
    class is its transport over Flower messages.

    Holds the `FederatedServer`, the map from client id to SuperNode, and the `SyncLedger` of what each client
    holds; checkpoints after every round (`fedsrd.integrations.checkpoint`).
    """

    def __init__(self, grid: Grid, settings: RunSettings, callbacks: Sequence[TrainerCallback] = ()) -> None:
        self.grid = grid
        self.settings = settings
        self.cfg = settings.fed
        self.algorithm = get_algorithm(self.cfg.algorithm, self.cfg)
        self.out_dir = Path(settings.training.output_dir).resolve()
        self.nodes: dict[int, int] = {}  # client id -> SuperNode id
        self.ledger = SyncLedger()
        self.server: FederatedServer | None = None
        self.history: list[dict[str, Any]] = []
        self.federation_id = uuid.uuid4().hex
        self.adapter_config: dict[str, Any] | None = None
        self.callbacks = list(callbacks)
        self._full_state: tuple[int, bytes] | None = None
        self._hello_errors: dict[int, str] = {}  # SuperNode id -> why its last hello failed
        self._secure_sum: SecureSum | None = None  # the last secure-aggregation round's outcome

    # ---- the run --------------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        resumed = self.settings.resume and self._restore()
        if not resumed:  # a new federation: never on top of another run's checkpoints and adapters
            removed = prepare_output_dir(self.out_dir, resume=False, extra=[Path(self.settings.checkpoint_dir)])
            if removed:
                _say(f"{self.out_dir} held a previous run: removed {', '.join(p.name for p in removed)} "
                     "(run config resume=true continues a run instead)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.out_dir / "fed_config.json", json.dumps(self.cfg.to_dict(), indent=2).encode())
        _say(f"{'resuming' if resumed else 'starting'} federation {self.federation_id} ({self.cfg.algorithm}, "
             f"{self.cfg.num_clients} clients, {self.cfg.sampled_per_round} per round); output in {self.out_dir}")
        init = self._connect(want_init=not resumed)
        if not resumed:
            self._start(init)
        events = RoundEvents(self.callbacks, self.settings.training)
        federation = Federation(self.cfg, self, events, self.history, self.out_dir,
                                self.settings.training.learning_rate)
        return federation.run(first_round=self.ledger.round + 1)

    def _restore(self) -> bool:
        ckpt = load_checkpoint(self.settings.checkpoint_dir)
        if ckpt is None:
            _say(f"resume: no checkpoint under {self.settings.checkpoint_dir}; starting a new federation")
            return False
        check_resume(ckpt.fed_config, self.cfg.to_dict(), self.settings.checkpoint_dir)
        self.server = FederatedServer(self.algorithm, ckpt.state, self.cfg)
        self.server.round = ckpt.round
        self.ledger, self.history = ckpt.ledger, ckpt.history
        self.federation_id = ckpt.federation_id
        if self.algorithm.uses_lora:  # rebuilt from this run's settings (a checkpoint's copy is never trusted)
            self.adapter_config = server_adapter_config(ckpt.state, self.settings)
        _say(f"resume: checkpoint of round {ckpt.round} from {self.settings.checkpoint_dir}")
        return True

    def _connect(self, want_init: bool) -> bytes | None:
        """Wait until a SuperNode for every client id has answered hello; the initial adapter from client 0."""
        deadline = time.monotonic() + self.settings.node_timeout
        init: bytes | None = None
        while True:
            node_ids = [n for n in self.grid.get_node_ids() if n not in self.nodes.values()]
            if node_ids:
                init = self._hello(node_ids, want_init and init is None) or init
            missing = [c for c in range(self.cfg.num_clients) if c not in self.nodes]
            if not missing and (init is not None or not want_init):
                return init
            if time.monotonic() > deadline:
                errors = "".join(f"; SuperNode {n}: {e}" for n, e in self._hello_errors.items())
                raise TimeoutError(
                    f"after {self.settings.node_timeout:.0f} s no SuperNode has answered for client(s) {missing} "
                    f"(connected: {sorted(self.nodes)}); start one per client with --node-config 'partition-id=N'"
                    f"{errors}"
                )
            time.sleep(1.0)

    def _hello(self, node_ids: Iterable[int], want_init: bool) -> bytes | None:
        config = {"federation-id": self.federation_id, "init-from": 0 if want_init else -1}
        messages = [Message(RecordDict({CONFIG: ConfigRecord(config)}), n, HELLO, group_id="hello") for n in node_ids]
        init = None
        timeout = min(self.settings.node_timeout, self.settings.round_timeout)
        for node_id, reply in self._exchange(messages, timeout).items():
            info, blobs, error = _parse_reply(reply)
            cid = None
            if error is None:
                try:
                    cid, round, digest = _held_fields(info, self.cfg.num_clients, self.ledger.round)
                    error = self._claim_error(cid, node_id) or self._init_error(blobs, want_init and cid == 0)
                except ReplyError as err:
                    error = f"malformed hello reply: {err}"
            if error is not None:
                if self._hello_errors.get(node_id) != error:
                    _say(f"SuperNode {node_id} did not answer hello: {error}")
                self._hello_errors[node_id] = error
                continue
            self._hello_errors.pop(node_id, None)
            self.nodes[cid] = node_id
            self.ledger.set_held(cid, round, digest)
            init = blobs.get("init", init) if want_init and cid == 0 else init  # only client 0 is asked for it
        return init

    def _claim_error(self, cid: int, node_id: int) -> str | None:
        """Why SuperNode `node_id` may not be client `cid` (another live SuperNode already is), or None."""
        holder = self.nodes.get(cid, node_id)
        if holder != node_id and holder in set(self.grid.get_node_ids()):
            return (f"says it is client {cid}, but SuperNode {holder} already is; give each data owner its own "
                    "--node-config 'partition-id=N'")
        return None

    def _init_error(self, blobs: Mapping[str, bytes], want_init: bool) -> str | None:
        """Why the initial adapter in a hello reply is unusable, or None (also None when none was asked for)."""
        if not want_init or "init" not in blobs:
            return None
        try:
            decode_full_state(blobs["init"], self.algorithm.name, max_bytes=self.cfg.max_message_bytes)
        except wire.WireError as err:
            return f"its initial adapter is not a valid full-state message: {err}"
        return None

    def _start(self, init: bytes | None) -> None:
        """Begin a new federation from client 0's initial adapter, after checking every client built the same one."""
        assert init is not None
        state, _ = decode_full_state(init, self.algorithm.name, max_bytes=self.cfg.max_message_bytes)
        digest = wire.state_digest(state)
        differing = sorted(c for c, held in self.ledger.held.items() if held != (0, digest))
        if differing and self.algorithm.init_from_data:  # their held (0, own digest) plans a full-state catch-up
            _say(f"client(s) {differing} computed {self.cfg.algorithm}'s initial adapter from their own data; each "
                 f"receives client 0's (digest {digest[:12]}) as a full state before it first trains")
        elif differing:
            raise RuntimeError(
                f"client(s) {differing} built a different initial adapter than client 0 (digest {digest[:12]}); "
                "every SuperNode must use the same model, LoRA settings and seed."
            )
        self.server = FederatedServer(self.algorithm, state, self.cfg)
        self.ledger.digests[0] = digest
        if self.algorithm.uses_lora:
            self.adapter_config = server_adapter_config(state, self.settings)
        self.history.append(start_record(upload_bytes=len(init), transport={"initial_adapter_bytes": len(init)}))
        self._checkpoint()

    # ---- the Transport the round loop calls -------------------------------------------------------------------
    def deliver(self, round: int, clients: list[int]) -> Delivery:
        """A train message to each sampled client's SuperNode (with what it missed); their updates."""
        if self.cfg.secure_aggregation != "off":
            return self._deliver_secure(round, clients)
        self._refresh(clients)
        rejected: dict[str, str] = {}
        dropped: dict[str, str] = {}
        plans = self._plans(clients, dropped)
        messages = [self._message(TRAIN, cid, round, plan) for cid, plan in plans.items()]
        replies = self._exchange(messages, self.settings.round_timeout)
        updates, senders = [], []
        for cid in plans:
            reply = replies.get(self.nodes[cid])
            info, blobs, error = _parse_reply(reply)
            failed = error is not None and _delivered_nothing(reply)
            if error is None:
                error = self._train_reply_error(cid, info, blobs)
            if error is not None:
                self.ledger.held[cid] = None  # it may or may not have applied the catch-up: ask before it trains again
                (dropped if failed else rejected)[str(cid)] = error
                _say(f"round {round}: client {cid} excluded: {error}")
                continue
            _, held_round, digest = _held_fields(info, self.cfg.num_clients, self.ledger.round)
            self.ledger.set_held(cid, held_round, digest)
            if info["status"] != "ok":
                dropped[str(cid)] = f"out of sync: {_short(info.get('reason'))}"
                continue
            updates.append(blobs["update"])
            senders.append(cid)
        return Delivery(
            updates=updates,
            senders=senders,
            dropped=dropped,
            rejected=rejected,
            download_bytes=sum(plan.num_bytes for plan in plans.values()),
            transport={"catch_up": {str(c): _describe_plan(p) for c, p in plans.items()}},
        )

    def server_step(self, round: int, delivery: Delivery, min_updates: int) -> RoundResult:
        if self.cfg.secure_aggregation != "off":
            return self._secure_step(round, min_updates)
        result = self.server.step(round, delivery.updates, min_updates=min_updates, senders=delivery.senders)
        for key, reason in result.rejected.items():
            _say(f"round {round}: client {key.removeprefix('client ')} excluded: {reason}")
        return result

    def distribute(self, round: int, result: RoundResult) -> int:
        """Keep the broadcast for the clients' next catch-up (each gets it before it next trains, or at the end)."""
        self.ledger.add_round(round, result.broadcast, wire.state_digest(self.server.state))
        self.ledger.prune(None if self.algorithm.writes_base_weights else len(self._full_state_bytes()))
        return 0

    def save(self, directory: Path) -> None:
        self._save_adapter(directory)

    def commit(self, round: int, history: list[dict[str, Any]]) -> None:
        self._checkpoint()

    def finish(self, history: list[dict[str, Any]]) -> None:
        if self.settings.final_sync:
            self._final_sync()
        self._save_adapter(self.out_dir / "final")

    # ---- secure aggregation (fedsrd.integrations.secagg): the server holds only the sum -----------------------
    def _deliver_secure(self, round: int, clients: list[int]) -> Delivery:
        """One SecAgg+ round with the sampled clients: they train inside its collect stage; the server gets the
        weighted mean of the survivors' uploads (kept for `_secure_step`) and never an individual update."""
        self._refresh(clients)
        dropped: dict[str, str] = {}
        rejected: dict[str, str] = {}
        plans = self._plans(clients, dropped)
        shapes = self.algorithm.round_update_shapes(self.server.state, round)
        specs = [(name, shape) for name, (shape, _) in sorted(shapes.items())]
        protocol = SecAggPlusServer(self.grid, self.cfg, specs, self.settings.round_timeout)
        secure = protocol.run(round, {cid: self.nodes[cid] for cid in plans},
                              lambda cid: self._message(TRAIN, cid, round, plans[cid]).content)
        for cid in plans:
            reply = secure.replies.get(cid)
            info, _, error = _parse_reply(reply)
            if error is None:
                try:
                    claimed, held_round, digest = _held_fields(info, self.cfg.num_clients, self.ledger.round)
                    if claimed != cid:
                        raise ReplyError(f"the SuperNode of client {cid} answers as client {claimed}")
                    self.ledger.set_held(cid, held_round, digest)
                    continue
                except ReplyError as err:
                    rejected[str(cid)] = f"malformed train reply: {err} (its masked vector is in the sum)"
            self.ledger.held[cid] = None  # it may or may not have applied the catch-up: ask before it trains again
        if secure.mean is None:
            for cid in secure.senders:
                self.ledger.held[cid] = None
        dropped.update({c: why for c, why in secure.dropped.items() if c not in dropped})
        for cid, why in dropped.items():
            _say(f"round {round}: client {cid} not in the secure sum: {why}")
        self._secure_sum = secure
        return Delivery(
            updates=[],
            senders=list(secure.senders),
            dropped=dropped,
            rejected=rejected,
            download_bytes=sum(plan.num_bytes for plan in plans.values()) + secure.protocol_down,
            upload_bytes=secure.masked_bytes + secure.protocol_up,
            num_uploads=len(secure.senders),
            transport={"catch_up": {str(c): _describe_plan(p) for c, p in plans.items()},
                       "secure_aggregation": secure.record()},
        )

    def _secure_step(self, round: int, min_updates: int) -> RoundResult:
        secure: SecureSum = self._secure_sum
        if secure.mean is None:
            _say(f"round {round}: {secure.failure}; the global state is unchanged")
            raise RuntimeError(f"{secure.failure} (dropped: {secure.dropped})")
        metrics = _mean_reply_metrics([secure.replies[c] for c in secure.senders if c in secure.replies])
        mean = _secagg.upload_of_mean(self.algorithm, self.cfg, self.server.state, secure.mean)  # local DP: changes
        return self.server.step_sum(round, mean, secure.senders, metrics, min_updates=min_updates)

    def _train_reply_error(self, cid: int, info: Mapping[str, Any], blobs: Mapping[str, bytes]) -> str | None:
        """Why a train reply from client `cid`'s SuperNode is unusable, or None."""
        try:
            claimed, _, _ = _held_fields(info, self.cfg.num_clients, self.ledger.round)
        except ReplyError as err:
            return f"malformed train reply: {err}"
        if claimed != cid:
            return f"malformed train reply: the SuperNode of client {cid} answers as client {claimed}"
        status = info.get("status")
        if status not in ("ok", "out-of-sync"):
            return f"malformed train reply: 'status' must be 'ok' or 'out-of-sync', got {_short(status)}"
        if status == "ok" and not isinstance(blobs.get("update"), bytes):
            return "malformed train reply: status 'ok' without an 'update' payload"
        return None

    def _final_sync(self) -> None:
        """Bring every client to the final global state and have each save its adapter; count the bytes."""
        self._refresh(sorted(self.nodes))
        rejected: dict[str, str] = {}
        plans = self._plans(sorted(self.nodes), rejected)
        messages = [self._message(SYNC, cid, self.ledger.round, plan, final=True) for cid, plan in plans.items()]
        replies = self._exchange(messages, self.settings.round_timeout)
        for cid in plans:
            info, _, error = _parse_reply(replies.get(self.nodes[cid]))
            try:
                if error is None:
                    claimed, held_round, digest = _held_fields(info, self.cfg.num_clients, self.ledger.round)
                    if claimed != cid:
                        raise ReplyError(f"the SuperNode of client {cid} answers as client {claimed}")
            except ReplyError as err:
                error = f"malformed sync reply: {err}"
            if error is not None:
                self.ledger.held[cid] = None
                rejected[str(cid)] = error
            else:
                self.ledger.set_held(cid, held_round, digest)
        sent = sum(plan.num_bytes for plan in plans.values())
        in_sync = sorted(c for c in self.nodes if self.ledger.in_sync(c))
        record = self.history[-1]
        transport = record.setdefault("transport", {})
        transport["final_sync_bytes"] = transport.get("final_sync_bytes", 0) + sent
        record["download_bytes"] += sent
        record["cumulative_mb"] += sent / MB
        transport["final_sync"] = {str(c): _describe_plan(p) for c, p in plans.items() if p.num_bytes}
        transport["clients_in_sync"] = in_sync
        if rejected:
            transport["final_sync_rejected"] = rejected
        _say(f"final sync: {sent} bytes to {sum(1 for p in plans.values() if p.num_bytes)} client(s); clients holding "
             f"the final global state (round {self.ledger.round}): {in_sync}")
        self._checkpoint()

    # ---- helpers --------------------------------------------------------------------------------------------------
    def _refresh(self, clients: Iterable[int]) -> None:
        """Forget departed SuperNodes; say hello to new ones and to clients whose state is unknown."""
        current = set(self.grid.get_node_ids())
        self.nodes = {c: n for c, n in self.nodes.items() if n in current}
        unknown = [c for c in clients if c in self.nodes and self.ledger.held.get(c) is None]
        ask = (current - set(self.nodes.values())) | {self.nodes[c] for c in unknown}
        if ask:
            self._hello(sorted(ask), want_init=False)

    def _plans(self, clients: Iterable[int], dropped: dict[str, str]) -> dict[int, CatchUp]:
        """What each client needs to catch up; clients that cannot be reached go to `dropped` with the reason."""
        plans: dict[int, CatchUp] = {}
        full = None if self.algorithm.writes_base_weights else self._full_state_bytes
        for cid in clients:
            if cid not in self.nodes:
                dropped[str(cid)] = "no SuperNode connected for this client"
                continue
            try:
                plans[cid] = self.ledger.plan(cid, full)
            except CatchUpError as err:
                dropped[str(cid)] = str(err)
        return plans

    def _message(self, kind: str, cid: int, round: int, plan: CatchUp, final: bool = False) -> Message:
        config = {
            "federation-id": self.federation_id,
            "round": round,
            "sync-kind": plan.kind,
            "sync-round": plan.to_round,
            "sync-digest": self.ledger.digests[plan.to_round],
            "final": final,
        }
        content = RecordDict({CONFIG: ConfigRecord(config)})
        if plan.blobs:
            content[PAYLOAD] = bytes_record(_catch_up_blobs(plan))
        return Message(content, self.nodes[cid], kind, group_id=str(round))

    def _exchange(self, messages: list[Message], timeout: float) -> dict[int, Message]:
        if not messages:
            return {}
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        return {reply.metadata.src_node_id: reply for reply in replies}

    def _full_state_bytes(self) -> bytes:
        """The current global state as one full-state message (encoded once per round)."""
        round = self.ledger.round
        if self._full_state is None or self._full_state[0] != round:
            data = _encode_full_state(self.algorithm, self.server.state, round, self.cfg.positions)
            self._full_state = (round, data)
        return self._full_state[1]

    def _checkpoint(self) -> None:
        ckpt = ServerCheckpoint(
            round=self.ledger.round,
            federation_id=self.federation_id,
            algorithm=self.algorithm.name,
            state=self.server.state,
            ledger=self.ledger,
            history=self.history,
            fed_config=self.cfg.to_dict(),
            adapter_config=self.adapter_config,
        )
        save_checkpoint(self.settings.checkpoint_dir, ckpt)
        write_history(self.out_dir / "history.json", self.history)

    def _save_adapter(self, directory: Path) -> None:
        """The global adapter as a PEFT folder (`PeftModel.from_pretrained(base, directory)` loads it).

        Full-parameter algorithms: the global state as ``global_state.safetensors`` (the server has no model;
        `FederatedTrainer.load_global_state` rebuilds the weights from it on any party).
        """
        if self.algorithm.uses_lora:
            self.adapter_config = server_adapter_config(self.server.state, self.settings)
            save_adapter(self.server.state, directory, self.adapter_config)
        else:
            from safetensors.torch import save

            state = {k: v.contiguous() for k, v in self.server.state.items()}
            atomic_write_bytes(directory / "global_state.safetensors", save(state, metadata={"format": "pt"}))


def server_adapter_config(state: Mapping[str, Any], settings: RunSettings) -> dict[str, Any]:
    """The PEFT ``adapter_config.json`` of the global adapter, from the server's own settings and state alone.

    Never a client's: a client could name another base model, rank or target modules. The target modules are the
    module-name suffixes that carry LoRA tensors in the global state (what `find_lora_target_modules` resolves on
    every client), the rank and scaling are the run's.
    """
    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in state if ".lora_" in name})
    lora = settings.fed.to_lora_config(target_modules=targets or None)
    lora.base_model_name_or_path = settings.model_data.model_name_or_path
    config = lora.to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set | frozenset) else str(v)))


def _mean_reply_metrics(replies: list[Message]) -> dict[str, float]:
    """The mean of each metric the clients reported beside their masked vectors (e.g. train_loss)."""
    values: dict[str, list[float]] = {}
    for reply in replies:
        try:
            record = reply.content[METRICS] if METRICS in reply.content else {}
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= 1e30:
                    values.setdefault(key.replace("-", "_"), []).append(float(value))
        except (AttributeError, KeyError, TypeError):
            continue
    values.pop("num_examples", None)
    return {k: sum(v) / len(v) for k, v in sorted(values.items())}


def _delivered_nothing(reply: Message | None) -> bool:
    """Whether a node's reply means the client's phase never produced an answer (no reply, or the ClientApp raised):
    the client is dropped. Any other unusable reply was refused (rejected)."""
    if reply is None:
        return True
    try:
        return bool(reply.has_error())
    except Exception:  # a reply too broken to ask is a refused one
        return False


def _describe_plan(plan: CatchUp) -> dict[str, Any]:
    return {"kind": plan.kind, "bytes": plan.num_bytes, "to_round": plan.to_round}


def _parse_reply(reply: Message | None) -> tuple[dict[str, Any], dict[str, bytes], str | None]:
    """(control fields, payload bytes, error or None) of a node's reply. Never raises: whatever a node sends, a reply
    that is not what our ClientApp sends comes back as an error, and the caller excludes that node."""
    if reply is None:
        return {}, {}, "no reply before the timeout"
    try:
        if reply.has_error():
            return {}, {}, f"the ClientApp failed (code {reply.error.code}): {str(reply.error.reason)[:500]}"
        content = reply.content
        if CONFIG not in content or not isinstance(content[CONFIG], ConfigRecord):
            return {}, {}, f"malformed reply: no {CONFIG!r} ConfigRecord"
        return dict(content[CONFIG]), record_bytes(content), None
    except wire.WireError as err:
        return {}, {}, f"malformed reply: {err}"
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # what Flower's records raise on odd content
        return {}, {}, f"malformed reply: {type(err).__name__}: {str(err)[:300]}"


class ReplyError(ValueError):
    """A node's reply carries a control field that is missing, of the wrong type or out of range."""


MAX_ROUND = 2**31 - 1


def _int_field(info: Mapping[str, Any], key: str, low: int, high: int) -> int:
    """`info[key]` as an int in [low, high] (a bool, float or string is not an int); ReplyError otherwise."""
    if key not in info:
        raise ReplyError(f"reply field {key!r} is missing (expected an integer in {low}..{high})")
    value = info[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ReplyError(f"reply field {key!r}: expected an integer in {low}..{high}, got {_short(value)}")
    return value


def _digest_field(info: Mapping[str, Any]) -> str:
    value = info.get("digest")
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ReplyError(f"reply field 'digest': expected a 64-character SHA-256 hex string, got {_short(value)}")
    return value


def _held_fields(info: Mapping[str, Any], num_clients: int, latest_round: int) -> tuple[int, int, str]:
    """(client id, round, digest) a node says it holds, validated: the round is one the server has run."""
    client_id = _int_field(info, "client-id", 0, num_clients - 1)
    return client_id, _int_field(info, "round", 0, latest_round), _digest_field(info)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
