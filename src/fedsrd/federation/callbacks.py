"""Round callbacks: `transformers.TrainerCallback`s that also hear the federation's events, with `control` honoured.

What fires when (every runtime; on Flower, on the coordinator; under Accelerate, on every process):

=====================  =====================================================================================
``on_train_begin``     once per federation, before its first round (also when resuming); never by a local phase
``on_round_begin``     each round (each attempt of a retried round), with ``round`` and the sampled ``clients``
``on_step_end`` etc.   Trainer's own step events, inside each client's local phase (simulation, Flower node)
``on_round_end``       each finished round, with ``record`` (its ``history.json`` entry, which the callback may
                       extend), ``saved_dir`` (``round_NNNN/`` written this round, or None) and ``is_last``
``on_log``             each finished round, with the round's metrics as ``fed/*``
``on_train_end``       once per federation, after its last round and the final save; never by a local phase
=====================  =====================================================================================

As in `transformers.trainer_callback.CallbackHandler.call_event`, a callback may return a `TrainerControl` (or
nothing if it changes nothing); the returned object is the control every later callback and the federation see.
``control.should_training_stop`` set by any round event ends the federation after the current round: its record
says ``"should_training_stop": true``, the final adapter is saved from it, and ``on_train_end`` fires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState


class FederatedCallback(TrainerCallback):
    """A `TrainerCallback` that also hears the federation's per-round events (see the module's table).

    `on_round_begin(args, state, control, round=, clients=, model=)` and
    `on_round_end(args, state, control, round=, record=, saved_dir=, is_last=, model=)`. `record` is the round's
    entry of `history.json` and may be extended in place (it is written after the callbacks ran); `saved_dir` is the
    `round_NNNN/` adapter directory written this round, or None; the model holds the new global adapter (None on a
    Flower coordinator, which has no model). The round metrics also reach every callback's `on_log`. Return a
    `TrainerControl` with ``should_training_stop`` set to end the federation after this round.
    """

    def on_round_begin(self, args, state, control, **kwargs):
        pass

    def on_round_end(self, args, state, control, **kwargs):
        pass


class RoundEvents:
    """Calls the federation-level events on a list of callbacks, keeping the one federation `control`.

    `callbacks` is a list or a zero-argument function returning the current list (a Trainer's callback handler may
    gain callbacks after the federation object is built). `agree` makes every process of a team take the main
    process's stop decision (identity in one process). `state` and `model` may be zero-argument functions (a Trainer
    builds a new `TrainerState` for every local phase).
    """

    def __init__(
        self,
        callbacks: Sequence[TrainerCallback] | Callable[[], Sequence[TrainerCallback]],
        args: Any,
        state: TrainerState | Callable[[], TrainerState] | None = None,
        model: Any = None,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        self._callbacks = callbacks
        self.args = args
        self._state = state if state is not None else TrainerState()
        self._model = model
        self.control = TrainerControl()
        self.agree = agree or (lambda flag: flag)

    @property
    def callbacks(self) -> Sequence[TrainerCallback]:
        return self._callbacks() if callable(self._callbacks) else self._callbacks

    @property
    def state(self) -> TrainerState:
        return self._state() if callable(self._state) else self._state

    @property
    def model(self) -> Any:
        """The model the callbacks see (None on a Flower coordinator); `model` may be a function returning it."""
        return self._model() if callable(self._model) and not hasattr(self._model, "parameters") else self._model

    def call(self, event: str, **kwargs: Any) -> TrainerControl:
        """Fire `event` on every callback that has it; a returned control replaces the current one."""
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is None:
                continue
            result = handler(self.args, self.state, self.control, model=self.model, **kwargs)
            if isinstance(result, TrainerControl):
                self.control = result
        return self.control

    def train_begin(self) -> None:
        self.control.should_training_stop = False
        self.call("on_train_begin")

    def train_end(self) -> None:
        self.call("on_train_end")

    def should_stop(self) -> bool:
        """Whether a callback asked to end the federation (the main process decides for a team)."""
        return bool(self.agree(bool(self.control.should_training_stop)))
