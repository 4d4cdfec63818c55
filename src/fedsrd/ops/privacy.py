"""Client-level differential privacy: the Gaussian noise and the privacy accountant (docs/privacy.md).

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018, Algorithm 1)
protects *every client's whole dataset* at once. Each round the server samples clients, each sampled client's change
is clipped to an L2 bound ``C`` (so adding or removing one client moves the sum of the changes by at most ``C``: the
sensitivity), and Gaussian noise ``N(0, (z C)^2 I)`` is added to that sum, ``z`` the noise multiplier. Dividing by the
fixed number of sampled clients ``m`` (not by how many arrived) keeps the sensitivity of the mean at ``C / m``, so the
noise on the mean has standard deviation ``z C / m`` (`noise_std_on_mean`).

The accountant is the `dp-accounting` library (Google's; no hand-written formulas here): it composes ``rounds`` copies
of one round's event (`round_event`) and reports epsilon at a given delta, by Renyi DP (Mironov, "Renyi Differential
Privacy", CSF 2017; the default, as TensorFlow Privacy's DP-FedAvg) or by privacy loss distributions (tighter, slower).
What one round is depends on how the clients are sampled (`sample_clients` draws exactly ``m`` of ``N`` without
replacement) and on what "neighbouring federations" means:

* every client every round (``m = N``): no sampling; the Gaussian mechanism ``GaussianDpEvent(z)`` under add/remove
  adjacency (one client's data present or not; absent, it is a zero change, as a dropout is), sensitivity ``C``.
* ``"fixed_size"`` (``m < N``, what the sampler does): ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z /
  2))`` under *replace-one* adjacency (one client's data replaced by other data; ``N`` is public), the bound of Wang,
  Balle and Kasiviswanathan, "Subsampled Renyi Differential Privacy and Analytical Moments Accountant", AISTATS 2019,
  Theorem 27 (dp-accounting's ``_compute_rdp_sample_wor_gaussian``; RDP only, its PLD accountant has no such event).
  That bound's noise multiplier is the noise's standard deviation over the L2 sensitivity under replace-one; replacing
  one client's clipped change by another moves the sum by up to ``||c - c'|| <= 2 C``, so ``z C / (2 C) = z / 2``.
* ``"poisson"`` (``m < N``): ``PoissonSampledDpEvent(m / N, GaussianDpEvent(z))`` under add/remove, the approximation
  DP-FedAvg and TensorFlow Privacy use for a fixed-size sample; not a guarantee for this library's sampler.
"""

from __future__ import annotations

import functools
import math

import torch

DP_MODES = ("off", "central", "local")
DP_ACCOUNTANTS = ("rdp", "pld")
DP_SAMPLING_ACCOUNTINGS = ("fixed_size", "poisson")
# A run written before `dp_sampling_accounting` existed (no such key in its fed_config.json or checkpoint) was
# accounted with the Poisson approximation.
STORED_RUN_SAMPLING_ACCOUNTING = "poisson"
# Renyi orders the RDP accountant optimises over (fractional orders below 2 do not converge for large q).
RDP_ORDERS = tuple([2 + x / 2 for x in range(20)] + [12, 14, 16, 20, 24, 28, 32, 48, 64, 128, 256])
PLD_DISCRETIZATION = 1e-3  # the PLD accountant's value discretisation (pessimistic: epsilon is an upper bound)


def require_accountant() -> None:
    """Raise ImportError with the install command if the `dp-accounting` package is missing."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "differential privacy (dp_mode 'central' or 'local') needs the dp-accounting package: "
            "pip install 'fedsrd[privacy]' (or pip install dp-accounting)."
        ) from err


def sample_size(sampling_rate: float, num_clients: int) -> int:
    """m, the clients a round samples, from q = m / N and N; ValueError unless q N is a whole number in 1..N."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients (N, the clients sampled from) must be an int >= 1, got {num_clients!r}")
    m = round(sampling_rate * num_clients)
    if not 1 <= m <= num_clients or abs(sampling_rate * num_clients - m) > 1e-6:
        raise ValueError(
            f"sampling_rate {sampling_rate!r} x num_clients {num_clients} must be a whole number of clients in "
            f"1..{num_clients} (q = m / N)"
        )
    return m


def check_sampling(
    sampling_rate: float, sampling: str, accountant: str = "rdp", num_clients: int | None = None
) -> int | None:
    """ValueError unless a round of rate `sampling_rate` accounted as `sampling` by `accountant` can be bounded; the
    round's sample size m for fixed-size sampling with q < 1 (else None)."""
    if sampling not in DP_SAMPLING_ACCOUNTINGS:
        raise ValueError(f"unknown sampling accounting {sampling!r}; expected one of {DP_SAMPLING_ACCOUNTINGS}.")
    if accountant not in DP_ACCOUNTANTS:
        raise ValueError(f"unknown privacy accountant {accountant!r}; expected one of {DP_ACCOUNTANTS}.")
    if sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be > 0, got {sampling_rate!r}")
    if sampling_rate >= 1.0 or sampling == "poisson":
        return None
    if num_clients is None:
        raise ValueError(
            f"fixed-size sampling accounting (sampling_rate {sampling_rate:.4g} < 1) needs num_clients, the N clients "
            "each round's m = sampling_rate x N are drawn from without replacement; or pass sampling='poisson' for the "
            "Poisson approximation."
        )
    if accountant == "pld":
        raise ValueError(
            f"the 'pld' accountant cannot account fixed-size sampling (a share {sampling_rate:.4g} of {num_clients} "
            "clients without replacement): dp-accounting's PLD accountant has no SampledWithoutReplacementDpEvent. "
            "Use accountant 'rdp' with 'fixed_size' (a guarantee for this sampler), or 'poisson' sampling accounting "
            "with 'pld' (the Poisson approximation)."
        )
    return sample_size(sampling_rate, num_clients)


def neighboring_relation(sampling_rate: float, sampling: str = "fixed_size") -> str:
    """The adjacency epsilon is for: ``"replace_one"`` for fixed-size sampling with q < 1, else ``"add_or_remove_one"``
    (every client every round, or the Poisson approximation)."""
    return "replace_one" if sampling == "fixed_size" and sampling_rate < 1.0 else "add_or_remove_one"


def accounting_summary(sampling_rate: float, sampling: str = "fixed_size", accountant: str = "rdp") -> dict:
    """How epsilon is accounted, for history.json, the report and the model card: the accountant, the sampling model
    (``"full_participation"``, ``"fixed_size"`` or ``"poisson"``) and the adjacency (`neighboring_relation`)."""
    return {
        "accountant": accountant,
        "sampling": "full_participation" if sampling_rate >= 1.0 else sampling,
        "neighboring": neighboring_relation(sampling_rate, sampling),
    }


def round_event(
    noise_multiplier: float, sampling_rate: float, sampling: str = "fixed_size", num_clients: int | None = None
):
    """One round as a `dp_accounting` event (the module docstring says which, and why ``z / 2`` for fixed size)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate >= 1.0:
        return gaussian
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    # Replace-one sensitivity of the sum of m changes clipped to C is 2 C; the noise's std is z C.
    m = check_sampling(sampling_rate, sampling, "rdp", num_clients)
    return dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients, m, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    )


def _accountant(kind: str, relation: str = "add_or_remove_one"):
    from dp_accounting import pld, rdp
    from dp_accounting.privacy_accountant import NeighboringRelation

    neighboring = (
        NeighboringRelation.REPLACE_ONE if relation == "replace_one" else NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    if kind == "rdp":
        return rdp.RdpAccountant(list(RDP_ORDERS), neighboring_relation=neighboring)
    if kind == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)  # add/remove: PLD has no fixed size
    raise ValueError(f"unknown privacy accountant {kind!r}; expected one of {DP_ACCOUNTANTS}.")


@functools.lru_cache(maxsize=1024)
def epsilon_after(
    rounds: int,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    accountant: str = "rdp",
    sampling: str = "fixed_size",
    num_clients: int | None = None,
) -> float:
    """Epsilon at `delta` after `rounds` rounds (0 after none; infinity without noise). `sampling` says how a round
    with `sampling_rate` q < 1 is accounted (module docstring); ``"fixed_size"`` needs `num_clients` (N, with
    m = q N sampled each round)."""
    import dp_accounting

    check_sampling(sampling_rate, sampling, accountant, num_clients)
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = _accountant(accountant, neighboring_relation(sampling_rate, sampling))
    event = round_event(noise_multiplier, sampling_rate, sampling, num_clients)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, int(rounds)))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def noise_multiplier_for(
    target_epsilon: float,
    rounds: int,
    sampling_rate: float,
    delta: float,
    accountant: str = "rdp",
    sampling: str = "fixed_size",
    num_clients: int | None = None,
) -> float:
    """The smallest noise multiplier (to a relative 1e-3, rounded up) whose epsilon after `rounds` is <= target."""
    import dp_accounting

    check_sampling(sampling_rate, sampling, accountant, num_clients)
    relation = neighboring_relation(sampling_rate, sampling)

    def make_event(z: float):
        return dp_accounting.SelfComposedDpEvent(round_event(z, sampling_rate, sampling, num_clients), int(rounds))

    try:
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant, relation), make_event, target_epsilon, delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e3), tol=1e-4,
        )  # fmt: skip
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as err:
        raise ValueError(
            f"no noise multiplier in [0.001, 1000] reaches epsilon {target_epsilon} at delta {delta} over {rounds} "
            f"rounds with sampling rate {sampling_rate:.4g} ({sampling} sampling accounting): {err}"
        ) from err
    z = float(z)
    while epsilon_after(rounds, z, sampling_rate, delta, accountant, sampling, num_clients) > target_epsilon:
        z *= 1.0 + 1e-4  # calibration's tolerance
    return z


def noise_std_on_mean(noise_multiplier: float, clip_norm: float, num_sampled: int) -> float:
    """Standard deviation of the noise on the mean of `num_sampled` clipped changes: ``z C / m``."""
    return noise_multiplier * clip_norm / num_sampled


def client_noise_std(noise_multiplier: float, clip_norm: float, num_sampled: int) -> float:
    """Distributed DP: each of the m sampled clients adds ``N(0, (z C)^2 / m)``, so their m shares sum to
    ``N(0, (z C)^2)``, the central mechanism's noise on the sum."""
    return noise_multiplier * clip_norm / math.sqrt(num_sampled)


def gaussian_like(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """``N(0, std^2)`` noise of `shape`, float32 on the CPU, drawn from `generator` (bit-reproducible by seed)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32) * float(std)


__all__ = [
    "DP_ACCOUNTANTS",
    "DP_MODES",
    "DP_SAMPLING_ACCOUNTINGS",
    "STORED_RUN_SAMPLING_ACCOUNTING",
    "accounting_summary",
    "check_sampling",
    "client_noise_std",
    "epsilon_after",
    "gaussian_like",
    "neighboring_relation",
    "noise_multiplier_for",
    "noise_std_on_mean",
    "round_event",
    "sample_size",
]
