"""GRPO (Shao et al. 2024, DeepSeekMath; the RL of DeepSeek-R1) and RLOO (Ahmadian et al. 2024).

Each step: take a batch of prompts, sample K completions per prompt with the current policy (the K samples
share the prompt's KV cache), score them, and turn the scores into advantages relative to the group:
(r − mean) / std for GRPO, r − mean of the others for RLOO, r − mean without the division for Dr. GRPO
(Liu et al. 2025). The policy then follows the clipped surrogate with a k3 KL penalty to the reference:

    loss_t = max(−A ρ_t, −A clip(ρ_t, 1−ε, 1+ε)) + β k3(log π_t − log π_ref,t),   ρ_t = π_t / π_old,t

averaged per sequence then over sequences (`--loss-normalisation sequence`, the paper) or over all tokens of
the step (`token`, DAPO). With one update per rollout batch (this implementation), π_old = π and ρ = 1 in
value, so the clip never binds; it still gives the exact policy gradient A ∇log π.

The reference for the KL term is the LoRA base (adapter switched off) with `--lora-r`, else a frozen copy of
the starting model; with `--beta 0` no reference exists at all, unless `--gold-reward` asks for the KL of the
over-optimisation curve (`evaluation/tracking.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignkit.algorithms.online import OnlineRLConfig, start_online_run
from alignkit.config import above, at_least
from alignkit.data.records import PromptWithAnswer
from alignkit.data.tokenize import IGNORE, Batch, collate, collate_with_prefixes
from alignkit.engine import Shuffled, train
from alignkit.evaluation.tracking import held_out_tracker
from alignkit.generation import Sample, SamplingParams, TransformersGenerator, rollout_rows
from alignkit.io import locks_output
from alignkit.logprobs import TokenLogprobModel, batch_logprobs
from alignkit.losses.policy import KLEstimator, clipped_surrogate, group_advantages, kl_penalty, penalise_cut, rloo_advantages
from alignkit.models import describe, save_model
from alignkit.reference import policy_reference, reference_logps
from alignkit.rewards.scorer import Scorer


@dataclass
class GRPOConfig(OnlineRLConfig):
    """Options of `alignkit grpo`."""

    reward: str = "gsm8k"
    """scorer: gsm8k, exact, format, python:module:function, rm:PATH, or a weighted sum like gsm8k*1+format*0.2"""
    num_generations: int = at_least(2, 4, why="advantages compare samples of one prompt")
    """K, completions sampled per prompt"""
    batch_size: int = at_least(1, 4)
    """prompts per micro-batch (each with K completions)"""
    update_batch_size: int = at_least(0, 4)
    """completions per forward/backward pass of the update, rounded up to whole groups of K (0: the whole
    micro-batch at once); the gradient is the same, the activation memory of a pass shrinks with it"""
    advantage: Literal["grpo", "rloo", "dr_grpo"] = "grpo"
    """group baseline: grpo (z-score in the group), rloo (leave-one-out mean), dr_grpo (mean, no std division)"""
    loss_normalisation: Literal["sequence", "token"] = "sequence"
    """average the per-token loss per sequence then over sequences (GRPO), or over all tokens (DAPO)"""
    beta: float = at_least(0, 0.04)
    """weight of the k3 KL penalty to the reference (0: no reference model)"""
    clip_eps: float = above(0, 0.2)
    """PPO clipping range ε"""


def rollout_batch(samples: list[Sample], pad_id: int, *, share_prefixes: bool) -> Batch:
    """One row per completion, scored on the completion (and its stop token).

    With `share_prefixes` each prompt is computed once for its K completions (`collate_with_prefixes`); else
    every row holds its prompt again (`rollout_rows`). One row per completion either way, with its targets
    from column 0 on in the first layout, so the loss reads both alike.
    """
    if not share_prefixes:
        return collate(rollout_rows(samples), pad_id)
    continuations = [c.trained_ids for s in samples for c in s.completions]
    return collate_with_prefixes([s.prompt_token_ids for s in samples], continuations, pad_id)


@dataclass
class RolloutBatch:
    """The completions of one rollout (R = prompts × K) as rows of `batch`, labels on the completion tokens."""

    batch: Batch
    advantages: torch.Tensor
    """[R] one advantage per sequence"""
    rewards: torch.Tensor
    """[R]"""
    ref_logps: torch.Tensor | None
    """[R, T] reference log-probs of the completion tokens, laid out as `batch` (None when beta = 0)"""
    finished: torch.Tensor
    """[R] whether each completion ended by itself"""
    samples: list[Sample]
    """the prompts and completions `batch` was collated from, to collate a part of them again"""
    pad_id: int
    share_prefixes: bool

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def n_sequences(self) -> int:
        return int(self.rewards.numel())

    def groups(self, start: int, stop: int, k: int) -> "RolloutBatch":
        """The completions of prompts start:stop (K each), collated on their own (no wider than they need)."""
        rows = slice(start * k, stop * k)
        samples = self.samples[start:stop]
        batch = rollout_batch(samples, self.pad_id, share_prefixes=self.share_prefixes)
        ref = None if self.ref_logps is None else self.ref_logps[rows, : batch.input_ids.shape[1]]
        return RolloutBatch(batch, self.advantages[rows], self.rewards[rows], ref, self.finished[rows], samples, self.pad_id, self.share_prefixes)

    def to(self, device: torch.device | str) -> "RolloutBatch":
        ref = None if self.ref_logps is None else self.ref_logps.to(device)
        return RolloutBatch(self.batch.to(device), self.advantages.to(device), self.rewards.to(device), ref,
                            self.finished.to(device), self.samples, self.pad_id, self.share_prefixes)  # fmt: skip


def advantages_for(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """Group-relative advantages for rewards [prompts, K]."""
    if kind == "rloo":
        return rloo_advantages(rewards)
    return group_advantages(rewards, scale=kind == "grpo")


class GroupRollouts:
    """The micro-batch stream of GRPO: each item is freshly sampled from the current policy.

    Prompt order is a `Shuffled` stream (deterministic in the seed), and sampling is seeded by the rollout's
    index, so a resumed run samples what the uninterrupted run sampled at that step.
    """

    def __init__(self, config: GRPOConfig, policy: TokenLogprobModel, reference: TokenLogprobModel | None,
                 generator: TransformersGenerator, scorer: Scorer, prompts: list[PromptWithAnswer], pad_id: int,
                 share_prefixes: bool):  # fmt: skip
        self.config, self.policy, self.reference, self.generator, self.scorer = config, policy, reference, generator, scorer
        self.pad_id, self.share_prefixes = pad_id, share_prefixes
        self.prompts = Shuffled(prompts, config.batch_size, list, config.seed)

    def per_epoch(self) -> int:
        return self.prompts.per_epoch()

    def skip(self, n: int) -> None:
        self.prompts.skip(n)

    def __iter__(self) -> Iterator[RolloutBatch]:
        for chosen in self.prompts:
            yield self.rollout(chosen, seed=self.config.seed + self.prompts.position)

    def rollout(self, records: list[PromptWithAnswer], seed: int) -> RolloutBatch:
        config, k = self.config, self.config.num_generations
        params = SamplingParams(k, config.temperature, config.top_p, config.max_new_tokens, seed)
        samples = self.generator.generate([r.prompt for r in records], params)
        prompts = [r.prompt for r in records for _ in range(k)]
        completions = [c.text for s in samples for c in s.completions]
        references = [r.answer for r in records for _ in range(k)]
        finished = torch.tensor([c.finished for s in samples for c in s.completions])
        rewards = penalise_cut(self.scorer.score(prompts, completions, references).float(), finished, config.cut_penalty)
        batch = rollout_batch(samples, self.pad_id, share_prefixes=self.share_prefixes)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = reference_logps(self.reference, batch.to(next(self.reference.parameters()).device)).cpu()
        return RolloutBatch(
            batch,
            advantages_for(rewards.view(len(records), k), config.advantage).flatten(),
            rewards,
            ref,
            finished,
            samples,
            self.pad_id,
            self.share_prefixes,
        )


class GRPOLoss:
    def __init__(self, config: GRPOConfig):
        self.config = config

    def units(self, rollout: RolloutBatch) -> int:
        mask = rollout.batch.labels != IGNORE
        return int(mask.sum()) if self.config.loss_normalisation == "token" else rollout.n_sequences

    def pieces(self, rollout: RolloutBatch) -> list[RolloutBatch]:
        k = self.config.num_generations
        prompts = rollout.n_sequences // k
        per_piece = prompts if self.config.update_batch_size <= 0 else max(1, -(-self.config.update_batch_size // k))
        if per_piece >= prompts:
            return [rollout]
        return [rollout.groups(start, min(start + per_piece, prompts), k) for start in range(0, prompts, per_piece)]

    def __call__(self, model: torch.nn.Module, rollout: RolloutBatch):
        config = self.config
        mask = (rollout.batch.labels != IGNORE).float()
        logps = batch_logprobs(model, rollout.batch)
        # One update per rollout: the sampling policy is the current one, so π_old = π.detach() exactly.
        per_token, clipped = clipped_surrogate(logps, logps.detach(), rollout.advantages[:, None], config.clip_eps)
        kl = torch.zeros_like(per_token)
        if rollout.ref_logps is not None:
            kl = kl_penalty(logps, rollout.ref_logps, KLEstimator.K3)
            per_token = per_token + config.beta * kl
        lengths = mask.sum(-1).clamp(min=1)
        if config.loss_normalisation == "token":
            loss = (per_token * mask).sum()
        else:
            loss = ((per_token * mask).sum(-1) / lengths).sum()
        n = rollout.n_sequences
        tokens = mask.sum()
        return loss, {
            "reward": (rollout.rewards.sum(), n),
            "reward_std": (rollout.rewards.view(-1, config.num_generations).std(-1).sum() * config.num_generations, n),
            "kl": ((kl.detach() * mask).sum(), tokens),
            "clip_frac": ((clipped.float() * mask).sum(), tokens),
            "completion_length": (lengths.sum(), n),
            "finished": (rollout.finished.float().sum(), n),
        }


@locks_output
def run_grpo(config: GRPOConfig) -> dict:
    run = start_online_run(config)
    policy, log = run.policy, run.log
    # The over-optimisation curve needs the KL, so a gold reward loads a reference even with --beta 0.
    reference = policy_reference(policy) if config.beta > 0 or (run.eval_prompts and config.gold_reward) else None
    # Rollouts need batch_size prompts per call; greedy evaluation goes faster with wider batches.
    generator = TransformersGenerator(policy.model, run.tokenizer, batch_size=max(config.batch_size, 16))
    log(f"model {config.model}: {describe(policy)}; K={config.num_generations}, advantage {config.advantage}, reward {config.reward}")

    output = Path(config.output)
    extra: dict = {"train_prompts": len(run.prompts), **describe(policy)}
    pad_id = run.tokenizer.pad_token_id
    tracker = held_out_tracker(config, output, run.eval_prompts, generator, policy, reference, run.scorer, pad_id, log)
    run.evaluate_before(config, tracker, extra)

    def save_final(trained: TokenLogprobModel, out: Path) -> None:
        save_model(trained.model, run.tokenizer, out)
        if tracker is not None:
            extra.update(tracker.after())

    rollout_reference = reference if config.beta > 0 else None
    # The K completions of a prompt share its forward pass in the update and the reference pass, as in sampling.
    share_prefixes = policy.shares_prefixes()
    if not share_prefixes:
        log("each completion's update recomputes its prompt (gradient checkpointing, or a model whose attention does not take a shared prompt's cache)")
    stream = GroupRollouts(config, policy, rollout_reference, generator, run.scorer, run.prompts, pad_id, share_prefixes)
    result = train(
        algorithm=f"grpo-{config.advantage}",
        config=config,
        full_config=config,
        model=policy,
        loss_fn=GRPOLoss(config),
        stream=stream,
        save_final=save_final,
        accelerator=run.accelerator,
        extra_summary=extra,
        on_step=None if tracker is None else tracker.on_step,
    )
    return run.report(result, extra)
