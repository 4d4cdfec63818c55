"""The client role: apply broadcasts to the local copy of the global state, turn local training into an upload.

Base-weight writes (FLoRA, FedEx-LoRA) live in `fedsrd.base_weights`."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from fedsrd import wire
from fedsrd.algorithms import Algorithm, BaseDelta, State
from fedsrd.config import FedSRDConfig
from fedsrd.ops import generator_for
from fedsrd.ops.privacy import client_noise_std

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
        # Client-kept tensors (`Algorithm.personal`) by client id, so a client finds its own wherever it trains next.
        self.personal_states: dict[int, State] = {}
        # What each client carries from one upload to its next (`Algorithm.client_update_with_memory`), by client id.
        self.memories: dict[int, State] = {}
        # What the last broadcast asks every party to fold into its base weights (`BaseWeightWriter.add`).
        self.base_delta: BaseDelta = {}
        # dp_mode="local" on a deployment: a secret only this party knows, mixed into its noise seed so that the
        # server, which knows the run seed, cannot regenerate the share (a SuperNode's `dp-noise-secret`).
        self.noise_secret: str | None = None

    def receive(self, broadcast: bytes) -> State:
        """Decode and apply the server's broadcast; raise if the result differs from the server's state."""
        msg = wire.decode(
            broadcast,
            expected=expected_specs(self.algorithm.broadcast_shapes(self.state)),
            kind="broadcast",
            algorithm=self.algorithm.name,
            max_bytes=self.config.max_message_bytes,
            require_all=not self.algorithm.broadcast_is_partial(),
            max_mask_seeds=self.config.num_clients,  # a broadcast's mask: at most the union of every client's seed
        )
        new_state = self.algorithm.reinitialize(self.algorithm.apply(self.state, msg.tensors), msg.round)
        digest = wire.state_digest(new_state)
        if msg.meta.get("digest") != digest:
            raise RuntimeError(
                f"round {msg.round}: the global state after applying the broadcast has digest {digest[:12]}, "
                f"but the server's is {str(msg.meta.get('digest'))[:12]}; client and server have diverged."
            )
        self.state = new_state
        self.round = msg.round
        self.base_delta = self.algorithm.base_delta(msg.tensors)
        return new_state

    def start_state(self, client_id: int) -> State:
        """The adapter client `client_id` trains from: the global state (at that client's LoRA rank, with
        `client_lora_ranks`) with that client's personal tensors on top."""
        return {**self.rank_view(client_id), **self.personal_states.get(client_id, {})}

    def rank_view(self, client_id: int) -> State:
        """The global state as client `client_id` sees it: `Algorithm.client_start_state` at its configured rank
        (`FedSRDConfig.client_lora_ranks`), or the global state itself when no per-client ranks are set."""
        if self.config.client_lora_ranks is None:
            return self.state
        return self.algorithm.client_start_state(self.state, self.config.client_rank(client_id))

    def keep_personal(self, client_id: int, local_state: State) -> None:
        """Store client `client_id`'s personal tensors (`Algorithm.personal`) after its local training."""
        personal = self.algorithm.personal
        kept = {k: v.detach().to("cpu", torch.float32).clone() for k, v in local_state.items() if personal(k)}
        if kept:
            self.personal_states[client_id] = kept

    def make_update(
        self, local_state: State, *, round: int, client_id: int, num_samples: int, metrics: dict[str, Any] | None = None
    ) -> bytes:
        """Encode what this client uploads after local training ended in `local_state`."""
        rng = generator_for(self.config.seed, "client_update", round, client_id)
        memory = self.memories.get(client_id, {})
        start = self.rank_view(client_id)  # the upload is at this client's own rank
        payload, kept = self.algorithm.client_update_with_memory(start, local_state, memory, round, rng)
        if kept:
            self.memories[client_id] = {k: v.detach().to("cpu", torch.float32) for k, v in kept.items()}
        else:
            self.memories.pop(client_id, None)
        if self.config.dp_mode == "local":
            payload = self.privatize(payload, round=round, client_id=client_id)
        meta = {"client_id": int(client_id), "num_samples": int(num_samples), **(metrics or {})}
        msg = wire.Message(kind="update", algorithm=self.algorithm.name, round=round, tensors=payload, meta=meta)
        return wire.encode(msg, value_dtype=self.config.value_dtype, positions=self.config.positions)

    def privatize(self, payload: dict, *, round: int, client_id: int) -> dict:
        """dp_mode="local" (distributed DP, docs/privacy.md): clip the change `payload` proposes to dp_clip_norm, then
        add this client's share ``N(0, (z C)^2 / m)`` of the noise to every coordinate of every upload tensor, drawn
        from (seed, round, client): the m sampled clients' shares sum to the central mechanism's ``N(0, (z C)^2)``.
        With `noise_secret` set, a hash of it joins the seed: same secret, same bits; no secret, no way to redraw."""
        cfg = self.config
        clipped = self.algorithm.clip_update(self.state, payload, float(cfg.dp_clip_norm))
        std = client_noise_std(cfg.resolved_dp_noise_multiplier, float(cfg.dp_clip_norm), cfg.sampled_per_round)
        secret = () if self.noise_secret is None else (hashlib.sha256(self.noise_secret.encode()).hexdigest(),)
        rng = generator_for(cfg.seed, "dp_noise", round, client_id, *secret)
        return self.algorithm.add_dp_noise(self.state, clipped, std, rng)


# Model cards published before `fedsrd.base_weights` existed import it from here.
from fedsrd.base_weights import add_base_delta  # noqa: E402

__all__ = ["FederatedClient", "add_base_delta", "expected_specs"]
