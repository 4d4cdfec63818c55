"""The client role: apply broadcasts to the local copy of the global state, turn local training into an upload."""

from __future__ import annotations

import logging
from typing import Any

from fedsrd import wire
from fedsrd.algorithms import Algorithm, State
from fedsrd.config import FedSRDConfig
from fedsrd.ops import generator_for

logger = logging.getLogger(__name__)


def expected_specs(shapes: dict[str, tuple[tuple[int, ...], bool]]) -> dict[str, wire.TensorSpec]:
    return {name: wire.TensorSpec(shape=shape, sparse_ok=sparse_ok) for name, (shape, sparse_ok) in shapes.items()}


class FederatedClient:
    """One party's view of the federation: its copy of the global state and the codec it speaks.

    `state` is only ever changed by `receive`, which decodes the server's bytes, applies them with the algorithm's
    `apply`, and checks the result against the digest the server computed of its own state.
    """

    def __init__(self, algorithm: Algorithm, global_state: State, config: FedSRDConfig) -> None:
        self.algorithm = algorithm
        self.config = config
        self.state = global_state
        self.round = 0

    def receive(self, broadcast: bytes) -> State:
        """Decode and apply the server's broadcast; raise if the result differs from the server's state."""
        msg = wire.decode(
            broadcast,
            expected=expected_specs(self.algorithm.broadcast_shapes(self.state)),
            kind="broadcast",
            algorithm=self.algorithm.name,
            max_bytes=self.config.max_message_bytes,
            require_all=not self.algorithm.broadcast_is_partial(),
        )
        new_state = self.algorithm.apply(self.state, msg.tensors)
        digest = wire.state_digest(new_state)
        if msg.meta.get("digest") != digest:
            raise RuntimeError(
                f"round {msg.round}: the global state after applying the broadcast has digest {digest[:12]}, "
                f"but the server's is {str(msg.meta.get('digest'))[:12]}; client and server have diverged."
            )
        self.state = new_state
        self.round = msg.round
        return new_state

    def make_update(
        self, local_state: State, *, round: int, client_id: int, num_samples: int, metrics: dict[str, Any] | None = None
    ) -> bytes:
        """Encode what this client uploads after local training ended in `local_state`."""
        rng = generator_for(self.config.seed, "client_update", round, client_id)
        payload = self.algorithm.client_update(self.state, local_state, round, rng)
        meta = {"client_id": int(client_id), "num_samples": int(num_samples), **(metrics or {})}
        msg = wire.Message(kind="update", algorithm=self.algorithm.name, round=round, tensors=payload, meta=meta)
        return wire.encode(msg, value_dtype=self.config.value_dtype, positions=self.config.positions)
