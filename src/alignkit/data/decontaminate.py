"""Evaluation sets are never training data: finding training texts that repeat an evaluation prompt.

A training text is contaminated by an evaluation prompt when it holds most of that prompt's word 8-grams
(the containment measure of GPT-3's and Llama 2's contamination studies, on lower-cased `\\w+` words). The
threshold is a half: a whole prompt pasted into a longer dialogue is caught (containment 1), and so is a copy
with a word or two changed (AlpacaEval's HH-derived instructions share a 20-word template and differ in one
dish); a shared stock phrase ("can you tell me more about what you're looking for") is a few 8-grams of a
long prompt and is not. A prompt of 4 to 7 words counts as contained when its words appear in the training
text as one contiguous run; a shorter one ("Hi", "Tell me a joke") only when the training text is that prompt.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from alignkit.data.loading import strict_rows

N = 8
THRESHOLD = 0.5
_WORD = re.compile(r"\w+")
T = TypeVar("T")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int = N) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def row_text(row: dict) -> str:
    """The prompt side of a data row in any of the layouts alignkit reads (what an evaluation could repeat)."""
    if "instruction" in row:
        return "\n".join(str(row[k]) for k in ("instruction", "input") if row.get(k))
    for key in ("prompt", "question", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    if isinstance(row.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user")
    return ""


class EvalIndex:
    """The word 8-grams of a set of evaluation prompts, to test training texts against."""

    def __init__(self, prompts: Iterable[str]):
        self.prompts: list[list[str]] = [w for w in (words(p) for p in prompts) if w]
        self.grams = [ngrams(w) for w in self.prompts]
        self.owners: dict[tuple[str, ...], list[int]] = {}
        for i, grams in enumerate(self.grams):
            for gram in grams:
                self.owners.setdefault(gram, []).append(i)
        self.short = [i for i, w in enumerate(self.prompts) if len(w) < N]

    def contaminating(self, text: str) -> list[int]:
        """Indices of the evaluation prompts that `text` contains (containment ≥ THRESHOLD)."""
        tokens = words(text)
        shared: dict[int, int] = {}
        for gram in ngrams(tokens):
            for i in self.owners.get(gram, ()):
                shared[i] = shared.get(i, 0) + 1
        found = [i for i, count in shared.items() if count >= THRESHOLD * len(self.grams[i])]
        if self.short:
            joined = f" {' '.join(tokens)} "
            found += [
                i for i in self.short
                if self.prompts[i] == tokens or (len(self.prompts[i]) >= 4 and f" {' '.join(self.prompts[i])} " in joined)
            ]  # fmt: skip
        return sorted(found)


def read_prompts(path: Path) -> list[str]:
    return [row_text(row) for _, row in strict_rows(str(path))]


# Near duplicates of evaluation prompts, for training prompts built from requests (alignkit.data.constraints).
# `EvalIndex`'s rule (a text holding half of an evaluation prompt's word 8-grams, or a short prompt whole) catches an IFEval prompt pasted into a training prompt, but two
# kinds of near duplicate pass it, and `NearIndex.near_duplicate` adds a test for each:
# - a part of a prompt used as a request: IFEval's prompts are a task plus constraints, so a base that is an
#   IFEval task without its constraints holds too few of the prompt's 8-grams. Here a text half of whose own
#   8-grams (for a text of 4 to 7 words, whose whole run of words) appear in one evaluation prompt counts too.
#   Stock constraint phrases shared with IFEval ("my answer is yes my answer is no") are a few 8-grams of a
#   prompt, far from half.
# - a short prompt edited in the middle: one word changed in a 10-word prompt breaks all three of its 8-grams.
#   A Jaccard similarity of word-3-gram sets >= 0.4 counts: one substituted word in IFEval's shortest prompt
#   (10 words) leaves 5/11 = 0.45, while no request in our instruction files comes above 0.17 with any IFEval
#   prompt, nor any generated prompt above 0.3.
NEAR_JACCARD = 0.4


class NearIndex(EvalIndex):
    """Evaluation prompts prepared for `near_duplicate`: `EvalIndex`'s 8-grams plus each prompt's word 3-grams."""

    def __init__(self, prompts: Sequence[str]):
        # NFKC folds typographic variants (full-width letters, ligatures) so that they cannot hide a copy.
        super().__init__(unicodedata.normalize("NFKC", p) for p in prompts)
        self.trigrams = [ngrams(tokens, 3) for tokens in self.prompts]
        self.trigram_owners: dict[tuple[str, ...], list[int]] = {}
        for i, grams in enumerate(self.trigrams):
            for gram in grams:
                self.trigram_owners.setdefault(gram, []).append(i)

    def near_duplicate(self, text: str) -> bool:
        """Whether `text` repeats an indexed prompt: holds it (`EvalIndex.contaminating`), is mostly held in
        it, or is as similar as a lightly edited copy (the comment above `NEAR_JACCARD` says why these)."""
        text = unicodedata.normalize("NFKC", text)
        if self.contaminating(text):
            return True
        tokens = words(text)
        grams = ngrams(tokens)
        shared = Counter(i for gram in grams for i in self.owners.get(gram, ()))
        if grams and max(shared.values(), default=0) >= THRESHOLD * len(grams):
            return True
        if 4 <= len(tokens) < N:
            run = f" {' '.join(tokens)} "
            if any(run in f" {' '.join(prompt)} " for prompt in self.prompts):
                return True
        trigrams = ngrams(tokens, 3)
        common = Counter(i for gram in trigrams for i in self.trigram_owners.get(gram, ()))
        return any(n / (len(trigrams) + len(self.trigrams[i]) - n) >= NEAR_JACCARD for i, n in common.items())


def decontaminate(items: Sequence[T], eval_prompts: Sequence[str], text: Callable[[T], str]) -> tuple[list[T], int]:
    """The items whose `text` is not a near duplicate of any evaluation prompt, and how many were dropped."""
    index = NearIndex(eval_prompts)
    kept = [item for item in items if not index.near_duplicate(text(item))]
    return kept, len(items) - len(kept)
