"""Bringing a client that missed rounds up to the current global state.

With ``clients_per_round < num_clients`` a client that was not sampled misses that round's broadcast, and for
algorithms whose broadcast is a delta (FedSRD: one sparse factor) it cannot train on the new global state without
it. The server keeps, per client, the round and digest of the global state the client holds (`SyncLedger`), and
before the client trains again sends it either every broadcast it missed, in order, or the full global state,
whichever is fewer bytes. Both are ordinary `fedsrd.wire` messages, so the bytes are counted like any other.

Algorithms that write into frozen base weights (FLoRA, FedEx-LoRA) always get the missed broadcasts: the full
adapter state does not carry the base-weight changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedsrd import wire
from fedsrd.algorithms import Algorithm, State
from fedsrd.client import FederatedClient

FULL_STATE_KEY = "full_state"  # meta flag of a broadcast that carries the whole global state, not a delta


class CatchUpError(RuntimeError):
    """A client cannot be brought to the current global state with what the server still has."""


class OutOfSync(RuntimeError):
    """A client holds a different global state than the catch-up it received was made for."""

    def __init__(self, message: str, round: int, digest: str) -> None:
        super().__init__(message)
        self.round = round
        self.digest = digest


@dataclass
class CatchUp:
    """What one client receives before it trains: nothing, its missed broadcasts, or the full state."""

    kind: str  # "none" | "broadcasts" | "full"
    to_round: int  # the round of the global state the client holds afterwards
    blobs: list[tuple[int, bytes]] = field(default_factory=list)  # (round, encoded message), oldest first

    @property
    def num_bytes(self) -> int:
        return sum(len(data) for _, data in self.blobs)


class SyncLedger:
    """The server's record of the global state after each round and of the state each client holds.

    `digests[r]` is the digest of the global state after round r (0: the shared initial adapter);
    `broadcasts[r]` the encoded broadcast of round r, kept while a client may still need it;
    `held[client_id]` the (round, digest) that client last reported, or None when unknown.
    """

    def __init__(
        self,
        digests: dict[int, str] | None = None,
        broadcasts: dict[int, bytes] | None = None,
        held: dict[int, tuple[int, str] | None] | None = None,
    ) -> None:
        self.digests: dict[int, str] = dict(digests or {})
        self.broadcasts: dict[int, bytes] = dict(broadcasts or {})
        self.held: dict[int, tuple[int, str] | None] = dict(held or {})

    @property
    def round(self) -> int:
        """The latest round whose global state is recorded."""
        return max(self.digests) if self.digests else 0

    def add_round(self, round: int, broadcast: bytes, digest: str) -> None:
        self.broadcasts[round] = broadcast
        self.digests[round] = digest

    def set_held(self, client_id: int, round: int, digest: str) -> None:
        self.held[client_id] = (int(round), str(digest))

    def in_sync(self, client_id: int) -> bool:
        """Whether the client holds the latest global state."""
        return self.held.get(client_id) == (self.round, self.digests.get(self.round))

    def plan(self, client_id: int, full_state: Callable[[], bytes] | None) -> CatchUp:
        """The cheapest way to bring `client_id` to the latest round; `full_state` None: broadcasts only."""
        target = self.round
        if self.in_sync(client_id):
            return CatchUp("none", target)
        options: list[CatchUp] = []
        held = self.held.get(client_id)
        if held is not None and held[0] < target and self.digests.get(held[0]) == held[1]:
            missed = range(held[0] + 1, target + 1)
            if all(r in self.broadcasts for r in missed):
                options.append(CatchUp("broadcasts", target, [(r, self.broadcasts[r]) for r in missed]))
        if full_state is not None:
            options.append(CatchUp("full", target, [(target, full_state())]))
        if not options:
            raise CatchUpError(
                f"client {client_id} holds {_describe(held)}, the server is at round {target}, and the broadcasts "
                "in between are no longer kept; this algorithm writes into base weights, so the full adapter state "
                "cannot replace them. Restore the client's state directory or restart the run."
            )
        return min(options, key=lambda c: (c.num_bytes, c.kind != "broadcasts"))

    def prune(self, full_size: int | None) -> None:
        """Drop broadcasts no client will be sent.

        A broadcast older than what every client holds is never needed. Round r's broadcast is only sent to a
        client holding round r-1, as part of the concatenation r..latest; once that concatenation is larger than
        the full state (`full_size`; None: the full state is not an option), the full state wins for every such
        client, and the later concatenations only grow.
        """
        known = [h for h in self.held.values() if h is not None]
        oldest_needed = min((h[0] for h in known), default=0) + 1
        if len(known) < len(self.held):
            oldest_needed = 1  # a client in an unknown state may need anything
        tail = 0
        for r in sorted(self.broadcasts, reverse=True):
            tail += len(self.broadcasts[r])
            if r < oldest_needed or (full_size is not None and tail > full_size):
                del self.broadcasts[r]


def _describe(held: tuple[int, str] | None) -> str:
    return "an unknown state" if held is None else f"round {held[0]} (digest {held[1][:12]})"


# ---------------------------------------------------------------------------------------------------------------------
# the full global state as a wire message
# ---------------------------------------------------------------------------------------------------------------------


def encode_full_state(algorithm: Algorithm, state: State, round: int, positions: str = "auto") -> bytes:
    """The whole global state after `round` as a ``broadcast`` message, float32 so every bit survives."""
    msg = wire.Message(
        kind="broadcast",
        algorithm=algorithm.name,
        round=round,
        tensors=state,
        meta={"digest": wire.state_digest(state), FULL_STATE_KEY: True},
    )
    return wire.encode(msg, value_dtype="float32", positions=positions)


def decode_full_state(
    data: bytes, algorithm: str, like: State | None = None, max_bytes: int | None = None
) -> tuple[State, int]:
    """Decode and check a full-state message (against the names and shapes of `like`, if given); (state, round)."""
    specs = None if like is None else {k: wire.TensorSpec(tuple(t.shape), sparse_ok=False) for k, t in like.items()}
    msg = wire.decode(data, expected=specs, kind="broadcast", algorithm=algorithm, max_bytes=max_bytes,
                      max_mask_seeds=0)  # dense only: nothing to regenerate, whatever the header claims
    if msg.meta.get(FULL_STATE_KEY) is not True:
        raise wire.WireError(f"round {msg.round}: expected a full-state message, got a broadcast delta.")
    if any(isinstance(t, wire.SparseTensor) for t in msg.tensors.values()):
        raise wire.WireError(f"round {msg.round}: a full-state message must hold dense tensors only.")
    state = {name: tensor.contiguous() for name, tensor in msg.tensors.items()}
    digest = wire.state_digest(state)
    if digest != msg.meta.get("digest"):
        raise wire.WireError(
            f"round {msg.round}: the full state has digest {digest[:12]}, the sender's is "
            f"{str(msg.meta.get('digest'))[:12]}."
        )
    return state, msg.round


def apply_catch_up(
    client: FederatedClient,
    kind: str,
    blobs: list[tuple[int, bytes]],
    on_applied: Callable[[int, bytes], None] | None = None,
) -> list[tuple[int, bytes]]:
    """Bring `client` (its `state` and `round`) up to date; returns the broadcasts it applied, in order.

    Broadcasts for rounds the client already holds are skipped (a reply that was lost, say). Raises `OutOfSync`
    when the client is older than the first broadcast or ends on a different state than the server's; the
    broadcasts applied before that stay applied, and `on_applied(round, data)` has heard of each of them.
    """
    applied: list[tuple[int, bytes]] = []
    if kind == "full":
        if client.algorithm.writes_base_weights:
            raise OutOfSync(
                f"algorithm {client.algorithm.name!r} writes base weights; a full adapter state cannot replace "
                "the broadcasts it missed.",
                client.round,
                wire.state_digest(client.state),
            )
        (_, data), = blobs
        client.state, client.round = decode_full_state(
            data, client.algorithm.name, like=client.state, max_bytes=client.config.max_message_bytes
        )
        client.base_delta = {}
        return applied
    for round, data in blobs:
        if round <= client.round:
            continue
        if round != client.round + 1:
            raise OutOfSync(
                f"holds round {client.round} but was sent broadcasts from round {blobs[0][0]} on",
                client.round,
                wire.state_digest(client.state),
            )
        try:
            client.receive(data)
        except (RuntimeError, wire.WireError) as err:  # digest mismatch: this client diverged
            raise OutOfSync(str(err), client.round, wire.state_digest(client.state)) from err
        applied.append((round, data))
        if on_applied is not None:
            on_applied(round, data)
    return applied
