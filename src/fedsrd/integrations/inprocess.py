"""A ServerApp and its ClientApps in one process: Flower's Message API without a SuperLink, SuperNodes or Ray.

For debugging a federation (a breakpoint in the ClientApp stops the one process that runs everything) and for
measuring what a round sends (the same messages, records and bytes as a deployment, without its latency)::

    from fedsrd.integrations.flower import run_server
    from fedsrd.integrations.inprocess import InProcessGrid, serverapp_task_identity

    nodes = [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    with serverapp_task_identity():
        history = run_server(InProcessGrid(run_config, nodes), run_config)

`InProcessGrid` implements the two `flwr.serverapp.Grid` methods a ServerApp's round loop calls, ours and Flower's
strategies alike: `get_node_ids` and `send_and_receive`. Every message and reply crosses as Flower's protobuf
(`flwr.common.serde.message_to_proto`, serialized to bytes and parsed back), so each side gets its own copy (a
ClientApp or mod that edits the message it receives, as Flower's `secaggplus_mod` does, leaves the server's message
alone) and a record a deployment could not send fails here too; `sizes` records each (message, reply) size in bytes.
What differs from a deployment: a deployment sends the records as Flower's content objects beside the message's
protobuf, not inside one protobuf (the same records, a few bytes of framing apart); every message is answered in order
before `send_and_receive` returns, so `timeout` is never reached; and a node that should fail is named by `fail`, not
by stopping a process. Each SuperNode keeps
one `Context` for the whole run, as a SuperNode keeps its node state between messages.

Flower builds each `Message` with the run, node and task ids of the process that creates it
(`flwr.supercore.task_identity.TaskIdentity`, set by the ServerApp and ClientApp processes of a deployment), so the
ServerApp side needs `serverapp_task_identity()` around it in a process of its own making. Nothing in
``import fedsrd`` imports this module: Flower stays an optional dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

try:
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.common.constant import ErrorCode
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fedsrd.integrations.inprocess needs Flower: pip install 'fedsrd[flower]' (flwr==1.41.*)."
    ) from err

FIRST_NODE_ID = 100  # SuperNode i gets node id FIRST_NODE_ID + i
NODE_UNAVAILABLE = "Error: Node Unavailable - the destination node went away (InProcessGrid's `fail`)."

ClientAppLike = Callable[[Message, Context], Message]


@contextmanager
def serverapp_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """Give this process the task identity a ServerApp process has (Flower 1.41), so the ServerApp can build its
    messages; the identity is unset again (None) on exit, also when the run raises."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


class InProcessGrid:
    """A Flower Grid whose SuperNodes are `app` (default: fedsrd's ClientApp) in this process, one `Context` each.

    `node_configs[i]` is SuperNode i's node config; its node id is 100 + i. `fail(node_id, message)`, when given and
    true, makes that delivery fail as a node that went away: the ClientApp is not called and the reply is the Error a
    SuperLink returns for an unavailable node. A ClientApp that raises is answered with the Error a SuperNode returns
    for it. `sent` records each message type in order; `exchanges` each (message, reply) pair; `sizes` each pair's
    serialized sizes in bytes (reply 0 when the node failed before answering).
    """

    def __init__(
        self,
        run_config: Mapping[str, Any],
        node_configs: Sequence[Mapping[str, Any]],
        app: ClientAppLike | None = None,
        fail: Callable[[int, Message], bool] | None = None,
    ) -> None:
        if app is None:
            from fedsrd.integrations.flower import make_client_app

            app = make_client_app()
        self.app, self.fail = app, fail
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=dict(c), state=RecordDict(), run_config=dict(run_config))
            for n, c in enumerate(node_configs, start=FIRST_NODE_ID)
        }
        self.sent: list[str] = []
        self.exchanges: list[tuple[Message, Message]] = []
        self.sizes: list[tuple[int, int]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg.metadata.message_type)
            delivered, sent_bytes = _through_the_wire(msg)  # raises, as a deployment's push would, if unsendable
            reply, reply_bytes = self._deliver(delivered)
            self.exchanges.append((msg, reply))
            self.sizes.append((sent_bytes, reply_bytes))
            replies.append(reply)
        return replies

    def _deliver(self, msg: Message) -> tuple[Message, int]:
        """The reply the server receives for `msg` (parsed from the wire when the ClientApp answered) and its size."""
        node_id = msg.metadata.dst_node_id
        if node_id not in self.contexts:
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no SuperNode {node_id}"), reply_to=msg), 0
        if self.fail is not None and self.fail(node_id, msg):
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=NODE_UNAVAILABLE), reply_to=msg), 0
        try:
            return _through_the_wire(self.app(msg, self.contexts[node_id]))  # an unsendable reply: the app's failure
        except Exception as err:  # what a SuperNode replies when the ClientApp raises (flwr 1.41, run_clientapp)
            reason = f"{type(err)}:<'{err}'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg), 0


def _through_the_wire(msg: Message) -> tuple[Message, int]:
    """`msg` serialized as Flower's protobuf and parsed back (a copy sharing nothing with it), and its size in bytes."""
    blob = message_to_proto(msg).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(blob)), len(blob)
