"""Rejection-sampling fine-tuning (Llama 2's rejection sampling; RAFT, Dong et al. 2023; ReST-style):
sample N answers per prompt with the current model, keep the best by a scorer, and fine-tune on those.

The samples are written to OUTPUT/best_of_n.jsonl first (prompt, completion, score), so a rerun reuses them
and a person can read what the model was trained on; the SFT stage then runs as `alignkit sft` would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from alignkit.algorithms.sft import SFTConfig, run_sft
from alignkit.config import above, at_least
from alignkit.errors import AlignkitError
from alignkit.generation import sample_best_of
from alignkit.io import locks_output, write_jsonl
from alignkit.options import ScorerOptions


@dataclass
class RSFTConfig(SFTConfig, ScorerOptions):
    """Options of `alignkit rsft` (the SFT options apply to the fine-tuning stage)."""

    prompts: str = ""
    """prompts to sample from (any file with prompt/instruction/question/messages rows)"""
    prompt_limit: int = at_least(0, 0)
    """use only the first N prompts (0: all)"""
    num_samples: int = at_least(2, 8, why="one of them is kept, the others rejected")
    """N, completions sampled per prompt; the best one is kept"""
    scorer: str = ""
    """scorer that picks the best: gsm8k, exact, format, python:module:function, rm:PATH, or a weighted sum"""
    min_score: float | None = None
    """drop prompts whose best completion scores below this (e.g. 1 for a 0/1 verifier: keep only solved ones)"""
    temperature: float = above(0, 0.8, why="greedy samples of one prompt are all the same")
    """sampling temperature"""
    max_new_tokens: int = at_least(1, 256)
    """longest sampled completion"""
    cut_penalty: float = at_least(0, 0.0)
    """subtracted from the score of a sample cut at --max-new-tokens before the best is picked and --min-score is
    applied; e.g. 1 for a 0-1 scorer: an answer that loops to the cap is never imitated"""

    def validate(self) -> None:
        if not self.prompts or not self.scorer or not self.output:
            raise AlignkitError("rsft needs --prompts, --scorer and --output")


@locks_output
def run_rsft(config: RSFTConfig) -> dict:
    output = Path(config.output)
    best_file = output / "best_of_n.jsonl"
    if not best_file.exists():
        rows = sample_best_of(
            config.model, config.prompts, n=config.num_samples, scorer=config.scorer, temperature=config.temperature,
            max_new_tokens=config.max_new_tokens, seed=config.seed, limit=config.prompt_limit,
            trust_remote_code=config.trust_remote_code, reward_timeout=config.reward_timeout, cut_penalty=config.cut_penalty,
        )  # fmt: skip
        kept = [r for r in rows if config.min_score is None or r["best_score"] >= config.min_score]
        if not kept:
            raise AlignkitError(
                f"no prompt's best completion scored at least {config.min_score}",
                fix="lower --min-score, raise --num-samples, or check the scorer",
            )
        write_jsonl([{"prompt": r["prompt"], "completion": r["best"], "score": r["best_score"]} for r in kept], str(best_file))
        print(f"kept the best of {config.num_samples} for {len(kept)} of {len(rows)} prompts -> {best_file}")
    return run_sft(dataclasses.replace(config, data=str(best_file)))
