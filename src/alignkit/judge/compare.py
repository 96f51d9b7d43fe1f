"""Asking a judge about pairs of answers, in both orders, and the judge as a scorer.

`judge_pairs` renders each pair twice (A = first, B = second; then swapped), sends all 2N judging prompts
to the judge at once (so a local model batches them and a server gets them concurrently) and combines the
two answers of each pair with `combine_orders`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alignkit.data.records import Prompt
from alignkit.errors import AlignkitError
from alignkit.judge.backends import Judge
from alignkit.judge.prompts import Template, prompt_text, shorten
from alignkit.judge.verdicts import Disagreement, PairVerdict, check_probabilities, combine_orders
from alignkit.rewards.scorer import CheckedScorer


@dataclass(frozen=True)
class PairRequest:
    """One question for the judge: which of `first` and `second` better answers `prompt`?"""

    prompt: str
    """the request as text (`prompt_text` of a chat prompt)"""
    first: str
    second: str
    principle: str = ""
    """the principle to judge by, for a template with a {principle} slot"""


def render_pair(template: Template, request: PairRequest, *, swapped: bool, max_answer_chars: int = 0) -> str:
    a, b = (request.second, request.first) if swapped else (request.first, request.second)
    return template.render(
        prompt=request.prompt,
        answer_a=shorten(a, max_answer_chars),
        answer_b=shorten(b, max_answer_chars),
        principle=request.principle,
    )


def judge_pairs(
    judge: Judge,
    template: Template,
    requests: Sequence[PairRequest],
    *,
    disagreement: Disagreement = "tie",
    max_answer_chars: int = 0,
) -> list[PairVerdict]:
    """The judge's verdict on each pair, asked in both orders (see `verdicts.combine_orders`)."""
    texts = []
    for request in requests:
        texts.append(render_pair(template, request, swapped=False, max_answer_chars=max_answer_chars))
        texts.append(render_pair(template, request, swapped=True, max_answer_chars=max_answer_chars))
    if not texts:
        return []
    try:
        probs = check_probabilities(judge.prob_a(texts), len(texts), judge.name)
    except ValueError as exc:
        raise AlignkitError(str(exc), fix="a judge's prob_a must return one probability per judging prompt") from None
    return [combine_orders(probs[2 * i], probs[2 * i + 1], disagreement) for i in range(len(requests))]


class JudgeScorer(CheckedScorer):
    """The judge behind the scorer interface: score = p(completion ≻ reference answer), both orders averaged.

    Ties, including pairs the two orders disagree on, score ½. With baseline answers as `references`, the
    mean score is a judge's win rate against the baseline; as a reward it is RLAIF against a fixed answer.
    """

    kind = "judge"
    needs_references = True

    def __init__(self, judge: Judge, template: Template, *, max_answer_chars: int = 0, name: str | None = None):
        self.judge, self.template, self.max_answer_chars = judge, template, max_answer_chars
        self.name = name or f"judge:{judge.name}"

    def raw_scores(self, prompts: Sequence[Prompt], completions: Sequence[str], references: Sequence[str] | None):
        assert references is not None  # `score` refuses a call without them (needs_references)
        requests = [PairRequest(prompt_text(p), c, r) for p, c, r in zip(prompts, completions, references)]
        verdicts = judge_pairs(self.judge, self.template, requests, disagreement="tie", max_answer_chars=self.max_answer_chars)
        return [v.p_first if v.outcome in ("first", "second") else 0.5 for v in verdicts]
