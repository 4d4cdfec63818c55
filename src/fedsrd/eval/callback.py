"""`LmEvalCallback`: lm-eval scores of the global adapter every k rounds, kept in history.json next to the bytes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from fedsrd.eval.harness import INSTALL_HINT, evaluate_adapter
from fedsrd.federation.callbacks import FederatedCallback
from fedsrd.wire import MB

logger = logging.getLogger(__name__)

SCORE_PREFIX = "lm_eval/"
UNAVAILABLE_KEY = "lm_eval_unavailable"


class LmEvalCallback(FederatedCallback):
    """Runs lm-eval tasks on the in-memory global model every `every` rounds and after the last one.

    Each evaluated round's record (its `history.json` entry) gets `lm_eval/<task>/<metric>` keys (see
    `AdapterEvaluation.scores`) and, when a suite has benchmarks that could not run, `lm_eval_unavailable`
    (benchmark -> reason). Only the main process evaluates. `FederatedTrainer` adds this callback itself when
    `FedSRDConfig.lm_eval_tasks` is set; build one directly to use other settings.
    """

    def __init__(
        self,
        tasks: Sequence[str | dict],
        every: int = 1,
        *,
        tokenizer: Any = None,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        max_gen_toks: int | None = None,
        include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        allow_code_execution: bool = False,
        print_scores: bool = True,
    ) -> None:
        if not tasks:
            raise ValueError("LmEvalCallback: tasks is empty; name at least one lm-eval task or suite.")
        if every < 0:
            raise ValueError(f"LmEvalCallback: every must be >= 0 (0: only after the last round), got {every}.")
        try:
            import lm_eval  # noqa: F401
        except ImportError as error:
            raise ImportError(INSTALL_HINT) from error
        self.tasks = list(tasks)
        self.every = every
        self.tokenizer = tokenizer
        self.options = dict(
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            max_gen_toks=max_gen_toks,
            include_path=include_path,
            allow_code_execution=allow_code_execution,
        )
        self.print_scores = print_scores

    @classmethod
    def from_config(cls, fed_config: Any, tokenizer: Any = None) -> LmEvalCallback:
        """The callback `FedSRDConfig.lm_eval_*` describes."""
        return cls(
            fed_config.lm_eval_tasks,
            fed_config.lm_eval_every,
            tokenizer=tokenizer,
            limit=fed_config.lm_eval_limit,
            batch_size=fed_config.lm_eval_batch_size,
            max_gen_toks=fed_config.lm_eval_max_gen_toks,
            include_path=fed_config.lm_eval_include_path,
            allow_code_execution=fed_config.lm_eval_allow_code_execution,
        )

    def is_due(self, round: int, is_last: bool) -> bool:
        return is_last or (self.every > 0 and round % self.every == 0)

    def on_init_end(self, args, state, control, processing_class=None, **kwargs):
        if self.tokenizer is None:
            self.tokenizer = processing_class

    def on_round_end(self, args, state, control, round=None, record=None, is_last=False, model=None, **kwargs):
        if record is None or model is None or args.process_index != 0 or not self.is_due(round, is_last):
            return
        result = evaluate_adapter(model, self.tokenizer, self.tasks, **self.options)
        record.update({SCORE_PREFIX + key: value for key, value in result.scores.items()})
        if result.unavailable:
            record[UNAVAILABLE_KEY] = dict(result.unavailable)
        if self.print_scores:  # next to the round table fedsrd prints
            from tqdm.auto import tqdm

            tqdm.write(format_round_scores(record))
        else:
            logger.info(format_round_scores(record))


def format_round_scores(record: dict[str, Any]) -> str:
    """One line: the round's lm-eval scores next to its upload/download and cumulative MB."""
    scores = "  ".join(f"{k[len(SCORE_PREFIX):]}={v:.4f}" for k, v in record.items() if k.startswith(SCORE_PREFIX))
    return (
        f"round {record.get('round')}: lm-eval {scores or '(none)'} | up {record.get('upload_bytes', 0) / MB:.3f} MB"
        f"  down {record.get('download_bytes', 0) / MB:.3f} MB  cumulative {record.get('cumulative_mb', 0.0):.3f} MB"
    )
