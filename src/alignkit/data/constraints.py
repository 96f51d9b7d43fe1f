"""Training prompts with verifiable constraints (Tülu 3's "RLVR" prompts), in IFEval's schema.

`constrained_prompts(bases, n, seed)` takes requests from our own training data and appends one to three
constraints of IFEval's 25 types (Zhou et al. 2023, arXiv:2311.07911), each with random arguments and one of
several wordings. Every row carries IFEval's `instruction_id_list` and `kwargs`, so the IFEval scorer
(`alignkit.rewards.ifeval`) checks a completion for it exactly as it checks an IFEval prompt: an RL reward that
says whether each constraint was followed.

IFEval is an evaluation set, so its prompts are never bases: `alignkit.data.decontaminate.decontaminate` drops
every base or finished prompt that repeats one (`NearIndex.near_duplicate` says how).

Departures from the reference generator (google-research `instruction_following_eval`), on purpose:
- Each type has three or four wordings of our own instead of one, so a policy learns the constraint rather
  than a sentence.
- The reference's conflict table is kept, and clashes it does not list are refused too (`_clash`): a word that
  is forbidden but also part of a required end phrase, lowercase with a "SECTION" header, "fewer than 80 words"
  with "at least 12 sentences", a non-English reply with English-only counts, a comma-free reply that must
  repeat a request with commas. Such a prompt can never earn its reward and only adds noise.
- "Fewer than N" of a letter uses only rare letters: fewer than 6 "e" is impossible in any real answer.
- The yes/no/maybe answer (`constrained_response`) is asked only of yes/no questions, and repeating the
  request only of one-line requests (a multi-line one must be copied newline for newline).
- Counts that make a constraint vacuous are left out ("at least 1 sentence", "exactly 1 bullet").
- `prompt_to_repeat` is the base request alone, and the wordings say to repeat the request without the added
  instructions; IFEval's own prompts repeat everything before the repeat sentence.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data.decontaminate import words
from alignkit.data.loading import strict_rows
from alignkit.errors import AlignkitError, DataError

RELATIONS = ("at least", "less than")

# ISO 639-1 codes of the reference's language list, English left out: an English reply is what a model writes
# anyway, so "answer in English" would teach nothing.
LANGUAGES = {
    "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi", "fr": "French", "ru": "Russian",
    "de": "German", "ja": "Japanese", "it": "Italian", "bn": "Bengali", "uk": "Ukrainian", "th": "Thai",
    "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "bg": "Bulgarian", "ko": "Korean", "pl": "Polish",
    "he": "Hebrew", "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada",
    "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}  # fmt: skip

# Keywords to require, count or open a paragraph with: everyday nouns that fit into an answer on any topic.
WORD_LIST = (
    "anchor", "apple", "balance", "bicycle", "blanket", "bridge", "candle", "canvas", "castle", "cloud",
    "compass", "corner", "cotton", "crystal", "desert", "diamond", "engine", "feather", "forest", "garden",
    "glacier", "harbor", "harvest", "horizon", "island", "journey", "kettle", "ladder", "lantern", "library",
    "magnet", "marble", "meadow", "mirror", "morning", "mountain", "needle", "orchard", "package", "painter",
    "pebble", "pencil", "pepper", "planet", "pocket", "puzzle", "rabbit", "ribbon", "river", "rocket",
    "saddle", "shadow", "signal", "silver", "spiral", "station", "storm", "summer", "sunrise", "teacher",
    "thunder", "ticket", "tower", "tunnel", "velvet", "village", "violin", "voyage", "wagon", "window",
    "winter", "wizard", "yellow", "ocean", "market", "letter", "valley", "basket", "butter", "captain",
    "circle", "coffee", "dragon", "friend", "ginger", "hammer", "jungle", "lemon", "memory", "motor",
    "napkin", "nickel", "parrot", "quiet", "rhythm", "secret", "spring", "timber", "trumpet", "whistle",
)  # fmt: skip

# Words never taken from a request as keywords: too common to make a constraint mean anything.
STOPWORDS = frozenset(
    "about above after again against among another answer around because before being below between could "
    "describe different does doing during each every example explain following from give given have having "
    "help into just like make many more most much need other over please provide should some something such "
    "than that their them then there these they thing things think this those through under until using very "
    "want what when where which while with within without would write your yours also always best better "
    "good great know little long really right tell used will".split()
)

# Phrases to end a reply with: no comma (a comma-free reply must be able to end with one) and no all-capital
# word (a reply with few capitalised words must too).
END_PHRASES = (
    "Thank you for reading.", "Let me know what you think.", "That is the whole story.", "Hope this helps!",
    "Any further questions?", "And that is all.", "What do you think?", "Good luck with it!",
    "Those are my thoughts.", "Feel free to ask more.", "Until next time.", "Enjoy!",
    "Do you need anything else?", "That settles it.",
)  # fmt: skip

SECTION_SPLITTERS = ("Section", "SECTION", "PART", "Part")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
# Letters a reply needs only a few of (about 1 in 700 letters of English text each): for "fewer than N" of a
# common letter no real answer qualifies.
RARE_LETTERS = "jqxz"
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


@dataclass(frozen=True)
class Base:
    """A request from our own training data that constraints are appended to."""

    text: str
    source: str
    """"file:line" of the row it came from"""


@dataclass(frozen=True)
class ConstraintType:
    """One IFEval instruction type: how to draw its arguments and how to say it."""

    id: str
    templates: tuple[str, ...]
    """wordings; `{name}` fields are the kwargs plus the phrases `_fields` derives from them"""
    sample: Callable[[random.Random, str], dict[str, Any]] = lambda rng, base: {}
    """draws the kwargs (IFEval's names) for a base request"""
    eligible: Callable[[str], bool] = lambda base: True
    """whether the type makes sense for this base request"""
    count: str = ""
    """the kwarg holding the number a `relation` compares with (empty when there is none)"""
    relation: str = ""
    """the kwarg holding "at least" or "less than" (empty when there is none)"""


def _relation(rng: random.Random, key: str, count: str, at_least: range, less_than: range) -> dict[str, Any]:
    """A relation and its number, from the range that keeps that relation neither vacuous nor impossible."""
    relation = rng.choice(RELATIONS)
    return {key: relation, count: rng.choice(at_least if relation == "at least" else less_than)}


def _base_words(base: str) -> list[str]:
    """Content words of the request (5+ letters, not stopwords), in order of appearance."""
    seen = dict.fromkeys(w.lower() for w in re.findall(r"[A-Za-z]{5,}", base))
    return [w for w in seen if w not in STOPWORDS]


def _keywords(rng: random.Random, base: str, k: int, from_base: float) -> list[str]:
    """k distinct keywords: each from the request with probability `from_base` (when it has enough), else
    from WORD_LIST. Words from the request make a forbidden word bite; list words make a required one new."""
    own = _base_words(base)
    picked: list[str] = []
    while len(picked) < k:
        pool = own if own and rng.random() < from_base else WORD_LIST
        word = rng.choice(pool)
        if word not in picked:
            picked.append(word)
    return picked


def _is_yes_no_question(base: str) -> bool:
    # "Can you ..." and "Do you know ..." are requests in question form, not questions to answer yes or no.
    text = base.strip()
    return (
        text.endswith("?")
        and "\n" not in text
        and re.match(r"(is|are|was|were|do|does|did|can|could|should|would|will|has|have)\b", text, re.I) is not None
        and re.match(r"(can|could|would|will) you\b|do you know\b", text, re.I) is None
    )


def _nth_paragraph(rng: random.Random, base: str) -> dict[str, Any]:
    paragraphs = rng.randint(2, 6)
    return {
        "num_paragraphs": paragraphs, "nth_paragraph": rng.randint(1, paragraphs), "first_word": rng.choice(WORD_LIST)
    }


def _letter(rng: random.Random, base: str) -> dict[str, Any]:
    relation = rng.choice(RELATIONS)
    if relation == "less than":
        letter, frequency = rng.choice(RARE_LETTERS), rng.randint(2, 6)
    else:
        letter, frequency = rng.choice(string.ascii_lowercase), rng.randint(3, 15)
    return {"let_relation": relation, "letter": letter, "let_frequency": frequency}


TYPES: tuple[ConstraintType, ...] = (
    ConstraintType(
        "change_case:english_lowercase",
        (
            "Write your entire reply in English using only lowercase letters; do not capitalise anything.",
            (
                "Respond in English and keep every letter lowercase: no capital letters anywhere, not even at the "
                "start of a sentence."
            ),
            "Use lowercase English throughout your answer. Uppercase letters are not allowed.",
            "Your whole answer must be English text without a single uppercase letter.",
        ),
    ),
    ConstraintType(
        "change_case:english_capital",
        (
            "Write your entire reply in English, in capital letters only.",
            "Answer in English and put every single letter in uppercase.",
            "Your whole response must be English text written in block capitals.",
            "Use only uppercase English letters from the first word to the last.",
        ),
    ),
    ConstraintType(
        "change_case:capital_word_frequency",
        (
            "Include {q0} words written entirely in capital letters.",
            "The number of fully capitalised words (like THIS) in your answer should be {q1}.",
            "Use all-caps words {q2} times in your reply.",
        ),
        sample=lambda rng, base: _relation(rng, "capital_relation", "capital_frequency", range(2, 21), range(3, 21)),
        count="capital_frequency",
        relation="capital_relation",
    ),
    ConstraintType(
        "punctuation:no_comma",
        (
            "Do not use a single comma anywhere in your reply.",
            "Your answer must contain no commas at all.",
            "Write without commas: the ',' character must not appear in your response.",
            "Avoid commas completely in what you write.",
        ),
    ),
    ConstraintType(
        "language:response_language",
        (
            "Write your whole reply in {language_name}; no other language is allowed.",
            "Respond only in {language_name}.",
            "Your entire answer must be in {language_name} and nothing else.",
            "Answer using the {language_name} language exclusively.",
        ),
        sample=lambda rng, base: {"language": rng.choice(sorted(LANGUAGES))},
    ),
    ConstraintType(
        "length_constraints:number_sentences",
        (
            "Your reply should have {q0} sentences.",
            "Write {q1} sentences in total.",
            "Use {q2} sentences in your answer.",
        ),
        sample=lambda rng, base: _relation(rng, "relation", "num_sentences", range(2, 21), range(2, 21)),
        count="num_sentences",
        relation="relation",
    ),
    ConstraintType(
        "length_constraints:number_words",
        (
            "Your answer should be {q0} words long.",
            "Write {q1} words.",
            "Use {q2} words in total.",
            "Respond in {q0} words.",
        ),
        sample=lambda rng, base: _relation(rng, "relation", "num_words", range(50, 501, 10), range(50, 501, 10)),
        count="num_words",
        relation="relation",
    ),
    ConstraintType(
        "length_constraints:number_paragraphs",
        (
            (
                "Organise your reply as exactly {num_paragraphs} paragraphs, separated from one another by the "
                "markdown divider *** on a line of its own."
            ),
            "Write {num_paragraphs} paragraphs and put the markdown divider *** between consecutive paragraphs.",
            "Your response must consist of {num_paragraphs} paragraphs; use *** to separate them.",
        ),
        sample=lambda rng, base: {"num_paragraphs": rng.randint(2, 6)},
    ),
    ConstraintType(
        "length_constraints:nth_paragraph_first_word",
        (
            (
                'Write exactly {num_paragraphs} paragraphs, separated by blank lines, and begin the {ordinal} '
                'paragraph with the word "{first_word}".'
            ),
            (
                'Your reply needs {num_paragraphs} paragraphs divided by empty lines. The first word of paragraph '
                'number {nth_paragraph} must be "{first_word}".'
            ),
            (
                'Split the answer into {num_paragraphs} paragraphs with one blank line between each pair; paragraph '
                '{nth_paragraph} has to start with "{first_word}".'
            ),
        ),
        sample=_nth_paragraph,
    ),
    ConstraintType(
        "detectable_content:number_placeholders",
        (
            "Include at least {num_placeholders} placeholders in square brackets, for example [name].",
            (
                "Leave {num_placeholders} or more blanks for the reader to fill in, each written in square brackets "
                "like [date]."
            ),
            (
                "Your response should contain no fewer than {num_placeholders} bracketed placeholders such as "
                "[location]."
            ),
        ),
        sample=lambda rng, base: {"num_placeholders": rng.randint(1, 8)},
    ),
    ConstraintType(
        "detectable_content:postscript",
        (
            'Close with a postscript that begins with "{postscript_marker}" after the main answer.',
            'After the main answer, add a note that opens with "{postscript_marker}" as a postscript.',
            'Add a short "{postscript_marker}" postscript at the end of your reply.',
        ),
        sample=lambda rng, base: {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)},
    ),
    ConstraintType(
        "detectable_format:number_bullet_lists",
        (
            (
                "Give exactly {num_bullets} bullet points, written as markdown bullets like:\n* first point\n* "
                "second point"
            ),
            (
                'Your answer must contain {num_bullets} markdown bullet points (lines starting with "* "), no more '
                'and no fewer.'
            ),
            'Include a list of precisely {num_bullets} items using markdown bullets ("* item").',
        ),
        sample=lambda rng, base: {"num_bullets": rng.randint(2, 7)},
    ),
    ConstraintType(
        "detectable_format:constrained_response",
        (
            'Reply with one of these exact options: "My answer is yes.", "My answer is no." or "My answer is maybe."',
            (
                "Your answer must include one of the following phrases word for word: My answer is yes. / My answer "
                "is no. / My answer is maybe."
            ),
            (
                'Choose one of "My answer is yes.", "My answer is no." and "My answer is maybe." and include it '
                'exactly as written.'
            ),
        ),
        eligible=_is_yes_no_question,
    ),
    ConstraintType(
        "detectable_format:number_highlighted_sections",
        (
            (
                "Mark {num_highlights} or more passages of your reply as highlighted by wrapping them in single "
                "asterisks, e.g. *key idea*."
            ),
            "Emphasise no fewer than {num_highlights} phrases using markdown, as in *important phrase*.",
            (
                "Your response should contain at least {num_highlights} highlighted snippets written between "
                "asterisks, such as *note this*."
            ),
        ),
        sample=lambda rng, base: {"num_highlights": rng.randint(1, 5)},
    ),
    ConstraintType(
        "detectable_format:multiple_sections",
        (
            (
                'Divide your reply into {num_sections} sections and open each one with a header of the form '
                '"{section_spliter} N" ("{section_spliter} 1", "{section_spliter} 2", ...).'
            ),
            (
                "Organise the answer as {num_sections} numbered sections; each opens with {section_spliter} followed "
                "by its number, e.g. {section_spliter} 1."
            ),
            (
                "Your response must have {num_sections} parts, labelled {section_spliter} 1 to {section_spliter} "
                "{num_sections}."
            ),
        ),
        sample=lambda rng, base: {
            "section_spliter": rng.choice(SECTION_SPLITTERS), "num_sections": rng.randint(2, 5)
        },
    ),
    ConstraintType(
        "detectable_format:json_format",
        (
            "Format your entire output as valid JSON; wrapping it in ``` markdown fences is fine.",
            "Your whole reply must be a JSON document and nothing else (it may sit inside a ```json code block).",
            "Return the answer as JSON only, with no text before or after it.",
        ),
    ),
    ConstraintType(
        "detectable_format:title",
        (
            "Give your answer a title wrapped in double angle brackets, like <<my title>>.",
            "Start with a title enclosed in << and >>, for example <<a day at sea>>.",
            "Include a title written between double angular brackets, such as <<the plan>>.",
        ),
    ),
    ConstraintType(
        "combination:two_responses",
        (
            "Give two different answers, separated by a line of six asterisks: ******.",
            "Write two distinct responses and put ****** (six asterisks) between them, and nowhere else.",
            "Provide two alternative replies; separate them with exactly six asterisks (******).",
        ),
    ),
    ConstraintType(
        "combination:repeat_prompt",
        (
            (
                "Before you answer, copy the request above word for word (only the request, not these extra "
                "instructions), then give your answer."
            ),
            (
                "Begin by restating the request exactly as written, with nothing before it and without the "
                "instructions added after it; then respond."
            ),
            (
                "Start your reply with a verbatim copy of the request (leaving out the instructions that follow it), "
                "and only then answer it."
            ),
        ),
        sample=lambda rng, base: {"prompt_to_repeat": base},
        # A multi-line request must be copied newline for newline; long ones make the copy most of the reply.
        eligible=lambda base: "\n" not in base and len(base) <= 300,
    ),
    ConstraintType(
        "startend:end_checker",
        (
            'Make "{end_phrase}" the very last words of your reply, with nothing after it.',
            'The last words of your response must be "{end_phrase}"; do not write anything after them.',
            'Finish with this precise sentence and add nothing afterwards: "{end_phrase}"',
        ),
        sample=lambda rng, base: {"end_phrase": rng.choice(END_PHRASES)},
    ),
    ConstraintType(
        "startend:quotation",
        (
            "Put your entire reply inside double quotation marks.",
            (
                "Wrap the whole answer in a pair of double quotes, opening at the very start and closing at the very "
                "end."
            ),
            'Your response must begin and end with a double quotation mark (").',
        ),
    ),
    ConstraintType(
        "keywords:existence",
        (
            "Make sure your answer contains {the_words}.",
            "Use {the_words} somewhere in your reply.",
            "Your response has to mention {the_words}.",
        ),
        sample=lambda rng, base: {"keywords": _keywords(rng, base, rng.randint(1, 3), from_base=0.2)},
    ),
    ConstraintType(
        "keywords:frequency",
        (
            'Use the word "{keyword}" {q0} times.',
            'The word "{keyword}" should appear {q1} times in your answer.',
            'Mention "{keyword}" {q2} times.',
        ),
        sample=lambda rng, base: {
            "keyword": _keywords(rng, base, 1, from_base=0.5)[0],
            **_relation(rng, "relation", "frequency", range(2, 6), range(2, 5)),
        },
        count="frequency",
        relation="relation",
    ),
    ConstraintType(
        "keywords:forbidden_words",
        (
            "Do not use {the_words} anywhere in your answer.",
            "Avoid {the_words} entirely.",
            "Your reply must not contain {the_words}.",
        ),
        sample=lambda rng, base: {"forbidden_words": _keywords(rng, base, rng.randint(1, 3), from_base=0.7)},
    ),
    ConstraintType(
        "keywords:letter_frequency",
        (
            'Let the letter "{letter}" occur {q0} times in your reply.',
            "Use the letter {letter} {q1} times.",
            "Write a reply in which the letter '{letter}' occurs {q2} times.",
        ),
        sample=_letter,
        count="let_frequency",
        relation="let_relation",
    ),
)
BY_ID: dict[str, ConstraintType] = {t.id: t for t in TYPES}
INSTRUCTION_IDS: tuple[str, ...] = tuple(BY_ID)


def _symmetric(table: dict[str, set[str]]) -> dict[str, frozenset[str]]:
    """Every type conflicts with itself, and A conflicts with B exactly when B conflicts with A."""
    full = {key: set(value) | {key} for key, value in table.items()}
    for key, value in table.items():
        for other in value:
            full[other].add(key)
    return {key: frozenset(value) for key, value in full.items()}


def _all_but(*allowed: str) -> set[str]:
    return set(INSTRUCTION_IDS) - set(allowed)


# The reference's conflict table (instructions_registry.INSTRUCTION_CONFLICTS): types that cannot be asked of one
# reply together. The types with their own output format (JSON, two answers, a repeated request, a fixed answer)
# allow only the few types that fit inside that format.
CONFLICTS: dict[str, frozenset[str]] = _symmetric({
    "keywords:existence": set(),
    "keywords:frequency": set(),
    "keywords:forbidden_words": set(),
    "keywords:letter_frequency": set(),
    "language:response_language": {
        "detectable_format:multiple_sections", "keywords:existence", "keywords:frequency",
        "keywords:forbidden_words", "startend:end_checker", "change_case:english_capital",
        "change_case:english_lowercase",
    },
    "length_constraints:number_sentences": set(),
    "length_constraints:number_paragraphs": {
        "length_constraints:nth_paragraph_first_word", "length_constraints:number_sentences",
    },
    "length_constraints:number_words": set(),
    "length_constraints:nth_paragraph_first_word": set(),
    "detectable_content:number_placeholders": set(),
    "detectable_content:postscript": set(),
    "detectable_format:number_bullet_lists": set(),
    "detectable_format:constrained_response": set(INSTRUCTION_IDS),
    "detectable_format:number_highlighted_sections": set(),
    "detectable_format:multiple_sections": {
        "language:response_language", "detectable_format:number_highlighted_sections",
    },
    "detectable_format:json_format": _all_but("keywords:forbidden_words", "keywords:existence"),
    "detectable_format:title": set(),
    "combination:two_responses": _all_but(
        "keywords:forbidden_words", "keywords:existence", "language:response_language", "detectable_format:title",
        "punctuation:no_comma",
    ),
    "combination:repeat_prompt": _all_but("keywords:existence", "detectable_format:title", "punctuation:no_comma"),
    "startend:end_checker": set(),
    "change_case:capital_word_frequency": {"change_case:english_lowercase", "change_case:english_capital"},
    "change_case:english_capital": set(),
    "change_case:english_lowercase": {"change_case:english_capital"},
    "punctuation:no_comma": set(),
    "startend:quotation": {"detectable_format:title"},
})  # fmt: skip

# Counts a non-English reply cannot meet as the checkers count: words are split on `\w+` (a Japanese or Thai
# sentence is one "word"), sentences by an English sentence splitter (Hindi ends them with "।"), letters and
# capitalised words are Latin, and a paragraph's first word is an English keyword.
_ENGLISH_ONLY = frozenset({
    "length_constraints:number_words", "length_constraints:number_sentences", "keywords:letter_frequency",
    "change_case:capital_word_frequency", "length_constraints:nth_paragraph_first_word",
})  # fmt: skip


def _required_text(picks: dict[str, dict[str, Any]]) -> str:
    """Text that a compliant reply must contain, lower-cased: what a forbidden word or letter must not be in."""
    parts: list[str] = list(picks.get("keywords:existence", {}).get("keywords", []))
    frequency = picks.get("keywords:frequency")
    if frequency and frequency["relation"] == "at least":
        parts.append(frequency["keyword"])
    parts.append(picks.get("startend:end_checker", {}).get("end_phrase", ""))
    parts.append(picks.get("length_constraints:nth_paragraph_first_word", {}).get("first_word", ""))
    parts.append(picks.get("detectable_format:multiple_sections", {}).get("section_spliter", ""))
    parts.append(picks.get("detectable_content:postscript", {}).get("postscript_marker", ""))
    parts.append(picks.get("combination:repeat_prompt", {}).get("prompt_to_repeat", ""))
    return " ".join(parts).lower()


def _clash(picks: dict[str, dict[str, Any]]) -> bool:
    """Whether the arguments drawn make the constraints impossible to meet together (the reference's table
    decides by type alone; these are the clashes that depend on the arguments or that it leaves out)."""
    required = _required_text(picks)
    forbidden = picks.get("keywords:forbidden_words", {}).get("forbidden_words", [])
    if any(re.search(rf"\b{re.escape(word)}\b", required) for word in forbidden):
        return True
    frequency = picks.get("keywords:frequency")
    if frequency:
        keyword, existing = frequency["keyword"], picks.get("keywords:existence", {}).get("keywords", [])
        if keyword in forbidden or keyword in existing:
            return True
        if frequency["relation"] == "less than" and keyword in required:
            return True
    letter = picks.get("keywords:letter_frequency")
    if letter and letter["let_relation"] == "less than" and letter["letter"] in required:
        return True
    sections = picks.get("detectable_format:multiple_sections")
    if sections:
        # The section checker matches its header case-sensitively, so the header must survive the case rule.
        if "change_case:english_lowercase" in picks:
            return True
        if "change_case:english_capital" in picks and not sections["section_spliter"].isupper():
            return True
        # A header word in capitals counts as a capitalised word, once per section.
        capitals = picks.get("change_case:capital_word_frequency")
        if capitals and capitals["capital_relation"] == "less than" and sections["section_spliter"].isupper():
            if sections["num_sections"] + 1 >= capitals["capital_frequency"]:
                return True
        # A paragraph that opens with a header cannot open with the required word.
        if "length_constraints:nth_paragraph_first_word" in picks:
            return True
    if "language:response_language" in picks and _ENGLISH_ONLY & picks.keys():
        return True
    repeat = picks.get("combination:repeat_prompt")
    if repeat and "punctuation:no_comma" in picks and "," in repeat["prompt_to_repeat"]:
        return True
    return _length_clash(picks)


def _length_clash(picks: dict[str, dict[str, Any]]) -> bool:
    """Word and sentence budgets too small for the structure asked for (about 10 words per sentence, paragraph,
    section or bullet; at least one sentence each) or a word count too large for the sentence budget."""
    units = max(
        picks.get("length_constraints:number_paragraphs", {}).get("num_paragraphs", 0),
        picks.get("length_constraints:nth_paragraph_first_word", {}).get("num_paragraphs", 0),
        picks.get("detectable_format:multiple_sections", {}).get("num_sections", 0),
        picks.get("detectable_format:number_bullet_lists", {}).get("num_bullets", 0),
    ) + ("detectable_content:postscript" in picks)
    sentences = picks.get("length_constraints:number_sentences")
    length = picks.get("length_constraints:number_words")
    if sentences and sentences["relation"] == "at least":
        units = max(units, sentences["num_sentences"])
    if length and length["relation"] == "less than" and length["num_words"] < 10 * units:
        return True
    if sentences and sentences["relation"] == "less than":
        if sentences["num_sentences"] - 1 < units:
            return True
        longest = 30 * (sentences["num_sentences"] - 1)  # words in the sentences allowed, at 30 words each
        if length and length["relation"] == "at least" and length["num_words"] > longest:
            return True
    return False


def _fields(kind: ConstraintType, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs plus the phrases the wordings use: a comparison three ways (q0, q1, q2), the language's name,
    a quoted word list, an ordinal."""
    fields = dict(kwargs)
    if kind.relation:
        number, at_least = kwargs[kind.count], kwargs[kind.relation] == "at least"
        fields["q0"] = f"{kwargs[kind.relation]} {number}"
        fields["q1"] = f"no fewer than {number}" if at_least else f"fewer than {number}"
        fields["q2"] = f"a minimum of {number}" if at_least else f"under {number}"
    if "language" in kwargs:
        fields["language_name"] = LANGUAGES[kwargs["language"]]
    listed = kwargs.get("keywords") or kwargs.get("forbidden_words")
    if listed:
        quoted = [f'"{word}"' for word in listed]
        joined = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
        fields["the_words"] = f"the word {joined}" if len(quoted) == 1 else f"the words {joined}"
    if "nth_paragraph" in kwargs:
        fields["ordinal"] = _ORDINALS[kwargs["nth_paragraph"] - 1]
    return fields


def describe(instruction_id: str, kwargs: dict[str, Any], wording: int) -> str:
    """The sentence that asks for one constraint, in wording number `wording` of its type."""
    kind = BY_ID[instruction_id]
    return kind.templates[wording].format(**_fields(kind, kwargs))


def _draw(rng: random.Random, base: str, used: Counter[str]) -> dict[str, dict[str, Any]]:
    """One to three compatible constraint types with their arguments, in the order they will be asked."""
    wanted = rng.choices((1, 2, 3), weights=(4, 4, 2))[0]
    picks: dict[str, dict[str, Any]] = {}
    while len(picks) < wanted:
        allowed = [
            t for t in TYPES
            if t.eligible(base) and t.id not in picks and not any(t.id in CONFLICTS[p] for p in picks)
        ]  # fmt: skip
        if not allowed:
            break
        # A type's weight falls as it is used, so the types that conflict with most others (and so rarely
        # survive as a second or third pick) and those few bases suit still appear about as often as the rest.
        kind = rng.choices(allowed, weights=[1 / (1 + used[t.id]) for t in allowed])[0]
        picks[kind.id] = kind.sample(rng, base)
    return picks


def constrained_prompts(bases: Sequence[Base], n: int, seed: int) -> list[dict[str, Any]]:
    """n prompts, each a base request followed by 1-3 verifiable constraints, as IFEval-schema rows:
    `{"prompt", "instruction_id_list", "kwargs", "source"}`. The same bases, n and seed give the same rows.

    Bases are used in turn (shuffled, reshuffled on every pass), so each appears about n / len(bases) times
    with different constraints."""
    if not bases:
        raise AlignkitError("no base requests to build constrained prompts from", fix="pass at least one Base")
    if n < 0:
        raise AlignkitError(f"cannot build {n} prompts", fix="ask for zero or more")
    rng = random.Random(seed)
    used: Counter[str] = Counter()
    order: list[int] = []
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        if not order:
            order = rng.sample(range(len(bases)), len(bases))
        base = bases[order.pop()]
        picks = _draw(rng, base.text, used)
        while _clash(picks):  # ends soon: a single constraint never clashes, and 4 draws in 10 have one
            picks = _draw(rng, base.text, used)
        used.update(picks.keys())
        sentences = [describe(i, kwargs, rng.randrange(len(BY_ID[i].templates))) for i, kwargs in picks.items()]
        # A request that does not end in punctuation reads as run on into the first constraint without a break.
        separator = rng.choice((" ", "\n\n")) if re.search(r"[.?!:\"')\]]$", base.text) else "\n\n"
        rows.append({
            "prompt": base.text + separator + " ".join(sentences),
            "instruction_id_list": list(picks),
            "kwargs": list(picks.values()),
            "source": base.source,
        })  # fmt: skip
    return rows


# Requests that already say how to format or size the answer: an added constraint could contradict them
# ("in one sentence" + "at least 12 sentences", "translate to French" + "reply in Hindi", a haiku of 300 words),
# and code cannot go without commas or capitals.
_FORMAT_DEMAND = re.compile(
    r"\b(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|single)[- ]"
    r"(?:words?|sentences?|paragraphs?|lines?|bullets?|points?|items?|characters?|syllables?|pages?)\b"
    r"|\b(?:json|yaml|xml|csv|markdown|table|bullet|numbered|format(?:ted)?|uppercase|lowercase|capital letters"
    r"|all caps|commas?|quotation marks?|title|postscript|p\.s\.|translat\w*|haiku|limerick|sonnet|tweet|acrostic"
    r"|briefly|concise(?:ly)?"
    r"|in (?:english|spanish|french|german|italian|portuguese|chinese|japanese|russian|arabic|hindi)"
    r"|code|python|javascript|java|sql|regex|html|css|function|script)\b",
    re.IGNORECASE,
)
MAX_BASE_CHARS = 600


def usable_base(text: str) -> bool:
    """Whether a request can take added constraints: short enough (a long input leaves the constraints lost
    at the end) and without formatting or length demands of its own."""
    return 0 < len(text) <= MAX_BASE_CHARS and not _FORMAT_DEMAND.search(text)


def read_bases(paths: Sequence[Path]) -> list[Base]:
    """The usable requests of instruction files (`instruction` + `input`) and preference files (`prompt`),
    each once (by lower-cased words) and in file order."""
    bases, seen = [], set()
    for path in paths:
        for number, row in strict_rows(str(path)):
            if isinstance(row.get("instruction"), str):
                text = row["instruction"].strip() + (f"\n\n{row['input'].strip()}" if row.get("input") else "")
            elif isinstance(row.get("prompt"), str):
                text = row["prompt"].strip()
            else:
                raise DataError("a row without `instruction` or `prompt` text", path=str(path), line=number)
            key = " ".join(words(text))
            if usable_base(text) and key not in seen:
                seen.add(key)
                bases.append(Base(text, f"{path.name}:{number}"))
    return bases
