"""The one reward interface: a *scorer* answers "how good is each completion for its prompt".

    scorer.score(prompts, completions, references=None) -> torch.Tensor  # [N] float32, on the CPU

The caller repeats each prompt once per completion, so `prompts`, `completions` and `references` are
parallel sequences of length N. A GSM8K verifier (`verifiers.py`), an IFEval checker (`ifeval.py`), a user's
Python function, a reward model (`reward_model.py`), an LLM judge and weighted sums of these are
interchangeable behind that one method, which is what lets the RL algorithms never ask where a reward came
from (STYLE.md: "rewards, judges and evaluation share one interface").

Every score goes through one check (`checked_scores`): a scorer that raises, returns NaN or inf, returns the
wrong number of scores or something that is not numbers stops the run with an `AlignkitError` that names the
scorer (for a user's function: the function and its import path) and says what was wrong and where. A
silent NaN reward would otherwise surface many steps later as a NaN loss with no hint of its cause.
"""

from __future__ import annotations

import inspect
import numbers
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from alignkit.data.records import Prompt, PromptWithAnswer
from alignkit.errors import AlignkitError, DataError

__all__ = ["CheckedScorer", "Scorer", "check_references", "checked_scores", "guard", "is_finite_number", "short_repr"]


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores completions: a verifier, a user function, a reward model, a weighted sum.

    `score` returns a float32 tensor of shape [N], one score per completion. `prompts[i]` is the prompt
    `completions[i]` answered (the caller repeats a prompt for each of its K samples) and `references[i]`
    its reference answer when the data has one. `name` labels the scorer in logs and error messages.
    """

    name: str

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> torch.Tensor: ...


def checked_scores(
    name: str,
    call: Callable[[], Any],
    expected: int,
    *,
    kind: str = "scorer",
    where: str | None = None,
) -> torch.Tensor:
    """Run `call()` and return its scores as a CPU float32 tensor [expected], or raise an `AlignkitError`.

    The one gate every score passes: the error names the scorer (`kind` 'name', at `where`) and says what
    was wrong — the exception it raised, the number of scores against `expected`, the index and value of the
    first non-numeric or non-finite score. An `AlignkitError` raised inside `call` passes through unchanged
    (it already says what is wrong).
    """
    label = f"{kind} '{name}'"
    try:
        result = call()
    except AlignkitError:
        raise
    except Exception as exc:  # a user's function can raise anything; the run must say which one did
        frame = traceback.extract_tb(exc.__traceback__)[-1]  # the line that raised, usually in the user's code
        raise AlignkitError(
            f"{label} raised {type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno}, in {frame.name})",
            where=where,
            fix=f"fix the {kind}; rerun with --debug for the whole traceback",
        ) from exc
    return _as_scores(label, result, expected, where)


def _as_scores(label: str, result: Any, expected: int, where: str | None) -> torch.Tensor:
    def fail(what: str) -> AlignkitError:
        return AlignkitError(
            f"{label} {what}",
            where=where,
            fix=f"return one finite number per completion: a list of {expected} floats or a tensor of shape "
            f"[{expected}]",
        )

    if isinstance(result, torch.Tensor):
        if result.is_complex() or not (result.is_floating_point() or result.dtype in _INT_DTYPES):
            raise fail(f"returned a tensor of dtype {result.dtype}, which is not real numbers")
        if result.dim() != 1:
            raise fail(f"returned a tensor of shape {list(result.shape)}; expected shape [{expected}]")
        if result.shape[0] != expected:
            raise fail(_count_mismatch(result.shape[0], expected))
        originals: list[Any] | None = None
        scores = result.detach().to(device="cpu", dtype=torch.float32)
    else:
        if isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
            raise fail(f"returned {type(result).__name__} {short_repr(result)}, not a list of {expected} numbers")
        originals = list(result)
        if len(originals) != expected:
            raise fail(_count_mismatch(len(originals), expected))
        values = []
        for i, value in enumerate(originals):
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise fail(f"returned a non-numeric score at index {i}: {type(value).__name__} {short_repr(value)}")
            values.append(float(value))
        scores = torch.tensor(values, dtype=torch.float32)
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        value = originals[i] if originals is not None else result[i].item()
        beyond = " (beyond float32's range)" if scores[i].isinf() and is_finite_number(value) else ""
        raise fail(f"returned {value!r} at index {i}{beyond}; scores must be finite numbers")
    return scores


def _count_mismatch(got: int, expected: int) -> str:
    return f"returned {got} scores for {expected} completions (expected {expected}, got {got})"


_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def is_finite_number(value: Any) -> bool:
    try:
        return abs(float(value)) != float("inf") and float(value) == float(value)
    except (TypeError, ValueError, OverflowError):
        return False


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CheckedScorer:
    """Base of alignkit's scorers: `score` checks the inputs, calls `raw_scores` and checks its output.

    Subclasses set `name` and implement `raw_scores`, returning a list of floats or a [N] tensor; the checks
    of `checked_scores` then apply to them as to any user function. `needs_references` makes `score` refuse
    a call without reference answers.
    """

    name: str = "scorer"
    kind: str = "scorer"  # the word error messages use: "scorer 'gsm8k'", "reward function 'f'"
    where: str | None = None  # where the scorer came from (a user function's import path), for errors
    needs_references: bool = False

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> torch.Tensor:
        self._check_inputs(prompts, completions, references)
        return checked_scores(
            self.name,
            lambda: self.raw_scores(prompts, completions, references),
            len(completions),
            kind=self.kind,
            where=self.where,
        )

    def raw_scores(
        self, prompts: Sequence[Prompt], completions: Sequence[str], references: Sequence[str] | None
    ) -> Sequence[float] | torch.Tensor:
        raise NotImplementedError

    def reference_problem(self, reference: str) -> str | None:
        """Why this scorer cannot use `reference`, or None; `check_references` asks it of every prompt at load time."""
        if self.needs_references and not reference.strip():
            return f"{self.kind} '{self.name}' compares completions with a reference answer, and this prompt has none"
        return None

    def _check_inputs(
        self, prompts: Sequence[Prompt], completions: Sequence[str], references: Sequence[str] | None
    ) -> None:
        label = f"{self.kind} '{self.name}'"
        if isinstance(completions, str):
            raise AlignkitError(f"{label} was given one string as `completions`; it takes a sequence of completions")
        if len(prompts) != len(completions):
            raise AlignkitError(
                f"{label} was given {len(prompts)} prompts for {len(completions)} completions",
                fix="repeat each prompt once per completion, so prompts[i] is the prompt completions[i] answers",
            )
        if references is not None and len(references) != len(completions):
            raise AlignkitError(f"{label} was given {len(references)} references for {len(completions)} completions")
        for i, completion in enumerate(completions):
            if not isinstance(completion, str):
                raise AlignkitError(f"{label}: completion {i} is {type(completion).__name__}, not a string")
        if self.needs_references and references is None:
            raise AlignkitError(
                f"{label} compares completions with reference answers, and none were given",
                fix="use prompts that carry an answer (GSM8K's `final` field, or `answer`), "
                "or a reward that needs none (format, python:..., rm:...)",
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class _Guarded(CheckedScorer):
    """Any `Scorer` (a reward model, say) behind the same output checks as alignkit's own."""

    def __init__(self, inner: Any, name: str):
        self.inner, self.name = inner, name
        self._takes_references = _accepts_references(inner.score)

    def raw_scores(self, prompts, completions, references):
        # A reward model's `score(prompts, completions)` has no use for references: do not force it to take them.
        if references is None or not self._takes_references:
            return self.inner.score(prompts, completions)
        return self.inner.score(prompts, completions, references)

    def __repr__(self) -> str:
        return f"guard({self.inner!r}, name={self.name!r})"


def check_references(scorer: Scorer | None, records: Sequence[PromptWithAnswer]) -> None:
    """Stop at the first prompt whose reference answer `scorer` cannot use, naming its file and line: at load time,
    not when that prompt is first sampled, possibly hours into a run."""
    problem = getattr(scorer, "reference_problem", None)
    if problem is None:
        return
    for record in records:
        if (what := problem(record.answer)) is not None:
            path, _, line = record.origin.rpartition(":")
            raise DataError(what, path=path or record.origin, line=int(line) if line.isdigit() else None,
                            fix="give each prompt a reference answer the scorer can read (for gsm8k: GSM8K's `final` "
                            "field, the number after ####), or leave such prompts out")  # fmt: skip


def guard(scorer: Any, name: str | None = None) -> Scorer:
    """`scorer` with its output checked by `checked_scores` (alignkit's own scorers are checked already).

    Anything with a `score(prompts, completions[, references])` method can be guarded; `name` defaults to its
    `name` attribute, else its class name. References reach it only if its `score` takes a third argument.
    """
    if isinstance(scorer, CheckedScorer) and name in (None, scorer.name):
        return scorer
    if not callable(getattr(scorer, "score", None)):
        raise AlignkitError(
            f"{short_repr(scorer)} is not a scorer: it has no `score(prompts, completions, references=None)` method"
        )
    return _Guarded(scorer, name or getattr(scorer, "name", None) or type(scorer).__name__)


def _accepts_references(method: Callable) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # a builtin or C extension: assume the documented signature
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params) or any(
        p.name == "references" for p in params
    )
