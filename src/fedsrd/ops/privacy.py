"""Client-level differential privacy: the Gaussian noise and the privacy accountant (docs/privacy.md).

DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018, Algorithm 1)
protects *every client's whole dataset* at once. Each round the server samples clients, each sampled client's change
is clipped to an L2 bound ``C`` (so adding or removing one client moves the sum of the changes by at most ``C``: the
sensitivity), and Gaussian noise ``N(0, (z C)^2 I)`` is added to that sum, ``z`` the noise multiplier. Dividing by the
fixed number of sampled clients ``m`` (not by how many arrived) keeps the sensitivity of the mean at ``C / m``, so the
noise on the mean has standard deviation ``z C / m`` (`noise_std_on_mean`).

One round is then a sampled Gaussian mechanism: the accountant (the `dp-accounting` library, Google's; no
hand-written formulas here) composes ``rounds`` of ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` with
``q = clients_per_round / num_clients`` and reports epsilon at a given delta, by Renyi DP (Mironov, "Renyi
Differential Privacy", CSF 2017; the default, as TensorFlow Privacy's DP-FedAvg) or by privacy loss distributions
(tighter, slower). With ``q = 1`` (every client every round) the event is the Gaussian mechanism itself.
"""

from __future__ import annotations

import functools
import math

import torch

DP_MODES = ("off", "central", "local")
DP_ACCOUNTANTS = ("rdp", "pld")
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


def round_event(noise_multiplier: float, sampling_rate: float):
    """One round as a `dp_accounting` event: the Gaussian mechanism, Poisson-subsampled at `sampling_rate` (< 1)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return gaussian if sampling_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def _accountant(kind: str):
    from dp_accounting import pld, rdp

    if kind == "rdp":
        return rdp.RdpAccountant(list(RDP_ORDERS))
    if kind == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    raise ValueError(f"unknown privacy accountant {kind!r}; expected one of {DP_ACCOUNTANTS}.")


@functools.lru_cache(maxsize=1024)
def epsilon_after(
    rounds: int, noise_multiplier: float, sampling_rate: float, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at `delta` after `rounds` rounds (0 after none; infinity without noise)."""
    import dp_accounting

    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = _accountant(accountant)
    acc.compose(dp_accounting.SelfComposedDpEvent(round_event(noise_multiplier, sampling_rate), int(rounds)))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def noise_multiplier_for(
    target_epsilon: float, rounds: int, sampling_rate: float, delta: float, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to a relative 1e-3, rounded up) whose epsilon after `rounds` is <= target."""
    import dp_accounting

    def make_event(z: float):
        return dp_accounting.SelfComposedDpEvent(round_event(z, sampling_rate), int(rounds))

    try:
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant), make_event, target_epsilon, delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e3), tol=1e-4,
        )  # fmt: skip
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as err:
        raise ValueError(
            f"no noise multiplier in [0.001, 1000] reaches epsilon {target_epsilon} at delta {delta} over {rounds} "
            f"rounds with sampling rate {sampling_rate:.4g}: {err}"
        ) from err
    z = float(z)
    while epsilon_after(rounds, z, sampling_rate, delta, accountant) > target_epsilon:  # calibration's tolerance
        z *= 1.0 + 1e-4
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
    "client_noise_std",
    "epsilon_after",
    "gaussian_like",
    "noise_multiplier_for",
    "noise_std_on_mean",
    "round_event",
]
