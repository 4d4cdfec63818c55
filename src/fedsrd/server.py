"""The server role, and `merge_adapters`: the server step as a PEFT adapter-merge utility on files alone."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsrd import wire
from fedsrd.algorithms import Algorithm, State, get_algorithm
from fedsrd.client import expected_specs
from fedsrd.config import FedSRDConfig
from fedsrd.ops import generator_for, normalized_weights

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one server step produced."""

    round: int
    broadcast: bytes
    accepted: list[int] = field(default_factory=list)  # client ids whose update was aggregated
    rejected: dict[str, str] = field(default_factory=dict)  # client id (or position) -> reason
    metrics: dict[str, float] = field(default_factory=dict)  # means of the clients' reported metrics


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

    def decode_update(self, data: bytes, round: int) -> wire.Message:
        msg = wire.decode(
            data,
            expected=expected_specs(self.algorithm.update_shapes(self.state)),
            kind="update",
            algorithm=self.algorithm.name,
            max_bytes=self.config.max_message_bytes,
            require_all=not self.algorithm.update_is_partial(),
        )
        if msg.round != round:
            raise wire.WireError(f"update is for round {msg.round}, but the server is running round {round}.")
        num_samples = msg.meta.get("num_samples", 0)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 0:
            raise wire.WireError(f"update meta 'num_samples' must be a non-negative integer, got {num_samples!r}.")
        largest = max((_max_abs(t) for t in msg.tensors.values()), default=0.0)
        if largest > self.config.max_update_value:
            raise wire.WireError(
                f"update holds a value of magnitude {largest:.3g}, "
                f"above max_update_value={self.config.max_update_value:g}."
            )
        if self.config.clip_update_norm is not None:
            msg.tensors = clip_update(msg.tensors, self.state, self.config.clip_update_norm,
                                      self.algorithm.uploads_deltas)
        return msg

    def _aggregate(
        self, round: int, accepted: list[wire.Message], rejected: dict[str, str]
    ) -> tuple[State, dict, State, list[wire.Message]]:
        """Run the server step; if it fails or yields a non-finite state, find and exclude the updates that cause it.

        Returns the new state, the payload to broadcast, the server's new memory and the updates that were
        aggregated. `self.state` and `self.memory` are not touched here, so nothing a client sends can leave the server half-updated.
        """
        try:
            return (*self._try_aggregate(round, accepted), accepted)
        except (ArithmeticError, RuntimeError, ValueError) as err:
            logger.warning("round %d: server step failed (%s); checking updates one by one", round, err)
        good = []
        for msg in accepted:
            try:
                self._try_aggregate(round, [msg])
                good.append(msg)
            except (ArithmeticError, RuntimeError, ValueError) as err:
                rejected[f"client {msg.meta.get('client_id', '?')}"] = f"breaks the server step: {err}"
                logger.warning("round %d: excluded client %s: %s", round, msg.meta.get("client_id", "?"), err)
        if not good:
            raise RuntimeError(f"round {round}: no update could be aggregated; rejected: {rejected}")
        return (*self._try_aggregate(round, good), good)

    def _try_aggregate(self, round: int, messages: list[wire.Message]) -> tuple[State, dict, State]:
        if self.config.aggregation == "samples":
            weights = normalized_weights([m.meta["num_samples"] for m in messages])
        else:
            weights = normalized_weights([1.0] * len(messages))
        rng = generator_for(self.config.seed, "server_step", round)
        with torch.no_grad():
            payload, memory = self.algorithm.server_step_with_memory(
                self.state, [m.tensors for m in messages], weights, round, rng, self.memory
            )
            # Apply what the clients will decode (values rounded to the wire dtype), so every party stays equal.
            payload = as_received(payload, self.config.value_dtype)
            state = self.algorithm.reinitialize(self.algorithm.apply(self.state, payload), round)
        for name, value in state.items():
            if not bool(torch.isfinite(value).all()):
                raise ArithmeticError(f"the aggregated state has non-finite values in {name!r}")
        return state, payload, memory

    def step(self, round: int, updates: list[bytes], min_updates: int = 1) -> RoundResult:
        """Aggregate the round's encoded updates, apply the result and return the encoded broadcast."""
        accepted: list[wire.Message] = []
        rejected: dict[str, str] = {}
        for position, data in enumerate(updates):
            try:
                accepted.append(self.decode_update(data, round))
            except wire.WireError as err:
                rejected[f"#{position}"] = str(err)
                logger.warning("round %d: rejected update #%d: %s", round, position, err)
        if len(accepted) < min_updates:
            raise RuntimeError(
                f"round {round}: only {len(accepted)} valid update(s) arrived, at least {min_updates} needed; "
                f"rejected: {rejected}"
            )
        self.state, payload, self.memory, accepted = self._aggregate(round, accepted, rejected)
        self.round = round
        broadcast = wire.Message(
            kind="broadcast",
            algorithm=self.algorithm.name,
            round=round,
            tensors=payload,
            meta={"digest": wire.state_digest(self.state)},
        )
        data = wire.encode(broadcast, value_dtype=self.config.value_dtype, positions=self.config.positions)
        return RoundResult(
            round=round,
            broadcast=data,
            accepted=[int(m.meta.get("client_id", -1)) for m in accepted],
            rejected=rejected,
            metrics=_mean_metrics(accepted),
        )


def as_received(payload: dict, value_dtype: str) -> dict:
    """`payload` with every value rounded to `value_dtype` and back to float32, as `wire.decode` returns it."""
    dtype = wire.VALUE_DTYPES[value_dtype]
    if dtype == torch.float32:
        return payload
    out = {}
    for name, value in payload.items():
        if isinstance(value, wire.SparseTensor):
            values = value.values.to(dtype).to(torch.float32)
            out[name] = wire.SparseTensor(shape=value.shape, indices=value.indices, values=values, mask=value.mask)
        else:
            out[name] = value.to(dtype).to(torch.float32)
    return out


def clip_update(payload: dict, global_state: State, max_norm: float, uploads_deltas: bool) -> dict:
    """`payload` with its proposed change scaled so the change's L2 norm is at most `max_norm`.

    The change of a tensor is the upload itself for delta-uploading algorithms (and for names outside the state),
    else upload - global. Sparse uploads keep their positions.
    """

    def change(name, value):
        if isinstance(value, wire.SparseTensor):
            values = value.values
            if not uploads_deltas and name in global_state:
                values = values - global_state[name].reshape(-1)[value.indices]
            return values
        if not uploads_deltas and name in global_state:
            return value - global_state[name]
        return value

    changes = {name: change(name, value) for name, value in payload.items()}
    norm = float(torch.sqrt(sum((c.double() ** 2).sum() for c in changes.values()))) if changes else 0.0
    if norm <= max_norm:
        return payload
    scale = max_norm / norm
    out = {}
    for name, value in payload.items():
        scaled = changes[name] * scale
        if isinstance(value, wire.SparseTensor):
            if not uploads_deltas and name in global_state:
                scaled = scaled + global_state[name].reshape(-1)[value.indices]
            out[name] = wire.SparseTensor(shape=value.shape, indices=value.indices, values=scaled, mask=value.mask)
        else:
            out[name] = scaled + global_state[name] if (not uploads_deltas and name in global_state) else scaled
    return out


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
    return {k: v.to(torch.float32) for k, v in load_file(str(weights)).items()}


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
    for blob in blobs:
        try:
            return wire.decode(blob).round
        except wire.WireError:
            continue
    raise ValueError("merge_adapters: no update could be read to find the round; pass round= explicitly.")


def save_adapter(state: State, out_dir: str | Path, adapter_config: dict | None = None) -> Path:
    """Write `state` as a PEFT adapter directory (adapter_model.safetensors + adapter_config.json)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if adapter_config is not None:
        (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return out
