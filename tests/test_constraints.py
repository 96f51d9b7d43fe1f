"""Training prompts with verifiable constraints (alignkit.data.constraints) and the shipped file made from them."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from alignkit.data.constraints import (
    BY_ID,
    CONFLICTS,
    INSTRUCTION_IDS,
    LANGUAGES,
    RELATIONS,
    Base,
    constrained_prompts,
    describe,
    read_bases,
    usable_base,
)
from alignkit.data.decontaminate import NearIndex, decontaminate
from alignkit.errors import AlignkitError
from alignkit.rewards.ifeval import INSTRUCTION_TYPES, follow_instructions, parse_reference

RESOURCES = Path(__file__).resolve().parents[1] / "src" / "alignkit" / "resources"
SHIPPED = RESOURCES / "ifeval_train_prompts.jsonl"
IFEVAL = RESOURCES / "ifeval_541.jsonl"

# IFEval's kwargs names per instruction, written out independently of the generator (from the IFEval data).
KWARGS = {
    "change_case:capital_word_frequency": {"capital_relation", "capital_frequency"},
    "change_case:english_capital": set(),
    "change_case:english_lowercase": set(),
    "combination:repeat_prompt": {"prompt_to_repeat"},
    "combination:two_responses": set(),
    "detectable_content:number_placeholders": {"num_placeholders"},
    "detectable_content:postscript": {"postscript_marker"},
    "detectable_format:constrained_response": set(),
    "detectable_format:json_format": set(),
    "detectable_format:multiple_sections": {"section_spliter", "num_sections"},
    "detectable_format:number_bullet_lists": {"num_bullets"},
    "detectable_format:number_highlighted_sections": {"num_highlights"},
    "detectable_format:title": set(),
    "keywords:existence": {"keywords"},
    "keywords:forbidden_words": {"forbidden_words"},
    "keywords:frequency": {"relation", "keyword", "frequency"},
    "keywords:letter_frequency": {"let_relation", "letter", "let_frequency"},
    "language:response_language": {"language"},
    "length_constraints:nth_paragraph_first_word": {"first_word", "num_paragraphs", "nth_paragraph"},
    "length_constraints:number_paragraphs": {"num_paragraphs"},
    "length_constraints:number_sentences": {"relation", "num_sentences"},
    "length_constraints:number_words": {"relation", "num_words"},
    "punctuation:no_comma": set(),
    "startend:end_checker": {"end_phrase"},
    "startend:quotation": set(),
}


# The reference's conflict table (instructions_registry.py), written out again for the strongest cases: the types
# that fix the reply's whole format go only with these; case and language rules exclude each other.
ONLY_WITH = {
    "detectable_format:constrained_response": set(),
    "detectable_format:json_format": {"keywords:existence", "keywords:forbidden_words"},
    "combination:repeat_prompt": {"keywords:existence", "detectable_format:title", "punctuation:no_comma"},
    "combination:two_responses": {
        "keywords:existence", "keywords:forbidden_words", "language:response_language", "detectable_format:title",
        "punctuation:no_comma",
    },
}  # fmt: skip
NEVER_TOGETHER = [
    ("change_case:english_lowercase", "change_case:english_capital"),
    ("change_case:english_lowercase", "change_case:capital_word_frequency"),
    ("change_case:english_capital", "change_case:capital_word_frequency"),
    ("startend:quotation", "detectable_format:title"),
    ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"),
    ("length_constraints:number_paragraphs", "length_constraints:number_sentences"),
    ("detectable_format:multiple_sections", "detectable_format:number_highlighted_sections"),
    *[("language:response_language", other) for other in (
        "detectable_format:multiple_sections", "keywords:existence", "keywords:frequency", "keywords:forbidden_words",
        "startend:end_checker", "change_case:english_capital", "change_case:english_lowercase",
    )],
]  # fmt: skip
TEXT_ARGUMENTS = {"prompt_to_repeat", "end_phrase", "keyword", "first_word", "section_spliter", "postscript_marker"}


@pytest.fixture(scope="module")
def bases() -> list[Base]:
    return read_bases([RESOURCES / "sft_instructions.jsonl", RESOURCES / "prefs_alpacaeval_train.jsonl"])


@pytest.fixture(scope="module")
def rows(bases) -> list[dict]:
    return constrained_prompts(bases, 600, seed=7)


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    return [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]


def ifeval_rows() -> list[dict]:
    if not IFEVAL.is_file():
        pytest.skip(f"{IFEVAL.name} is not shipped in alignkit/resources, so there is no IFEval to compare with")
    return [json.loads(line) for line in IFEVAL.read_text(encoding="utf-8").splitlines() if line.strip()]


def ifeval_prompts() -> list[str]:
    return [row["prompt"] for row in ifeval_rows()]


def wording(row: dict, position: int) -> int:
    """Which wording of its type asks for the row's `position`-th constraint (exactly one must appear)."""
    instruction_id, kwargs = row["instruction_id_list"][position], row["kwargs"][position]
    wordings = range(len(BY_ID[instruction_id].templates))
    found = [w for w in wordings if describe(instruction_id, kwargs, w) in row["prompt"]]
    assert len(found) == 1, (row, instruction_id, found)
    return found[0]


def test_generator_covers_the_25_ifeval_types():
    assert set(INSTRUCTION_IDS) == set(KWARGS) == set(INSTRUCTION_TYPES)
    assert {i: set(kind.arguments) for i, kind in INSTRUCTION_TYPES.items()} == KWARGS
    assert all(len(kind.templates) >= 3 for kind in BY_ID.values())
    assert all(a in CONFLICTS[b] for a in INSTRUCTION_IDS for b in CONFLICTS[a]), "conflicts are symmetric"


def test_same_seed_same_prompts_other_seed_other_prompts(bases):
    assert constrained_prompts(bases, 50, seed=1) == constrained_prompts(bases, 50, seed=1)
    assert constrained_prompts(bases, 50, seed=1) != constrained_prompts(bases, 50, seed=2)


def check_types(rows: list[dict]) -> None:
    """One to three types per prompt, none twice, no two that conflict."""
    for row in rows:
        ids = row["instruction_id_list"]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids), row
        assert not [(a, b) for a in ids for b in ids if a != b and b in CONFLICTS[a]], row
        for own_format, allowed in ONLY_WITH.items():
            assert own_format not in ids or set(ids) - {own_format} <= allowed, row
        assert not [pair for pair in NEVER_TOGETHER if set(pair) <= set(ids)], row


def test_no_conflicting_or_repeated_types(rows):
    check_types(rows)


def test_forbidden_words_never_in_what_the_reply_must_contain(rows):
    for row in rows:
        kwargs = dict(zip(row["instruction_id_list"], row["kwargs"]))
        forbidden = kwargs.get("keywords:forbidden_words", {}).get("forbidden_words", [])
        required = " ".join([
            *kwargs.get("keywords:existence", {}).get("keywords", []),
            kwargs.get("startend:end_checker", {}).get("end_phrase", ""),
            kwargs.get("length_constraints:nth_paragraph_first_word", {}).get("first_word", ""),
            kwargs.get("detectable_format:multiple_sections", {}).get("section_spliter", ""),
        ]).lower()  # fmt: skip
        assert not set(forbidden) & set(re.findall(r"\w+", required)), row


def test_every_type_appears_with_several_wordings(rows):
    seen: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        for position, instruction_id in enumerate(row["instruction_id_list"]):
            seen[instruction_id].add(wording(row, position))
    assert set(seen) == set(INSTRUCTION_IDS)
    assert {i: len(w) for i, w in seen.items() if len(w) < 2} == {}


def check_schema(rows: list[dict]) -> None:
    """Rows in IFEval's layout: every instruction with exactly IFEval's kwargs names, values of the right kind."""
    for row in rows:
        assert set(row) == {"prompt", "instruction_id_list", "kwargs", "source"}
        assert len(row["kwargs"]) == len(row["instruction_id_list"])
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            assert set(kwargs) == KWARGS[instruction_id], (instruction_id, kwargs)
            for key, value in kwargs.items():
                if key.endswith("relation"):
                    assert value in RELATIONS
                elif key in ("keywords", "forbidden_words"):
                    assert value and all(isinstance(w, str) and w for w in value)
                elif key == "language":
                    assert value in LANGUAGES
                elif key == "letter":
                    assert len(value) == 1 and value.islower()
                elif key in TEXT_ARGUMENTS:
                    assert isinstance(value, str) and value
                else:
                    assert isinstance(value, int) and value >= 1, (key, value)
            INSTRUCTION_TYPES[instruction_id].parse(kwargs)  # the scorer accepts them (raises otherwise)
        reference = json.dumps({"instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]})
        assert parse_reference(reference) == (row["instruction_id_list"], row["kwargs"])


def test_kwargs_follow_ifevals_schema(rows):
    check_schema(rows)


def test_kwargs_names_match_the_ifeval_data():
    for row in ifeval_rows():
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            assert {k for k, v in kwargs.items() if v is not None} <= KWARGS[instruction_id]


def test_repeated_request_is_the_base_as_it_appears(rows):
    repeats = [row for row in rows if "combination:repeat_prompt" in row["instruction_id_list"]]
    assert repeats
    for row in repeats:
        request = row["kwargs"][row["instruction_id_list"].index("combination:repeat_prompt")]["prompt_to_repeat"]
        assert row["prompt"].startswith(request) and "\n" not in request


def test_bases_are_short_unique_and_free_of_format_demands(bases):
    assert len(bases) > 300
    assert all(usable_base(b.text) for b in bases)
    assert len({b.text.lower() for b in bases}) == len(bases)
    assert not usable_base("Write a haiku about autumn.")
    assert not usable_base("Summarise this article in three sentences.")
    assert not usable_base("Translate the sentence into French.")
    assert not usable_base("Describe a forest. " * 40)
    assert usable_base("Give me some tips for a first trip to Portugal.")


def test_bad_arguments_are_user_errors():
    with pytest.raises(AlignkitError):
        constrained_prompts([], 3, seed=0)
    with pytest.raises(AlignkitError):
        constrained_prompts([Base("Plan a picnic.", "x:1")], -1, seed=0)


def easy_response(row: dict) -> str:
    """A reply that meets every constraint of a row whose types are all 'easy' ones."""
    kwargs = dict(zip(row["instruction_id_list"], row["kwargs"]))
    text = "this reply explains the main idea in plain words and keeps every sentence short and simple."
    if "detectable_format:title" in kwargs:
        text = "<<a plain answer>>\n" + text
    for word in kwargs.get("keywords:existence", {}).get("keywords", []):
        text += f" it also mentions the word {word}."
    if "detectable_content:postscript" in kwargs:
        text += f"\n{kwargs['detectable_content:postscript']['postscript_marker']} thank you for asking."
    if "startend:end_checker" in kwargs:
        text += " " + kwargs["startend:end_checker"]["end_phrase"]
    if "change_case:english_lowercase" in kwargs:
        text = text.lower()
    return f'"{text}"' if "startend:quotation" in kwargs else text


EASY = {
    "change_case:english_lowercase", "punctuation:no_comma", "startend:end_checker", "detectable_content:postscript",
    "detectable_format:title", "startend:quotation", "keywords:existence",
}  # fmt: skip


def test_ifeval_checker_passes_a_compliant_reply_and_fails_a_careless_one(bases):
    easy = [row for row in constrained_prompts(bases, 3000, seed=11) if set(row["instruction_id_list"]) <= EASY]
    assert len({i for row in easy for i in row["instruction_id_list"]}) == len(EASY) and len(easy) >= 50
    # Capitals, a comma, no title, quotes, postscript or end phrase, and no word of 5+ letters to be a keyword.
    careless = "Okay, fine."
    for row in easy:
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        assert follow_instructions(easy_response(row), ids, kwargs) == [True] * len(ids), (row, easy_response(row))
        assert follow_instructions(careless, ids, kwargs) == [False] * len(ids), row


def test_shipped_file_is_valid(shipped):
    assert len(shipped) >= 2000
    assert {i for row in shipped for i in row["instruction_id_list"]} == set(INSTRUCTION_IDS)
    check_types(shipped)
    check_schema(shipped)
    wordings = Counter((i, wording(row, p)) for row in shipped for p, i in enumerate(row["instruction_id_list"]))
    assert len(wordings) == sum(len(kind.templates) for kind in BY_ID.values()), "every wording is used"


def test_no_ifeval_prompt_in_the_shipped_file(shipped):
    _, dropped = decontaminate(shipped, ifeval_prompts(), lambda row: row["prompt"])
    assert dropped == 0


def test_near_duplicate_detector_catches_edited_copies():
    prompts = [
        "Write a cover letter for a junior gardener applying to a botanical garden in Leeds. Use no commas at all.",
        "Is a tomato a fruit? Reply in fewer than fifty words.",
    ]
    index = NearIndex(prompts)
    assert index.near_duplicate(prompts[0])
    assert index.near_duplicate("WRITE a cover-letter for a junior gardener applying to a botanical garden in Leeds!")
    assert index.near_duplicate("Write a cover letter for a junior gardener applying to a botanical garden in York.")
    assert index.near_duplicate("Is a tomato a vegetable? Reply in fewer than fifty words.")  # short: Jaccard
    assert index.near_duplicate(prompts[1] + " Put your entire reply inside double quotation marks.")
    assert not index.near_duplicate("Write a cover letter for a nurse.")
    assert not index.near_duplicate("Is the tomato native to South America?")
    kept, dropped = decontaminate(["Plan a picnic.", prompts[1].upper()], prompts, lambda text: text)
    assert (kept, dropped) == (["Plan a picnic."], 1)


def test_near_duplicate_detector_catches_every_lightly_edited_ifeval_prompt():
    prompts = ifeval_prompts()
    index = NearIndex(prompts)
    for prompt in prompts:
        edited = prompt.split()
        edited[len(edited) // 2] = "zebra"
        assert index.near_duplicate(" ".join(edited)), prompt
