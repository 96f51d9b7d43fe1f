"""What PPO and GRPO share: their option defaults, the setup before the loop, and the held-out evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from alignkit.config import at_least
from alignkit.data.records import PromptWithAnswer
from alignkit.engine import EngineConfig, RunResult, make_accelerator
from alignkit.errors import AlignkitError
from alignkit.logprobs import TokenLogprobModel
from alignkit.models import load_tokenizer
from alignkit.options import ModelOptions, RolloutOptions, require_sampling
from alignkit.rewards.scorer import Scorer, check_references
from alignkit.rewards.verifiers import build_scorer


@dataclass
class OnlineRLConfig(EngineConfig, RolloutOptions, ModelOptions):
    """Options of the online RL commands."""

    lr: float = 1e-6
    """peak learning rate of AdamW"""
    warmup_ratio: float = 0.0
    """fraction of the steps spent warming the learning rate up linearly from 0"""
    scheduler: Literal["cosine", "linear", "constant", "wsd"] = "constant"
    """learning-rate schedule after warm-up"""
    num_generations: int = at_least(1, 1)
    """completions per prompt"""

    def validate(self) -> None:
        self.require_prompts()
        if not self.output:
            raise AlignkitError("no output directory given", fix="pass --output DIR")
        require_sampling(self.num_generations, self.temperature, "--num-generations")


@dataclass
class OnlineRun:
    """The parts every online run builds before its loop."""

    accelerator: Accelerator
    log: Callable[[str], None]
    tokenizer: PreTrainedTokenizerBase
    prompts: list[PromptWithAnswer]
    eval_prompts: list[PromptWithAnswer]
    scorer: Scorer
    policy: TokenLogprobModel

    def evaluate_before(self, config: OnlineRLConfig, tracker: Any, extra: dict[str, Any]) -> None:
        """The held-out score of the starting policy, unless the run is already complete (nothing will train)."""
        if tracker is not None and (config.overwrite or not (Path(config.output) / "summary.json").exists()):
            extra["eval_before"] = tracker.before()
            self.log(f"held-out mean reward (accuracy for a 0/1 verifier) before: {extra['eval_before']['reward']:.3f}")

    def report(self, result: RunResult, extra: dict[str, Any]) -> dict[str, Any]:
        evals = ""
        if "eval_before" in extra and "eval_after" in extra:
            evals = f", held-out mean reward {extra['eval_before']['reward']:.3f} -> {extra['eval_after']['reward']:.3f}"
        self.log(f"done: {result.steps} steps, {result.tokens_per_s:.0f} tokens/s, peak memory {result.peak_memory_mb:.0f} MiB{evals}")
        return {**vars(result), **extra}


def start_online_run(config: OnlineRLConfig) -> OnlineRun:
    accelerator = make_accelerator(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    prompts, eval_prompts = config.load_prompts(tokenizer, accelerator.print)
    scorer = build_scorer(config.reward, timeout=config.reward_timeout)
    check_references(scorer, [*prompts, *eval_prompts])
    return OnlineRun(accelerator, accelerator.print, tokenizer, prompts, eval_prompts, scorer, config.build_policy())
