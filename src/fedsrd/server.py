"""The server role, and `merge_adapters`: the server step as a PEFT adapter-merge utility on files alone."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsrd import wire
from fedsrd.algorithms import Algorithm, State, get_algorithm
from fedsrd.algorithms.ranks import rank_dim, state_rank
from fedsrd.client import expected_specs
from fedsrd.config import FedSRDConfig
from fedsrd.ops import generator_for, normalized_weights, round_to_dtype
from fedsrd.ops.aligned import aligned
from fedsrd.ops.privacy import noise_std_on_mean
from fedsrd.ops.robust import lower_median, trim_count, trimmed_mean

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one server step produced."""

    round: int
    broadcast: bytes
    accepted: list[int] = field(default_factory=list)  # client ids whose update was aggregated
    rejected: dict[str, str] = field(default_factory=dict)  # client id (or position) -> reason
    metrics: dict[str, float] = field(default_factory=dict)  # means of the clients' reported metrics
    robust: dict = field(default_factory=dict)  # what bounded the clients' influence (`bound_influence`)
    # Clients of different LoRA ranks: per configured rank (str), the encoded size of the part of the broadcast a
    # client of that rank needs (`Algorithm.client_download`) and its trainable parameter bytes (history's per_client).
    download_bytes_by_rank: dict[str, int] = field(default_factory=dict)
    trainable_bytes_by_rank: dict[str, int | None] = field(default_factory=dict)


class FederatedServer:
    """Holds the global state; validates client uploads, runs the algorithm's server step, encodes the broadcast.

    A malformed or hostile update is rejected with a logged reason and excluded; it never changes the state.
    """

    def __init__(self, algorithm: Algorithm, global_state: State, config: FedSRDConfig) -> None:
        self.algorithm = algorithm
        self.config = config
        self.state = global_state
        self.round = 0
        # Server-side state carried between rounds and never broadcast (`Algorithm.server_step_with_memory`).
        self.memory: State = {}

    def decode_update(self, data: bytes, round: int, sender: int | None = None) -> wire.Message:
        """Decode and validate one client's update; `sender`: the client id the transport knows it by, if any (the
        update must carry that id). Raises WireError naming what is wrong."""
        msg = wire.decode(
            data,
            expected=expected_specs(self.algorithm.update_shapes(self.update_view(data, sender))),
            kind="update",
            algorithm=self.algorithm.name,
            max_bytes=self.config.max_message_bytes,
            require_all=not self.algorithm.update_is_partial(),
            max_mask_seeds=1,  # a client's mask is one seeded draw; more would only multiply the server's work
        )
        if msg.round != round:
            raise wire.WireError(f"update is for round {msg.round}, but the server is running round {round}.")
        msg.meta = validate_update_meta(msg.meta, sender)
        largest = max((_max_abs(t) for t in msg.tensors.values()), default=0.0)
        if largest > self.config.max_update_value:
            raise wire.WireError(
                f"update holds a value of magnitude {largest:.3g}, "
                f"above max_update_value={self.config.max_update_value:g}."
            )
        return msg

    # ---- clients of different LoRA ranks (FedSRDConfig.client_lora_ranks) ----------------------------------------
    def update_view(self, data: bytes, sender: int | None = None) -> State:
        """The state an update is checked against: the global state, or with `client_lora_ranks` the start state of
        the rank configured for the client the update claims to be (`sender` where the transport knows it).

        WireError if that client has no configured rank, or if the update's LoRA tensors carry another rank (the
        rank travels in the tensors' shapes and is checked before anything is decoded)."""
        if self.config.client_lora_ranks is None:
            return self.state
        header = wire.read_header(data, max_bytes=self.config.max_message_bytes)
        client_id = header["meta"].get("client_id") if sender is None else sender
        if not _is_int(client_id) or not 0 <= client_id < self.config.num_clients:
            raise wire.WireError(
                f"update meta 'client_id' must be an int in 0..{self.config.num_clients - 1} (a client with a rank in "
                f"client_lora_ranks), got {_short(client_id)}."
            )
        rank = self.config.client_rank(client_id)
        for name, entry in header["tensors"].items():
            dim = rank_dim(name)
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if dim is not None and isinstance(shape, (list, tuple)) and len(shape) == 2 and shape[dim] != rank:
                raise wire.WireError(
                    f"update from client {client_id} has LoRA rank {shape[dim]} in {name!r}, but client {client_id} "
                    f"is configured for rank {rank} (client_lora_ranks)."
                )
        return self.algorithm.client_start_state(self.state, rank)

    def per_rank_costs(
        self, broadcast: wire.Message, broadcast_bytes: int
    ) -> tuple[dict[str, int], dict[str, int | None]]:
        """For each configured rank (str): the encoded bytes of what a client of that rank needs of the broadcast, and
        the float32 bytes of the parameters it trains. Without `client_lora_ranks`, one entry ``"global"``: the whole
        broadcast and the global adapter's trainable bytes."""
        if self.config.client_lora_ranks is None:
            rank = state_rank(self.state)
            trained = None if rank is None else self.algorithm.trainable_param_bytes(self.state, rank)
            return {"global": broadcast_bytes}, {"global": trained}
        ranks = sorted(set(self.config.client_lora_ranks))
        download, trainable = {}, {}
        for rank in ranks:
            part = self.algorithm.client_download(broadcast.tensors, rank)  # with the broadcast's header
            msg = wire.Message(kind="broadcast", algorithm=self.algorithm.name, round=broadcast.round, tensors=part,
                               meta=broadcast.meta)
            download[str(rank)] = len(wire.encode(msg, value_dtype=self.config.value_dtype,
                                                  positions=self.config.positions))
            trainable[str(rank)] = self.algorithm.trainable_param_bytes(self.state, rank)
        return download, trainable

    def bound_influence(
        self, round: int, messages: list[wire.Message], rejected: dict[str, str]
    ) -> tuple[list[wire.Message], dict]:
        """Clip each accepted update's change to the round's bound, in place. Returns the updates kept (one whose norm
        cannot be computed is excluded into `rejected`) and what was done, for the round's record (``history.json``'s
        ``robust``): the rule, each client's change norm, the bound and every clipped client (norm before, scale).
        Every clipped update is logged.

        The bound is the smaller of `clip_update_norm` and, where adaptive clipping is on,
        ``adaptive_clip_multiplier x`` the lower median of the round's norms (`fedsrd.ops.robust`). With dp_mode
        "central" it is also at most `dp_clip_norm`, and adaptive clipping is off (its bound depends on the data).
        """
        record: dict = {"rule": self.robust_rule()}
        if not messages or not self._clipping():
            return messages, record
        kept, norms = [], []
        for msg in messages:
            try:
                norm = self.algorithm.update_norm(self.state, msg.tensors)
                if not math.isfinite(norm):
                    raise ArithmeticError(f"its change norm is {norm}")
            except _STEP_ERRORS as err:
                rejected[f"client {msg.meta['client_id']}"] = f"breaks the server step: {err}"
                logger.warning("round %d: excluded client %s: %s", round, msg.meta["client_id"], err)
                continue
            kept.append(msg)
            norms.append(norm)
        messages = kept
        if not messages:
            return messages, record
        bound = self._clip_bound(round, [m.meta["client_id"] for m in messages], norms, record)
        for msg, norm in zip(messages, norms, strict=True):
            if norm > bound:
                msg.tensors = self.algorithm.clip_update(self.state, msg.tensors, bound)
        return messages, record

    def _adaptive(self) -> bool:
        """Whether the bound follows the round's median norm (adaptive clipping); off under differential privacy, where
        the median depends on the clients' data."""
        cfg = self.config
        return cfg.adaptive_clip == "on" or (
            cfg.adaptive_clip == "auto" and "clip" in self.algorithm.robust_defences and cfg.dp_mode == "off"
        )

    def _clipping(self) -> bool:
        """Whether this round's updates are norm-clipped (`bound_influence`)."""
        cfg = self.config
        return self._adaptive() or cfg.clip_update_norm is not None or cfg.dp_mode == "central"

    def _clip_bound(self, round: int, clients: list[int], norms: list[float], record: dict) -> float:
        """The round's clipping bound from the clients' change norms; fills `record` and logs every clipped client."""
        cfg = self.config
        adaptive = self._adaptive()
        dp_clip = cfg.dp_clip_norm if cfg.dp_mode == "central" else None
        bounds = [b for b in (cfg.clip_update_norm, dp_clip) if b is not None]
        if adaptive:
            record["median_norm"] = lower_median(norms)
            bounds.append(cfg.adaptive_clip_multiplier * record["median_norm"])
        bound = min(bounds)
        record["clip_bound"] = bound
        record["norms"] = {str(c): norm for c, norm in zip(clients, norms, strict=True)}
        record["clipped"] = {}
        for client, norm in zip(clients, norms, strict=True):
            if norm > bound:
                record["clipped"][str(client)] = {"norm": norm, "scale": bound / norm if norm else 1.0}
                logger.warning("round %d: clipped client %s's update: change norm %.4g > bound %.4g", round, client,
                               norm, bound)
        if cfg.dp_mode != "off":  # each client's norm depends on its data: under DP the record keeps only the bound
            del record["norms"], record["clipped"]
        return bound

    def robust_rule(self) -> str:
        """How the server step combines the updates: 'mean' (the algorithm's own weighted step), 'median' or
        'trimmed_mean' (coordinate-wise, then the algorithm's step on that one consensus update)."""
        return "mean" if self.config.robust_aggregation == "none" else self.config.robust_aggregation

    def _aggregate(
        self, round: int, accepted: list[wire.Message], rejected: dict[str, str], sum_of: int | None = None
    ) -> tuple[State, dict, State, dict, list[wire.Message]]:
        """Run the server step; if it fails or yields a non-finite state, find and exclude the updates that cause it.

        Returns the new state, the payload to broadcast, the server's new memory, the robust rule's statistics and the
        updates that were aggregated. `self.state` and `self.memory` are not touched here, so nothing a client sends
        can leave the server half-updated. `sum_of`: secure aggregation's one mean stands for that many uploads (DP).
        """
        try:
            return (*self._try_aggregate(round, accepted, sum_of), accepted)
        except _STEP_ERRORS as err:
            logger.warning("round %d: server step failed (%s); checking updates one by one", round, err)
        good = []
        for msg in accepted:
            try:
                self._try_aggregate(round, [msg], sum_of)
                good.append(msg)
            except _STEP_ERRORS as err:
                rejected[f"client {msg.meta.get('client_id', '?')}"] = f"breaks the server step: {err}"
                logger.warning("round %d: excluded client %s: %s", round, msg.meta.get("client_id", "?"), err)
        if not good:
            raise RuntimeError(f"round {round}: no update could be aggregated; rejected: {rejected}")
        return (*self._try_aggregate(round, good, sum_of), good)

    def _raw_weights(self, messages: list[wire.Message]) -> list[float]:
        """Each update's weight before normalisation: 1, or its (capped) sample count (`aggregation`)."""
        if self.config.aggregation == "samples":
            return [float(c) for c in capped_sample_counts([m.meta["num_samples"] for m in messages])]
        return [1.0] * len(messages)

    def _try_aggregate(
        self, round: int, messages: list[wire.Message], sum_of: int | None = None
    ) -> tuple[State, dict, State, dict]:
        weights = normalized_weights(self._raw_weights(messages))
        updates, stats = [m.tensors for m in messages], {}
        if self.robust_rule() != "mean":  # the algorithm's weighted sum of one consensus update, of weight one
            updates, stats = self._robust_combine(messages)
            weights = [1.0]
        noise_std = None
        if self.config.dp_mode != "off":
            updates, weights, noise_std, stats = self._private_sum(updates, sum_of)
        rng = generator_for(self.config.seed, "server_step", round)
        with torch.no_grad():
            if noise_std is None:
                payload, memory = self.algorithm.server_step_with_memory(
                    self.state, updates, weights, round, rng, self.memory
                )
            else:
                payload, memory = self.algorithm.server_step_private(
                    self.state, updates, weights, round, rng, self.memory, noise_std,
                    generator_for(self.config.seed, "dp_noise", round),
                )  # fmt: skip
        state, payload = self._next_state(round, payload)
        return state, payload, memory, stats

    def _next_state(self, round: int, payload: dict) -> tuple[State, dict]:
        """The state after applying `payload` as the clients will decode it; ArithmeticError if it is not finite."""
        with torch.no_grad():
            # Apply what the clients will decode (values rounded to the wire dtype), so every party stays equal.
            payload = as_received(payload, self.config.value_dtype)
            state = self.algorithm.reinitialize(self.algorithm.apply(self.state, payload), round)
        for name, value in state.items():
            if not bool(torch.isfinite(value).all()):
                raise ArithmeticError(f"the aggregated state has non-finite values in {name!r}")
        return state, payload

    def _private_sum(self, updates: list, sum_of: int | None = None) -> tuple[list, list[float], float | None, dict]:
        """Differential privacy (docs/privacy.md): the mean over the *fixed* number m of sampled clients (a client
        whose update is missing or was excluded counts as no change, `Algorithm.null_update`), so one client moves it
        by at most dp_clip_norm / m whatever the others do; and the standard deviation of the noise the server adds
        to that mean: ``z C / m`` under "central"; under "local", the noise shares of the m - k clients that did not
        contribute (the k that did added theirs), None when all did.

        `sum_of`: secure aggregation (dp_mode "local" only) hands one update, the mean of the k = `sum_of` uploads in
        the unmasked sum; with weight k / m and a null update of weight (m - k) / m it is the plain path's padded mean
        (the step is linear, `Algorithm.secure_sum`), and the server adds the same missing shares, from the same
        generator."""
        cfg = self.config
        m, k = cfg.sampled_per_round, len(updates) if sum_of is None else sum_of
        if k > m:
            raise ValueError(f"differential privacy: {k} updates in a round that samples {m} clients.")
        z, clip = cfg.resolved_dp_noise_multiplier, float(cfg.dp_clip_norm)
        if cfg.dp_mode == "central":
            std = noise_std_on_mean(z, clip, m)
        else:
            std = noise_std_on_mean(z, clip, m) * math.sqrt((m - k) / m) if k < m else None
        stats = {"dp_noise_multiplier": z, "dp_clip_norm": clip, "dp_noise_std": std or 0.0, "dp_denominator": m}
        if sum_of is not None:
            if cfg.dp_mode != "local" or len(updates) != 1:
                raise ValueError("differential privacy on a secure sum: dp_mode 'local' and one mean update only.")
            # the noise the k clients' shares put into the sum the server unmasked: what protects against the server
            stats["dp_secure_sum_noise_multiplier"] = z * math.sqrt(k / m)
            if k == m:
                return updates, [1.0], std, stats
            return [updates[0], self.algorithm.null_update(self.state, updates[0])], [k / m, (m - k) / m], std, stats
        padded = [*updates, *[self.algorithm.null_update(self.state, updates[0]) for _ in range(m - k)]]
        return padded, [1.0 / m] * m, std, stats

    def _robust_combine(self, messages: list[wire.Message]) -> tuple[list[dict], dict]:
        """The coordinate-wise median or trimmed mean of the updates, and per client the share of its coordinates
        that the rule dropped (``trimmed_share``)."""
        m = len(messages)
        trim = (m - 1) // 2 if self.config.robust_aggregation == "median" else trim_count(m, self.config.trim_fraction)
        consensus, dropped, total = {}, torch.zeros(m, dtype=torch.int64), 0
        for name in messages[0].tensors:
            values = [msg.tensors[name] for msg in messages]
            if any(isinstance(v, wire.SparseTensor) for v in values):
                raise TypeError(f"robust_aggregation={self.config.robust_aggregation!r} needs dense updates; "
                                f"{name!r} arrived sparse.")
            consensus[name], counts = trimmed_mean(values, trim)
            dropped += counts
            total += values[0].numel()
        share = {str(msg.meta["client_id"]): int(n) / total if total else 0.0
                 for msg, n in zip(messages, dropped.tolist(), strict=True)}
        return [consensus], {"trim_per_side": trim, "trimmed_share": share}

    def _validated(
        self, round: int, updates: list[bytes], senders: list[int] | None, rejected: dict[str, str]
    ) -> Iterator[tuple[int, wire.Message]]:
        """Each update that decodes and validates (`decode_update`, one per client id), with its position, in order;
        the others go into `rejected` with the reason, keyed by sender (or ``#position``)."""
        claimed: set[int] = set()
        for position, data in enumerate(updates):
            sender = None if senders is None else senders[position]
            label = f"#{position}" if sender is None else str(sender)
            try:
                msg = self.decode_update(data, round, sender)
                if msg.meta["client_id"] in claimed:
                    raise wire.WireError(f"a second update from client_id {msg.meta['client_id']} in this round.")
            except wire.WireError as err:
                rejected[label] = str(err)
                logger.warning("round %d: rejected update %s: %s", round, label, err)
                continue
            claimed.add(msg.meta["client_id"])
            yield position, msg

    # ---- the streaming step (server_streaming: on) ------------------------------------------------------------------
    def _streaming_step(
        self, round: int, updates: list[bytes], senders: list[int] | None, rejected: dict[str, str], min_updates: int
    ) -> tuple[State, dict, State, dict, list[wire.Message]]:
        """The step with at most one decoded update in memory at a time (`Algorithm.begin_aggregate`).

        Pass 1 validates each update exactly as the batch step does and keeps only its metadata and, where clipping is
        on, its change norm; the round's clipping bound and weights follow from those. Pass 2 decodes each accepted
        update again (the bytes were validated, so it decodes to the same tensors), clips it, folds it and releases
        it. An update that breaks the step is isolated and excluded as in the batch step.
        """
        clipping = self._clipping()
        accepted: list[tuple[int, wire.Message, float]] = []  # (position, message without its tensors, norm)
        for position, msg in self._validated(round, updates, senders, rejected):
            norm = 0.0
            if clipping:
                try:
                    norm = self.algorithm.update_norm(self.state, msg.tensors)
                    if not math.isfinite(norm):
                        raise ArithmeticError(f"its change norm is {norm}")
                except _STEP_ERRORS as err:
                    rejected[f"client {msg.meta['client_id']}"] = f"breaks the server step: {err}"
                    logger.warning("round %d: excluded client %s: %s", round, msg.meta["client_id"], err)
                    continue
            msg.tensors = {}  # released; decoded again when folded
            accepted.append((position, msg, norm))
        _require_updates(round, len(accepted), min_updates, rejected)
        record: dict = {"rule": self.robust_rule()}
        bound = None
        if clipping:
            bound = self._clip_bound(round, [m.meta["client_id"] for _, m, _ in accepted], [n for *_, n in accepted],
                                     record)  # fmt: skip

        def fold(items: list[tuple[int, wire.Message, float]]) -> tuple[State, dict, State]:
            aggregation = self.algorithm.begin_aggregate(
                self.state, round, generator_for(self.config.seed, "server_step", round), self.memory
            )
            weights = self._raw_weights([m for _, m, _ in items])
            with torch.no_grad():
                for (position, _, norm), weight in zip(items, weights, strict=True):
                    sender = None if senders is None else senders[position]
                    tensors = self.decode_update(updates[position], round, sender).tensors
                    if bound is not None and norm > bound:
                        tensors = self.algorithm.clip_update(self.state, tensors, bound)
                    aggregation.fold(tensors, weight)
                    del tensors
                payload, memory = aggregation.finish()
            state, payload = self._next_state(round, payload)
            return state, payload, memory

        try:
            state, payload, memory = fold(accepted)
        except (*_STEP_ERRORS, wire.WireError) as err:
            logger.warning("round %d: server step failed (%s); checking updates one by one", round, err)
            good = []
            for item in accepted:
                try:
                    fold([item])
                    good.append(item)
                except (*_STEP_ERRORS, wire.WireError) as one_err:
                    client = item[1].meta.get("client_id", "?")
                    rejected[f"client {client}"] = f"breaks the server step: {one_err}"
                    logger.warning("round %d: excluded client %s: %s", round, client, one_err)
            if not good:
                raise RuntimeError(f"round {round}: no update could be aggregated; rejected: {rejected}") from err
            accepted = good
            state, payload, memory = fold(accepted)
        return state, payload, memory, record, [m for _, m, _ in accepted]

    def step(
        self, round: int, updates: list[bytes], min_updates: int = 1, senders: list[int] | None = None
    ) -> RoundResult:
        """Aggregate the round's encoded updates, apply the result and return the encoded broadcast.

        `senders`: the client id the transport delivered each update from (Flower: the SuperNode's client); an update
        claiming another id is rejected, and rejections are keyed by that id instead of ``#position``.

        Nothing changes until the whole update set is validated, the step has run and the broadcast is encoded:
        any exception leaves `state`, `memory` and `round` as they were.
        """
        if senders is not None and len(senders) != len(updates):
            raise ValueError(f"step: {len(updates)} updates but {len(senders)} senders; expected one sender each.")
        rejected: dict[str, str] = {}
        if self.config.server_streaming == "on":
            state, payload, memory, robust, accepted = self._streaming_step(round, updates, senders, rejected,
                                                                             min_updates)
        else:
            accepted = [msg for _, msg in self._validated(round, updates, senders, rejected)]
            _require_updates(round, len(accepted), min_updates, rejected)
            accepted, robust = self.bound_influence(round, accepted, rejected)
            if not accepted:
                raise RuntimeError(f"round {round}: no update could be aggregated; rejected: {rejected}")
            state, payload, memory, stats, accepted = self._aggregate(round, accepted, rejected)
            robust.update(stats)
        return self._commit(round, state, payload, memory, [m.meta["client_id"] for m in accepted], rejected,
                            _mean_metrics(accepted), robust)

    def step_sum(
        self, round: int, mean: State, senders: list[int], metrics: dict[str, float], min_updates: int = 1
    ) -> RoundResult:
        """The server step on the weighted mean of the round's uploads, as secure aggregation delivers it
        (`fedsrd.integrations.secagg`): the server never holds an individual update.

        Only for algorithms whose step is linear in equal-shape dense uploads (`Algorithm.secure_sum`): the step on
        the one mean, of weight one, is the step on the updates. The mean is checked as an update is (names, shapes,
        finiteness, `max_update_value`); no per-client clipping or robust rule can apply to a sum.
        """
        if not self.algorithm.secure_sum:
            raise ValueError(f"algorithm {self.algorithm.name!r}'s server step is not a sum of its uploads.")
        if len(senders) < min_updates:
            raise RuntimeError(f"round {round}: only {len(senders)} upload(s) in the secure sum, at least "
                               f"{min_updates} needed")
        expected = self.algorithm.round_update_shapes(self.state, round)
        if sorted(mean) != sorted(expected):
            raise wire.WireError(f"the secure sum holds {sorted(mean)}, expected {sorted(expected)}.")
        for name, (shape, _) in expected.items():
            if tuple(mean[name].shape) != tuple(shape):
                raise wire.WireError(
                    f"the secure sum's {name!r} has shape {tuple(mean[name].shape)}, expected {tuple(shape)}."
                )
            if not bool(torch.isfinite(mean[name]).all()) or _max_abs(mean[name]) > self.config.max_update_value:
                raise wire.WireError(f"the secure sum's {name!r} is not finite or above max_update_value.")
        aggregate = wire.Message("update", self.algorithm.name, round, dict(mean), {"client_id": 0, "num_samples": 1})
        rejected: dict[str, str] = {}
        sum_of = len(senders) if self.config.dp_mode != "off" else None  # distributed DP: the mean of len(senders)
        state, payload, memory, stats, _ = self._aggregate(round, [aggregate], rejected, sum_of)
        return self._commit(round, state, payload, memory, sorted(senders), rejected, dict(metrics),
                            {"rule": "secure_sum", **stats})

    def _commit(
        self, round: int, state: State, payload: dict, memory: State, accepted: list[int], rejected: dict[str, str],
        metrics: dict[str, float], robust: dict,
    ) -> RoundResult:
        """Encode the broadcast and make the round's state the server's."""
        broadcast = wire.Message(
            kind="broadcast",
            algorithm=self.algorithm.name,
            round=round,
            tensors=payload,
            meta={"digest": wire.state_digest(state)},
        )
        data = wire.encode(broadcast, value_dtype=self.config.value_dtype, positions=self.config.positions)
        download_by_rank, trainable_by_rank = self.per_rank_costs(broadcast, len(data))
        result = RoundResult(
            round=round, broadcast=data, accepted=accepted, rejected=rejected, metrics=metrics, robust=robust,
            download_bytes_by_rank=download_by_rank, trainable_bytes_by_rank=trainable_by_rank,
        )
        self.state, self.memory, self.round = state, memory, round  # the only place the step changes the server
        return result


def _require_updates(round: int, accepted: int, min_updates: int, rejected: dict[str, str]) -> None:
    if accepted < min_updates:
        raise RuntimeError(
            f"round {round}: only {accepted} valid update(s) arrived, at least {min_updates} needed; "
            f"rejected: {rejected}"
        )


# What a broken update can make an algorithm's server step raise (it is then isolated and excluded).
_STEP_ERRORS = (ArithmeticError, RuntimeError, ValueError, TypeError, IndexError, KeyError)

# Bounds on an update's metadata (`validate_update_meta`).
MAX_META_ENTRIES = 64
MAX_META_KEY_CHARS = 64
MAX_META_VALUE = 1e30  # a reported metric of larger magnitude is not a metric
MAX_CLIENT_ID = 2**31 - 1
MAX_NUM_SAMPLES = 2**40
SAMPLES_CAP_RATIO = 10.0  # aggregation="samples": no client counts more than this times the round's lower median


def validate_update_meta(meta: object, sender: int | None = None) -> dict:
    """An update's metadata, checked against its schema; WireError naming the field otherwise.

    Schema: ``client_id`` an int in 0..2**31-1 (equal to `sender` where the transport knows the sender),
    ``num_samples`` an int in 0..2**40 (0 if absent), and at most 64 other entries, each a metric: a name of at most
    64 characters and a finite number of magnitude at most 1e30.
    """
    if not isinstance(meta, dict):
        raise wire.WireError(f"update meta must be an object, got {type(meta).__name__}.")
    if len(meta) > MAX_META_ENTRIES:
        raise wire.WireError(f"update meta has {len(meta)} entries, at most {MAX_META_ENTRIES} allowed.")
    client_id = meta.get("client_id")
    if not _is_int(client_id) or not 0 <= client_id <= MAX_CLIENT_ID:
        raise wire.WireError(f"update meta 'client_id' must be an int in 0..{MAX_CLIENT_ID}, got {_short(client_id)}.")
    if sender is not None and client_id != sender:
        raise wire.WireError(f"update meta 'client_id' is {client_id}, but the update came from client {sender}.")
    num_samples = meta.get("num_samples", 0)
    if not _is_int(num_samples) or not 0 <= num_samples <= MAX_NUM_SAMPLES:
        raise wire.WireError(
            f"update meta 'num_samples' must be an int in 0..{MAX_NUM_SAMPLES}, got {_short(num_samples)}."
        )
    out = {"client_id": client_id, "num_samples": num_samples}
    for key, value in meta.items():
        if key in out:
            continue
        if not isinstance(key, str) or not 0 < len(key) <= MAX_META_KEY_CHARS:
            raise wire.WireError(f"update meta key {_short(key)}: expected a name of 1 to {MAX_META_KEY_CHARS} chars.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wire.WireError(f"update meta {key!r}: expected a number (a metric), got {_short(value)}.")
        if not abs(value) <= MAX_META_VALUE:  # exact for ints of any size; False for NaN and infinities
            raise wire.WireError(f"update meta {key!r}: expected a finite number of magnitude <= 1e30, "
                                 f"got {_short(value)}.")
        out[key] = float(value)
    return out


def capped_sample_counts(counts: list[int]) -> list[int]:
    """Sample counts with each capped at `SAMPLES_CAP_RATIO` x the lower median, so no one client's claim can take
    (nearly) all the weight of a ``samples``-weighted step."""
    if len(counts) < 2:
        return list(counts)
    lower_median = sorted(counts)[(len(counts) - 1) // 2]
    cap = max(1, int(SAMPLES_CAP_RATIO * lower_median))
    return [min(c, cap) for c in counts]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_received(payload: dict, value_dtype: str) -> dict:
    """`payload` with every value rounded to `value_dtype` and back to float32, as `wire.decode` returns it."""
    dtype = wire.VALUE_DTYPES[value_dtype]
    if dtype == torch.float32:
        return payload
    return {name: round_to_dtype(value, dtype) for name, value in payload.items()}


def _max_abs(value) -> float:
    values = value.values if isinstance(value, wire.SparseTensor) else value
    return float(values.abs().max()) if values.numel() else 0.0


def _mean_metrics(messages: list[wire.Message]) -> dict[str, float]:
    keys = {k for m in messages for k, v in m.meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys -= {"client_id", "num_samples"}
    out = {}
    for key in sorted(keys):
        values = [float(m.meta[key]) for m in messages if key in m.meta]
        out[key] = sum(values) / len(values)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# merge_adapters: the server step on files, without the base model
# ---------------------------------------------------------------------------------------------------------------------

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def load_adapter_state(adapter: str | Path | State) -> State:
    """A PEFT adapter state dict from a directory saved by `save_pretrained` (or a state dict, returned as fp32)."""
    if isinstance(adapter, dict):
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in adapter.items()}
    from safetensors.torch import load_file

    path = Path(adapter)
    weights = path / ADAPTER_WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"adapter weights not found: expected {weights} (a PEFT adapter directory).")
    return {k: aligned(v.to(torch.float32)) for k, v in load_file(str(weights)).items()}


def merge_adapters(
    global_adapter: str | Path | State,
    updates: list[bytes | str | Path],
    algorithm: str | Algorithm,
    *,
    round: int | None = None,
    config: FedSRDConfig | None = None,
    min_updates: int = 1,
) -> tuple[State, bytes]:
    """Run one server step on the current global adapter and the clients' encoded updates.

    Returns the new global adapter state dict (PEFT keys, no adapter name) and the encoded broadcast for the clients.
    Nothing here needs the base model. `round` defaults to the round named in the first readable update.
    """
    state = load_adapter_state(global_adapter)
    if isinstance(algorithm, Algorithm):
        algo = algorithm
        config = config or algo.config
    else:
        config = config or FedSRDConfig(algorithm=algorithm)
        algo = get_algorithm(algorithm, config)
    blobs = [Path(u).read_bytes() if isinstance(u, (str, Path)) else u for u in updates]
    if round is None:
        round = _round_of(blobs)
    server = FederatedServer(algo, state, config)
    result = server.step(round, blobs, min_updates=min_updates)
    return server.state, result.broadcast


def _round_of(blobs: list[bytes]) -> int:
    reasons = []
    for i, blob in enumerate(blobs):
        try:
            return wire.read_header(blob)["round"]  # the header only: nothing is regenerated to read the round
        except wire.WireError as error:
            reasons.append(f"update {i}: {error}")
    raise ValueError(
        "merge_adapters: no update could be read to find the round (expected fedsrd.wire messages; "
        + "; ".join(reasons)
        + "); pass round= explicitly (--round)."
    )


def save_adapter(state: State, out_dir: str | Path, adapter_config: dict | None = None) -> Path:
    """Write `state` as a PEFT adapter directory (adapter_model.safetensors + adapter_config.json)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if adapter_config is not None:
        (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return out
