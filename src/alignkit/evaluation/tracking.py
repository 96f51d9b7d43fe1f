"""Held-out evaluation of online RL (PPO, GRPO) before, during and after training: the over-optimisation curve.

At step 0, every `--eval-every` steps and after the last step, the policy answers the held-out prompts
(`--eval-prompts`) greedily, and the checkpoint becomes one row of ``OUTPUT/overoptimisation.jsonl``:

    {"step": 40, "kl": 3.1, "sqrt_kl": 1.76, "proxy": 0.82, "gold": 0.41, "length": 57.2, "distinct_2": 0.63}

``proxy`` is the mean training reward (`--reward`) of the answers and ``gold`` that of a held-out judge
(`--gold-reward`; null without one); ``kl`` is the sequence-level k1 estimate Σ_t log π(y_t) − log π_ref(y_t)
per answer, averaged over answers, in nats (null when the run holds no reference model); ``sqrt_kl`` is
√max(kl, 0); ``length`` the mean answer length in tokens; ``distinct_2`` the distinct-bigram ratio of the
answers. Gold and proxy against √KL is the plot of Gao, Schulman & Hilton 2022: the proxy keeps rising while
the gold reward peaks and falls. After each row `diagnostics.checkpoint_alarms` runs over all rows so far
and each alarm is printed once when it first fires; the verdicts go to ``summary.json``.

Greedy answers are not samples from π, so their mean log-ratio is a log-likelihood ratio rather than an
unbiased KL estimate (it can come out slightly negative); it is deterministic, which a curve whose points
are minutes apart needs more than unbiasedness.

An evaluation leaves the run as it found it: the model back in its mode, no gradients, and the Python,
NumPy and torch (CPU and CUDA) random states restored, so a run with `--eval-every` trains exactly as one
without it.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.data.records import PromptWithAnswer
from alignkit.evaluation.diagnostics import CHECKPOINTS_FILE, Alarm, checkpoint_alarms
from alignkit.evaluation.metrics import distinct_n
from alignkit.generation import Sample, SamplingParams, TransformersGenerator, rollout_rows
from alignkit.io import write_jsonl
from alignkit.logprobs import TokenLogprobModel
from alignkit.models import evaluating
from alignkit.options import RolloutOptions
from alignkit.reference import as_reference, sequence_logprobs
from alignkit.rewards.scorer import Scorer, check_references
from alignkit.rewards.verifiers import build_scorer


def greedy_answers(generator: TransformersGenerator, records: list[PromptWithAnswer], max_new_tokens: int) -> list[Sample]:
    return generator.generate([r.prompt for r in records], SamplingParams(1, 0.0, 1.0, max_new_tokens))


def reward_summary(scorer: Scorer, records: list[PromptWithAnswer], samples: list[Sample]) -> dict:
    """Mean reward of the answers (the accuracy, for a 0/1 verifier), mean answer length in tokens, 5 examples."""
    completions = [s.completions[0] for s in samples]
    rewards = scorer.score([r.prompt for r in records], [c.text for c in completions], [r.answer for r in records])
    return {
        "reward": rewards.float().mean().item(),
        "length": sum(len(c.token_ids) for c in completions) / len(completions),
        "examples": [{"prompt": r.prompt[-1].content, "answer": r.answer, "completion": c.text, "reward": float(x)}
                     for r, c, x in list(zip(records, completions, rewards))[:5]],  # fmt: skip
    }


@torch.no_grad()
def evaluate_rewards(generator: TransformersGenerator, scorer: Scorer, records: list[PromptWithAnswer], max_new_tokens: int) -> dict:
    """Mean reward of greedy answers (the accuracy, for a 0/1 verifier) and mean answer length in tokens."""
    return reward_summary(scorer, records, greedy_answers(generator, records, max_new_tokens))


@contextlib.contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode without gradients; afterwards the model's mode and every random state as they were.

    A scorer may draw from Python's, NumPy's or torch's generators (generation itself draws from its own, per
    prompt); without this, dropout and any other draw of the next training step would differ.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), evaluating(model):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class HeldOutTracker:
    """Evaluates the policy on the held-out prompts at checkpoints and keeps OUTPUT/overoptimisation.jsonl.

    Call `before()` on the starting policy (its result is the summary's `eval_before`), pass `on_step` to
    `engine.train` as its hook, and take `after()` into the summary once training is done.
    """

    def __init__(self, output: Path, records: list[PromptWithAnswer], generator: TransformersGenerator,
                 policy: TokenLogprobModel, reference: TokenLogprobModel | None, proxy: Scorer, gold: Scorer | None,
                 every: int, max_new_tokens: int, pad_id: int, log: Callable[[str], None]):  # fmt: skip
        self.file = output / CHECKPOINTS_FILE
        self.records, self.generator, self.policy, self.reference = records, generator, policy, reference
        self.proxy, self.gold, self.every, self.max_new_tokens, self.pad_id, self.log = proxy, gold, every, max_new_tokens, pad_id, log
        self.rows: list[dict] | None = None
        """None until the run starts or resumes (the first `on_step` call)"""
        self.initial: dict | None = None
        self.latest: dict = {}
        self.alarms: dict[str, Alarm] = {}
        self.warned: set[str] = set()

    def evaluate(self, step: int) -> tuple[dict, dict]:
        """This checkpoint's row and its summary: `reward_summary` of the proxy plus gold, KL and distinct-2."""
        records = self.records
        with untouched(self.policy.model):
            samples = greedy_answers(self.generator, records, self.max_new_tokens)
            summary = reward_summary(self.proxy, records, samples)
            texts = [s.completions[0].text for s in samples]
            gold = None
            if self.gold is not None:
                gold = self.gold.score([r.prompt for r in records], texts, [r.answer for r in records]).float().mean().item()
            kl = self.kl(samples)
        row = {
            "step": step,
            "kl": kl,
            "sqrt_kl": None if kl is None else math.sqrt(max(kl, 0.0)),
            "proxy": summary["reward"],
            "gold": gold,
            "length": summary["length"],
            "distinct_2": distinct_n(texts, 2),
        }
        return row, {**summary, "gold": gold, "kl": kl, "distinct_2": row["distinct_2"]}

    def kl(self, samples: list[Sample]) -> float | None:
        """Mean over answers of Σ_t log π(y_t) − log π_ref(y_t), nats; None without a reference model."""
        if self.reference is None:
            return None
        examples = [row[0] for row in rollout_rows(samples)]
        batch_size = self.generator.batch_size
        logps = sequence_logprobs(self.policy, examples, self.pad_id, batch_size)
        with as_reference(self.reference):
            ref = sequence_logprobs(self.reference, examples, self.pad_id, batch_size)
        return sum(a - b for a, b in zip(logps, ref)) / len(examples)

    def before(self) -> dict:
        """Evaluate the starting policy; its row is written when the run is seen to start afresh."""
        self.initial, summary = self.evaluate(0)
        return summary

    def on_step(self, step: int, total: int) -> None:
        """The engine's hook: set the file up when the run starts or resumes, then evaluate when a row is due."""
        if self.rows is None:
            self.rows = []
            if step == 0:
                assert self.initial is not None, "before() evaluates the starting policy"
                self.record(self.initial)
            elif self.file.exists():
                # A resumed run drops the rows of the steps after its checkpoint: those steps are trained again.
                lines = self.file.read_text(encoding="utf-8").splitlines()
                self.rows = [row for row in map(json.loads, filter(str.strip, lines)) if row["step"] <= step]
            return
        if step == total or (self.every > 0 and step % self.every == 0):
            row, self.latest = self.evaluate(step)
            self.record(row)

    def record(self, row: dict) -> None:
        self.rows = [r for r in self.rows or [] if r["step"] < row["step"]] + [row]
        write_jsonl(self.rows, str(self.file))
        self.alarms = checkpoint_alarms(self.rows)
        for name, alarm in self.alarms.items():
            if alarm.fired and name not in self.warned:
                self.warned.add(name)
                self.log(f"WARNING ({name}, held-out step {self.step_of(alarm)}): {alarm.message}")

    def step_of(self, alarm: Alarm) -> int | None:
        return None if alarm.at_index is None or self.rows is None else self.rows[alarm.at_index]["step"]

    def after(self) -> dict[str, Any]:
        """The summary's `eval_after` (the evaluation after the last step) and the alarms' verdicts."""
        alarms = {name: {"fired": a.fired, "at_step": self.step_of(a), "message": a.message} for name, a in self.alarms.items()}
        return {"eval_after": self.latest, "alarms": alarms}


def held_out_tracker(config: RolloutOptions, output: Path, records: list[PromptWithAnswer], generator: TransformersGenerator,
                     policy: TokenLogprobModel, reference: TokenLogprobModel | None, proxy: Scorer, pad_id: int,
                     log: Callable[[str], None]) -> HeldOutTracker | None:  # fmt: skip
    """The tracker of an RL run's options, or None without held-out prompts."""
    if not records:
        return None
    gold = build_scorer(config.gold_reward, timeout=config.reward_timeout) if config.gold_reward else None
    check_references(gold, records)
    return HeldOutTracker(output, records, generator, policy, reference, proxy, gold, config.eval_every,
                          config.max_new_tokens, pad_id, log)  # fmt: skip
