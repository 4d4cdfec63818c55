"""Held-out evaluation of the global model, the same arithmetic in one process and in a team of processes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsrd.trainer import FederatedTrainer


def evaluate_global(trainer: FederatedTrainer) -> dict[str, float]:
    """Held-out loss of the global adapter on each eval set, and their mean as `eval_loss`."""
    return summarize_eval(evaluate_sets(trainer, list(trainer.eval_dataset)))


def evaluate_sets(trainer: FederatedTrainer, names: list[str]) -> dict[str, float]:
    """Held-out loss (and accuracy, for sequence classifiers) of the model as loaded on the eval sets `names`."""
    scores: dict[str, float] = {}
    for name in names:
        metrics = trainer.evaluate(eval_dataset=trainer.eval_dataset[name], metric_key_prefix=f"eval_{name}")
        scores[f"eval_{name}_loss"] = float(metrics[f"eval_{name}_loss"])
        if f"eval_{name}_accuracy" in metrics:  # sequence classifiers
            scores[f"eval_{name}_accuracy"] = float(metrics[f"eval_{name}_accuracy"])
    return scores


def summarize_eval(scores: dict[str, float]) -> dict[str, float]:
    """Per-set scores (in the eval sets' order) with their means added: `eval_loss`, and `eval_accuracy`."""
    scores = dict(scores)
    losses = [v for k, v in scores.items() if k.endswith("_loss")]
    scores["eval_loss"] = sum(losses) / len(losses)
    accuracies = [v for k, v in scores.items() if k.endswith("_accuracy")]
    if accuracies:
        scores["eval_accuracy"] = sum(accuracies) / len(accuracies)
    return scores
