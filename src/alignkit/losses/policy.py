"""Policy-gradient losses and advantage estimators for RL fine-tuning of LMs.

Everything here is a pure function of tensors. Token-level tensors are
``[B, T]`` with a ``mask`` of the same shape that is 1 (or True) on valid
tokens — the completion tokens whose log-probs are being trained — and 0 on
prompt / padding positions. Group-level tensors are ``[B, K]``: ``K`` sampled
completions for each of ``B`` prompts.
"""

from __future__ import annotations

from enum import StrEnum

import torch

__all__ = [
    "KLEstimator",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "clipped_surrogate",
    "clipped_value_error",
    "ppo_policy_loss",
    "rloo_advantages",
    "sequence_rewards_to_tokens",
    "value_loss",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set.

    ``sum(x * mask) / sum(mask)``, over all elements (a scalar) or along
    ``dim``. ``x`` and ``mask`` have the same shape; ``mask`` is bool or 0/1.
    An all-zero mask gives NaN rather than silently returning 0.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantage whitening over the valid tokens of the whole batch.

    ``(x - mean) / sqrt(var + 1e-8)`` where mean and (population) variance are
    taken over the masked elements only, so padding cannot shift the
    statistics. Returns a tensor shaped like ``x`` with zeros at invalid
    positions.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened * mask.to(x.dtype)


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

    ``δ_t = r_t + γ V_{t+1} − V_t``,  ``A_t = δ_t + γλ A_{t+1}``,
    ``returns = A + V``.

    ``rewards``, ``values``, ``mask``: ``[B, T]``. Invalid positions are
    terminal: the value there is 0 (so the last valid token bootstraps from 0)
    and the advantage and return there are 0. Returns ``(advantages, returns)``,
    both ``[B, T]``, computed without grad — they are regression / policy
    targets, not something to differentiate through.
    """
    m = mask.to(values.dtype)
    v = values * m
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    deltas = rewards + gamma * next_v - v

    advantages = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        # Multiplying by the mask resets the recursion at every invalid token,
        # which is what makes padding behave as an episode end.
        running = (deltas[:, t] + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
    return advantages, advantages + v


def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` with ``ρ = exp(logps − old_logps)``, no reduction.

    Also returns where the clipped branch is strictly larger (those tokens get no gradient). Callers choose
    the normalisation: a masked mean over tokens (PPO, DAPO) or per sequence first (GRPO).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # The max is the pessimistic bound: once the ratio has moved past the trust
    # region in the direction the advantage rewards, the clamped branch wins
    # and its gradient w.r.t. ρ is zero.
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, arXiv:1707.06347).

    ``ρ = exp(logps − old_logps)``,
    ``loss = mean_valid max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))``.

    ``logps``, ``old_logps``, ``advantages``, ``mask``: ``[B, T]`` per-token
    log-probs of the sampled tokens under the current and the sampling policy.
    Returns the scalar loss and detached scalar stats:

    - ``clip_frac``: fraction of valid tokens where the clipped term is
      strictly larger, i.e. where the token gets no gradient;
    - ``approx_kl``: k3 estimate of KL(old ‖ new), mean of ``(ρ−1) − log ρ``.
    """
    per_token, clipped = clipped_surrogate(logps, old_logps, advantages, clip_eps)
    loss = masked_mean(per_token, mask)

    with torch.no_grad():
        clip_frac = masked_mean(clipped.to(logps.dtype), mask)
        # Tokens were sampled from the old policy, so it plays the "policy"
        # role in the estimator and the new one the "reference":
        # k3(old − new) = (ρ − 1) − log ρ.
        approx_kl = masked_mean(kl_penalty(old_logps, logps, KLEstimator.K3), mask)
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """Clipped value-function loss used in PPO implementations.

    ``V_clip = old_V + clip(V − old_V, −ε, ε)``,
    ``loss = ½ · mean_valid max((V − R)², (V_clip − R)²)``.

    All inputs ``[B, T]``; returns a scalar. Clipping keeps the value head
    from moving further than ``ε`` from the values the advantages were built
    on (Andrychowicz et al. 2021 discuss when it helps).
    """
    return 0.5 * masked_mean(clipped_value_error(values, old_values, returns, clip_eps), mask)


def clipped_value_error(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float = 0.2
) -> torch.Tensor:
    """Per-token ``max((V − R)², (V_clip − R)²)``, no reduction (``value_loss`` halves and averages it)."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)


class KLEstimator(StrEnum):
    """Schulman's per-sample KL estimators (http://joschu.net/blog/kl-approx.html)."""

    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


def kl_penalty(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kind: str | KLEstimator = KLEstimator.K1,
) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) for tokens sampled from π.

    With ``x = logps − ref_logps`` (J. Schulman, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html):

    - ``k1 = x``: unbiased, high variance, can be negative;
    - ``k2 = x² / 2``: biased, low variance, always ≥ 0;
    - ``k3 = e^(−x) − 1 + x``: unbiased, low variance, always ≥ 0.

    ``logps``, ``ref_logps``: any matching shape, usually ``[B, T]``; the
    result has the same shape. Unknown ``kind`` raises ``ValueError``.
    """
    try:
        kind = KLEstimator(kind)
    except ValueError:
        valid = ", ".join(repr(k.value) for k in KLEstimator)
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {valid}") from None

    x = logps - ref_logps
    if kind is KLEstimator.K1:
        return x
    if kind is KLEstimator.K2:
        return 0.5 * x**2
    return torch.expm1(-x) + x


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, arXiv:2402.03300).

    ``A_i = (r_i − mean_j r_j) / (std_j r_j + eps)`` within each group, with
    the unbiased (``K − 1``) standard deviation. ``scale=False`` drops the
    division, as in Dr. GRPO (Liu et al. 2025, arXiv:2503.20783), which argues
    it over-weights prompts whose rewards barely vary.

    ``rewards``: ``[B, K]``, ``K`` samples per prompt; returns ``[B, K]``.
    ``scale=True`` needs ``K ≥ 2`` (the unbiased std is undefined otherwise).
    """
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale:
        return centred
    if rewards.shape[-1] < 2:
        raise ValueError(f"scaled group advantages need K >= 2 samples per group, got K={rewards.shape[-1]}")
    return centred / (rewards.std(dim=-1, keepdim=True) + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, arXiv:2402.14740).

    ``A_i = r_i − (1 / (K−1)) Σ_{j≠i} r_j``: each sample is baselined by the
    mean of the other samples for the same prompt, which keeps the baseline
    independent of the sample and so the gradient unbiased.

    ``rewards``: ``[B, K]`` with ``K ≥ 2``; returns ``[B, K]``.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs K >= 2 samples per group, got K={k}")
    others_mean = (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others_mean


def penalise_cut(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """``scores − penalty`` where an answer was cut at the length cap (``finished`` false), ``scores`` elsewhere.

    A cut answer is scored as it stands by most verifiers, so a policy that loops until the cap loses nothing
    for it; DAPO (Yu et al. 2025, arXiv:2503.14476) punishes overlong answers. This is its simplest form: a
    flat penalty, with no soft band before the cap. ``scores``, ``finished``: ``[N]``.
    """
    return scores - penalty * (~finished.bool()).to(scores.dtype)


def sequence_rewards_to_tokens(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's scalar score on its last valid token.

    ``scores``: ``[B]``; ``mask``: ``[B, T]``. Returns ``[B, T]`` (dtype of
    ``scores``) that is zero except ``scores[b]`` at the last position where
    ``mask[b]`` is set; rows with no valid token stay all zero. PPO adds this
    to the per-token KL penalty so the reward-model score arrives at the end
    of the episode.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).amax(dim=-1, keepdim=True)
    return torch.where(positions == last, scores.unsqueeze(-1), 0.0)
