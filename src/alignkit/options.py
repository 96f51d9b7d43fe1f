"""Option groups that several commands share; each command's config dataclass inherits the ones it needs."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedModel

from alignkit.config import above, at_least, within
from alignkit.data.loading import Kind, load_records
from alignkit.data.records import Message, PromptWithAnswer, Record
from alignkit.data.tokenize import prompt_ids
from alignkit.errors import AlignkitError
from alignkit.fused import lean_activations
from alignkit.logprobs import TokenLogprobModel
from alignkit.models import LoraSettings, apply_lora, enable_activation_checkpointing, load_model
from alignkit.rewards.verifiers import REWARD_TIMEOUT


@dataclass
class ModelOptions:
    """Which model to start from and how to adapt it."""

    model: str = "smollm2-135m-instruct"
    """model to start from: a directory, a hub id, an alignkit output directory, or smollm2-135m-instruct / tiny-llama"""
    lora_r: int = at_least(0, 0)
    """LoRA rank (0: full fine-tuning)"""
    lora_alpha: float = above(0, 16.0)
    """LoRA scaling numerator (the update is scaled by alpha / r)"""
    lora_dropout: float = within("[0, 1)", 0.0)
    """dropout on the LoRA branch"""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """module names that get LoRA adapters, e.g. q_proj v_proj; all-linear for every linear layer but the head"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, about a third more compute"""
    lean_activations: bool = True
    """keep fewer tensors of RMSNorm and SwiGLU for the backward pass, recomputing their element-wise rest (Llama, Mistral, Qwen families): the same results, less activation memory"""
    trust_remote_code: bool = False
    """run code shipped with a hub model (off unless you trust it)"""

    def lora(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, list(self.lora_target_modules))

    def load_trainable(self) -> PreTrainedModel:
        """The model to train, with lean activations when asked (before LoRA wraps its layers)."""
        model = load_model(self.model, trust_remote_code=self.trust_remote_code)
        if self.lean_activations:
            lean_activations(model)
        return model

    def build_policy(self) -> TokenLogprobModel:
        """The model to train (LoRA-wrapped when asked), ready to return target-token log-probs."""
        model = apply_lora(self.load_trainable(), self.lora())
        if self.gradient_checkpointing:
            enable_activation_checkpointing(model)
        return TokenLogprobModel(model)


@dataclass
class DataOptions:
    """Where the training data is and how it is cut into sequences."""

    data: str = ""
    """training data: .jsonl, .json, .parquet, a saved `datasets` directory, or a hub dataset name"""
    eval_data: str = ""
    """held-out data in the same format (default: --eval-fraction of --data)"""
    eval_fraction: float = within("[0, 1)", 0.0)
    """fraction of --data held out for evaluation when --eval-data is not given"""
    max_length: int = at_least(1, 512)
    """longest sequence in tokens; longer examples are cut and the cut is reported"""
    limit: int = at_least(0, 0)
    """use only the first N training records (0: all), e.g. for a quick trial run"""
    skip_invalid: bool = False
    """skip malformed records (counted and reported) instead of stopping at the first one"""
    field_map: list[str] = field(default_factory=list)
    """rename input fields, e.g. question=instruction answer=output"""

    def field_mapping(self) -> dict[str, str]:
        mapping = {}
        for item in self.field_map:
            source, sep, target = item.partition("=")
            if not sep or not source or not target:
                raise AlignkitError(f"--field-map entry {item!r} is not of the form source=target")
            mapping[source] = target
        return mapping

    def require_data(self) -> None:
        if not self.data:
            raise AlignkitError("no training data given", fix="pass --data FILE (or set data: in the --config file)")

    def load_train_eval(self, kind: Kind, seed: int, log: Callable[[str], None] = print) -> tuple[list[Record], list[Record]]:
        """Training records and held-out records (from --eval-data, or a seeded --eval-fraction of --data)."""
        self.require_data()
        mapping = self.field_mapping()
        records, report = load_records(
            self.data, kind, field_map=mapping, skip_invalid=self.skip_invalid, limit=self.limit or None
        )
        log(report.summary())
        if self.eval_data:
            held, held_report = load_records(self.eval_data, kind, field_map=mapping, skip_invalid=self.skip_invalid)
            log(held_report.summary())
            return records, held
        if self.eval_fraction <= 0:
            return records, []
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        held_out = set(order[: max(1, round(self.eval_fraction * len(records)))])
        return [r for i, r in enumerate(records) if i not in held_out], [r for i, r in enumerate(records) if i in held_out]


def require_sampling(k: int, temperature: float, k_flag: str) -> None:
    """K ≥ 2 completions of one prompt are compared (group advantages, best of K): greedy ones would all be the same."""
    if k >= 2 and temperature == 0:
        raise AlignkitError(f"--temperature 0 is greedy decoding, so the {k} completions per prompt ({k_flag}) would all be "
                            "the same and there would be nothing to compare", fix="sample with --temperature > 0, e.g. 1.0")  # fmt: skip


@dataclass
class ScorerOptions:
    """How a command calls the scorers it is given."""

    reward_timeout: float = at_least(0, REWARD_TIMEOUT)
    """seconds one call of a python:... reward function may take before the run stops with an error naming it (0: no limit)"""


@dataclass
class RolloutOptions(ScorerOptions):
    """Prompts for online RL (GRPO, PPO) and how completions are sampled from them."""

    prompts: str = ""
    """training prompts (any file with prompt/instruction/question/messages rows; a reference answer is kept)"""
    limit: int = at_least(0, 0)
    """use only the first N training prompts (0: all)"""
    eval_prompts: str = ""
    """held-out prompts: mean reward of greedy answers (the accuracy, for a 0/1 verifier) before and after training, and at --eval-every"""
    eval_limit: int = at_least(1, 50)
    """use the first N held-out prompts"""
    eval_every: int = at_least(0, 0)
    """also evaluate on --eval-prompts every N steps, one row each in OUTPUT/overoptimisation.jsonl (0: only before and after)"""
    gold_reward: str = ""
    """held-out judge scored beside --reward on --eval-prompts (any scorer spec, e.g. rm:outputs/rm_gold): the over-optimisation curve"""
    prompt_suffix: str = ""
    """text appended to each prompt, e.g. an instruction about the answer format"""
    reward: str = ""
    """scorer: rm:PATH (a trained reward model), gsm8k, exact, format, python:module:function, or a weighted sum like gsm8k*1+format*0.2"""
    temperature: float = at_least(0, 1.0)
    """sampling temperature of the rollouts (0: greedy)"""
    top_p: float = within("(0, 1]", 1.0)
    """nucleus sampling of the rollouts"""
    max_new_tokens: int = at_least(1, 256)
    """longest completion"""
    cut_penalty: float = at_least(0, 0.0)
    """subtracted from the reward of an answer cut at --max-new-tokens (a verifier scores it as it stands, so a
    policy that loops until the cap loses nothing for it); e.g. 1 for a 0-1 reward: an unfinished answer ranks below
    every finished one"""
    max_prompt_length: int = at_least(1, 512)
    """prompts longer than this (in tokens) are left out, and counted"""

    def require_prompts(self) -> None:
        if not self.prompts or not self.reward:
            raise AlignkitError("no prompts or no reward given", fix="pass --prompts FILE and --reward SPEC (e.g. gsm8k or rm:outputs/rm)")
        if (self.eval_every or self.gold_reward) and not self.eval_prompts:
            raise AlignkitError("--eval-every and --gold-reward evaluate on held-out prompts", fix="pass --eval-prompts FILE")

    def load_prompts(self, tokenizer, log: Callable[[str], None] = print) -> tuple[list[PromptWithAnswer], list[PromptWithAnswer]]:
        """Training prompts that fit --max-prompt-length, and the held-out prompts (both with --prompt-suffix)."""
        train = self._with_suffix(self.prompts, self.limit or None)
        fits = [p for p in train if len(prompt_ids(tokenizer, p.prompt)) <= self.max_prompt_length]
        if not fits:
            raise AlignkitError(f"all {len(train)} prompts are longer than --max-prompt-length {self.max_prompt_length} tokens",
                                where=self.prompts, fix="raise --max-prompt-length")  # fmt: skip
        log(f"{self.prompts}: {len(fits)} prompts ({len(train) - len(fits)} longer than {self.max_prompt_length} tokens left out)")
        held_out = self._with_suffix(self.eval_prompts, self.eval_limit) if self.eval_prompts else []
        return fits, held_out

    def _with_suffix(self, path: str, limit: int | None) -> list[PromptWithAnswer]:
        records, _ = load_records(path, "prompt", limit=limit)
        if not self.prompt_suffix:
            return records  # type: ignore[return-value]
        out = []
        for record in records:
            *head, last = record.prompt
            out.append(PromptWithAnswer((*head, Message(last.role, last.content + self.prompt_suffix)), record.answer, record.origin))
        return out
