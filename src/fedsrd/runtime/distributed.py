"""Clients in parallel over processes: `accelerate launch --num_processes P examples/fed_train.py ...`.

Every process holds one copy of the model (on its own GPU, or on the CPU) and runs the same round loop
(`fedsrd.federation.Federation`, with `fedsrd.runtime.local`'s transport); a `ProcessTeam` decides what each process
does in the steps that can be shared out, with Accelerate's own utilities:

- local training: `PartialState.split_between_processes` gives each process a contiguous share of the round's
  sampled clients; each trains its share one after another, exactly as the single-process loop would, and encodes
  the updates; `gather_object` brings every process's encoded updates (and the clients' own tensors, for
  algorithms that keep some on the client) to every process, put back in client-id order;
- the server step runs once, on the main process; `broadcast_object_list` sends its encoded broadcast to the others,
  and every process applies it (and checks the digest) as every client does;
- evaluation: the eval sets are split between processes, and their scores gathered and averaged as in one process.

What travels between processes is bytes (`fedsrd.wire` messages; safetensors for client-kept tensors) inside small
envelopes of plain Python values, so the result is the one process's, bit for bit where the devices' arithmetic is
the same: per-client randomness is seeded by (seed, round, client id), never by process.

Each process's `Trainer` trains *its own* clients, so it must not behave as data-parallel training: no
DistributedDataParallel wrapper, no sharded dataloader, no gradient or loss all-reduce, no learning-rate scheduler
stepped once per process. Trainer and Accelerate decide all of that from Accelerate's process state
(`PartialState`/`AcceleratorState`, process-wide singletons), so the local phases and evaluations run inside
`single_process_view()`, which makes that state read "one process, not distributed" for their duration (device and
process index unchanged, so only the main process logs) and restores it before the next collective.

Failures: every exchange carries (process, step, error text, payload). If any process failed in a step, every
process raises: the failing one its own exception, the others `ProcessFailed` with that error's text and traceback,
so no process is left waiting in a collective. An exception outside these steps (e.g. in a main-process-only save)
ends that process; `accelerate launch` (torchrun) then stops the others and shows the error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, broadcast_object_list, gather_object

from fedsrd import wire
from fedsrd.federation.client_phase import train_clients
from fedsrd.federation.evaluation import evaluate_global, evaluate_sets, summarize_eval
from fedsrd.ops.aligned import aligned_state
from fedsrd.server import RoundResult

if TYPE_CHECKING:
    from fedsrd.algorithms import State
    from fedsrd.client import FederatedClient
    from fedsrd.server import FederatedServer
    from fedsrd.trainer import FederatedTrainer

logger = logging.getLogger(__name__)

# Process groups where every process is an ordinary torch.distributed rank with its own device: one client per process
# works there. DeepSpeed, FSDP, Megatron-LM, tensor parallelism and XLA shard one model over processes instead.
PARALLEL_CLIENT_TYPES = (
    DistributedType.MULTI_CPU,
    DistributedType.MULTI_GPU,
    DistributedType.MULTI_XPU,
    DistributedType.MULTI_NPU,
    DistributedType.MULTI_MLU,
    DistributedType.MULTI_SDAA,
    DistributedType.MULTI_MUSA,
    DistributedType.MULTI_HPU,
    DistributedType.MULTI_NEURON,
)


class ProcessFailed(Exception):
    """Another process of a multi-process run failed; the message is that process's error and traceback."""


class ProcessFailedRuntimeError(ProcessFailed, RuntimeError):
    """`ProcessFailed` for a `RuntimeError`, so that ``except RuntimeError`` (e.g. a round retry) acts alike on every
    process."""


@contextlib.contextmanager
def single_process_view() -> Iterator[None]:
    """Within the block, Accelerate's process state (and so Trainer's) reads as one process, not distributed.

    `DistributedType.NO` and ``num_processes == 1``; the device and process index stay, so each process keeps its own
    device and only the main process logs. Trainer then wraps nothing in DDP, shards no dataloader, gathers no loss
    and steps the learning-rate schedule once per optimizer step, as in a single-process run. No collective may be
    called inside. The state is restored on exit.
    """
    shared_states = (PartialState._shared_state, AcceleratorState._shared_state)
    saved = [dict(shared) for shared in shared_states]
    for shared in shared_states:
        if shared:  # AcceleratorState exists once an Accelerator (Trainer's) was built
            shared.update(distributed_type=DistributedType.NO, num_processes=1)
    try:
        yield
    finally:
        for shared, values in zip(shared_states, saved):
            shared.clear()
            shared.update(values)


class ProcessTeam(ABC):
    """The processes among which a run's clients are shared: this one alone (`SingleProcess`), or several under
    `accelerate launch` (`AccelerateTeam`). The simulation's transport (`fedsrd.runtime.local`) calls these steps."""

    num_processes: int = 1
    is_main: bool = True

    @abstractmethod
    def train_clients(
        self, trainer: FederatedTrainer, client_view: FederatedClient, clients: list[int], round: int
    ) -> tuple[dict[int, bytes], dict[str, str]]:
        """Every sampled client's encoded update by client id (in client-id order), and the dropped ones' reasons."""

    @abstractmethod
    def server_step(
        self,
        server: FederatedServer,
        round: int,
        updates: list[bytes],
        *,
        min_updates: int = 1,
        senders: list[int] | None = None,
    ) -> RoundResult:
        """`FederatedServer.step`, run once; every process gets its result (the encoded broadcast included)."""

    @abstractmethod
    def evaluate_global(self, trainer: FederatedTrainer) -> dict[str, float]:
        """`fedsrd.federation.evaluation.evaluate_global` of the model as loaded, the same on every process."""

    def agree(self, flag: bool) -> bool:
        """The main process's value of `flag`, on every process (e.g. a callback's stop request)."""
        return flag


class SingleProcess(ProcessTeam):
    """One process trains every client in turn (`python examples/fed_train.py`)."""

    def train_clients(self, trainer, client_view, clients, round):
        return train_clients(trainer, client_view, clients, round)

    def server_step(self, server, round, updates, *, min_updates=1, senders=None):
        return server.step(round, updates, min_updates=min_updates, senders=senders)

    def evaluate_global(self, trainer):
        return evaluate_global(trainer)


class AccelerateTeam(ProcessTeam):
    """P processes started by `accelerate launch`; each trains a share of every round's clients (module docstring)."""

    def __init__(self, state: PartialState) -> None:
        self.state = state
        self.num_processes = state.num_processes
        self.process_index = state.process_index
        self.is_main = state.is_main_process
        self.exchanges = 0  # exchanges so far (`_name`)

    # ---- the three shared-out steps ----------------------------------------------------------------------------
    def train_clients(self, trainer, client_view, clients, round):
        clients = list(clients)
        known_before = list(client_view.personal_states)

        def train_share() -> dict[int, dict[str, Any]]:
            results = {}
            with self.state.split_between_processes(clients) as share, single_process_view():
                for cid in share:
                    updates, dropped = train_clients(trainer, client_view, [cid], round)
                    personal = client_view.personal_states.get(cid)
                    memory = client_view.memories.get(cid)
                    results[cid] = {
                        "updates": updates,
                        "dropped": dropped,
                        "personal": None if personal is None else encode_state(personal),
                        "memory": None if memory is None else encode_state(memory),
                    }
            return results

        shares = self.exchange(f"round {round}: local training", train_share)
        by_client = {cid: result for share in shares for cid, result in share.items()}
        updates: dict[int, bytes] = {}
        dropped: dict[str, str] = {}
        for cid in clients:  # client-id order, whichever process trained the client
            result = by_client[cid]
            updates.update(result["updates"])
            dropped.update(result["dropped"])
            if result["personal"] is not None:
                client_view.personal_states[cid] = decode_state(result["personal"])
            if result["memory"] is not None:  # error-feedback residuals follow the client to any process
                client_view.memories[cid] = decode_state(result["memory"])
            else:
                client_view.memories.pop(cid, None)
        _order_like_one_process(client_view.personal_states, known_before, clients)
        return updates, dropped

    def server_step(self, server, round, updates, *, min_updates=1, senders=None):
        what = self._name(f"round {round}: server step")
        result, error, envelope = None, None, None
        if self.is_main:
            try:
                result = server.step(round, updates, min_updates=min_updates, senders=senders)
                envelope = self._envelope(what, payload=dataclasses.asdict(result))
            except Exception as err:
                error = err
                envelope = self._envelope(what, error=err)
        envelope = broadcast_object_list([envelope], from_process=0)[0]
        self._raise_failures([envelope], error)
        return result if self.is_main else RoundResult(**envelope["payload"])

    def evaluate_global(self, trainer):
        names = list(trainer.eval_dataset)

        def evaluate_share() -> dict[str, dict[str, float]]:
            with self.state.split_between_processes(names) as share, single_process_view():
                return {name: evaluate_sets(trainer, [name]) for name in share}

        shares = self.exchange("evaluation", evaluate_share)
        by_name = {name: scores for share in shares for name, scores in share.items()}
        scores: dict[str, float] = {}
        for name in names:  # the eval sets' own order, as one process would add them up
            scores.update(by_name[name])
        return summarize_eval(scores)

    def agree(self, flag: bool) -> bool:
        return bool(self.exchange("stop decision", lambda: bool(flag))[0])

    # ---- exchanges -----------------------------------------------------------------------------------------------
    def exchange(self, what: str, work: Callable[[], Any]) -> list[Any]:
        """Run `work` here, gather every process's result (in process order); raise everywhere if any failed."""
        what = self._name(what)
        error = None
        try:
            envelope = self._envelope(what, payload=work())
        except Exception as err:
            error = err
            envelope = self._envelope(what, error=err)
        envelopes = gather_object([envelope])
        self._raise_failures(envelopes, error)
        return [e["payload"] for e in envelopes]

    def _name(self, what: str) -> str:
        """Every process makes the same exchanges in the same order: the count and step name must match."""
        self.exchanges += 1
        return f"#{self.exchanges} {what}"

    def _envelope(self, what: str, payload: Any = None, error: BaseException | None = None) -> dict[str, Any]:
        """What one process contributes to an exchange: plain values and bytes, or its error's text."""
        envelope = {"process": self.process_index, "what": what, "payload": payload, "error": None}
        if error is not None:
            text = "".join(traceback.format_exception(error))
            envelope.update(payload=None, error=text, runtime_error=isinstance(error, RuntimeError))
        return envelope

    def _raise_failures(self, envelopes: list[dict[str, Any]], error: BaseException | None) -> None:
        """Raise on this process if any process failed (its own exception, or `ProcessFailed`) or if they diverged."""
        failed = [e for e in envelopes if e["error"] is not None]
        if failed:
            if error is not None:
                raise error
            first = failed[0]
            cls = ProcessFailedRuntimeError if first["runtime_error"] else ProcessFailed
            raise cls(f"process {first['process']} failed in {first['what']}:\n{first['error']}")
        steps = {e["what"] for e in envelopes}
        if len(steps) > 1:
            where = "; ".join(f"process {e['process']}: {e['what']}" for e in envelopes)
            raise RuntimeError(f"the processes of this run reached different steps ({where}); they have diverged.")

    def check_same_start(self, trainer: FederatedTrainer) -> None:
        """Raise on every process unless all start from the same global state (same model, config and seed)."""
        digests = self.exchange("start", lambda: wire.state_digest(trainer.global_state))
        if len(set(digests)) > 1:
            raise RuntimeError(
                "the processes of this run start from different global states (digests "
                f"{[d[:12] for d in digests]}); every process must load the same model with the same config and seed."
            )


def process_team(trainer: FederatedTrainer) -> ProcessTeam:
    """`AccelerateTeam` when this process is one of several (`accelerate launch --num_processes P`), else
    `SingleProcess`. Raises ValueError for launches that shard one model over processes (DeepSpeed, FSDP, ...)."""
    state = trainer.args.distributed_state
    if state is None or state.num_processes <= 1:
        return SingleProcess()
    if state.distributed_type not in PARALLEL_CLIENT_TYPES:
        raise ValueError(
            f"fedsrd runs whole clients in parallel, one model copy per process, but this launch is "
            f"{state.distributed_type.value} ({state.num_processes} processes), which shards one model over "
            "processes; launch with plain `accelerate launch --num_processes P` (no DeepSpeed/FSDP/TP config), or "
            "with one process."
        )
    team = AccelerateTeam(PartialState())
    team.check_same_start(trainer)
    if team.is_main:
        logger.info("%d processes share each round's clients (%s)", team.num_processes, state.distributed_type.value)
    return team


# ---- client-kept tensors between processes -------------------------------------------------------------------------


def encode_state(state: State) -> bytes:
    """A named tensor state as safetensors bytes (exact, pickle-free)."""
    from safetensors.torch import save

    return save({name: tensor.contiguous() for name, tensor in state.items()})


def decode_state(data: bytes) -> State:
    from safetensors.torch import load

    return aligned_state(load(data))


def _order_like_one_process(personal_states: dict[int, State], known_before: list[int], clients: list[int]) -> None:
    """Reorder `personal_states` in place as the single-process loop fills it: the clients it held before this round,
    then the new ones in client-id order (averages over clients, e.g. `Algorithm.export_state`, follow this order)."""
    if not isinstance(personal_states, dict):  # an on-disk store iterates by client id, whoever trained first
        return
    order = known_before + [cid for cid in clients if cid in personal_states and cid not in known_before]
    ordered = {cid: personal_states[cid] for cid in order}
    personal_states.clear()
    personal_states.update(ordered)
