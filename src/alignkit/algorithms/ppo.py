"""PPO against a reward model with a per-token KL penalty: step 3 of InstructGPT (Ouyang et al. 2022),
following Ziegler et al. 2019 and Stiennon et al. 2020.

Each rollout: sample completions with the current policy, score them (a trained reward model, or any
scorer), and build per-token rewards

    r_t = −β · (log π_old(y_t) − log π_ref(y_t))    (+ the score on the last token)

then advantages and returns with GAE on the value model's estimates, whiten the advantages, and run
`--ppo-epochs` passes of clipped-surrogate updates over shuffled minibatches of the rollout, with a clipped
value loss. β is fixed or follows the adaptive controller of Ziegler et al. (target KL, horizon). PPO-ptx
mixes a language-modelling loss on `--ptx-data` with weight γ into every update (InstructGPT's fix for the
alignment tax).

The value model is either initialised from the reward model (`--value-model PATH`, as InstructGPT) or a
head on the policy's own hidden states (`--value-model shared`: no second backbone, cheapest on a CPU).
Policy and value are one module with one optimiser, so `accelerate` wraps them together.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from alignkit.algorithms.online import OnlineRLConfig, start_online_run
from alignkit.config import above, at_least, within
from alignkit.data.loading import load_records
from alignkit.data.tokenize import IGNORE, Batch, collate, encode_conversations, truncate
from alignkit.engine import Shuffled, train
from alignkit.errors import AlignkitError
from alignkit.evaluation.tracking import held_out_tracker
from alignkit.generation import SamplingParams, TransformersGenerator, rollout_rows
from alignkit.io import locks_output
from alignkit.logprobs import TokenLogprobModel, base_model, batch_logprobs
from alignkit.losses.policy import (
    clipped_surrogate,
    clipped_value_error,
    gae,
    kl_penalty,
    masked_whiten,
    penalise_cut,
    sequence_rewards_to_tokens,
)
from alignkit.models import describe, evaluating, save_model
from alignkit.reference import policy_reference, reference_logps
from alignkit.rewards.reward_model import load_reward_model
from alignkit.rewards.scorer import Scorer


@dataclass
class PPOConfig(OnlineRLConfig):
    """Options of `alignkit ppo`."""

    value_model: str = ""
    """value model: a reward-model directory to initialise it from, or 'shared' for a head on the policy (default: the --reward model if it is rm:PATH, else shared)"""
    rollout_size: int = at_least(1, 16)
    """prompts sampled per rollout"""
    num_generations: int = at_least(1, 1)
    """completions per prompt in a rollout"""
    score_baseline: Literal["none", "group"] = "none"
    """group: subtract from each score the mean score of its prompt's --num-generations completions, a
    per-prompt baseline that keeps prompt difficulty out of the advantages while the value model learns"""
    batch_size: int = at_least(1, 4)
    """completions per PPO minibatch"""
    ppo_epochs: int = at_least(1, 4)
    """passes over each rollout"""
    kl_coef: float = at_least(0, 0.05)
    """β, weight of the per-token KL penalty in the reward (initial value when adaptive)"""
    adaptive_kl: bool = False
    """adapt β towards --target-kl with Ziegler et al.'s proportional controller"""
    target_kl: float = above(0, 6.0)
    """adaptive KL: target KL per completion (nats)"""
    kl_horizon: int = at_least(1, 10000)
    """adaptive KL: horizon of the controller, in completions"""
    clip_eps: float = above(0, 0.2)
    """policy ratio clipping ε"""
    value_clip_eps: float = above(0, 0.2)
    """value clipping ε"""
    vf_coef: float = at_least(0, 0.1)
    """weight of the value loss"""
    gamma: float = within("[0, 1]", 1.0)
    """discount"""
    lam: float = within("[0, 1]", 0.95)
    """GAE λ"""
    whiten_advantages: bool = True
    """normalise advantages to mean 0, std 1 over each rollout"""
    ptx_data: str = ""
    """PPO-ptx: SFT or text data whose language-modelling loss is mixed into each update"""
    ptx_coef: float = at_least(0, 0.0)
    """PPO-ptx: weight γ of that loss"""

    def steps_per_rollout(self) -> int:
        rows = self.rollout_size * self.num_generations
        return self.ppo_epochs * math.ceil(rows / self.batch_size) // self.grad_accum

    def validate(self) -> None:
        super().validate()
        rows = self.rollout_size * self.num_generations
        if rows % self.batch_size or (rows // self.batch_size) % self.grad_accum:
            raise AlignkitError(
                f"a rollout of {rows} completions does not split into minibatches of --batch-size {self.batch_size} "
                f"× --grad-accum {self.grad_accum}",
                fix="make rollout_size × num_generations a multiple of batch_size × grad_accum",
            )
        if self.save_every and self.save_every % self.steps_per_rollout():
            raise AlignkitError(
                f"--save-every must be a multiple of the {self.steps_per_rollout()} steps of one rollout",
                fix="checkpoints between rollouts could not resume exactly; pick a multiple",
            )
        if self.score_baseline == "group" and self.num_generations < 2:
            raise AlignkitError("--score-baseline group compares completions of one prompt", fix="add --num-generations 4")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise AlignkitError("--ptx-coef needs --ptx-data")


class AdaptiveKL:
    """Ziegler et al. 2019: β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n / horizon)."""

    def __init__(self, value: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class PolicyAndValue(nn.Module):
    """The policy and its value estimates, one module (one optimiser, one DDP wrapper)."""

    def __init__(self, policy: TokenLogprobModel, value_backbone: nn.Module | None, value_head: nn.Linear):
        super().__init__()
        self.policy, self.value_backbone, self.value_head = policy, value_backbone, value_head

    def forward(self, input_ids, labels, position_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        logps, hidden = self.policy.logprobs_and_hidden(input_ids, labels, position_ids, attention_mask)
        if self.value_backbone is not None:
            hidden = self.value_backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
        return logps, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()


def build_value(config: PPOConfig, policy: TokenLogprobModel, tokenizer) -> tuple[nn.Module | None, nn.Linear]:
    source = config.value_model or (config.reward[3:] if config.reward.startswith("rm:") else "shared")
    if source == "shared":
        head = nn.Linear(base_model(policy.model).config.hidden_size, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return None, head
    rm = load_reward_model(source, device="cpu")
    if rm.backbone != "causal" or rm.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise AlignkitError(
            f"the value model must read the policy's tokens, but the reward model {source} uses another tokenizer or an encoder",
            fix="pass --value-model shared (a value head on the policy)",
        )
    return rm.body(), copy.deepcopy(rm.head)


@dataclass
class PPOMinibatch:
    batch: Batch
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    """[R] summed k1 KL of each completion"""
    kl_coef: float
    ptx: Batch | None = None

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    def to(self, device) -> "PPOMinibatch":
        move = lambda t: t.to(device)  # noqa: E731
        return PPOMinibatch(
            self.batch.to(device), move(self.old_logps), move(self.old_values), move(self.advantages), move(self.returns),
            move(self.scores), move(self.kl), self.kl_coef, None if self.ptx is None else self.ptx.to(device),
        )  # fmt: skip


class PPORollouts:
    """Micro-batches of PPO: a fresh rollout, then `ppo_epochs` shuffled passes over it, then the next."""

    def __init__(self, config: PPOConfig, model: PolicyAndValue, reference: TokenLogprobModel, generator: TransformersGenerator,
                 scorer: Scorer, prompts: list, pad_id: int, kl: AdaptiveKL, ptx: Shuffled | None):  # fmt: skip
        self.config, self.model, self.reference, self.generator, self.scorer = config, model, reference, generator, scorer
        self.pad_id, self.kl, self.ptx = pad_id, kl, ptx
        self.prompts = Shuffled(prompts, config.rollout_size, list, config.seed)
        self.rows = config.rollout_size * config.num_generations
        self.per_rollout = config.ppo_epochs * (self.rows // config.batch_size)
        self.offset = 0

    def per_epoch(self) -> int:
        return self.prompts.per_epoch() * self.per_rollout

    def skip(self, n: int) -> None:
        self.prompts.skip(n // self.per_rollout)
        self.offset = n % self.per_rollout  # zero when checkpoints fall between rollouts, as validate() ensures
        if self.ptx is not None:
            self.ptx.skip(n)

    def __iter__(self) -> Iterator[PPOMinibatch]:
        ptx = iter(self.ptx) if self.ptx is not None else None
        for records in self.prompts:
            rollout = self.rollout(records, seed=self.config.seed + self.prompts.position)
            for i, minibatch in enumerate(rollout):
                if i < self.offset:
                    continue
                minibatch.ptx = next(ptx) if ptx is not None else None
                yield minibatch
            self.offset = 0

    @torch.no_grad()
    def rollout(self, records: list, seed: int) -> list[PPOMinibatch]:
        config = self.config
        params = SamplingParams(config.num_generations, config.temperature, config.top_p, config.max_new_tokens, seed)
        samples = self.generator.generate([r.prompt for r in records], params)
        k = config.num_generations
        scores = self.scorer.score(
            [r.prompt for r in records for _ in range(k)],
            [c.text for s in samples for c in s.completions],
            [r.answer for r in records for _ in range(k)],
        ).float()
        scores = penalise_cut(scores, torch.tensor([c.finished for s in samples for c in s.completions]), config.cut_penalty)
        batch = collate(rollout_rows(samples), self.pad_id)
        device = next(self.model.parameters()).device
        on_device = batch.to(device)
        with evaluating(self.model):
            old_logps, values = self.model(on_device.input_ids, on_device.labels, on_device.position_ids, on_device.attention_mask)
            ref = reference_logps(self.reference, on_device)
        mask = (on_device.labels != IGNORE).float()
        kl_tokens = kl_penalty(old_logps, ref, "k1") * mask
        baseline = scores.view(-1, k).mean(-1).repeat_interleave(k) if config.score_baseline == "group" else 0.0
        rewards = -self.kl.value * kl_tokens + sequence_rewards_to_tokens((scores - baseline).to(device), mask)
        advantages, returns = gae(rewards, values * mask, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        kl_per_completion = kl_tokens.sum(-1)
        coef = self.kl.value
        self.kl.update(kl_per_completion.mean().item(), self.rows)

        generator = torch.Generator().manual_seed(seed)
        minibatches = []
        for _ in range(config.ppo_epochs):
            order = torch.randperm(self.rows, generator=generator)
            for start in range(0, self.rows, config.batch_size):
                rows = order[start : start + config.batch_size]
                sub = batch.select(rows)
                width = sub.input_ids.shape[1]
                cut = lambda t: t[rows.to(t.device)][:, :width].cpu()  # noqa: E731
                minibatches.append(PPOMinibatch(
                    sub, cut(old_logps), cut(values), cut(advantages), cut(returns),
                    scores[rows], kl_per_completion[rows.to(device)].cpu(), coef,
                ))  # fmt: skip
        return minibatches


class PPOLoss:
    """Clipped surrogate + vf_coef · clipped value error, summed over completion tokens (the units)."""

    def __init__(self, config: PPOConfig):
        self.config = config

    def units(self, mb: PPOMinibatch) -> int:
        return int((mb.batch.labels != IGNORE).sum())

    def __call__(self, model: nn.Module, mb: PPOMinibatch):
        config = self.config
        b = mb.batch
        mask = (b.labels != IGNORE).float()
        logps, values = model(b.input_ids, b.labels, b.position_ids, b.attention_mask)
        policy_loss, clipped = clipped_surrogate(logps, mb.old_logps, mb.advantages, config.clip_eps)
        value_error = clipped_value_error(values, mb.old_values, mb.returns, config.value_clip_eps)
        loss = ((policy_loss + config.vf_coef * 0.5 * value_error) * mask).sum()
        tokens, n = mask.sum(), mb.scores.numel()
        metrics = {
            "reward": (mb.scores.sum(), n),
            "kl": (mb.kl.sum(), n),
            "kl_coef": (torch.tensor(mb.kl_coef * n), n),
            "entropy": ((-mb.old_logps * mask).sum(), tokens),  # Monte Carlo: tokens were sampled from π_old
            "clip_frac": ((clipped.float() * mask).sum(), tokens),
            "approx_kl": ((kl_penalty(mb.old_logps, logps.detach(), "k3") * mask).sum(), tokens),
            "value_error": (((values.detach() - mb.returns) ** 2 * mask).sum(), tokens),
            "response_length": (tokens, n),
        }
        if mb.ptx is not None:
            # γ · mean NLL per pre-training token, scaled so the engine's division by RL tokens leaves it intact.
            ptx_logps = batch_logprobs(model.module.policy if hasattr(model, "module") else model.policy, mb.ptx)
            ptx_nll = -ptx_logps.sum() / max(mb.ptx.n_targets, 1)
            loss = loss + config.ptx_coef * ptx_nll * tokens
            metrics["ptx_loss"] = (ptx_nll.detach(), 1.0)
        return loss, metrics


@locks_output
def run_ppo(config: PPOConfig) -> dict:
    run = start_online_run(config)
    policy, tokenizer, log = run.policy, run.tokenizer, run.log
    reference = policy_reference(policy)
    value_backbone, value_head = build_value(config, policy, tokenizer)
    combined = PolicyAndValue(policy, value_backbone, value_head)
    generator = TransformersGenerator(policy.model, tokenizer, batch_size=config.rollout_size)
    kl = AdaptiveKL(config.kl_coef, config.target_kl if config.adaptive_kl else None, config.kl_horizon)
    ptx = None
    if config.ptx_coef > 0:
        ptx_records, _ = load_records(config.ptx_data, "conversation")
        ptx_examples, _ = truncate(encode_conversations(tokenizer, ptx_records, last_only=False), 512)  # type: ignore[arg-type]
        ptx = Shuffled([[e] for e in ptx_examples], config.batch_size, lambda rows: collate(rows, tokenizer.pad_token_id), config.seed)
    log(f"model {config.model}: {describe(combined)}; reward {config.reward}; value {'shared head' if value_backbone is None else 'from the reward model'}")

    output = Path(config.output)
    extra: dict = {"train_prompts": len(run.prompts), **describe(combined)}
    pad_id = tokenizer.pad_token_id
    tracker = held_out_tracker(config, output, run.eval_prompts, generator, policy, reference, run.scorer, pad_id, log)
    run.evaluate_before(config, tracker, extra)

    def save_final(trained: PolicyAndValue, out: Path) -> None:
        save_model(trained.policy.model, tokenizer, out)
        if tracker is not None:
            extra.update(tracker.after())

    stream = PPORollouts(config, combined, reference, generator, run.scorer, run.prompts, pad_id, kl, ptx)
    result = train(
        algorithm="ppo",
        config=config,
        full_config=config,
        model=combined,
        loss_fn=PPOLoss(config),
        stream=stream,
        save_final=save_final,
        accelerator=run.accelerator,
        extra_summary=extra,
        checkpointed=[kl],
        on_step=None if tracker is None else tracker.on_step,
    )
    return run.report(result, extra)
