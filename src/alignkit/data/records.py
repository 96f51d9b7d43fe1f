"""Typed records: what every stage of alignkit reads and writes, validated once when loaded.

Every record keeps `origin` ("file:line"), so a problem found later (tokenisation, a judge) still names the
line it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


Prompt = tuple[Message, ...]


@dataclass(frozen=True)
class Conversation:
    """Chat messages; SFT trains on the assistant turns (all of them, or only the last: a config choice)."""

    messages: Prompt
    origin: str = ""


@dataclass(frozen=True)
class PreferencePair:
    """One prompt, a preferred and a dispreferred response; `margin` is an optional strength of preference."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    origin: str = ""


@dataclass(frozen=True)
class Ranking:
    """One prompt with K ≥ 2 responses, best first (InstructGPT's K-way comparisons)."""

    prompt: Prompt
    responses: tuple[str, ...]
    origin: str = ""

    def pairs(self) -> list[PreferencePair]:
        """All C(K, 2) ordered pairs the ranking implies."""
        return [
            PreferencePair(self.prompt, self.responses[i], self.responses[j], origin=self.origin)
            for i in range(len(self.responses))
            for j in range(i + 1, len(self.responses))
        ]


@dataclass(frozen=True)
class LabelledCompletion:
    """An unpaired completion marked desirable or not (KTO's data)."""

    prompt: Prompt
    completion: str
    desirable: bool
    origin: str = ""


@dataclass(frozen=True)
class PromptWithAnswer:
    """A prompt and its reference answer (GSM8K's final number, an exact string, a reference reply)."""

    prompt: Prompt
    answer: str
    origin: str = ""


@dataclass(frozen=True)
class PlainText:
    """Raw text for language-model loss on every token (pre-training / mid-training streams)."""

    text: str
    origin: str = ""


Record = Conversation | PreferencePair | Ranking | LabelledCompletion | PromptWithAnswer | PlainText


def user_prompt(text: str) -> Prompt:
    return (Message("user", text),)


def distinct_answers(completions: Sequence[str]) -> list[str]:
    """Non-empty completions without repeats (same text up to surrounding whitespace), first occurrence kept:
    a pair of identical answers teaches nothing, to a judge or to a labeller."""
    seen: set[str] = set()
    kept = []
    for completion in completions:
        key = completion.strip()
        if key and key not in seen:
            seen.add(key)
            kept.append(completion)
    return kept
