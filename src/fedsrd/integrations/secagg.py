"""Secure aggregation on Flower: the server learns only the weighted sum of a round's uploads (SecAgg+; Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Complexity", CCS 2020), through Flower's own protocol.

The client side is Flower's `flwr.client.mod.secaggplus_mod`, unchanged (`secure_aggregation_mod` only routes the
protocol's messages to it). The server side cannot be Flower's `SecAggPlusWorkflow`: that workflow drives a legacy
`Strategy` through `LegacyContext` (``configure_fit`` on a `ClientManager`, `ClientProxy`, ``FitRes``), while our
ServerApp runs fedsrd's round loop on the Message API `Grid`. `SecAggPlusServer` sends the workflow's four stages as the
same messages and removes the masks with the same Flower primitives (Shamir ``combine_shares``, the ECDH + HKDF
``generate_shared_key``, the mask generator ``pseudo_rand_gen``, ``dequantize``); no cryptography is written here.

One round, stage by stage (each a TRAIN message to every surviving sampled client):

    setup             server -> clients: n, shares, threshold, ranges     clients -> server: two public keys each
    share keys        the neighbours' public keys                       each secret (mask seed b_i, key sk1_i) in
                                                                          Shamir shares, encrypted per neighbour
    collect masked    our train message (catch-up, round) + the shares   the update y_i = q(w_i x_i) + PRG(b_i)
      vectors         meant for this client; it trains                    +- sum_j PRG(s_ij) mod 2^32, and [q(w_i)]
    unmask            who survived, who dropped                         shares of b_i (survivors), of sk1_j (dropped)

The server adds the y_i (the pairwise masks cancel), rebuilds each survivor's b_i and removes PRG(b_i), rebuilds each
dropped client's sk1 and removes its pairwise masks, and dequantizes: sum_i w_i x_i and sum_i w_i arrive together, so
it divides one by the other. Fewer than `threshold` shares of a needed secret, or fewer than `threshold` survivors, and
the round fails: `SecureSum.failure` says why and nothing is aggregated.

What the server holds: the public keys, encrypted shares it cannot read, masked vectors, the shares of the secrets it
is meant to rebuild, and the sum. Where the protocol's promise stops: see docs/flower.md, "Secure aggregation".

Distributed DP (dp_mode "local"; docs/privacy.md, "Distributed DP with secure aggregation"): each client clips its
change to C and adds its noise share N(0, (z C)^2 / m) before the mod sees it, so the server unmasks only the noisy
sum (Kairouz et al., "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation",
ICML 2021, with continuous Gaussian shares quantized by the mod instead of discrete ones). The masked vector then
carries the client's *change* (upload - global, `upload_arrays`), whose every value is at most C + |noise|, and the
clipping range grows to ``C + DP_RANGE_SIGMAS * z C / sqrt(m)`` when the configured one is smaller
(`clipping_range`); the server adds the global state back (`upload_of_mean`) and its step divides by m, adding the
dropped clients' shares, as on the plain path (`FederatedServer.step_sum`).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common.parameter import bytes_to_ndarray
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedsrd.config import FedSRDConfig
from fedsrd.ops.privacy import client_noise_std

CONTROL_RECORD = "fedsrd"  # the ConfigRecord of a train message's control fields (flower.CONFIG, the same string)
# The ClientApp's node (model, data, settings) for a Flower context: set by fedsrd.integrations.flower, which owns the
# node cache (a registered function rather than an import, so the two modules do not import each other).
node_of: Callable[[Any], Any] | None = None

__all__ = [
    "SecAggPlusServer",
    "SecureSum",
    "clipping_range",
    "protocol_sizes",
    "secure_aggregation_mod",
    "upload_arrays",
    "upload_of_mean",
]

MAX_KEY_BYTES = 1024  # a serialized EC public key is ~91 bytes; a reply holding more is not a key
# Distributed DP: the clipping range covers a client's noise share out to this many standard deviations. A Gaussian
# value lies beyond 10 sigma with probability 1.5e-23, so even 1e12 uploaded values (clients x rounds x parameters) are
# clipped with probability below 1e-10.
DP_RANGE_SIGMAS = 10.0


def uploads_changes(cfg: FedSRDConfig) -> bool:
    """Whether a masked vector carries the client's change (upload - global) rather than its upload: under
    dp_mode "local", so that every value is bounded by the config (C + noise) whatever the global state holds."""
    return cfg.dp_mode == "local"


def clipping_range(cfg: FedSRDConfig) -> float:
    """The range [-r, r] every uploaded value is clipped to before quantization: `secagg_clipping_range`, or under
    dp_mode "local" at least ``C + DP_RANGE_SIGMAS * z C / sqrt(m)`` (one coordinate of a change clipped to L2 norm C
    is at most C; the noise share has standard deviation z C / sqrt(m))."""
    r = float(cfg.secagg_clipping_range)
    if cfg.dp_mode != "local":
        return r
    clip = float(cfg.dp_clip_norm)
    share = client_noise_std(cfg.resolved_dp_noise_multiplier, clip, cfg.sampled_per_round)
    return max(r, clip + DP_RANGE_SIGMAS * share)


def upload_arrays(
    algorithm: Any, cfg: FedSRDConfig, global_state: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> list[np.ndarray]:
    """A client's dense upload as the float32 arrays the mod masks, in name order: the upload itself, or under
    `uploads_changes` its change from `global_state` (the global copy the client trained from, which the server
    holds bit for bit)."""
    changes = uploads_changes(cfg) and not algorithm.uploads_deltas
    out = []
    for name in sorted(tensors):
        value = tensors[name].to(torch.float32)
        if changes:
            value = value - global_state[name].to(torch.float32)
        out.append(np.ascontiguousarray(value.numpy()))
    return out


def upload_of_mean(
    algorithm: Any, cfg: FedSRDConfig, global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The unmasked mean as an upload the algorithm's step takes: `mean` itself, or under `uploads_changes` the
    global state plus the mean change (for algorithms that upload values rather than deltas)."""
    if not uploads_changes(cfg) or algorithm.uploads_deltas:
        return dict(mean)
    return {name: global_state[name].to(torch.float32) + value for name, value in mean.items()}


def protocol_sizes(cfg: FedSRDConfig, num_sampled: int) -> tuple[int, int]:
    """(num_shares, threshold) for a round of `num_sampled` clients: SecAggPlusWorkflow's own rule (a value <= 1 is a
    fraction; an even share count below the sample grows by one; at least 2 shares needed)."""
    shares, threshold = cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold
    if shares <= 1:
        num_shares = round(shares * num_sampled)
        if num_shares < num_sampled and num_shares % 2 == 0:
            num_shares += 1
        if num_shares <= 2:
            num_shares = num_sampled
    else:
        num_shares = int(shares)
        if num_shares != num_sampled and num_shares % 2 == 0:
            num_shares += 1
    num_shares = min(num_shares, num_sampled)
    need = max(round(threshold * num_shares), 2) if threshold <= 1 else int(threshold)
    return num_shares, min(need, num_shares)


@dataclass
class SecureSum:
    """What one SecAgg+ round gave the server."""

    mean: dict[str, torch.Tensor] | None  # sum_i w_i x_i / sum_i w_i over the survivors; None if the round failed
    senders: list[int]  # client ids whose upload is inside the sum
    replies: dict[int, Message]  # each sender's collect-stage reply (its control fields and metrics; no update)
    dropped: dict[str, str] = field(default_factory=dict)  # client id -> why it is not in the sum
    failure: str | None = None
    weight_sum: float = 0.0
    masked_bytes: int = 0  # the masked vectors as they travelled (they replace the updates' bytes)
    protocol_up: int = 0  # keys, encrypted shares, unmask shares: client -> server (serialized records)
    protocol_down: int = 0  # keys, shares and lists forwarded: server -> client (serialized records)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """For the round's ``transport`` entry in history.json."""
        out = {
            "protocol": "secaggplus",
            "masked_vector_bytes": self.masked_bytes,
            "protocol_upload_bytes": self.protocol_up,
            "protocol_download_bytes": self.protocol_down,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
        }
        if self.failure:
            out["failure"] = self.failure
        return out


def _size(content: RecordDict) -> int:
    return recorddict_to_proto(content).ByteSize()


class SecAggPlusServer:
    """The server side of one SecAgg+ round on a Flower `Grid` (the four stages of `SecAggPlusWorkflow`).

    `specs`: the upload's tensors, (name, shape) in the order the clients send them. `nodes`: client id -> SuperNode.
    """

    def __init__(self, grid: Any, cfg: FedSRDConfig, specs: list[tuple[str, tuple[int, ...]]], timeout: float) -> None:
        self.grid, self.cfg, self.specs, self.timeout = grid, cfg, specs, timeout
        self.shapes = [(1,), *[tuple(s) for _, s in specs]]  # [weight factor, tensors...] as the mod sends them
        self.range = clipping_range(cfg)  # grows under distributed DP to hold every noise share

    def run(self, round: int, nodes: Mapping[int, int], train_content: Callable[[int], RecordDict]) -> SecureSum:
        """One round with the sampled clients `nodes`; `train_content(cid)` is the train message for client `cid`."""
        out = SecureSum(mean=None, senders=[], replies={})
        node_to_cid = {n: c for c, n in nodes.items()}
        sampled = sorted(nodes.values())
        num_shares, threshold = protocol_sizes(self.cfg, len(sampled))
        order = list(sampled)
        random.Random(f"secaggplus-{self.cfg.seed}-{round}").shuffle(order)  # the neighbour ring (seeded)
        half = num_shares >> 1
        neighbours = {nid: {order[(i + k) % len(order)] for k in range(-half, half + 1)} for i, nid in enumerate(order)}
        self.round, self.out, self.node_to_cid, self.threshold = round, out, node_to_cid, threshold

        def fail(stage: str, why: str) -> SecureSum:
            out.failure = f"secure aggregation stopped at {stage}: {why}"
            return out

        if len(sampled) < 3:  # with one or two clients the sum is (almost) the update itself
            return fail("setup", f"{len(sampled)} sampled client(s) reachable, secure aggregation needs at least 3")

        # ---- stage 0: setup -> public keys
        setup = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: len(sampled),
            Key.SHARE_NUMBER: num_shares,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: self.range,
            Key.TARGET_RANGE: int(self.cfg.secagg_quantization_range),
            Key.MOD_RANGE: int(self.cfg.secagg_modulus_range),
            Key.MAX_WEIGHT: float(self.cfg.secagg_max_weight),
        }
        replies = self._stage("setup", {n: RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)}) for n in sampled})
        public_keys: dict[int, list[bytes]] = {}
        for nid, cfg in replies.items():
            pk1, pk2 = cfg.get(Key.PUBLIC_KEY_1), cfg.get(Key.PUBLIC_KEY_2)
            if not all(isinstance(k, bytes) and 0 < len(k) <= MAX_KEY_BYTES for k in (pk1, pk2)) or pk1 == pk2:
                self._drop(nid, "setup: expected two distinct public keys")
                continue
            public_keys[nid] = [pk1, pk2]
        if len({k for keys in public_keys.values() for k in keys}) != 2 * len(public_keys):
            return fail("setup", "two clients sent the same public key")
        active = set(public_keys)
        if len(active) < threshold:
            return fail("setup", f"{len(active)} clients answered, the threshold is {threshold}")

        # ---- stage 1: share keys -> encrypted shares, forwarded to their destinations
        contents = {}
        for nid in active:
            record = ConfigRecord({str(j): public_keys[j] for j in neighbours[nid] & active})
            record[Key.STAGE] = Stage.SHARE_KEYS
            contents[nid] = RecordDict({RECORD_KEY_CONFIGS: record})
        replies = self._stage("share_keys", contents)
        forward: dict[int, tuple[list[int], list[bytes]]] = {}
        for nid, cfg in replies.items():
            dsts, ctxts = cfg.get(Key.DESTINATION_LIST), cfg.get(Key.CIPHERTEXT_LIST)
            ok = (
                isinstance(dsts, list)
                and isinstance(ctxts, list)
                and len(dsts) == len(ctxts)
                and all(type(d) is int for d in dsts)
                and all(isinstance(c, bytes) for c in ctxts)
                and set(dsts) == (neighbours[nid] & active) - {nid}
            )
            if not ok:
                self._drop(nid, "share keys: expected one encrypted share for each neighbour")
                continue
            forward[nid] = (dsts, ctxts)
        shared = set(forward)  # the clients whose secrets are shared: everyone masks with exactly these
        if len(shared) < threshold:
            return fail("share keys", f"{len(shared)} clients shared their keys, the threshold is {threshold}")
        inbox: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in shared}
        for src in sorted(shared):
            for dst, ctxt in zip(*forward[src], strict=True):
                if dst in inbox:
                    inbox[dst][0].append(src)
                    inbox[dst][1].append(ctxt)

        # ---- stage 2: collect masked vectors (each client trains here)
        contents = {}
        for nid in shared:
            content = train_content(node_to_cid[nid])
            content[RECORD_KEY_CONFIGS] = ConfigRecord(
                {
                    Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                    Key.SOURCE_LIST: inbox[nid][0],
                    Key.CIPHERTEXT_LIST: inbox[nid][1],
                }
            )
            contents[nid] = content
        replies = self._stage("collect_masked_vectors", contents, keep=True)
        masked_sum: list[np.ndarray] | None = None
        survivors: set[int] = set()
        for nid, cfg in replies.items():
            vector = self._masked_vector(cfg.get(Key.MASKED_PARAMETERS))
            if vector is None:
                self._drop(nid, "collect masked vectors: no masked vector of the expected shapes")
                continue
            masked_sum = vector if masked_sum is None else [a + b for a, b in zip(masked_sum, vector, strict=True)]
            survivors.add(nid)
        dead = shared - survivors
        if len(survivors) < threshold or masked_sum is None:
            return fail(
                "collect masked vectors", f"{len(survivors)} masked vectors arrived, the threshold is {threshold}"
            )

        # ---- stage 3: unmask -> shares of the survivors' mask seeds and of the dropped clients' keys
        contents = {}
        for nid in survivors:
            record = ConfigRecord(
                {
                    Key.STAGE: Stage.UNMASK,
                    Key.ACTIVE_NODE_ID_LIST: sorted(neighbours[nid] & survivors),
                    Key.DEAD_NODE_ID_LIST: sorted(neighbours[nid] & dead),
                }
            )
            contents[nid] = RecordDict({RECORD_KEY_CONFIGS: record})
        replies = self._stage("unmask", contents)
        shares: dict[int, list[bytes]] = {nid: [] for nid in shared}
        for nid, cfg in replies.items():
            owners, values = cfg.get(Key.NODE_ID_LIST), cfg.get(Key.SHARE_LIST)
            allowed = neighbours[nid] & shared
            if not (
                isinstance(owners, list)
                and isinstance(values, list)
                and len(owners) == len(values)
                and all(type(o) is int and o in allowed for o in owners)
                and len(set(owners)) == len(owners)
                and all(isinstance(v, bytes) and len(v) <= MAX_KEY_BYTES for v in values)
            ):
                continue  # its shares are not used; the threshold decides whether the round can still finish
            for owner, share in zip(owners, values, strict=True):
                shares[owner].append(share)
        t0 = time.perf_counter()
        mod = self.cfg.secagg_modulus_range
        vector = parameters_mod(masked_sum, mod)
        for nid in sorted(shared):
            if len(shares[nid]) < threshold:
                return fail(
                    "unmask", f"{len(shares[nid])} shares of a client's secret arrived, the threshold is {threshold}"
                )
            try:
                secret = combine_shares(shares[nid])
                if nid in survivors:  # remove the survivor's own mask PRG(b_i)
                    private = pseudo_rand_gen(secret, mod, self.shapes)
                    vector = [a - b for a, b in zip(vector, private, strict=True)]
                else:  # a dropped client: rebuild its pairwise masks with every survivor and remove them
                    for other in sorted(neighbours[nid] & survivors):
                        key = generate_shared_key(
                            bytes_to_private_key(secret), bytes_to_public_key(public_keys[other][0])
                        )
                        pairwise = pseudo_rand_gen(key, mod, self.shapes)
                        sign = 1 if nid > other else -1
                        vector = [a + sign * b for a, b in zip(vector, pairwise, strict=True)]
            except (ValueError, TypeError) as err:
                return fail("unmask", f"a secret could not be rebuilt from its shares ({err})")
        vector = parameters_mod(vector, mod)
        q_weight, quantized = factor_extract(vector)
        q = self.cfg.secagg_quantization_range
        if int(q_weight) <= 0:
            return fail("unmask", "the weights sum to zero")
        # Each client sent q(w_i x_i + r) with w_i = its weight / max_weight; the sum carries (n - 1) r extra.
        values = dequantize(quantized, self.range, q)
        offset = -(len(survivors) - 1) * self.range
        scale = q / int(q_weight)  # 1 / sum_i w_i
        out.mean = {
            name: torch.from_numpy(((v + offset) * scale).astype(np.float32)).reshape(shape)
            for (name, shape), v in zip(self.specs, values, strict=True)
        }
        out.weight_sum = int(q_weight) / q * self.cfg.secagg_max_weight
        out.stage_seconds["unmask_server"] = time.perf_counter() - t0
        out.senders = sorted(node_to_cid[n] for n in survivors)
        for nid in dead:
            self.out.dropped.setdefault(str(node_to_cid[nid]), "dropped out during secure aggregation")
        return out

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _stage(self, name: str, contents: Mapping[int, RecordDict], keep: bool = False) -> dict[int, ConfigRecord]:
        """Send one stage's messages; the protocol records of the replies that came back without error."""
        out = self.out
        t0 = time.perf_counter()
        messages = []
        for nid, content in contents.items():
            out.protocol_down += _size(RecordDict({RECORD_KEY_CONFIGS: content[RECORD_KEY_CONFIGS]}))
            messages.append(Message(content, nid, MessageType.TRAIN, group_id=f"{self.round}-secaggplus-{name}"))
        replies = self.grid.send_and_receive(messages, timeout=self.timeout) if messages else []
        out.stage_seconds[name] = time.perf_counter() - t0
        got: dict[int, ConfigRecord] = {}
        for reply in replies:
            nid = reply.metadata.src_node_id
            if nid not in contents or nid in got:
                continue
            try:
                if reply.has_error():
                    self._drop(nid, f"{name}: the ClientApp failed: {str(reply.error.reason)[:300]}")
                    continue
                record = reply.content[RECORD_KEY_CONFIGS]
                if not isinstance(record, ConfigRecord):
                    raise TypeError(f"{RECORD_KEY_CONFIGS!r} is not a ConfigRecord")
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                self._drop(nid, f"{name}: malformed reply ({type(err).__name__})")
                continue
            size = _size(RecordDict({RECORD_KEY_CONFIGS: record}))
            if name == "collect_masked_vectors":
                masked = record.get(Key.MASKED_PARAMETERS)
                masked_len = sum(len(b) for b in masked) if isinstance(masked, list) else 0
                out.masked_bytes += masked_len
                out.protocol_up += size - masked_len
                out.replies[self.node_to_cid[nid]] = reply
            else:
                out.protocol_up += size
            got[nid] = record
        for nid in contents:
            if nid not in got:
                self._drop(nid, f"{name}: no reply before the timeout")
        return got

    def _drop(self, nid: int, why: str) -> None:
        self.out.dropped.setdefault(str(self.node_to_cid[nid]), why)

    def _masked_vector(self, blobs: object) -> list[np.ndarray] | None:
        """The masked vector of one reply, checked against the expected shapes before any large allocation."""
        if not isinstance(blobs, list) or len(blobs) != len(self.shapes):
            return None
        out = []
        for blob, shape in zip(blobs, self.shapes, strict=True):
            if not isinstance(blob, bytes) or len(blob) > 8 * int(np.prod(shape)) + 1024:
                return None
            try:
                array = bytes_to_ndarray(blob)
            except (ValueError, OSError, EOFError):
                return None
            if array.dtype != np.int64 or tuple(array.shape) != tuple(shape):
                return None
            out.append(array)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# the client side: Flower's secaggplus_mod, for the protocol's messages only
# ---------------------------------------------------------------------------------------------------------------------


def is_secagg_message(msg: Message) -> bool:
    try:
        return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content
    except (AttributeError, KeyError, TypeError):
        return False


def secure_aggregation_mod(msg: Message, context: Any, call_next: Callable) -> Message:
    """A ClientApp mod: the SecAgg+ stages go to Flower's `secaggplus_mod`, every other message straight on.

    Flower's mod quantizes with stochastic rounding drawn from NumPy's global generator; for the collect stage that
    generator is seeded from (federation seed, round, client id) and restored afterwards, so the same config and seed
    give the same aggregate, bit for bit, as fedsrd promises everywhere else.
    """
    if not is_secagg_message(msg):
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    stage = msg.content[RECORD_KEY_CONFIGS].get(Key.STAGE)
    if stage != Stage.COLLECT_MASKED_VECTORS:
        return secaggplus_mod(msg, context, call_next)
    seed = rounding_seed(msg, context)
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        reply = secaggplus_mod(msg, context, call_next)
    finally:
        np.random.set_state(saved)
    for key in [k for k in reply.content if k.startswith("fitres.")]:  # the mod's input, not for the server
        del reply.content[key]
    return reply


def rounding_seed(msg: Message, context: Any) -> list[int]:
    """The stochastic-rounding seed of one client's upload: (federation seed, round, client id), and under distributed
    DP the node's `dp-noise-secret` (so the server cannot predict the rounding of the noisy change either)."""
    if node_of is None:
        raise RuntimeError("secure aggregation: no node lookup registered (fedsrd.integrations.flower sets it).")
    node = node_of(context)
    config = msg.content[CONTROL_RECORD]  # the coordinator's control fields (fedsrd.integrations.flower.CONFIG)
    seed = [node.settings.fed.seed & 0xFFFFFFFF, int(config["round"]) & 0xFFFFFFFF, node.client_id, 0x5ECA]
    secret = getattr(node, "noise_secret", None)
    if secret:
        digest = hashlib.sha256(f"secagg-rounding/{secret}".encode()).digest()
        seed += [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]
    return seed
