"""Named benchmark suites: which lm-eval task stands for each benchmark, with its shots and headline metric.

Pure data (no lm-eval import), so configs, the CLI and the model card can name suites without the `eval` extra.
A benchmark that lm-evaluation-harness does not have keeps its place in the suite with `task=None` and the reason,
so results tables show it as missing instead of dropping it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedsrd.data import SYNTHETIC_DOMAINS

NOT_IN_LM_EVAL = (
    "not in lm-evaluation-harness (0.4.13); the paper's numbers fit OpenCompass. Evaluate your own copy as a "
    "local JSONL task (docs/evaluation.md)"
)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a suite.

    `task` is the lm-eval task or group that runs it (None: lm-eval has none, see `note`), `num_fewshot` the shots
    (None: the task's own default), `metric` the headline metric as lm-eval names it in results (`"acc,none"`) or a
    prefix of that name (`"pass"` for `pass@1,create_test`), `domain` the column it is averaged in.
    """

    name: str
    task: str | None
    metric: str
    num_fewshot: int | None = None
    domain: str = ""
    unsafe_code: bool = False
    note: str = ""


@dataclass(frozen=True)
class Suite:
    """A named list of benchmarks; `averages` maps an average's name to the domains it is taken over."""

    name: str
    description: str
    benchmarks: tuple[Benchmark, ...]
    averages: dict[str, tuple[str, ...]] = field(default_factory=dict)
    needs_network: bool = True

    @property
    def available(self) -> tuple[Benchmark, ...]:
        return tuple(b for b in self.benchmarks if b.task is not None)

    @property
    def unavailable(self) -> dict[str, str]:
        return {b.name: b.note for b in self.benchmarks if b.task is None}


def synthetic_task_name(domain: str) -> str:
    """The lm-eval task shipped for a synthetic domain (`fedsrd/eval/tasks/fedsrd_<domain>.yaml`)."""
    return f"fedsrd_{domain}"


SYNTHETIC_GROUP = "fedsrd_synthetic"
SYNTHETIC_TASKS: tuple[str, ...] = tuple(synthetic_task_name(d) for d in SYNTHETIC_DOMAINS)

SUITES: dict[str, Suite] = {
    "synthetic": Suite(
        name="synthetic",
        description="Exact-match generation on the embedded synthetic domains (held-out test split; offline).",
        benchmarks=tuple(
            Benchmark(name=d, task=synthetic_task_name(d), metric="exact_match,none", num_fewshot=0, domain="synthetic")
            for d in SYNTHETIC_DOMAINS
        ),
        averages={"avg": ("synthetic",)},
        needs_network=False,
    ),
    # FedSRD paper, Table 2: 8 in-domain + 2 out-of-domain benchmarks (Yan et al., WWW 2026).
    "fedsrd_paper": Suite(
        name="fedsrd_paper",
        description="The FedSRD paper's benchmarks (Table 2) as far as lm-evaluation-harness has them; needs the Hub.",
        benchmarks=(
            Benchmark("HumanEval", "humaneval", "pass", 0, "code", unsafe_code=True),
            Benchmark(
                "MBPP", "mbpp", "pass", 3, "code", unsafe_code=True,
                note="lm-eval's mbpp is the full 500-problem test split; the paper used sanitized MBPP (257)",
            ),
            Benchmark("MedQA", "medqa_4options", "acc,none", 1, "medical"),
            Benchmark("MedMCQA", "medmcqa", "acc,none", 1, "medical", note="scored on the validation split (4,183)"),
            Benchmark("FinEval", None, "", 0, "finance", note=NOT_IN_LM_EVAL),
            Benchmark("FinanceIQ", None, "", 0, "finance", note=NOT_IN_LM_EVAL),
            Benchmark("GSM8K", "gsm8k", "exact_match,flexible-extract", 0, "math"),
            Benchmark("MATH", "hendrycks_math", "exact_match,none", 0, "math", note="7 subjects, 5,000 problems"),
            Benchmark(
                "AGIEval", "agieval", "acc,none", 0, "ood",
                note="lm-eval's group has 21 sub-tasks; the paper lists 20",
            ),
            Benchmark("LawBench", None, "", 1, "ood", note=NOT_IN_LM_EVAL),
        ),
        averages={"avg_in_domain": ("code", "medical", "finance", "math"), "avg_ood": ("ood",)},
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}")
    return SUITES[name]
