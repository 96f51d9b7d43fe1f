"""The reward interface of online RL (GRPO, PPO, best-of-N) and its rule-based scorers.

A *scorer* answers "how good is each completion for its prompt" with one float per completion:

    scorer.score(prompts, completions, references=None) -> torch.Tensor  # [N] float32, on the CPU

The caller repeats each prompt once per completion, so `prompts`, `completions` and `references` are
parallel sequences of length N. A GSM8K verifier, a format check, a user's Python function, a reward model
(`rewards/reward_model.py`) and weighted sums of these are interchangeable behind that one method, which is
what lets the RL algorithms never ask where a reward came from (STYLE.md: "rewards, judges and evaluation
share one interface").

Every score goes through one check (`checked_scores`): a scorer that raises, returns NaN or inf, returns the
wrong number of scores or something that is not numbers stops the run with an `AlignkitError` that names the
scorer (for a user's function: the function and its import path) and says what was wrong and where. A
silent NaN reward would otherwise surface many steps later as a NaN loss with no hint of its cause.

`build_scorer("gsm8k*1.0+format*0.2")` builds a scorer from the CLI's reward spec (syntax in `build_scorer`
and docs/rewards.md).

Departures from the usual recipes, on purpose:
- GSM8K extraction prefers explicit answer markers (`#### N`, `\\boxed{N}`, `<answer>…</answer>`,
  "the answer is N") over the last number in the text, and compares numbers exactly after normalisation
  (`$1,234.00` == `1234`, `0.5` == `1/2`), never with a float tolerance: GSM8K's answers are exact.
- The R1 format check strips surrounding whitespace first, so a trailing newline from the chat template
  does not cost the format reward.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import numbers
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from alignkit.data.records import Prompt, PromptWithAnswer
from alignkit.errors import AlignkitError, DataError

__all__ = [
    "R1_FORMAT",
    "REWARD_TIMEOUT",
    "SCORER_KINDS",
    "CheckedScorer",
    "ExactMatch",
    "Gsm8kVerifier",
    "PythonFunction",
    "RegexFormat",
    "Scorer",
    "WeightedSum",
    "build_scorer",
    "check_references",
    "checked_scores",
    "extract_final_number",
    "guard",
    "load_function",
    "normalize_number",
]


# --------------------------------------------------------------------------------------------------------------
# The interface


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
            raise fail(f"returned {type(result).__name__} {_short(result)}, not a list of {expected} numbers")
        originals = list(result)
        if len(originals) != expected:
            raise fail(_count_mismatch(len(originals), expected))
        values = []
        for i, value in enumerate(originals):
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise fail(f"returned a non-numeric score at index {i}: {type(value).__name__} {_short(value)}")
            values.append(float(value))
        scores = torch.tensor(values, dtype=torch.float32)
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        value = originals[i] if originals is not None else result[i].item()
        beyond = " (beyond float32's range)" if scores[i].isinf() and _is_finite(value) else ""
        raise fail(f"returned {value!r} at index {i}{beyond}; scores must be finite numbers")
    return scores


def _count_mismatch(got: int, expected: int) -> str:
    return f"returned {got} scores for {expected} completions (expected {expected}, got {got})"


_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_finite(value: Any) -> bool:
    try:
        return abs(float(value)) != float("inf") and float(value) == float(value)
    except (TypeError, ValueError, OverflowError):
        return False


def _short(value: Any, limit: int = 60) -> str:
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
            f"{_short(scorer)} is not a scorer: it has no `score(prompts, completions, references=None)` method"
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


# --------------------------------------------------------------------------------------------------------------
# GSM8K: the final number of a completion

# A number as written in a worked answer: optional sign and dollar sign, thousands grouped by commas or not,
# optional decimals. The look-behind stops "16-3" from reading as 16 and -3, and "v1.5" or "x2" as numbers.
_NUMBER = re.compile(r"(?<![\w.])(?:-\$?|\$-?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")
_FRACTION = re.compile(r"(-?\d+)\s*/\s*(\d+)")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_HASHES = re.compile(r"####")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(r"\banswer\b[\s*_]*(?:is\b|:|=)", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """The canonical form of one number written as text, or None when `text` is not a single number.

    Dollar signs, thousands commas, percent signs, a trailing full stop and surrounding spaces are dropped;
    the value is exact, so `"$1,234.50"` -> `"1234.5"`, `"18.0"` -> `"18"`, `"-3"` -> `"-3"`,
    `"1/2"` and `"0.5"` -> `"0.5"`, `"1/3"` -> `"1/3"`. Two numbers are equal iff their forms are.
    """
    s = text.strip().replace("\u2212", "-")  # U+2212, the typographic minus
    s = _LATEX_FRAC.sub(r"\1/\2", s)
    for junk in ("\\$", "$", "{,}", ",\\!", ",", "\\%", "%", "\\!"):
        s = s.replace(junk, "")
    s = s.strip().rstrip(".")
    fraction = _FRACTION.fullmatch(s)
    try:
        if fraction:
            value = Fraction(int(fraction[1]), int(fraction[2]))
        elif re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s):
            value = Fraction(s)
        else:
            return None
    except ZeroDivisionError:
        return None
    return _format_exact(value)


def _format_exact(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:  # a terminating decimal: write it as one, so 0.5 and 1/2 agree
        return format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return f"{value.numerator}/{value.denominator}"


def _number_in(span: str) -> str | None:
    """The answer inside an explicit marker's span: after the last `=` if there is one, else the first number.

    `"16 - 3 - 4 = 9, 9 * 2 = 18"` -> 18; `"18 dollars"` -> 18; `"\\frac{3}{4}"` -> 3/4.
    """
    span = _LATEX_FRAC.sub(r"\1/\2", span).replace("{,}", ",").replace(",\\!", ",").replace("\u2212", "-")
    if "=" in span:
        span = span.rsplit("=", 1)[1]
    whole = normalize_number(span.replace("\\text", "").strip(" {}\t\n"))
    if whole is not None and "/" in span:  # a bare fraction, which the number pattern alone would split
        return whole
    found = _NUMBER.search(span)
    return normalize_number(found[0]) if found else None


# An answer sits within a short distance of its marker, and only the last few markers matter: bounding both
# keeps extraction linear in the length of a completion, even of a degenerate one that repeats "\\boxed{" or
# "####" thousands of times (which a policy in a repetition loop does produce).
_MARKERS_TRIED = 8
_WINDOW = 400


def _boxed_content(text: str, start: int) -> str:
    """The content of the `\\boxed{` that opens just before `start`, braces matched (`\\boxed{\\frac{3}{4}}`)."""
    depth, i, stop = 1, start, min(len(text), start + _WINDOW)
    while i < stop and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1 if depth == 0 else i]


def _after(text: str, start: int) -> str:
    """The rest of the line that starts at `start` (or of the next line, if this one is blank)."""
    return text[start : start + _WINDOW].lstrip().split("\n", 1)[0]


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a completion in canonical form (`normalize_number`), or None if it has none.

    Tried in order; within each, the last occurrence that holds a number wins:
    1. `#### N` (GSM8K's own format): the rest of that line;
    2. `\\boxed{N}` (LaTeX, as math-tuned models write);
    3. `<answer>N</answer>` (R1's format; an unclosed tag, as in a truncated sample, runs to the end);
    4. "the answer is N" / "Answer: N": the rest of that sentence;
    5. otherwise the last line that holds a number: the number after its last `=` if it has one, else its
       last number.
    Inside a marker the number after the last `=` is taken, else the first one (`\\boxed{2 \\times 9 = 18}`,
    `#### 18 dollars`). On GSM8K's own worked solutions with the `#### N` line cut off, rule 5 finds the
    answer in 99.1% of the training set, against 97.2% for the plain last number.
    """
    text = text.replace("\u2212", "-")
    rules: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
        (_HASHES, lambda m: _after(text, m.end())),
        (_BOXED, lambda m: _boxed_content(text, m.end())),
        (_ANSWER_TAG, lambda m: m[1]),
        # "The answer is 18. Check: 9 = 9" stops at the end of its sentence, at 18
        (_ANSWER_IS, lambda m: re.split(r"\.(?:\s|$)", _after(text, m.end()), maxsplit=1)[0]),
    ]
    for pattern, span in rules:
        for marker in reversed(list(pattern.finditer(text))[-_MARKERS_TRIED:]):
            if (found := _number_in(span(marker))) is not None:
                return found
    lines = [line for line in text.splitlines() if _NUMBER.search(line)]
    if not lines:
        return None
    # "a total of 9 + 6 = 15 liters out of the 24 liters": the result follows the `=`, context follows it
    if "=" in lines[-1] and (found := _number_in(lines[-1])) is not None:
        return found
    return normalize_number(_NUMBER.findall(lines[-1])[-1])


class Gsm8kVerifier(CheckedScorer):
    """1.0 when the completion's final number equals the reference answer, else 0.0 (no number is 0.0).

    The completion's number comes from `extract_final_number`. A reference is GSM8K's `final` field ("18",
    "-10", "1,000") or a whole worked solution ending in `#### N`; both are normalised the same way. A
    reference with no number in it is a data error: `check_references` reports it with its file and line when
    the prompts are loaded, and `score` with its index.
    """

    needs_references = True

    def __init__(self, name: str = "gsm8k"):
        self.name = name

    @staticmethod
    def expected(reference: str) -> str | None:
        return normalize_number(reference) or extract_final_number(reference)

    def reference_problem(self, reference: str) -> str | None:
        if self.expected(reference) is None:
            return f"scorer '{self.name}': the reference answer has no number in it: {_short(reference)}"
        return None

    def raw_scores(self, prompts, completions, references):
        scores = []
        for i, (completion, reference) in enumerate(zip(completions, references)):
            expected = self.expected(reference)
            if expected is None:
                raise AlignkitError(
                    f"scorer '{self.name}': reference {i} has no number in it: {_short(reference)}",
                    fix="give GSM8K's `final` field (the number after ####) as the reference answer",
                )
            scores.append(1.0 if extract_final_number(completion) == expected else 0.0)
        return scores


# --------------------------------------------------------------------------------------------------------------
# String rules


class ExactMatch(CheckedScorer):
    """1.0 when the completion equals the reference, else 0.0.

    By default surrounding whitespace is stripped, runs of whitespace count as one space and case is
    ignored (`casefold`); `ignore_case=False, collapse_whitespace=False` compares the strings as they are.
    """

    needs_references = True

    def __init__(self, ignore_case: bool = True, collapse_whitespace: bool = True, name: str = "exact"):
        self.ignore_case, self.collapse_whitespace, self.name = ignore_case, collapse_whitespace, name

    def normalize(self, text: str) -> str:
        if self.collapse_whitespace:
            text = " ".join(text.split())
        return text.casefold() if self.ignore_case else text

    def raw_scores(self, prompts, completions, references):
        return [float(self.normalize(c) == self.normalize(r)) for c, r in zip(completions, references)]


# DeepSeek-R1's format reward (Guo et al. 2025, arXiv:2501.12948): reasoning in <think>, then the answer in
# <answer>, and nothing after it. `$` anchors the end, so the lazy `.*?` still stretches over repeated blocks
# (`<think>a</think><answer>1</answer><answer>2</answer>` matches); pass a stricter pattern to forbid that.
R1_FORMAT = r"^<think>.*?</think>\s*<answer>.*?</answer>$"


class RegexFormat(CheckedScorer):
    """1.0 when the completion (surrounding whitespace stripped) matches `pattern` (`re.search`), else 0.0.

    The default is R1's `^<think>.*?</think>\\s*<answer>.*?</answer>$` with `re.DOTALL`, so `.` crosses
    lines. Anchor a pattern with `^…$` to require the whole completion to match it. If the chat template
    already opens `<think>` in the prompt, give a pattern without it.
    """

    def __init__(self, pattern: str = R1_FORMAT, flags: int = re.DOTALL, name: str = "format"):
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as exc:
            raise AlignkitError(
                f"format pattern {pattern!r} is not a valid regular expression: {exc}",
                fix="write a Python `re` pattern, e.g. format:^<think>.*?</think>\\s*<answer>.*?</answer>$",
            ) from exc
        self.pattern, self.name = pattern, name

    def raw_scores(self, prompts, completions, references):
        return [1.0 if self.regex.search(c.strip()) else 0.0 for c in completions]


# --------------------------------------------------------------------------------------------------------------
# User functions

_REWARD_ARGUMENTS = ("prompts", "completions", "references")
REWARD_TIMEOUT = 60.0
"""seconds one call of a user's reward function may take (`--reward-timeout`)"""


def load_function(target: str) -> Callable:
    """The function named by `"module.path:function"` or `"path/to/file.py:function"`.

    A module is imported with the current directory on `sys.path` (as `python -m` would), a file by its
    path. `function` may be dotted (`Class.method`).
    """
    source, colon, attr = target.rpartition(":")
    if not colon or not source or not attr:
        raise AlignkitError(
            f"'{target}' does not name a function",
            fix="write MODULE:FUNCTION (my_rewards:length_penalty) or FILE.py:FUNCTION (./rewards.py:length_penalty)",
        )
    is_file = source.endswith(".py") or "/" in source or os.sep in source
    module = _import_file(Path(source), target) if is_file else _import_module(source, target)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            functions = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
            raise AlignkitError(
                f"{Path(source).name if is_file else source} has no function '{attr}'",
                where=target,
                fix=f"functions defined there: {', '.join(functions) or '(none)'}",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise AlignkitError(f"'{attr}' in {source} is a {type(obj).__name__}, not a function", where=target)
    return obj


def _import_file(path: Path, target: str):
    if not path.is_file():
        raise AlignkitError(
            f"no such file: {path}", where=target, fix="give the path of a .py file (absolute, or relative to here)"
        )
    resolved = path.resolve()
    module_name = "_alignkit_reward_" + re.sub(r"\W", "_", str(resolved))
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise AlignkitError(f"{path} cannot be imported as Python", where=target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so dataclasses, pickling and relative lookups inside it work
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise AlignkitError(f"importing {path} failed: {type(exc).__name__}: {exc}", where=target) from exc
    return module


def _import_module(name: str, target: str):
    cwd, added = os.getcwd(), False
    if cwd not in sys.path and "" not in sys.path:  # the `alignkit` script, unlike `python -m`, leaves it out
        sys.path.insert(0, cwd)
        added = True
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise AlignkitError(
                f"no module named '{name}'",
                where=target,
                fix="check the spelling and that the module is importable (on PYTHONPATH or in the current "
                "directory), or give its file: python:path/to/file.py:FUNCTION",
            ) from exc
        raise AlignkitError(f"importing {name} failed: {exc}", where=target) from exc
    except Exception as exc:
        raise AlignkitError(f"importing {name} failed: {type(exc).__name__}: {exc}", where=target) from exc
    finally:
        if added:
            sys.path.remove(cwd)


class PythonFunction(CheckedScorer):
    """A user's reward function, given as `"module:function"`, `"path/to/file.py:function"` or a callable.

    The function is called with keyword arguments and returns one number per completion (list or tensor):

        def my_reward(prompts, completions, references, **kwargs) -> list[float]: ...

    It takes only the arguments it names: `completions` is required; `prompts` (tuples of `Message`; the
    question is `prompt[-1].content`) and `references` (a list of str, or None when the data has no
    answers) are optional, and `**kwargs` receives all three. Its output passes the checks of
    `checked_scores`, whose errors name the function and its import path.

    Each call runs in a worker thread, so that a call that hangs becomes an error naming the function after
    `timeout` seconds (0: no limit) instead of a run that waits forever, and one that calls `sys.exit` an error
    instead of the end of the run. A thread, not a process: the call costs microseconds more and the function
    sees the process's state (its imports, its caches) as it would when called directly.
    """

    kind = "reward function"

    def __init__(self, target: str | Callable, name: str | None = None, timeout: float = REWARD_TIMEOUT):
        self.timeout = timeout
        if callable(target):
            self.fn = target
            self.where = f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', target)}"
        else:
            self.fn, self.where = load_function(target), target
        self.name = name or getattr(self.fn, "__name__", None) or self.where
        self._arguments = self._arguments_taken()

    def _arguments_taken(self) -> tuple[str, ...]:
        """Which of prompts/completions/references the function takes; anything else it requires is an error now,
        not a TypeError at the first rollout."""
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):
            return _REWARD_ARGUMENTS
        if any(p.kind == p.VAR_KEYWORD for p in params):
            return _REWARD_ARGUMENTS
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unfillable = [
            p.name for p in params
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and (p.name not in _REWARD_ARGUMENTS or p.kind == p.POSITIONAL_ONLY)
        ]
        if unfillable or "completions" not in named:
            problem = (f"requires argument(s) {', '.join(map(repr, unfillable))} that alignkit cannot fill"
                       if unfillable else "takes no `completions` argument")
            raise AlignkitError(
                f"reward function '{self.name}' {problem}",
                where=self.where,
                fix="define it as f(prompts, completions, references) or f(completions, **kwargs); "
                "it is called with those keyword arguments and returns one float per completion",
            )
        return tuple(a for a in _REWARD_ARGUMENTS if a in named)

    def raw_scores(self, prompts, completions, references):
        given = {
            "prompts": list(prompts),
            "completions": list(completions),
            "references": None if references is None else list(references),
        }
        return self._in_worker(lambda: self.fn(**{a: given[a] for a in self._arguments}))

    def _in_worker(self, call: Callable[[], Any]) -> Any:
        outcome: list[tuple[bool, Any]] = []

        def work() -> None:
            try:
                outcome.append((True, call()))
            except BaseException as exc:  # SystemExit too: whether the run ends is the run's decision, not the function's
                outcome.append((False, exc))

        # A daemon thread: one still hanging after the timeout must not keep the process from exiting.
        worker = threading.Thread(target=work, name=f"reward function {self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout or None)
        if not outcome:
            raise AlignkitError(
                f"reward function '{self.name}' did not return within {self.timeout:g} s (--reward-timeout)",
                where=self.where,
                fix="find where it waits or loops (call it by hand on a few completions); if it is slow by design, "
                "raise --reward-timeout (0: no limit)",
            )
        returned, value = outcome[0]
        if returned:
            return value
        if isinstance(value, SystemExit):
            raise AlignkitError(
                f"reward function '{self.name}' called sys.exit({'' if value.code is None else repr(value.code)}) "
                "instead of returning scores",
                where=self.where,
                fix="return one score per completion; raise an exception to report a problem",
            )
        raise value


# --------------------------------------------------------------------------------------------------------------
# Combinations


class WeightedSum(CheckedScorer):
    """Σ_i w_i · s_i(prompts, completions, references): e.g. correctness plus a small format bonus.

    Each part is checked on its own (a NaN is blamed on the part that made it); `score_parts` returns the
    unweighted scores of each part by name, for logging them separately.
    """

    def __init__(self, parts: Sequence[tuple[Scorer, float]], name: str | None = None):
        if not parts:
            raise AlignkitError("a weighted sum of rewards needs at least one part")
        self.parts: list[tuple[Scorer, float]] = []
        for scorer, weight in parts:
            if not isinstance(weight, numbers.Real) or not _is_finite(weight):
                raise AlignkitError(
                    f"the weight of reward '{getattr(scorer, 'name', scorer)}' is {weight!r}; "
                    "weights must be finite numbers"
                )
            self.parts.append((guard(scorer), float(weight)))
        self.name = name or "+".join(f"{s.name}*{w:g}" for s, w in self.parts)

    def reference_problem(self, reference: str) -> str | None:
        problems = (getattr(scorer, "reference_problem", lambda _: None)(reference) for scorer, _ in self.parts)
        return next((p for p in problems if p is not None), None)

    def score_parts(self, prompts, completions, references=None) -> dict[str, torch.Tensor]:
        """Each part's own (unweighted) scores, keyed by its name (made unique with #2, #3, ...)."""
        self._check_inputs(prompts, completions, references)
        out: dict[str, torch.Tensor] = {}
        for scorer, _ in self.parts:
            key, k = scorer.name, 2
            while key in out:
                key, k = f"{scorer.name}#{k}", k + 1
            out[key] = scorer.score(prompts, completions, references)
        return out

    def raw_scores(self, prompts, completions, references):
        total = torch.zeros(len(completions), dtype=torch.float32)
        for (_, weight), scores in zip(self.parts, self.score_parts(prompts, completions, references).values()):
            total += weight * scores
        return total


# --------------------------------------------------------------------------------------------------------------
# The CLI's reward spec

SCORER_KINDS: dict[str, str] = {
    "gsm8k": "gsm8k  1 if the final number equals the reference answer (GSM8K's `final`), else 0",
    "exact": "exact  1 if the completion equals the reference, ignoring case and spacing (exact:strict: as is)",
    "format": "format  1 if the completion matches R1's <think>…</think><answer>…</answer> (format:REGEX: yours)",
    "python": "python:MODULE:FUNCTION or python:FILE.py:FUNCTION  your function f(prompts, completions, references)",
    "rm": "rm:PATH  a trained reward model (the output directory of `alignkit rm`)",
    "ifeval": "ifeval  the fraction of the prompt's IFEval instructions followed (ifeval:loose: IFEval's loose mode)",
    "ifeval_all": "ifeval_all  1 if all of the prompt's IFEval instructions are followed, else 0 (ifeval_all:loose)",
}

_WEIGHT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# `+` joins terms only where a known kind (optionally after a weight) follows it, so a regex such as
# `format:^\d+<answer>` keeps its own `+`.
_TERM_SPLIT = re.compile(rf"\s*\+\s*(?=(?:{_WEIGHT}\s*\*\s*)?(?:{'|'.join(SCORER_KINDS)})(?![\w.-]))")


def build_scorer(spec: str, *, timeout: float = REWARD_TIMEOUT) -> Scorer:
    """The scorer a reward spec describes: `KIND[:ARG]` terms, each optionally weighted, joined by `+`.

        gsm8k                          GSM8K correctness
        format:^<answer>\\d+</answer>$  a format of your own (a Python regex; `.` matches newlines)
        gsm8k*1.0+format*0.2           a weighted sum (weight after the term, `*W`, or before it, `W*`)
        python:my_rewards:brevity      a user function; rm:outputs/rm  a reward model

    A weight is a trailing `*NUMBER` (or a leading `NUMBER*`); a term with no weight has weight 1. One
    unweighted term gives that scorer itself, anything else a `WeightedSum`. A regex that itself ends in
    `*NUMBER` must take a leading weight (`1*format:a*2`). The kinds are listed in `SCORER_KINDS`. `timeout`
    limits each call of a user function (`PythonFunction`).
    """
    if not spec or not spec.strip():
        raise AlignkitError("the reward spec is empty", fix=_kinds_fix())
    parts = [_parse_term(term.strip(), spec, timeout) for term in _TERM_SPLIT.split(spec.strip())]
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return WeightedSum(parts)


def _kinds_fix() -> str:
    return "valid rewards:\n     " + "\n     ".join(SCORER_KINDS.values()) + "\n   combine them as gsm8k*1.0+format*0.2"


def _parse_term(term: str, spec: str, timeout: float) -> tuple[Scorer, float]:
    weight = 1.0
    if m := re.fullmatch(rf"({_WEIGHT})\s*\*\s*(.+)", term, re.DOTALL):
        weight, term = float(m[1]), m[2]
    elif m := re.fullmatch(rf"(.+?)\s*\*\s*({_WEIGHT})", term, re.DOTALL):
        term, weight = m[1], float(m[2])
    kind, colon, arg = term.partition(":")
    kind = kind.strip()

    def no_argument() -> None:
        if arg:
            raise AlignkitError(
                f"reward '{kind}' takes no argument, got '{kind}:{arg}'", where=f"reward spec {spec!r}",
                fix=_kinds_fix(),
            )

    def argument(what: str) -> str:
        if not arg:
            raise AlignkitError(f"reward '{kind}' needs {what}: {SCORER_KINDS[kind]}", where=f"reward spec {spec!r}")
        return arg

    if kind == "gsm8k":
        no_argument()
        return Gsm8kVerifier(), weight
    if kind == "exact":
        if arg not in ("", "strict"):
            raise AlignkitError(f"exact takes no argument or 'strict', got '{arg}'", where=f"reward spec {spec!r}")
        return (ExactMatch(ignore_case=False, collapse_whitespace=False) if arg else ExactMatch()), weight
    if kind == "format":
        return (RegexFormat(arg) if arg else RegexFormat()), weight
    if kind == "python":
        return PythonFunction(argument("a function"), timeout=timeout), weight
    if kind == "rm":
        return _load_reward_model(argument("a path")), weight
    if kind in ("ifeval", "ifeval_all"):
        if arg not in ("", "loose"):
            raise AlignkitError(f"{kind} takes no argument or 'loose', got '{arg}'", where=f"reward spec {spec!r}")
        from alignkit.rewards.ifeval import IFEvalScorer  # imported here: ifeval.py imports this module

        return IFEvalScorer(all_or_nothing=kind == "ifeval_all", loose=arg == "loose"), weight
    hint = " (a weight is a number: KIND*0.5)" if "*" in kind else ""
    raise AlignkitError(f"unknown reward '{kind}'{hint}", where=f"reward spec {spec!r}", fix=_kinds_fix())


def _load_reward_model(path: str) -> Scorer:
    module = "alignkit.rewards.reward_model"
    try:  # imported here: it brings in transformers and a model only when an rm: term asks for one
        from alignkit.rewards.reward_model import load_reward_model
    except ImportError as exc:
        if exc.name in (module, "alignkit.rewards") or exc.name is None:
            raise AlignkitError(
                "reward-model rewards (rm:PATH) are not available in this version of alignkit",
                fix="use a rule-based reward (gsm8k, exact, format) or python:MODULE:FUNCTION",
            ) from exc
        raise AlignkitError(
            f"the reward-model scorer cannot be imported: {exc}",
            fix=f"install the missing package ({exc.name}) into this environment",
        ) from exc
    return guard(load_reward_model(path), name="rm")
