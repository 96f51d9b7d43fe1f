"""Failure diagnostics over a run's checkpoints: reward over-optimisation, verbosity bias, mode collapse.

Each alarm takes per-checkpoint series in training order (one value per evaluated checkpoint) and returns an
:class:`Alarm`. Series are smoothed by a trailing moving average over ``window`` checkpoints before any
comparison, so one noisy evaluation neither fires an alarm nor hides one; the smoothed value at checkpoint
i is the mean of checkpoints ``i − window + 1 .. i``, hence the earliest index an alarm can name is
``window`` (the first smoothed value, at ``window − 1``, is the baseline). Only past checkpoints are used,
so the same call works online during training.

References: Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization" (proxy vs gold
reward as KL grows); Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF"
(verbosity bias); Kirk et al. 2024, "Understanding the Effects of RLHF on LLM Generalisation and
Diversity" (mode collapse).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from alignkit.evaluation.metrics import Numbers, as_vector

__all__ = [
    "CHECKPOINTS_FILE",
    "Alarm",
    "Correlation",
    "GaoFit",
    "GaoForm",
    "checkpoint_alarms",
    "fit_gao_curve",
    "length_drift_alarm",
    "length_reward_correlation",
    "mode_collapse_alarm",
    "overoptimisation_alarm",
    "pearson",
    "spearman",
]


@dataclass(frozen=True)
class Alarm:
    """The verdict of one diagnostic."""

    fired: bool
    """Whether the failure was detected."""
    at_index: int | None
    """The first checkpoint (index into the input series) at which it was detected; ``None`` if not fired."""
    message: str
    """What was seen, in numbers, and what to do about it; says why it stayed quiet when not fired."""


def _trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """``s[j] = mean(x[j : j + window])``, length ``n − window + 1``; ``s[j]`` belongs to checkpoint ``j + window − 1``."""
    return np.convolve(x, np.full(window, 1.0 / window), mode="valid")


def _check_window(n: int, window: int) -> str | None:
    """``None`` if ``n`` checkpoints are enough for ``window``, else the reason for a quiet alarm."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if n < window + 1:
        return f"not enough checkpoints: {n}, need at least window + 1 = {window + 1}"
    return None


# --- reward over-optimisation ---------------------------------------------------------------------------


def overoptimisation_alarm(
    kl: Numbers, proxy: Numbers, gold: Numbers, window: int = 3, min_drop: float = 0.1
) -> Alarm:
    """Fires when the gold reward falls from its peak while the proxy reward keeps rising (Gao et al. 2022).

    Gao et al. show that optimising a learned (proxy) reward model against a policy first raises and then
    lowers the true ("gold") reward as ``KL(π ‖ π_init)`` grows, while the proxy keeps climbing: the policy
    exploits the proxy's errors. With ``g``, ``p`` the trailing means over ``window`` checkpoints of
    ``gold`` and ``proxy`` (``g_0`` the first of them), the alarm fires at the first checkpoint i with::

        drop_i = max_{j≤i} g_j − g_i,   gain = g_peak − g_0     (peak = argmax_{j≤i} g_j, the first one)
        drop_i > min_drop · gain   and   p_i > p_peak

    that is, the gold reward has given back more than ``min_drop`` (a fraction) of what it had gained from
    the first checkpoint to its peak, while the proxy is higher than it was at the gold peak. Measuring the
    drop against the gain makes the threshold independent of the gold reward's offset and scale (a reward
    model's scores have neither). If the gold never rose above its start, any fall with a rising proxy
    counts. A gold reward that falls together with the proxy is not over-optimisation (training is simply
    getting worse) and does not fire.

    ``kl``: the KL to the reference (or its square root) at each checkpoint, quoted in the message to
    locate the peak; ``proxy``: the reward being optimised; ``gold``: a held-out judge, the same for all
    checkpoints. All three are per-checkpoint series of one length, in training order.
    """
    x, prox, g_raw = as_vector(kl, "kl"), as_vector(proxy, "proxy"), as_vector(gold, "gold")
    if not (x.size == prox.size == g_raw.size):
        raise ValueError(f"kl, proxy and gold must have one length, got {x.size}, {prox.size}, {g_raw.size}")
    if min_drop < 0:
        raise ValueError(f"min_drop must be >= 0, got {min_drop}")
    if (reason := _check_window(x.size, window)) is not None:
        return Alarm(False, None, reason)
    g, p = _trailing_mean(g_raw, window), _trailing_mean(prox, window)
    offset = window - 1  # smoothed index j belongs to checkpoint j + offset
    peak = 0
    for j in range(1, g.size):
        if g[j] > g[peak]:
            peak = j
            continue
        drop, gain = g[peak] - g[j], g[peak] - g[0]
        lost = drop / gain if gain > 0 else math.inf
        if drop > 0 and lost > min_drop and p[j] > p[peak]:
            i, best = j + offset, peak + offset
            share = f"{lost:.0%} of its gain" if gain > 0 else "below its starting value"
            return Alarm(
                True,
                i,
                f"reward over-optimisation at checkpoint {i} (KL {x[i]:.4g}): the gold reward (mean of "
                f"{window} checkpoints) fell from {g[peak]:.4g} at checkpoint {best} (KL {x[best]:.4g}) to "
                f"{g[j]:.4g}, {share}, while the proxy reward rose from {p[peak]:.4g} to {p[j]:.4g}. "
                f"The policy exploits the proxy's errors (Gao et al. 2022): keep a checkpoint near {best}, "
                "stop earlier, or raise the KL penalty.",
            )
    return Alarm(
        False,
        None,
        f"no over-optimisation over {x.size} checkpoints: the gold reward (mean of {window}) never lost more "
        f"than {min_drop:.0%} of its gain while the proxy rose (gold peak {g.max():.4g}, last {g[-1]:.4g}).",
    )


class GaoForm(StrEnum):
    """The functional forms of gold reward against ``d = √KL`` fitted by Gao et al. 2022."""

    BON = "bon"
    """Best-of-n: ``R(d) = d (α − β d)``."""
    RL = "rl"
    """Reinforcement learning: ``R(d) = d (α − β log d)``."""


@dataclass(frozen=True)
class GaoFit:
    """Least-squares fit of a :class:`GaoForm` to gold rewards; see :func:`fit_gao_curve`."""

    form: GaoForm
    alpha: float
    beta: float
    peak_d: float | None
    """``√KL`` at which the fitted reward is largest; ``None`` when it has no maximum (``β ≤ 0``)."""
    peak_kl: float | None
    """``peak_d²``."""
    peak_reward: float | None
    """The fitted reward at ``peak_d`` (relative to the initial policy)."""

    def predict(self, kl: Numbers) -> np.ndarray:
        """The fitted reward ``R(√KL)`` at the given KL values (``0 log 0 = 0``)."""
        d = np.sqrt(as_vector(kl, "kl"))
        return d * self.alpha - self.beta * _gao_penalty(d, self.form)


def _gao_penalty(d: np.ndarray, form: GaoForm) -> np.ndarray:
    """The term multiplied by β: ``d²`` (BoN) or ``d log d`` with ``0 log 0 = 0`` (RL)."""
    if form is GaoForm.BON:
        return d * d
    return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)


def fit_gao_curve(kl: Numbers, gold: Numbers, form: str | GaoForm = GaoForm.RL) -> GaoFit:
    """Fit Gao et al. 2022's scaling form of gold reward against ``d = √KL`` by least squares.

    Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization", eqs. (1)-(2)::

        best-of-n:  R_bon(d) = d (α − β d)        peak at d* = α / (2β),          R* = α² / (4β)
        RL:         R_RL(d)  = d (α − β log d)    peak at d* = exp(α/β − 1),      R* = β d*

    with ``d = √KL(π ‖ π_init)`` (for best-of-n, ``KL = log n − (n − 1)/n``). Both forms are linear in
    (α, β), so ``numpy.linalg.lstsq`` on the columns ``[d, −d²]`` or ``[d, −d log d]`` solves them exactly.
    Both pass through ``R(0) = 0``: pass ``gold`` relative to the initial policy (gold minus the initial
    policy's gold reward), as the paper does. The peak is where the model predicts that more optimisation
    starts to hurt; it is ``None`` if ``β ≤ 0`` (no over-optimisation seen in the data). For best-of-n with
    ``α ≤ 0`` the reward never rises and the peak is ``d* = 0``, ``R* = 0``.
    """
    form = GaoForm(form)
    k, y = as_vector(kl, "kl"), as_vector(gold, "gold")
    if k.size != y.size:
        raise ValueError(f"kl and gold must have the same length, got {k.size} and {y.size}")
    if (k < 0).any():
        raise ValueError("kl must be >= 0 (a KL divergence)")
    d = np.sqrt(k)
    design = np.column_stack([d, -_gao_penalty(d, form)])
    if np.linalg.matrix_rank(design) < 2:
        raise ValueError("need at least two checkpoints with distinct KL > 0 to fit α and β")
    alpha, beta = (float(v) for v in np.linalg.lstsq(design, y, rcond=None)[0])
    if beta <= 0:
        return GaoFit(form, alpha, beta, None, None, None)
    if form is GaoForm.BON:
        peak_d = max(alpha / (2.0 * beta), 0.0)
        peak_r = peak_d * (alpha - beta * peak_d)
    else:
        peak_d = math.exp(alpha / beta - 1.0)
        peak_r = beta * peak_d
    return GaoFit(form, alpha, beta, peak_d, peak_d**2, peak_r)


# --- verbosity bias -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman correlation of two paired samples."""

    pearson: float
    """Linear correlation; NaN if either sample is constant."""
    spearman: float
    """Rank correlation (Pearson on average ranks); NaN if either sample is constant."""
    n: int
    """Number of pairs."""


def pearson(x: Numbers, y: Numbers) -> float:
    """Pearson's ``r = Σ(x − x̄)(y − ȳ) / √(Σ(x − x̄)² Σ(y − ȳ)²)``; NaN if either sample is constant.

    Pearson 1895. Needs at least two pairs.
    """
    a, b = as_vector(x, "x"), as_vector(y, "y")
    if a.size != b.size:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    if a.size < 2:
        raise ValueError("a correlation needs at least 2 pairs")
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    return float(da @ db) / denom if denom > 0 else math.nan


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, tied values sharing the mean of the ranks they span (``[5, 7, 5] → [1.5, 3, 1.5]``)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # rank of the first member of each distinct value
    return (first + (counts - 1) / 2.0)[inverse]


def spearman(x: Numbers, y: Numbers) -> float:
    """Spearman's ρ: Pearson's r of the ranks, ties given their average rank (Spearman 1904)."""
    a, b = as_vector(x, "x"), as_vector(y, "y")
    if a.size != b.size:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    return pearson(_average_ranks(a), _average_ranks(b))


def length_reward_correlation(lengths: Numbers, rewards: Numbers) -> Correlation:
    """Correlation between answer length and reward: the verbosity bias of a reward model or judge.

    Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF", find that much of
    what RLHF optimises is length; a strongly positive correlation on a fixed answer set means the scorer
    rewards length itself, and the policy will learn to pad. Pearson measures a linear relation,
    Spearman any monotone one and is robust to a few very long answers; see :func:`pearson`,
    :func:`spearman`.
    """
    a, b = as_vector(lengths, "lengths"), as_vector(rewards, "rewards")
    return Correlation(pearson(a, b), spearman(a, b), int(a.size))


def length_drift_alarm(length_series: Numbers, threshold: float = 0.5, window: int = 3) -> Alarm:
    """Fires when the mean response length has grown by more than ``threshold`` (a fraction) since the start.

    With ``L`` the trailing mean over ``window`` checkpoints and ``L_0`` its first value, it fires at the first
    checkpoint with ``L_i > (1 + threshold) L_0``; 0.5 means 50 % longer. Length growth during RLHF is the
    usual symptom of a verbose reward model being exploited (Singhal et al. 2023); check
    :func:`length_reward_correlation` of the reward model to confirm.
    """
    lengths = as_vector(length_series, "length_series")
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if (reason := _check_window(lengths.size, window)) is not None:
        return Alarm(False, None, reason)
    smooth = _trailing_mean(lengths, window)
    base = smooth[0]
    if base <= 0:
        raise ValueError(f"the starting mean length must be positive, got {base}")
    over = np.flatnonzero(smooth[1:] > (1.0 + threshold) * base)
    if over.size:
        j = int(over[0]) + 1
        i = j + window - 1
        return Alarm(
            True,
            i,
            f"response length drift at checkpoint {i}: mean length (over {window} checkpoints) grew from "
            f"{base:.4g} to {smooth[j]:.4g} (+{smooth[j] / base - 1:.0%}, threshold +{threshold:.0%}). The "
            "reward may favour length (Singhal et al. 2023): check length_reward_correlation, or use a "
            "length penalty / length-normalised objective.",
        )
    return Alarm(
        False,
        None,
        f"no length drift: mean length went from {base:.4g} to at most {smooth.max():.4g} "
        f"(+{smooth.max() / base - 1:.0%}, threshold +{threshold:.0%}).",
    )


def mode_collapse_alarm(diversity_series: Numbers, threshold: float = 0.5, window: int = 3) -> Alarm:
    """Fires when output diversity has fallen by more than ``threshold`` (a fraction) of its starting value.

    ``diversity_series``: any per-checkpoint diversity measure where higher means more diverse, e.g.
    ``metrics.mean_token_entropy`` or ``metrics.distinct_n`` of samples for fixed prompts (for
    ``self_bleu``, which rises as diversity falls, pass ``1 − self_bleu``). With ``D`` the trailing mean
    over ``window`` checkpoints and ``D_0`` its first value, it fires at the first checkpoint with
    ``D_i < (1 − threshold) D_0``. RLHF narrows output diversity (Kirk et al. 2024); a collapse means
    the policy answers every prompt the same way, which also starves GRPO of in-group variance.
    """
    div = as_vector(diversity_series, "diversity_series")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    if (reason := _check_window(div.size, window)) is not None:
        return Alarm(False, None, reason)
    smooth = _trailing_mean(div, window)
    base = smooth[0]
    if base <= 0:
        raise ValueError(f"the starting diversity must be positive, got {base}")
    under = np.flatnonzero(smooth[1:] < (1.0 - threshold) * base)
    if under.size:
        j = int(under[0]) + 1
        i = j + window - 1
        return Alarm(
            True,
            i,
            f"mode collapse at checkpoint {i}: diversity (mean over {window} checkpoints) fell from "
            f"{base:.4g} to {smooth[j]:.4g} (−{1 - smooth[j] / base:.0%}, threshold −{threshold:.0%}). "
            "Raise the KL penalty or the sampling temperature, or stop at an earlier checkpoint.",
        )
    return Alarm(
        False,
        None,
        f"no mode collapse: diversity went from {base:.4g} to at least {smooth.min():.4g} "
        f"(−{max(0.0, 1 - smooth.min() / base):.0%}, threshold −{threshold:.0%}).",
    )


# --- the held-out checkpoints of an online RL run -------------------------------------------------------

CHECKPOINTS_FILE = "overoptimisation.jsonl"
"""One row per held-out evaluation of `alignkit ppo` / `grpo` (``evaluation/tracking.py``), in the run directory."""


def checkpoint_alarms(rows: Sequence[Mapping[str, Any]]) -> dict[str, Alarm]:
    """The three alarms over the rows of a run's :data:`CHECKPOINTS_FILE` (step order), by name.

    ``overoptimisation``: :func:`overoptimisation_alarm` on the rows' ``kl``, ``proxy`` and ``gold``, when
    every row has a gold reward and a KL; ``length_drift``: :func:`length_drift_alarm` on ``length``;
    ``mode_collapse``: :func:`mode_collapse_alarm` on ``distinct_2``. An alarm whose series is missing from
    a row, or starts at 0 (nothing to measure a change against), is left out. Used online by the training
    loop and offline by the report, so both say the same thing.
    """

    def column(key: str) -> list[float] | None:
        values = [row.get(key) for row in rows]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        return values if values and numbers else None  # type: ignore[return-value]

    found: dict[str, Alarm] = {}
    kl, proxy, gold = column("kl"), column("proxy"), column("gold")
    if kl and proxy and gold:
        found["overoptimisation"] = overoptimisation_alarm(kl, proxy, gold)
    for name, key, alarm in (("length_drift", "length", length_drift_alarm), ("mode_collapse", "distinct_2", mode_collapse_alarm)):
        values = column(key)
        if values is None:
            continue
        try:
            found[name] = alarm(values)
        except ValueError:
            continue  # a starting value of 0
    return found
