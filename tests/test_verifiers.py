"""Rule-based rewards: GSM8K answer extraction, format and exact match, user functions, weighted sums, the
checks every score passes through, and the CLI's reward spec. Fast: no models."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from alignkit.data.records import user_prompt
from alignkit.errors import AlignkitError
from alignkit.rewards.scorer import CheckedScorer, Scorer, guard
from alignkit.rewards.verifiers import (
    R1_FORMAT,
    ExactMatch,
    Gsm8kVerifier,
    PythonFunction,
    RegexFormat,
    WeightedSum,
    build_scorer,
    extract_final_number,
    normalize_number,
)
from conftest import builtin_rows


def prompts(n: int):
    return [user_prompt(f"question {i}") for i in range(n)]


def gsm8k_rows(n: int | None = None) -> list[dict]:
    return builtin_rows("gsm8k-test")[:n]


# ---------------------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        # GSM8K's own format wins over every other number in the text
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
        ("#### 72", "72"),
        ("So the answer is 5.\n#### 72", "72"),
        ("#### $70,000", "70000"),
        ("#### 18 dollars", "18"),
        ("#### -10", "-10"),
        # \boxed, with thousands commas, LaTeX dollars, fractions, nested braces, a working inside the box
        (r"The total is $\boxed{1,234}$.", "1234"),
        (r"Final: \boxed{\$18.00}", "18"),
        (r"\boxed{\frac{3}{4}}", "0.75"),
        (r"\boxed{\dfrac{1}{3}}", "1/3"),
        (r"\boxed{2 \times 9 = 18}", "18"),
        (r"\boxed{18 \text{ dollars}}", "18"),
        (r"\boxed{1{,}080}", "1080"),
        (r"First try \boxed{17}. No wait, recount: \boxed{18}", "18"),
        (r"\boxed{-5}", "-5"),
        # R1's answer tag; an unclosed tag (a truncated sample) runs to the end
        ("<think>16 - 3 - 4 = 9 eggs, 9 * 2 = 18</think>\n<answer>18</answer>", "18"),
        ("<think>I think 20</think><answer>She makes $18 every day.</answer>", "18"),
        ("<think>...</think><answer>16 - 3 - 4 = 9, 9 * 2 = 18", "18"),
        # "the answer is" stops at the end of its sentence
        ("16 - 3 - 4 = 9 and 9 * 2 = 18. The answer is 18. Check: 9 * 2 = 18, 18 - 0 = 18", "18"),
        ("The answer is $18.", "18"),
        ("**Final Answer:** $1,080", "1080"),
        ("Answer: 3/4", "0.75"),
        ("the answer is\n\n42", "42"),
        # no marker: the last line with a number, the result after its `=`
        ("She makes 9 * 2 = $18 every day at the farmers' market.", "18"),
        ("Thus, there are a total of 9 + 6 = 15 liters of water out of the 24 liters.", "15"),
        ("She has 16 eggs.\nShe eats 3 and bakes 4, so she sells 9.", "9"),
        ("It costs $18.00.", "18"),
        ("The temperature fell to -5 degrees.", "-5"),
        ("He lost \u22127 points.", "-7"),  # a typographic minus
        ("16-3-4=9", "9"),  # a minus between numbers is subtraction, not a sign
        ("The discount is 25%", "25"),
        ("The price is 0.50 per egg", "0.5"),
        ("In 2023 she sold 1,234,567 eggs", "1234567"),
        ("I don't know.", None),
        ("", None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("18", "18"), ("18.0", "18"), ("18.00", "18"), ("$1,234.50", "1234.5"), ("18.", "18"), ("-3", "-3"),
     ("1/2", "0.5"), ("0.5", "0.5"), ("2/6", "1/3"), ("25%", "25"), (" 7 ", "7"), ("-0", "0"),
     ("eighteen", None), ("1/0", None), ("3 4", None), ("$ 18", "18"), ("1 / 4", "0.25"), ("", None)],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_gsm8k_worked_solutions_score_one_against_their_own_final():
    rows = gsm8k_rows(20)
    scores = Gsm8kVerifier().score(prompts(20), [r["answer"] for r in rows], [r["final"] for r in rows])
    assert scores.dtype == torch.float32 and scores.shape == (20,)
    assert scores.tolist() == [1.0] * 20
    # ... and 0 against the next row's final (the first 20 finals differ from their neighbours')
    shifted = [r["final"] for r in rows[1:] + rows[:1]]
    assert all(a["final"] != b for a, b in zip(rows, shifted))
    assert Gsm8kVerifier().score(prompts(20), [r["answer"] for r in rows], shifted).sum().item() == 0.0


def test_gsm8k_all_600_shipped_solutions_and_without_their_hash_line():
    rows = gsm8k_rows() + builtin_rows("gsm8k-train")
    answers, finals = [r["answer"] for r in rows], [r["final"] for r in rows]
    assert len(rows) == 600 and Gsm8kVerifier().score(prompts(600), answers, finals).mean().item() == 1.0
    # With `#### N` cut off, a model-like worked answer: the fallback still finds nearly all of them
    cut = [a.rsplit("####", 1)[0] for a in answers]
    assert Gsm8kVerifier().score(prompts(600), cut, finals).mean().item() > 0.98


def test_gsm8k_scores_realistic_completions():
    completions = [
        "Janet's ducks lay 16 eggs. She uses 3 + 4 = 7, so 16 - 7 = 9 are left.\nShe sells them for 9 * $2 = $18.",
        "She has 16 - 3 - 4 = 9 eggs and makes 9 * 2 = 18 dollars.\n#### 18",
        r"So she earns $\boxed{\$18.00}$ per day.",
        "<think>16-3-4=9, 9*2=18</think>\n<answer>18</answer>",
        "She makes $20 a day.",  # wrong
        "I am not sure how to solve this.",  # no number at all
        "#### 18.5",  # close is not correct
    ]
    scores = Gsm8kVerifier().score(prompts(7), completions, ["18"] * 7)
    assert scores.tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_gsm8k_references_are_normalised_and_may_be_whole_solutions():
    scorer = Gsm8kVerifier()
    completions, references = ["#### 1000", "#### 70,000", "x = -10"], ["1,000", "#### 70000", "-10"]
    assert scorer.score(prompts(3), completions, references).tolist() == [1, 1, 1]


def test_gsm8k_needs_references_and_numeric_ones():
    with pytest.raises(AlignkitError, match="gsm8k.*reference"):
        Gsm8kVerifier().score(prompts(1), ["#### 3"])
    with pytest.raises(AlignkitError, match="reference 1 has no number"):
        Gsm8kVerifier().score(prompts(2), ["#### 3", "#### 4"], ["3", "four"])


# ---------------------------------------------------------------------------------------------------------------
# Format and exact match


def test_r1_format_positive_and_negative():
    good = [
        "<think>16 - 3 - 4 = 9\n9 * 2 = 18</think>\n<answer>18</answer>",
        "<think>short</think><answer>18</answer>\n",  # a trailing newline from the template is fine
        "  <think>\n\nmulti\nline\n</think>\n\n<answer>\n18\n</answer>",
    ]
    bad = [
        "<answer>18</answer>",  # no reasoning
        "<think>9 * 2 = 18</think>",  # no answer
        "The answer is 18. <think>x</think><answer>18</answer>",  # text before
        "<think>x</think><answer>18</answer> Hope this helps!",  # text after
        "<answer>18</answer><think>x</think>",  # wrong order
        "<think>x<answer>18</answer>",  # unclosed think
    ]
    scores = RegexFormat().score(prompts(len(good + bad)), good + bad)
    assert scores.tolist() == [1.0] * len(good) + [0.0] * len(bad)
    assert RegexFormat().pattern == R1_FORMAT


def test_custom_format_and_bad_regex():
    scorer = RegexFormat(r"^\d+$")
    assert scorer.score(prompts(3), ["42", "42 eggs", " 7\n"]).tolist() == [1, 0, 1]
    with pytest.raises(AlignkitError, match="not a valid regular expression"):
        RegexFormat("(unclosed")


def test_exact_match_normalised_and_strict():
    completions = ["Paris", "  paris \n", "The city of Paris", "new  york"]
    refs = ["Paris", "Paris", "Paris", "New York"]
    assert ExactMatch().score(prompts(4), completions, refs).tolist() == [1, 1, 0, 1]
    strict = ExactMatch(ignore_case=False, collapse_whitespace=False)
    assert strict.score(prompts(4), completions, refs).tolist() == [1, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# User functions


REWARDS_FILE = textwrap.dedent(
    """
    def brevity(prompts, completions, references):
        # 1 for an empty answer, falling by 0.1 per word
        return [1.0 - 0.1 * len(c.split()) for c in completions]

    def echoes_question(completions, **kwargs):
        return [float(p[-1].content in c) for p, c in zip(kwargs["prompts"], completions)]

    def matches(completions, references):
        return [float(c == r) for c, r in zip(completions, references)]

    def explodes(prompts, completions, references):
        raise ValueError("division by zero in my reward")

    def gives_nan(prompts, completions, references):
        return [1.0, float("nan"), 0.5][: len(completions)]

    def gives_inf(completions, **kwargs):
        return [0.0] * (len(completions) - 1) + [float("inf")]

    def one_short(prompts, completions, references):
        return [1.0] * (len(completions) - 1)

    def gives_text(prompts, completions, references):
        return [1.0, "0.5", 0.0][: len(completions)]

    def gives_none(completions, **kwargs):
        return [None] * len(completions)

    def gives_scalar(completions, **kwargs):
        return 1.0

    def gives_matrix(completions, **kwargs):
        import torch
        return torch.ones(len(completions), 1)

    def gives_tensor(completions, **kwargs):
        import torch
        return torch.arange(len(completions), dtype=torch.float64)

    def wants_more(prompts, completions, tokenizer):
        return [0.0] * len(completions)

    NOT_A_FUNCTION = 3
    """
)


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_FILE, encoding="utf-8")
    return path


def test_python_function_from_a_file(rewards_file):
    scorer = PythonFunction(f"{rewards_file}:brevity")
    assert scorer.name == "brevity"
    scores = scorer.score(prompts(3), ["", "one two", "a b c d e"], None)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.8, 0.5]))


def test_python_function_gets_only_what_it_takes(rewards_file):
    ps = [user_prompt("cat"), user_prompt("dog")]
    assert PythonFunction(f"{rewards_file}:echoes_question").score(ps, ["a cat", "a cat"]).tolist() == [1, 0]
    assert PythonFunction(f"{rewards_file}:matches").score(ps, ["x", "y"], ["x", "z"]).tolist() == [1, 0]
    assert PythonFunction(f"{rewards_file}:gives_tensor").score(prompts(3), ["a", "b", "c"]).tolist() == [0, 1, 2]
    assert PythonFunction(lambda completions: [len(c) for c in completions], name="length").score(
        prompts(2), ["ab", "abc"]).tolist() == [2, 3]


def test_python_function_from_a_module(rewards_file, monkeypatch):
    monkeypatch.syspath_prepend(str(rewards_file.parent))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    assert PythonFunction("my_rewards:brevity").score(prompts(1), ["a b"]).tolist() == pytest.approx([0.8])


def test_python_function_from_a_module_in_the_current_directory(rewards_file, monkeypatch):
    monkeypatch.chdir(rewards_file.parent)
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(rewards_file.parent))])
    assert build_scorer("python:my_rewards:brevity").name == "brevity"


@pytest.mark.parametrize(
    "target, message",
    [
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("/nonexistent/rewards.py:f", "no such file"),
        ("FILE:nope", r"my_rewards.py has no function 'nope'\n.*functions defined there: brevity, echoes_question"),
        ("FILE:NOT_A_FUNCTION", "not a function"),
        ("FILE", "does not name a function"),
        ("FILE:wants_more", "'wants_more' requires argument.*'tokenizer'"),
    ],
)
def test_python_function_loading_errors(rewards_file, target, message):
    with pytest.raises(AlignkitError, match=message):
        PythonFunction(target.replace("FILE", str(rewards_file)))


def test_a_file_that_fails_to_import_says_so(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_package_xyz\n")
    with pytest.raises(AlignkitError, match="importing .*broken.py failed: ModuleNotFoundError"):
        PythonFunction(f"{path}:f")


@pytest.mark.parametrize(
    "function, message",
    [
        ("explodes", r"reward function 'explodes' raised ValueError: division by zero in my reward"),
        ("gives_nan", r"reward function 'gives_nan' returned nan at index 1"),
        ("gives_inf", r"reward function 'gives_inf' returned inf at index 2"),
        ("one_short", r"reward function 'one_short' returned 2 scores for 3 completions \(expected 3, got 2\)"),
        ("gives_text", r"reward function 'gives_text' returned a non-numeric score at index 1: str '0.5'"),
        ("gives_none", r"reward function 'gives_none' returned a non-numeric score at index 0: NoneType"),
        ("gives_scalar", r"reward function 'gives_scalar' returned float 1.0, not a list of 3 numbers"),
        ("gives_matrix", r"reward function 'gives_matrix' returned a tensor of shape \[3, 1\]; expected shape \[3\]"),
    ],
)
def test_bad_reward_functions_are_named_in_the_error(rewards_file, function, message):
    scorer = PythonFunction(f"{rewards_file}:{function}")
    with pytest.raises(AlignkitError, match=message) as caught:
        scorer.score(prompts(3), ["a", "b", "c"], ["a", "b", "c"])
    assert f"{rewards_file}:{function}" in str(caught.value)  # where it lives, to go and fix it


def test_a_raising_function_keeps_its_traceback(rewards_file):
    with pytest.raises(AlignkitError) as caught:
        PythonFunction(f"{rewards_file}:explodes").score(prompts(1), ["a"])
    assert isinstance(caught.value.__cause__, ValueError)


def test_inputs_must_line_up():
    with pytest.raises(AlignkitError, match="2 prompts for 3 completions"):
        RegexFormat().score(prompts(2), ["a", "b", "c"])
    with pytest.raises(AlignkitError, match="1 references for 2 completions"):
        ExactMatch().score(prompts(2), ["a", "b"], ["a"])
    with pytest.raises(AlignkitError, match="one string"):
        RegexFormat().score(prompts(1), "a")


def test_empty_batch():
    assert Gsm8kVerifier().score([], [], []).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# Weighted sums and foreign scorers


class Constant:
    """A stand-in for a reward model: `score(prompts, completions)`, no references."""

    def __init__(self, value: float, name: str = "const"):
        self.value, self.name = value, name

    def score(self, prompts, completions):
        return torch.full((len(completions),), self.value)


def test_weighted_sum_by_hand():
    completions = [
        "<think>9 * 2 = 18</think><answer>18</answer>",  # right and well formed: 1.0 + 0.2 - 0.5
        "<think>9 * 2 = 20</think><answer>20</answer>",  # wrong, well formed:       0.0 + 0.2 - 0.5
        "#### 18",                                        # right, no format:        1.0 + 0.0 - 0.5
        "no idea",                                        # nothing:                0.0 + 0.0 - 0.5
    ]
    scorer = WeightedSum([(Gsm8kVerifier(), 1.0), (RegexFormat(), 0.2), (Constant(1.0), -0.5)])
    scores = scorer.score(prompts(4), completions, ["18"] * 4)
    torch.testing.assert_close(scores, torch.tensor([0.7, -0.3, 0.5, -0.5]))
    assert scorer.name == "gsm8k*1+format*0.2+const*-0.5"
    parts = scorer.score_parts(prompts(4), completions, ["18"] * 4)
    assert list(parts) == ["gsm8k", "format", "const"]
    assert parts["format"].tolist() == [1, 1, 0, 0]


def test_weighted_sum_blames_the_part_that_failed(rewards_file):
    scorer = WeightedSum([(RegexFormat(), 1.0), (PythonFunction(f"{rewards_file}:gives_nan"), 0.5)])
    with pytest.raises(AlignkitError, match="'gives_nan' returned nan at index 1"):
        scorer.score(prompts(3), ["a", "b", "c"])
    with pytest.raises(AlignkitError, match="weights must be finite"):
        WeightedSum([(RegexFormat(), float("nan"))])


def test_foreign_scorers_are_guarded():
    class Broken:
        name = "broken_rm"

        def score(self, prompts, completions):
            return torch.tensor([float("nan")] * len(completions), device="cpu")

    assert isinstance(Constant(1.0), Scorer) and isinstance(Gsm8kVerifier(), Scorer)
    with pytest.raises(AlignkitError, match="scorer 'broken_rm' returned nan at index 0"):
        guard(Broken()).score(prompts(2), ["a", "b"], ["x", "y"])  # references are not forced on it
    assert guard(Constant(2.0)).score(prompts(2), ["a", "b"], ["x", "y"]).tolist() == [2, 2]
    assert isinstance(guard(Gsm8kVerifier()), CheckedScorer)


# ---------------------------------------------------------------------------------------------------------------
# The CLI's reward spec


def test_build_scorer_single_terms(rewards_file):
    assert isinstance(build_scorer("gsm8k"), Gsm8kVerifier)
    assert isinstance(build_scorer("exact"), ExactMatch) and build_scorer("exact").ignore_case
    assert not build_scorer("exact:strict").ignore_case
    assert build_scorer("format").pattern == R1_FORMAT
    assert build_scorer(r"format:^\d+$").score(prompts(2), ["12", "x"]).tolist() == [1, 0]
    assert build_scorer(f"python:{rewards_file}:brevity").name == "brevity"


def test_build_scorer_weighted_sums():
    for spec in ("gsm8k*1.0+format*0.2", "gsm8k + format * 0.2", "1*gsm8k+0.2*format", "format*0.2+gsm8k"):
        scorer = build_scorer(spec)
        assert isinstance(scorer, WeightedSum), spec
        weights = {s.name: w for s, w in scorer.parts}
        assert weights == {"gsm8k": 1.0, "format": 0.2}, spec
    assert isinstance(build_scorer("gsm8k*0.5"), WeightedSum)
    assert build_scorer("format*-1").parts[0][1] == -1.0


def test_build_scorer_keeps_regex_operators():
    # `+` and `*` inside a regex are not term separators or weights
    scorer = build_scorer(r"gsm8k+format:^<answer>\d+</answer>.*$*0.5")
    assert [(s.name, w) for s, w in scorer.parts] == [("gsm8k", 1.0), ("format", 0.5)]
    assert scorer.parts[1][0].pattern == r"^<answer>\d+</answer>.*$"
    assert build_scorer(r"2*format:a\d*3").parts[0][0].pattern == r"a\d*3"  # a leading weight leaves `*3` alone


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bleu", r"unknown reward 'bleu'(.|\n)*gsm8k(.|\n)*exact(.|\n)*format(.|\n)*python(.|\n)*rm:PATH"),
        ("gsm8k+bleu", "unknown reward 'gsm8k\\+bleu'"),
        ("gsm8k*abc", "a weight is a number"),
        ("", "empty"),
        ("gsm8k:3", "takes no argument"),
        ("exact:loose", "exact takes no argument or 'strict'"),
        ("python", "needs a function"),
        ("rm", "needs a path"),
    ],
)
def test_build_scorer_errors(spec, message):
    with pytest.raises(AlignkitError, match=message):
        build_scorer(spec)


def test_rm_spec_without_the_reward_model_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "alignkit.rewards.reward_model", None)  # as if it were not written yet
    with pytest.raises(AlignkitError, match=r"rm:PATH\) are not available"):
        build_scorer("gsm8k+rm:outputs/rm")


def test_rm_spec_loads_lazily_and_is_guarded(monkeypatch):
    import types

    loaded = []
    fake = types.ModuleType("alignkit.rewards.reward_model")

    def load_reward_model(path):
        loaded.append(path)
        return Constant(0.5, name="ignored")

    fake.load_reward_model = load_reward_model
    monkeypatch.setitem(sys.modules, "alignkit.rewards.reward_model", fake)
    scorer = build_scorer("gsm8k+rm:outputs/rm*2")
    assert loaded == ["outputs/rm"]
    assert [s.name for s, _ in scorer.parts] == ["gsm8k", "rm"]
    assert scorer.score(prompts(2), ["#### 3", "#### 4"], ["3", "3"]).tolist() == [2.0, 1.0]


def test_degenerate_completions_are_scored_quickly():
    # A policy stuck in a repetition loop must not stall the reward: extraction is linear in the text.
    import time

    loops = ["\\boxed{" * 5000, "####" * 10000, "the answer is " * 5000, "<answer>" * 5000, "1 " * 20000]
    start = time.perf_counter()
    Gsm8kVerifier().score(prompts(len(loops)), loops, ["1"] * len(loops))
    assert time.perf_counter() - start < 2.0
