"""GRPO / RLOO on the tiny model: rollout layout, the loss by hand, learning a reward, and reward errors."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.algorithms.grpo import GRPOConfig, GRPOLoss, RolloutBatch, advantages_for, rollout_batch, run_grpo
from alignkit.config import build_config
from alignkit.data.records import user_prompt
from alignkit.data.tokenize import IGNORE
from alignkit.engine import pieces_of
from alignkit.errors import AlignkitError
from alignkit.generation import Completion, Sample, rollout_rows
from alignkit.logprobs import TokenLogprobModel, batch_logprobs
from alignkit.models import TINY_LLAMA, load_model
from alignkit.reference import policy_reference, reference_logps
from conftest import read_metrics, run_cli

GSM8K = "builtin:gsm8k-train"
GSM8K_TEST = "builtin:gsm8k-test"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def config(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(model=TINY_LLAMA, prompts=GSM8K, limit=64, output=str(tmp_path / "out"), max_steps=4, batch_size=4,
                    num_generations=4, max_new_tokens=12, lr=1e-3, progress=False)  # fmt: skip
    settings.update(overrides)
    cfg = GRPOConfig(**settings)
    cfg.validate()
    return cfg


def test_rollout_rows_train_on_completion_and_stop_token_only():
    sample = Sample(user_prompt("q"), [5, 6, 7], [Completion("ab", [8, 9], True, stop_id=2), Completion("abc", [8, 9, 10], False)])
    rows = rollout_rows([sample])
    assert rows[0][0].input_ids == [5, 6, 7, 8, 9, 2] and rows[0][0].labels == [IGNORE, IGNORE, 8, 9, 2, IGNORE]
    assert rows[1][0].input_ids == [5, 6, 7, 8, 9, 10] and rows[1][0].labels == [IGNORE, IGNORE, 8, 9, 10, IGNORE]


def test_group_advantages_by_kind():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(advantages_for(rewards, "dr_grpo"), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    torch.testing.assert_close(advantages_for(rewards, "rloo"), torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(advantages_for(rewards, "grpo"), torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (std + 1e-4))


@pytest.mark.parametrize("share_prefixes", [True, False])
@pytest.mark.parametrize("normalisation", ["sequence", "token"])
def test_loss_value_and_gradient_by_hand(tiny_tokenizer, normalisation, share_prefixes):
    """With π_old = π and the reference equal to the policy: loss = −Σ A_i (per sequence) or −Σ A_i |o_i| (per token),
    and the gradient is that of −Σ_i (A_i / |o_i|) Σ_t log π (or −Σ_i A_i Σ_t log π)."""
    model = TokenLogprobModel(load_model(TINY_LLAMA))
    sample = Sample(user_prompt("q"), [5, 6, 7], [Completion("", [8, 9], True, 2), Completion("", [8, 9, 10, 11], False)])
    pad = tiny_tokenizer.pad_token_id
    batch = rollout_batch([sample], pad, share_prefixes=share_prefixes)
    advantages = torch.tensor([1.5, -0.5])
    with torch.no_grad():
        ref = batch_logprobs(model, batch)
    rollout = RolloutBatch(batch, advantages, torch.tensor([1.0, 0.0]), ref, torch.tensor([True, False]), [sample], pad, share_prefixes)
    cfg = GRPOConfig(prompts="x", output="x", num_generations=2, loss_normalisation=normalisation, beta=0.1)
    loss, metrics = GRPOLoss(cfg)(model, rollout)
    lengths = torch.tensor([3.0, 4.0])
    weights = advantages / lengths if normalisation == "sequence" else advantages
    assert loss.item() == pytest.approx(-(weights * lengths).sum().item(), abs=1e-5)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    # The expected gradient always comes from the full rows, each holding its prompt.
    full = rollout_batch([sample], pad, share_prefixes=False)
    logps = batch_logprobs(model, full)
    expected = torch.autograd.grad(-(weights * logps.sum(-1)).sum(), [p for p in model.parameters()], allow_unused=True)
    for g, e in zip(grads, expected):
        if g is not None:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    assert metrics["kl"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert GRPOLoss(cfg).units(rollout) == (7 if normalisation == "token" else 2)
    assert batch.n_tokens == full.n_tokens == 2 * 3 + 3 + 4


@pytest.mark.parametrize("share_prefixes, widths", [(False, [4, 8]), (True, [2, 5])])
def test_update_in_pieces_of_groups_gives_the_whole_rollouts_loss_and_gradient(tmp_path, tiny_tokenizer, e_reward, share_prefixes, widths):
    model = TokenLogprobModel(load_model(TINY_LLAMA))
    short = Sample(user_prompt("q"), [5, 6], [Completion("", [8], True, 2), Completion("", [8, 9], False)])
    long = Sample(user_prompt("r"), [5, 6, 7], [Completion("", [8, 9, 10, 11], True, 2), Completion("", [9], False)])
    pad = tiny_tokenizer.pad_token_id
    batch = rollout_batch([short, long], pad, share_prefixes=share_prefixes)
    with torch.no_grad():
        ref = batch_logprobs(model, batch) - 0.1
    rollout = RolloutBatch(batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.tensor([1.0, 0.0, 1.0, 0.0]), ref,
                           torch.ones(4, dtype=torch.bool), [short, long], pad, share_prefixes)  # fmt: skip
    cfg = GRPOConfig(prompts="x", output="x", num_generations=2, beta=0.1, update_batch_size=1)
    loss = GRPOLoss(cfg)
    pieces = pieces_of(loss, rollout)
    # Each piece is one group, cut to its own longest row: the short group drops the long one's padding.
    assert [tuple(p.batch.input_ids.shape) for p in pieces] == [(2, w) for w in widths]
    assert sum(p.n_tokens for p in pieces) == batch.n_tokens
    # The engine's passes, one backward per piece, accumulate the whole rollout's gradient. The two differ
    # only in float rounding (other matrix shapes sum in another order): 1e-5 is a thousand times float32's
    # rounding of these O(1) values and far below any real difference (a dropped or doubled piece moves them by O(0.1)).
    params = [p for p in model.parameters() if p.requires_grad]
    whole_loss = loss(model, rollout)[0]
    whole = torch.autograd.grad(whole_loss, params)
    piece_losses = [loss(model, p)[0] for p in pieces]
    summed = [sum(gs) for gs in zip(*(torch.autograd.grad(l, params) for l in piece_losses))]
    assert sum(piece_losses).item() == pytest.approx(whole_loss.item(), abs=1e-5)
    for a, b in zip(summed, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    # Through the engine: the first step's rollout comes from the same starting weights in both runs, so its
    # samples and loss are the same on any CPU. Later steps are not compared: each run's update rounds
    # differently in its own batch shapes, Adam's first steps (≈ lr·sign(g)) turn that into different last
    # bits of the weights, and from then on sampling may pick other tokens (it did on an AMX Xeon).
    common = dict(reward=e_reward, beta=0.1, lr=5e-2, max_steps=1)
    run_grpo(config(tmp_path, output=str(tmp_path / "pieces"), update_batch_size=4, **common))
    run_grpo(config(tmp_path, output=str(tmp_path / "whole"), update_batch_size=0, **common))
    (in_pieces,), (at_once,) = read_metrics(tmp_path / "pieces"), read_metrics(tmp_path / "whole")
    for name in ("loss", "reward", "tokens", "completion_length"):
        assert in_pieces[name] == pytest.approx(at_once[name], rel=1e-5, abs=1e-6), name


def test_shared_prompts_train_as_full_rows_do(tmp_path, tiny_tokenizer, e_reward, monkeypatch):
    """The same first step with each prompt computed once for its K completions or once per completion: the same
    samples, loss, reward and tokens (later steps sample from weights whose last bits differ, see above); and the
    LoRA base as reference, under a non-zero adapter, scores a rollout alike in both layouts."""
    common = dict(reward=e_reward, beta=0.1, lr=5e-2, max_steps=1, lora_r=4)
    run_grpo(config(tmp_path, output=str(tmp_path / "shared"), **common))
    with monkeypatch.context() as patched:
        patched.setattr(TokenLogprobModel, "shares_prefixes", lambda self: False)
        run_grpo(config(tmp_path, output=str(tmp_path / "full"), **common))
    (shared,), (full,) = read_metrics(tmp_path / "shared"), read_metrics(tmp_path / "full")
    for name in ("loss", "kl", "reward", "completion_length", "tokens"):
        assert shared[name] == pytest.approx(full[name], rel=1e-5, abs=1e-6), name

    from peft import LoraConfig, get_peft_model

    policy = TokenLogprobModel(get_peft_model(load_model(TINY_LLAMA), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # the adapter changes what the prompt's cache holds, under the policy
    samples = [Sample(user_prompt("q"), [5, 6, 7], [Completion("", [8, 9], True, 2), Completion("", [9, 10, 11], False)])]
    pad = tiny_tokenizer.pad_token_id
    reference = policy_reference(policy)
    by_layout = [reference_logps(reference, rollout_batch(samples, pad, share_prefixes=s)).sum(-1) for s in (True, False)]
    torch.testing.assert_close(by_layout[0], by_layout[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_layout[0], batch_logprobs(policy, rollout_batch(samples, pad, share_prefixes=False)).sum(-1))


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "dr_grpo"])
def test_policy_learns_a_reward(tmp_path, e_reward, advantage):
    run_grpo(config(tmp_path, reward=e_reward, advantage=advantage, max_steps=24, lr=2e-2, beta=0.0, batch_size=2, num_generations=8))
    rewards = [m["reward"] for m in read_metrics(tmp_path / "out")]
    assert sum(rewards[-6:]) / 6 > 1.5 * sum(rewards[:6]) / 6, rewards


def test_kl_to_a_lora_base_reference_grows_from_zero(tmp_path, e_reward):
    run_grpo(config(tmp_path, reward=e_reward, lora_r=8, beta=0.1, lr=5e-2, max_steps=6))
    kls = [m["kl"] for m in read_metrics(tmp_path / "out")]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0


def test_held_out_accuracy_is_reported_with_gsm8k_verifier(tmp_path):
    summary = run_grpo(config(tmp_path, eval_prompts=GSM8K_TEST, eval_limit=4, max_steps=1))
    assert 0.0 <= summary["eval_after"]["reward"] <= 1.0 and len(summary["eval_after"]["examples"]) == 4


def test_a_reward_function_that_raises_or_returns_nan_is_named(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def boom(prompts, completions, references):\n    raise RuntimeError('kaput')\n\n"
                   "def nan(prompts, completions, references):\n    return [float('nan')] * len(completions)\n")
    common = ["grpo", "--model", TINY_LLAMA, "--prompts", GSM8K, "--limit", "8", "--max-steps", "1", "--max-new-tokens", "4",
              "--output"]  # fmt: skip
    result = run_cli(*common, str(tmp_path / "a"), "--reward", f"python:{bad}:boom")
    assert result.returncode == 2 and "boom" in result.stderr and "kaput" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(*common, str(tmp_path / "b"), "--reward", f"python:{bad}:nan")
    assert result.returncode == 2 and "nan" in result.stderr.lower() and "Traceback" not in result.stderr


def test_held_out_checkpoints_trace_proxy_gold_and_kl_without_changing_training(tmp_path, e_reward):
    # LoRA dropout draws from torch's global RNG in every training step, and generation reseeds that RNG: an
    # evaluation that did not restore it would change the losses after it. Both runs compute the same tensors
    # in the same shapes on the same machine, so their losses are equal to the bit on any CPU.
    common = dict(reward=e_reward, lora_r=4, lora_dropout=0.5, beta=0.1, lr=5e-2, max_steps=5,
                  eval_prompts=GSM8K_TEST, eval_limit=4)  # fmt: skip
    tracked = run_grpo(config(tmp_path, output=str(tmp_path / "tracked"), eval_every=2, gold_reward="gsm8k", **common))
    plain = run_grpo(config(tmp_path, output=str(tmp_path / "plain"), **common))
    assert [m["loss"] for m in read_metrics(tmp_path / "tracked")] == [m["loss"] for m in read_metrics(tmp_path / "plain")]

    rows = read_jsonl(tmp_path / "tracked" / "overoptimisation.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4, 5]
    assert set(rows[0]) == {"step", "kl", "sqrt_kl", "proxy", "gold", "length", "distinct_2"}
    assert rows[0]["kl"] == 0.0 and rows[0]["sqrt_kl"] == 0.0  # the policy is its reference before training
    assert rows[-1]["kl"] != 0.0 and rows[-1]["sqrt_kl"] == pytest.approx(max(rows[-1]["kl"], 0.0) ** 0.5)
    assert all(r["gold"] in (0.0, 0.25, 0.5, 0.75, 1.0) and r["length"] > 0 for r in rows)
    assert tracked["eval_after"]["reward"] == rows[-1]["proxy"] and tracked["eval_before"]["reward"] == rows[0]["proxy"]
    # mode_collapse is left out when the tiny model's answers start with no word bigram (distinct-2 = 0).
    assert {"overoptimisation", "length_drift"} <= set(tracked["alarms"]) <= {"overoptimisation", "length_drift", "mode_collapse"}
    assert all(set(a) == {"fired", "at_step", "message"} for a in tracked["alarms"].values())
    # --eval-every 0: before and after only, and without a gold reward no over-optimisation verdict.
    plain_rows = read_jsonl(tmp_path / "plain" / "overoptimisation.jsonl")
    assert [r["step"] for r in plain_rows] == [0, 5] and plain_rows[-1]["gold"] is None
    assert plain_rows[-1]["proxy"] == rows[-1]["proxy"] and "overoptimisation" not in plain["alarms"]


def test_eval_every_and_gold_reward_need_held_out_prompts(tmp_path, e_reward):
    with pytest.raises(AlignkitError, match="eval-prompts"):
        config(tmp_path, reward=e_reward, gold_reward="gsm8k")
    with pytest.raises(AlignkitError, match="'--eval-every' must be ≥ 0"):  # refused as the options are read
        build_config(GRPOConfig, {"reward": e_reward, "eval_prompts": GSM8K, "eval_every": -1})


def test_a_cut_answer_earns_the_reward_less_the_cut_penalty(tmp_path):
    """The tiny model solves no GSM8K problem (reward 0), so a step's mean reward is minus its share of cut answers."""
    run_grpo(config(tmp_path, max_steps=2, cut_penalty=1.0))
    rows = read_metrics(tmp_path / "out")
    assert any(r["finished"] < 1 for r in rows), rows
    assert all(r["reward"] == pytest.approx(r["finished"] - 1) for r in rows), rows
