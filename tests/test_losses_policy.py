"""Tests for alignkit.losses.policy against values worked out by hand with plain Python."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.policy import (
    KLEstimator,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    penalise_cut,
    rloo_advantages,
    sequence_rewards_to_tokens,
    value_loss,
)

TOL = 1e-6
F64 = torch.float64


def t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def assert_close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=actual.dtype), atol=TOL, rtol=0)


# --------------------------------------------------------------------------- masked helpers


def test_masked_mean_scalar_and_dim() -> None:
    x = t([[1.0, 2.0, 99.0], [4.0, -99.0, -99.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert_close(masked_mean(x, mask), (1.0 + 2.0 + 4.0) / 3)
    assert_close(masked_mean(x, mask, dim=1), [1.5, 4.0])


def test_masked_whiten_by_hand() -> None:
    x = t([[1.0, 2.0, 3.0, 1000.0]])
    mask = t([[1, 1, 1, 0]])
    # mean 2, population variance ((-1)^2 + 0 + 1^2) / 3
    s = math.sqrt(2.0 / 3.0 + 1e-8)
    assert_close(masked_whiten(x, mask), [[-1.0 / s, 0.0, 1.0 / s, 0.0]])


def test_masked_whiten_moments_on_valid_entries() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=F64) * 4.0 + 7.0
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    x[~mask] = 1e6  # padding must not leak into the statistics
    out = masked_whiten(x, mask)
    valid = out[mask]
    assert abs(valid.mean().item()) < TOL
    assert abs((valid**2).mean().item() - 1.0) < TOL  # population variance
    assert torch.all(out[~mask] == 0)


# --------------------------------------------------------------------------- GAE


def hand_gae(
    r: list[float], v: list[float], n: int, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """A_t = Σ_l (γλ)^l δ_{t+l} over the first n (valid) tokens, V = 0 from n on."""
    vv = [v[i] if i < n else 0.0 for i in range(len(v) + 1)]
    deltas = [r[i] + gamma * vv[i + 1] - vv[i] for i in range(n)]
    adv = [sum((gamma * lam) ** l * deltas[i + l] for l in range(n - i)) for i in range(n)]
    adv += [0.0] * (len(r) - n)
    ret = [adv[i] + (v[i] if i < n else 0.0) for i in range(len(r))]
    return adv, ret


def test_gae_matches_hand_computation_with_padding() -> None:
    gamma, lam = 0.9, 0.8
    r = [[0.1, -0.2, 0.0, 1.0], [0.5, 2.0, 50.0, 50.0]]
    v = [[0.3, 0.1, -0.4, 0.6], [1.0, -0.5, 100.0, 100.0]]  # junk beyond row 1's end
    lengths = [4, 2]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    values = t(v).requires_grad_(True)

    adv, ret = gae(t(r), values, mask, gamma=gamma, lam=lam)

    expected = [hand_gae(r[b], v[b], lengths[b], gamma, lam) for b in range(2)]
    assert_close(adv, [e[0] for e in expected])
    assert_close(ret, [e[1] for e in expected])
    # Spot-check the padded row fully by hand: V_2 = 0, so δ_1 = 2.0 − (−0.5) = 2.5.
    d0 = 0.5 + 0.9 * -0.5 - 1.0
    assert_close(adv[1], [d0 + 0.72 * 2.5, 2.5, 0.0, 0.0])
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- PPO policy loss


def test_ppo_unclipped_is_minus_mean_a_rho() -> None:
    logp = [[-1.0, -2.0, -0.5], [-1.2, -3.0, -7.0]]
    old = [[-1.1, -1.9, -0.5], [-1.25, -3.1, 0.0]]
    a = [[1.0, -0.5, 2.0], [-1.5, 0.3, 9.0]]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = ppo_policy_loss(t(logp), t(old), t(a), mask, clip_eps=0.2)

    valid = [(i, j) for i in range(2) for j in range(3) if mask[i][j]]
    rho = {ij: math.exp(logp[ij[0]][ij[1]] - old[ij[0]][ij[1]]) for ij in valid}
    assert all(0.8 < r < 1.2 for r in rho.values())
    assert_close(loss, -sum(a[i][j] * rho[i, j] for i, j in valid) / len(valid))
    assert_close(stats["clip_frac"], 0.0)
    assert_close(stats["approx_kl"], sum((r - 1) - math.log(r) for r in rho.values()) / len(valid))
    assert not any(s.requires_grad for s in stats.values())
    assert all(s.dim() == 0 for s in stats.values())


def test_ppo_clipped_regime_values_clip_frac_and_grads() -> None:
    eps = 0.2
    # token: (log ratio, advantage)
    # 0: ρ>1+ε, A>0  -> clipped,   term −A(1+ε)
    # 1: ρ<1−ε, A<0  -> clipped,   term −A(1−ε)
    # 2: ρ<1−ε, A>0  -> unclipped, term −Aρ (pessimistic branch is the raw one)
    # 3: ρ>1+ε, A<0  -> unclipped, term −Aρ
    # 4: padding
    log_ratio = [0.5, -0.5, -0.5, 0.5, 3.0]
    a = [2.0, -1.0, 1.5, -0.7, 5.0]
    old = [-1.0, -2.0, -0.3, -1.5, -2.0]
    logp = [o + d for o, d in zip(old, log_ratio)]
    mask = t([[1, 1, 1, 1, 0]])

    logps = t([logp]).requires_grad_(True)
    loss, stats = ppo_policy_loss(logps, t([old]), t([a]), mask, clip_eps=eps)

    rho = [math.exp(d) for d in log_ratio]
    terms = [-a[0] * (1 + eps), -a[1] * (1 - eps), -a[2] * rho[2], -a[3] * rho[3]]
    assert_close(loss, sum(terms) / 4)
    assert_close(stats["clip_frac"], 2 / 4)
    assert_close(stats["approx_kl"], sum((r - 1) - math.log(r) for r in rho[:4]) / 4)

    loss.backward()
    # d(−Aρ)/d logp = −Aρ; clipped and padded tokens get nothing
    assert_close(logps.grad, [[0.0, 0.0, -a[2] * rho[2] / 4, -a[3] * rho[3] / 4, 0.0]])


# --------------------------------------------------------------------------- value loss


def test_value_loss_unclipped() -> None:
    v, old, ret = [0.5, 1.0, -0.2], [0.4, 1.1, 7.0], [1.0, 0.0, 3.0]
    mask = t([[1, 1, 0]])
    expected = 0.5 * ((0.5 - 1.0) ** 2 + (1.0 - 0.0) ** 2) / 2
    assert_close(value_loss(t([v]), t([old]), t([ret]), mask, clip_eps=0.2), expected)


def test_value_loss_clipped() -> None:
    eps = 0.2
    v, old, ret = [1.0, 1.0, -1.0], [0.0, 0.0, 0.0], [0.5, 1.5, -2.0]
    values = t([v]).requires_grad_(True)
    loss = value_loss(values, t([old]), t([ret]), t([[1, 1, 1]]), clip_eps=eps)

    def clip(x: float, lo: float, hi: float) -> float:
        return min(max(x, lo), hi)

    per_token = []
    for vi, oi, ri in zip(v, old, ret):
        vc = oi + clip(vi - oi, -eps, eps)
        per_token.append(max((vi - ri) ** 2, (vc - ri) ** 2))
    # token 0: raw (0.25) beats clipped (0.09); tokens 1, 2: clipped branch wins
    assert per_token == pytest.approx([0.25, 1.3**2, 1.8**2])
    assert_close(loss, 0.5 * sum(per_token) / 3)

    loss.backward()
    # only the raw-branch token moves the value head
    assert_close(values.grad, [[0.5 * 2 * (1.0 - 0.5) / 3, 0.0, 0.0]])


# --------------------------------------------------------------------------- KL estimators


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", KLEstimator.K1, KLEstimator.K2, KLEstimator.K3])
def test_kl_estimators_by_hand(kind: str) -> None:
    xs = [-2.0, -0.1, 0.0, 0.5, 3.0]
    ref = [-1.0, -0.3, -2.0, -0.7, -4.0]
    logps = [r + x for r, x in zip(ref, xs)]
    hand = {
        "k1": lambda x: x,
        "k2": lambda x: x * x / 2,
        "k3": lambda x: math.exp(-x) - 1 + x,
    }[str(kind)]
    assert_close(kl_penalty(t(logps), t(ref), kind), [hand(x) for x in xs])


def test_kl_default_is_k1_and_unknown_raises() -> None:
    a, b = t([[-1.0, -2.0]]), t([[-1.5, -0.5]])
    assert_close(kl_penalty(a, b), [[0.5, -1.5]])
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        kl_penalty(a, b, "k4")


def test_k3_nonnegative() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g, dtype=F64) * 5
    assert torch.all(kl_penalty(x, torch.zeros_like(x), "k3") >= 0)


def test_k1_and_k3_unbiased_for_true_kl() -> None:
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.25, 0.25, 0.25, 0.25]
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(t(p), 200_000, replacement=True, generator=g)
    logps, ref = t(p).log()[idx], t(q).log()[idx]
    for kind in ("k1", "k3"):
        assert abs(kl_penalty(logps, ref, kind).mean().item() - true_kl) < 0.01


# --------------------------------------------------------------------------- group baselines


def test_group_advantages_by_hand() -> None:
    rows = [[1.0, 2.0, 3.0, 6.0], [0.0, 1.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]
    eps = 1e-4
    expected, expected_unscaled = [], []
    for row in rows:
        k = len(row)
        mean = sum(row) / k
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (k - 1))
        expected.append([(r - mean) / (std + eps) for r in row])
        expected_unscaled.append([r - mean for r in row])
    assert_close(group_advantages(t(rows), eps=eps), expected)
    assert_close(group_advantages(t(rows), eps=eps, scale=False), expected_unscaled)
    # a constant group gets zero advantage, not NaN
    assert_close(group_advantages(t(rows))[2], [0.0] * 4)


def test_group_advantages_scaled_needs_two_samples() -> None:
    with pytest.raises(ValueError):
        group_advantages(t([[1.0], [2.0]]))
    assert_close(group_advantages(t([[1.0], [2.0]]), scale=False), [[0.0], [0.0]])


def test_rloo_k3_by_hand() -> None:
    rewards = t([[1.0, 2.0, 6.0], [0.0, -3.0, 3.0]])
    assert_close(
        rloo_advantages(rewards),
        [[1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2], [0 - 0 / 2, -3 - 3 / 2, 3 - (-3) / 2]],
    )


def test_rloo_k1_raises() -> None:
    with pytest.raises(ValueError):
        rloo_advantages(t([[1.0], [2.0]]))


# --------------------------------------------------------------------------- sequence scores


def test_sequence_rewards_to_tokens() -> None:
    scores = t([1.5, -2.0, 3.0, 4.0])
    mask = torch.tensor(
        [
            [1, 1, 1, 0],  # right-padded
            [1, 1, 1, 1],  # full
            [0, 1, 1, 0],  # prompt masked out in front
            [0, 0, 0, 0],  # nothing valid
        ]
    )
    out = sequence_rewards_to_tokens(scores, mask)
    assert out.dtype == F64
    assert_close(
        out,
        [[0.0, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, -2.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    )


def test_a_cut_answer_loses_the_penalty_and_a_finished_one_keeps_its_score():
    scores, finished = t([0.5, 1.0, 0.0, 0.25]), torch.tensor([True, False, False, True])
    assert torch.equal(penalise_cut(scores, finished, 1.0), t([0.5, 0.0, -1.0, 0.25]))
    assert torch.equal(penalise_cut(scores, finished, 0.0), scores)
