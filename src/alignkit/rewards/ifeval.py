"""IFEval: does a response follow verifiable instructions? (Zhou et al. 2023, arXiv:2311.07911)

IFEval's 541 prompts each carry one to three instructions of 25 types ("answer in fewer than 100 words",
"wrap the whole reply in JSON", "end with 'Is there anything else I can help with?'"), each checkable by a
rule. `INSTRUCTION_TYPES` maps an instruction id to its `Instruction`: calling it with a response and that
instruction's kwargs (the benchmark's argument names) says whether the response follows it.

    follow_instructions(response, ["punctuation:no_comma"], [{}])            # -> [True] or [False]
    follow_instructions(response, ids, kwargs, loose=True)                   # the benchmark's loose mode

Strict mode checks the response as it is; an empty or whitespace-only response follows nothing. Loose mode
counts an instruction as followed when any of eight variants follows it: the response, the response without
its first line, without its last line, without both, and each of these with every `*` removed, so a
"Sure, here it is:" opening or markdown emphasis does not cost the instruction.

`IFEvalScorer` puts this behind the reward interface (`verifiers.py`): reward `ifeval` is the fraction of a
prompt's instructions followed, `ifeval_all` 1.0 only when all are (the paper's prompt-level accuracy), both
strict unless the spec says `:loose`. Its reference answer is the JSON that `data.loading` makes of an IFEval
row: `{"instruction_id_list": [...], "kwargs": [...]}`.

The rules are those of the reference implementation (google-research `instruction_following_eval`; a copy
lives in lm-evaluation-harness), quirks included, since scores are only comparable with the paper's when
they agree; `scripts/ifeval_agreement.py` compares the two on real responses. The quirks a reader should know:
- Words are runs of `\\w`; keywords (`keywords:existence`, `keywords:frequency`) are regular expressions
  matched case-insensitively anywhere, so "cat" is found in "category"; only forbidden words must stand alone
  (`\\b` on each side).
- Sentences are counted by Punkt with NLTK's English model (shipped as `resources/punkt_english.json`),
  re-implemented here so that no NLTK and no download is needed: "1. Item." is two sentences, as in NLTK.
  Words in all capitals are counted on NLTK's word tokens, so "DON'T" is two ("DO", "N'T").
- `length_constraints:number_paragraphs` splits on `***` (a lone empty part at either end is not a
  paragraph; one in the middle fails the instruction); `nth_paragraph_first_word` splits on a blank line.
- A bullet is a line starting with `*` (not `**`) or `-`, so a `---` rule counts as one; a highlighted
  section is `*text*` or `**text**` within one line.
- `detectable_content:postscript` finds "P.S." or "P.P.S" anywhere (any case), not only at the end.
- A response in which langdetect finds nothing to go by (no letters, or only a URL) counts as written in
  the language asked for, also by `english_capital` and `english_lowercase` once its case is right.

Deliberate differences from the reference:
- langdetect is seeded (a private detector factory with seed 0), so a verdict never changes between runs;
  the reference leaves it unseeded, which flips borderline texts from run to run.
- Sentences and words are those of NLTK 3.8.1 to 3.9.2 (the paper's NLTK, and lm-evaluation-harness's
  `nltk>=3.9.1`). NLTK 3.9.3 and later also split words at dashes (U+2012 to U+2015), and 3.10.2 and later
  treat curly quotes and guillemets as punctuation beside a sentence end; both change some counts.
- A missing or ill-typed argument raises `AlignkitError` where the reference would draw a random one, and
  `keywords:letter_frequency` takes any one character, as the original does (lm-evaluation-harness's copy
  replaces anything outside a-z by a random letter; IFEval asks for "#" and "!" once each).
- Brackets nested too deeply for Python's JSON parser fail `json_format` instead of raising RecursionError.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import takewhile
from pathlib import Path
from typing import Any

from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
from langdetect.lang_detect_exception import LangDetectException

from alignkit.errors import AlignkitError
from alignkit.rewards.scorer import CheckedScorer

__all__ = [
    "INSTRUCTION_TYPES",
    "IFEvalScorer",
    "Instruction",
    "count_sentences",
    "count_words",
    "follow_instructions",
    "loose_variants",
    "parse_reference",
    "split_sentences",
]

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _compare(count: int, relation: str, threshold: int) -> bool:
    """IFEval's two relations: "less than N" is count < N, "at least N" is count >= N."""
    return count < threshold if relation == "less than" else count >= threshold


# --------------------------------------------------------------------------------------------------------------
# Words and sentences

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """The number of words, a word being a run of letters, digits and underscores: "don't" is two."""
    return len(_WORD.findall(text))


@dataclass(frozen=True)
class _PunktModel:
    """The four tables of a trained Punkt model (see resources/punkt_english.json)."""

    abbreviations: frozenset[str]
    collocations: frozenset[tuple[str, str]]
    sentence_starters: frozenset[str]
    orthography: Mapping[str, int]
    """word type -> the union of the contexts (`_ORTHO_*` flags) it was seen in; absent types are 0"""


@cache
def _punkt_english() -> _PunktModel:
    path = Path(__file__).resolve().parents[1] / "resources" / "punkt_english.json"
    tables = json.loads(path.read_text(encoding="utf-8"))
    return _PunktModel(
        abbreviations=frozenset(tables["abbreviations"]),
        collocations=frozenset(tuple(pair) for pair in tables["collocations"]),
        sentence_starters=frozenset(tables["sentence_starters"]),
        orthography={
            word: int(flags) for flags, words in tables["orthographic_contexts"].items() for word in words.split()
        },
    )


# Where a word type was seen in Punkt's training text: capitalised or not, at a sentence start, inside a
# sentence, or where the position was unknown.
_ORTHO_BEG_UC, _ORTHO_MID_UC, _ORTHO_UNK_UC = 1 << 1, 1 << 2, 1 << 3
_ORTHO_BEG_LC, _ORTHO_MID_LC, _ORTHO_UNK_LC = 1 << 4, 1 << 5, 1 << 6
_ORTHO_UC = _ORTHO_BEG_UC | _ORTHO_MID_UC | _ORTHO_UNK_UC
_ORTHO_LC = _ORTHO_BEG_LC | _ORTHO_MID_LC | _ORTHO_UNK_LC

# Punkt's English language variables (NLTK 3.9's PunktLanguageVars): characters that end a word, a run
# such as "--" or "...", characters no word starts with, a candidate sentence end with its context.
_NON_WORD = r"""[)";}\]*:@'({\[?!]"""
_MULTI_CHAR = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PUNKT_TOKEN = re.compile(
    rf"""{_MULTI_CHAR}"""
    rf"""|(?=[^("`{{\[:;&#*@)}}\]\-,])\S+?(?=\s|$|{_NON_WORD}|{_MULTI_CHAR}|,(?=$|\s|{_NON_WORD}|{_MULTI_CHAR}))"""
    r"""|\S"""
)
_CANDIDATE_END = re.compile(rf"[.?!](?=(?P<after>{_NON_WORD}|\s+(?P<next>\S+)))")
# Closing quotes and brackets right after a sentence end belong to that sentence: `(Sent1.) Sent2.`
_CLOSING = re.compile(r"""["')\]}]+?(?:\s+|(?=--)|$)""", re.MULTILINE)
_NUMERIC = re.compile(r"-?[.,]?\d[\d,.-]*\.?")
_INITIAL = re.compile(r"[^\W\d]\.")
_PUNCTUATION_TOKENS = frozenset(";:,.!?")


class _Token:
    """A Punkt word token with its annotations: a sentence break after it, an abbreviation, an ellipsis."""

    __slots__ = ("text", "type", "sentbreak", "abbr", "ellipsis")

    def __init__(self, text: str):
        self.text = text
        # Punkt's "type" folds case and all numbers together, so "5." and "12." look alike to its tables
        self.type = "##number##" if _NUMERIC.fullmatch(text.lower()) else text.lower()
        self.sentbreak = self.abbr = self.ellipsis = False

    def type_no_period(self) -> str:
        return self.type[:-1] if len(self.type) > 1 and self.type.endswith(".") else self.type

    def type_no_sentperiod(self) -> str:
        return self.type_no_period() if self.sentbreak else self.type


def _first_pass(token: _Token, model: _PunktModel) -> None:
    """Decide by the token alone: ?/!/. break, ".." is an ellipsis, a known abbreviation does not break."""
    text = token.text
    if text in (".", "?", "!"):
        token.sentbreak = True
    elif len(text) > 1 and not text.strip("."):
        token.ellipsis = True
    elif text.endswith(".") and not text.endswith(".."):
        stem = text[:-1].lower()
        if stem in model.abbreviations or stem.split("-")[-1] in model.abbreviations:
            token.abbr = True
        else:
            token.sentbreak = True


def _starts_sentence(token: _Token, model: _PunktModel) -> bool | None:
    """Punkt's orthographic heuristic: does the case of `token` say a sentence starts there? None: unsure."""
    if token.text in _PUNCTUATION_TOKENS:
        return False
    flags = model.orthography.get(token.type_no_sentperiod(), 0)
    # capitalised here, seen in lower case, never capitalised inside a sentence: this must be a sentence start
    if token.text[0].isupper() and flags & _ORTHO_LC and not flags & _ORTHO_MID_UC:
        return True
    if token.text[0].islower() and (flags & _ORTHO_UC or not flags & _ORTHO_BEG_LC):
        return False
    return None


def _second_pass(token: _Token, following: _Token, model: _PunktModel) -> None:
    """Revise the decision for a token ending in "." by the token after it (Kiss & Strunk, section 4)."""
    if not token.text.endswith("."):
        return
    typ, next_typ = token.type_no_period(), following.type_no_sentperiod()
    initial = _INITIAL.fullmatch(token.text) is not None
    if (typ, next_typ) in model.collocations:
        token.sentbreak, token.abbr = False, True
        return
    if (token.abbr or token.ellipsis) and not initial:
        if _starts_sentence(following, model) is True or (
            following.text[0].isupper() and next_typ in model.sentence_starters
        ):
            token.sentbreak = True
            return
    if initial or typ == "##number##":
        starts = _starts_sentence(following, model)
        # "J. Bach": an initial before a word only ever seen capitalised is no sentence end
        if starts is False or (
            starts is None
            and initial
            and following.text[0].isupper()
            and not model.orthography.get(next_typ, 0) & _ORTHO_LC
        ):
            token.sentbreak, token.abbr = False, True


def _context_has_break(context: str, model: _PunktModel) -> bool:
    """Whether Punkt puts a sentence break in `context` before its last token."""
    tokens = [_Token(t) for line in context.split("\n") if line.strip() for t in _PUNKT_TOKEN.findall(line)]
    for token in tokens:
        _first_pass(token, model)
    for token, following in zip(tokens, tokens[1:]):
        _second_pass(token, following, model)
        if token.sentbreak:
            return True
    return False


def _candidate_ends(text: str) -> Iterator[tuple[re.Match, str]]:
    """Each possible sentence end with its context: the word before it, the end mark and the next token.

    A run of marks ("wait!!! Next") counts once, at its last mark, with the word before the run: NLTK finds
    the word before a mark by the last whitespace before it (ASCII whitespace only) and drops a mark whose
    word overlaps the next mark's, which this follows to the letter.
    """
    previous: re.Match | None = None
    word_start = word_stop = 0
    for match in _CANDIDATE_END.finditer(text):
        before = text[word_stop : match.start()]
        last_space = max(before.rfind(c) for c in string.whitespace)
        start = word_stop + last_space + 1 if last_space > 0 else word_start
        if previous is not None and word_stop <= start:
            yield previous, text[word_start:word_stop] + previous.group() + previous["after"]
        previous, word_start, word_stop = match, start, match.start()
    if previous is not None:
        yield previous, text[word_start:word_stop] + previous.group() + previous["after"]


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` as NLTK's English Punkt tokenizer (`nltk.sent_tokenize`) splits them."""
    model = _punkt_english()
    spans, start = [], 0
    for match, context in _candidate_ends(text):
        if _context_has_break(context, model):
            spans.append((start, match.end()))
            start = match.start("next") if match["next"] else match.end()
    spans.append((start, len(text.rstrip())))
    sentences, shift = [], 0
    for i, (begin, end) in enumerate(spans):
        begin += shift
        following = spans[i + 1] if i + 1 < len(spans) else None
        closing = _CLOSING.match(text[following[0] : following[1]]) if following else None
        if closing:  # move the closing quotes or brackets from the next sentence onto this one
            sentences.append(text[begin : following[0] + len(closing.group().rstrip())])
            shift = closing.end()
        else:
            shift = 0
            if text[begin:end]:
                sentences.append(text[begin:end])
    return sentences


def count_sentences(text: str) -> int:
    """The number of sentences as NLTK's English Punkt tokenizer counts them (`split_sentences`)."""
    return len(split_sentences(text))


# NLTK's word tokenizer (`nltk.word_tokenize` of NLTK 3.9.2), which IFEval runs to count words in capitals:
# each rule pads pieces with spaces, and the tokens are what `split()` then finds.
_Rules = tuple[tuple[re.Pattern, str], ...]


def _rules(*rules: tuple[str, str], flags: int = 0) -> _Rules:
    return tuple((re.compile(pattern, flags), replacement) for pattern, replacement in rules)


_BEFORE_PADDING = _rules(
    # opening quotes
    (r"([«“‘„]|[`]+)", r" \1 "),
    (r'^"', r"``"),
    (r"(``)", r" \1 "),
    (r"""([ (\[{<])("|'{2})""", r"\1 `` "),
    (r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2"),
    # punctuation
    (r"""([^.])(\.)([\])}>"'»”’ ]*)\s*$""", r"\1 \2 \3 "),
    (r"([:,])([^\d])", r" \1 \2"),
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),
    (r"[;@#$%&]", r" \g<0> "),
    (r"""([^.])(\.)([\])}>"']*)\s*$""", r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[*]", r" \g<0> "),
    (r"[\]\[(){}<>]", r" \g<0> "),
    (r"--", r" -- "),
)
_AFTER_PADDING = _rules(
    # closing quotes and clitics
    (r"([»”’])", r" \1 "),
    (r"''", " '' "),
    (r'"', " '' "),
    (r"\s+", " "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
) + _rules(  # Robert MacIntyre's contractions: "cannot" is "can" + "not", "'tis" is "'t" + "is"
    *((pattern, r" \1 \2 ") for pattern in (
        r"\b(can)(not)\b", r"\b(d)('ye)\b", r"\b(gim)(me)\b", r"\b(gon)(na)\b", r"\b(got)(ta)\b",
        r"\b(lem)(me)\b", r"\b(more)('n)\b", r"\b(wan)(na)(?=\s)", r" ('t)(is)\b", r" ('t)(was)\b",
    )),
    flags=re.IGNORECASE,
)  # fmt: skip


def _word_tokens(sentence: str) -> list[str]:
    for regex, replacement in _BEFORE_PADDING:
        sentence = regex.sub(replacement, sentence)
    sentence = f" {sentence} "  # the rules after this point find words by the spaces around them
    for regex, replacement in _AFTER_PADDING:
        sentence = regex.sub(replacement, sentence)
    return sentence.split()


def _capital_words(text: str) -> int:
    """Words in all capitals among NLTK's word tokens of each Punkt sentence ("U.S." is one, "DON'T" two)."""
    return sum(token.isupper() for sentence in split_sentences(text) for token in _word_tokens(sentence))


# --------------------------------------------------------------------------------------------------------------
# Language


@cache
def _language_detector() -> DetectorFactory:
    # A factory of our own, seeded: langdetect's module-level one is unseeded, so its verdict on a borderline
    # text changes from run to run, and seeding that one would change it for everyone in the process.
    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(0)
    return factory


def _is_language(text: str, language: str) -> bool:
    """Whether langdetect says `text` is in `language` (ISO 639-1); True when it cannot tell, as in IFEval."""
    detector = _language_detector().create()
    try:
        detector.append(text)
        return detector.detect() == language
    except LangDetectException:
        return True


# --------------------------------------------------------------------------------------------------------------
# The 25 instruction types: each takes the response and the instruction's kwargs


def _no_comma(response: str) -> bool:
    return "," not in response


def _number_words(response: str, *, num_words: int, relation: str) -> bool:
    return _compare(count_words(response), relation, num_words)


def _number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(response), relation, num_sentences)


def _number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", response)
    empty = [i for i, part in enumerate(parts) if not part.strip()]
    # an empty part before the first or after the last divider is no paragraph; one between two is an error
    if any(0 < i < len(parts) - 1 for i in empty):
        return False
    return len(parts) - len(empty) == num_paragraphs


def _nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    parts = response.split("\n\n")
    count = sum(1 for part in parts if part.strip())
    # IFEval indexes the split parts, empty ones included, but only up to the number of non-empty ones
    if nth_paragraph > count or not (paragraph := parts[nth_paragraph - 1].strip()):
        return False
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    first = "".join(c.lower() for c in takewhile(lambda c: c not in ".,?!'\"", word))
    return count == num_paragraphs and first == first_word.lower()


def _forbidden_words(response: str, *, forbidden_words: Sequence[str]) -> bool:
    return not any(re.search(rf"\b{word}\b", response, re.IGNORECASE) for word in forbidden_words)


def _keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(keyword.strip(), response, re.IGNORECASE)), relation, frequency)


def _keywords_exist(response: str, *, keywords: Sequence[str]) -> bool:
    return all(re.search(keyword, response, re.IGNORECASE) for keyword in keywords)


def _letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(Counter(response.lower())[letter.strip().lower()], let_relation, let_frequency)


def _highlighted_sections(response: str, *, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def _title(response: str) -> bool:
    return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", response))


def _bullet_lists(response: str, *, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^*].*$", response, re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def _json_format(response: str) -> bool:
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    try:
        json.loads(text.removesuffix("```").strip())
    except (ValueError, RecursionError):
        return False
    return True


def _multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    return len(re.split(rf"\s?{section_spliter.strip()}\s?\d+\s?", response)) - 1 >= num_sections


def _constrained_response(response: str) -> bool:
    return any(option in response for option in CONSTRAINED_RESPONSES)


def _repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _two_responses(response: str) -> bool:
    parts = response.split("******")
    if any(not part.strip() for part in parts[1:-1]):
        return False
    answers = [part.strip() for part in parts if part.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


def _quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == text[-1] == '"'


def _end_checker(response: str, *, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _english_lowercase(response: str) -> bool:
    return response.islower() and _is_language(response, "en")


def _english_capital(response: str) -> bool:
    return response.isupper() and _is_language(response, "en")


def _capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(_capital_words(response), capital_relation, capital_frequency)


def _response_language(response: str, *, language: str) -> bool:
    return _is_language(response, language)


def _number_placeholders(response: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def _postscript(response: str, *, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    # IFEval's two markers admit a space after each full stop ("P. S."); any other marker is a regex
    pattern = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}.get(marker, marker.lower())
    return re.search(rf"\s*{pattern}.*$", response.lower(), re.MULTILINE) is not None


# --------------------------------------------------------------------------------------------------------------
# Arguments: each checker returns None for a good value, else what is wrong with it


def _count(value: Any) -> str | None:
    integer = isinstance(value, int) and not isinstance(value, bool)
    if (integer or (isinstance(value, float) and value.is_integer())) and value >= 0:
        return None
    return f"must be a whole number >= 0, not {value!r}"


def _relation(value: Any) -> str | None:
    return None if value in RELATIONS else f"must be 'less than' or 'at least', not {value!r}"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, not {value!r}"


def _letter(value: Any) -> str | None:
    return None if isinstance(value, str) and len(value) == 1 else f"must be one character, not {value!r}"


def _regex(value: Any) -> str | None:
    if problem := _text(value):
        return problem
    try:
        re.compile(value)
    except re.error as exc:  # IFEval reads keywords and section names as regular expressions
        return f"is not a valid regular expression ({exc}): {value!r}"
    return None


def _regexes(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return f"must be a non-empty list of strings, not {value!r}"
    return next(filter(None, map(_regex, value)), None)


@dataclass(frozen=True)
class Instruction:
    """One IFEval instruction type: `instruction(response, kwargs)` says whether `response` follows it."""

    id: str
    rule: Callable[..., bool]
    """rule(response, **arguments) -> bool, the benchmark's check"""
    arguments: Mapping[str, Callable[[Any], str | None]]
    """argument name -> its checker (None for a good value, else the problem)"""

    def parse(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The rule's arguments from IFEval's kwargs, or an `AlignkitError` naming the id and the argument.

        A null value counts as absent (the Hugging Face copy of IFEval lists every argument of every type,
        most of them null).
        """
        if not isinstance(kwargs, Mapping):
            raise AlignkitError(f"the kwargs of IFEval instruction '{self.id}' are {type(kwargs).__name__}, not a dict")
        given = {name: value for name, value in kwargs.items() if value is not None}
        for name, value in given.items():
            if name not in self.arguments:
                raise AlignkitError(
                    f"IFEval instruction '{self.id}' takes no argument '{name}'",
                    fix=f"its arguments: {', '.join(self.arguments) or '(none)'}",
                )
        for name, check in self.arguments.items():
            missing = f"is missing (its arguments: {', '.join(self.arguments)})"
            if problem := check(given[name]) if name in given else missing:
                raise AlignkitError(f"IFEval instruction '{self.id}': argument '{name}' {problem}")
        if "nth_paragraph" in given and not 1 <= given["nth_paragraph"] <= given["num_paragraphs"]:
            raise AlignkitError(
                f"IFEval instruction '{self.id}': argument 'nth_paragraph' is {given['nth_paragraph']}, "
                f"outside 1..num_paragraphs ({given['num_paragraphs']})"
            )
        return {name: int(v) if self.arguments[name] is _count else v for name, v in given.items()}

    def __call__(self, response: str, kwargs: Mapping[str, Any]) -> bool:
        return self.rule(response, **self.parse(kwargs))


def _types(*specs: tuple[str, Callable[..., bool], dict[str, Callable[[Any], str | None]]]) -> dict[str, Instruction]:
    return {type_id: Instruction(type_id, rule, arguments) for type_id, rule, arguments in specs}


INSTRUCTION_TYPES: dict[str, Instruction] = _types(
    ("punctuation:no_comma", _no_comma, {}),
    ("length_constraints:number_words", _number_words, {"num_words": _count, "relation": _relation}),
    ("length_constraints:number_sentences", _number_sentences, {"num_sentences": _count, "relation": _relation}),
    ("length_constraints:number_paragraphs", _number_paragraphs, {"num_paragraphs": _count}),
    ("length_constraints:nth_paragraph_first_word", _nth_paragraph_first_word,
     {"num_paragraphs": _count, "nth_paragraph": _count, "first_word": _text}),
    ("keywords:forbidden_words", _forbidden_words, {"forbidden_words": _regexes}),
    ("keywords:frequency", _keyword_frequency, {"keyword": _regex, "frequency": _count, "relation": _relation}),
    ("keywords:existence", _keywords_exist, {"keywords": _regexes}),
    ("keywords:letter_frequency", _letter_frequency,
     {"letter": _letter, "let_frequency": _count, "let_relation": _relation}),
    ("detectable_format:number_highlighted_sections", _highlighted_sections, {"num_highlights": _count}),
    ("detectable_format:title", _title, {}),
    ("detectable_format:number_bullet_lists", _bullet_lists, {"num_bullets": _count}),
    ("detectable_format:json_format", _json_format, {}),
    ("detectable_format:multiple_sections", _multiple_sections, {"section_spliter": _regex, "num_sections": _count}),
    ("detectable_format:constrained_response", _constrained_response, {}),
    ("combination:repeat_prompt", _repeat_prompt, {"prompt_to_repeat": _text}),
    ("combination:two_responses", _two_responses, {}),
    ("startend:quotation", _quotation, {}),
    ("startend:end_checker", _end_checker, {"end_phrase": _text}),
    ("change_case:english_lowercase", _english_lowercase, {}),
    ("change_case:english_capital", _english_capital, {}),
    ("change_case:capital_word_frequency", _capital_word_frequency,
     {"capital_frequency": _count, "capital_relation": _relation}),
    ("language:response_language", _response_language, {"language": _text}),
    ("detectable_content:number_placeholders", _number_placeholders, {"num_placeholders": _count}),
    ("detectable_content:postscript", _postscript, {"postscript_marker": _regex}),
)  # fmt: skip


def _instruction(instruction_id: Any) -> Instruction:
    if instruction_id not in INSTRUCTION_TYPES:
        raise AlignkitError(
            f"unknown IFEval instruction '{instruction_id}'",
            fix="use one of IFEval's 25 ids: " + ", ".join(INSTRUCTION_TYPES),
        )
    return INSTRUCTION_TYPES[instruction_id]


# --------------------------------------------------------------------------------------------------------------
# Following a prompt's instructions


def loose_variants(response: str) -> list[str]:
    """The eight texts loose mode checks: the response, without its first/last/both lines, each also without `*`."""
    lines = response.split("\n")
    trimmed = [response] + ["\n".join(part).strip() for part in (lines[1:], lines[:-1], lines[1:-1])]
    return trimmed + [text.replace("*", "") for text in trimmed]


def follow_instructions(
    response: str, instruction_ids: Sequence[str], kwargs: Sequence[Mapping[str, Any]], *, loose: bool = False
) -> list[bool]:
    """For each instruction, whether `response` follows it (IFEval's strict mode, or `loose`).

    `kwargs[i]` holds the arguments of `instruction_ids[i]` under the benchmark's names. An unknown id or a
    missing or ill-typed argument raises `AlignkitError`; an empty or whitespace-only response, or variant in
    loose mode, follows nothing.
    """
    if isinstance(instruction_ids, str) or len(instruction_ids) != len(kwargs):
        raise AlignkitError(
            f"IFEval needs one kwargs dict per instruction id; got {len(kwargs)} kwargs for "
            f"{1 if isinstance(instruction_ids, str) else len(instruction_ids)} ids",
            fix="pass instruction_ids as a list, with {} for an instruction without arguments",
        )
    # every instruction is parsed before any is checked, so a bad one fails whatever the response
    instructions = map(_instruction, instruction_ids)
    checks = [(instruction.rule, instruction.parse(given)) for instruction, given in zip(instructions, kwargs)]
    candidates = [text for text in (loose_variants(response) if loose else [response]) if text.strip()]
    return [any(rule(text, **arguments) for text in candidates) for rule, arguments in checks]


_REFERENCE_FIX = (
    'give each prompt its instructions as the reference: the JSON {"instruction_id_list": [...], "kwargs": [...]} '
    "(loading an IFEval row, e.g. alignkit/resources/ifeval_541.jsonl, makes it from the row's fields)"
)


def parse_reference(reference: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The instruction ids and kwargs of a reference `{"instruction_id_list": [...], "kwargs": [...]}`."""
    try:
        parsed = json.loads(reference)
    except (TypeError, ValueError):
        parsed = None
    ids = parsed.get("instruction_id_list") if isinstance(parsed, dict) else None
    kwargs = parsed.get("kwargs") if isinstance(parsed, dict) else None
    if not (isinstance(ids, list) and ids and isinstance(kwargs, list) and len(kwargs) == len(ids)):
        shown = reference if len(str(reference)) <= 80 else str(reference)[:77] + "..."
        raise AlignkitError(
            f"an IFEval reference must be JSON with lists 'instruction_id_list' and 'kwargs' of one equal, non-zero "
            f"length; got {shown!r}",
            fix=_REFERENCE_FIX,
        )
    return ids, kwargs


class IFEvalScorer(CheckedScorer):
    """The fraction of a prompt's IFEval instructions a completion follows, or (`all_or_nothing`) 1.0 only if
    it follows all of them; `loose` uses IFEval's loose mode. References: `parse_reference`'s JSON."""

    needs_references = True

    def __init__(self, *, all_or_nothing: bool = False, loose: bool = False, name: str | None = None):
        self.all_or_nothing, self.loose = all_or_nothing, loose
        self.name = name or ("ifeval_all" if all_or_nothing else "ifeval") + (":loose" if loose else "")

    def raw_scores(self, prompts, completions, references):
        scores = []
        for completion, reference in zip(completions, references):
            followed = follow_instructions(completion, *parse_reference(reference), loose=self.loose)
            scores.append(float(all(followed)) if self.all_or_nothing else sum(followed) / len(followed))
        return scores
