"""IFEval (`alignkit.rewards.ifeval`): each of the 25 instruction types on hand-written responses that follow
it and that do not, at the edges of the benchmark's definitions; strict against loose mode; the `ifeval`
rewards; the errors for bad instructions and references; the shipped 541 prompts. Fast: no models, only
langdetect's profiles. (Agreement with the reference implementation on real text: scripts/ifeval_agreement.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.data.loading import InvalidRecord, load_records, parse_prompt, parse_prompt_answer
from alignkit.data.records import user_prompt
from alignkit.errors import AlignkitError
from alignkit.rewards.ifeval import (
    INSTRUCTION_TYPES,
    IFEvalScorer,
    count_sentences,
    count_words,
    follow_instructions,
    loose_variants,
    split_sentences,
)
from alignkit.rewards.verifiers import WeightedSum, build_scorer

IFEVAL_541 = Path(__file__).resolve().parents[1] / "src" / "alignkit" / "resources" / "ifeval_541.jsonl"
END = "Is there anything else I can help with?"
GERMAN = "Das Wetter ist heute schön, und wir gehen am Nachmittag im Park spazieren."
HINDI = "मुझे सुबह जल्दी उठकर चाय पीना बहुत पसंद है।"


def follows(instruction_id: str, response: str, *, loose: bool = False, **kwargs) -> bool:
    return follow_instructions(response, [instruction_id], [kwargs], loose=loose)[0]


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# (instruction id, kwargs, response, followed in strict mode)
CASES = [
    ("punctuation:no_comma", {}, "No commas here. None at all!", True),
    ("punctuation:no_comma", {}, "One, two.", False),
    ("punctuation:no_comma", {}, "一，二", True),  # only the ASCII comma counts
    # a word is a run of \w: "don't" is two, "e-mail" two
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, words(4), True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, words(5), False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, words(5), True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, words(4), False),
    ("length_constraints:number_words", {"num_words": 4, "relation": "at least"}, "Don't send e-mail", True),
    # Punkt: "Mr." is an abbreviation, "1." ends a sentence before a capital, "a.m." before a lower-case word
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two! Three?", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Mr. Smith came. He sat. He left.", True),
    ("length_constraints:number_sentences", {"num_sentences": 4, "relation": "at least"},
     "Mr. Smith came at 9 a.m. today. He sat. He left.", False),
    ("length_constraints:number_sentences", {"num_sentences": 4, "relation": "at least"}, "1. Apples. 2. Pears.", True),
    # paragraphs are split by ***; empty ends do not count, an empty middle fails
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n***\nB\n***\nC", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "***\nA\n***\nB\n***\nC\n***", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n***\nB", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n***\n\n***\nB\n***\nC", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n\nB\n\nC", False),
    # paragraphs are split by a blank line; quotes before and punctuation after the first word are ignored
    *[("length_constraints:nth_paragraph_first_word",
       {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "bonding"}, response, expected)
      for response, expected in [
        ("Intro.\n\nBonding matters.\n\nEnd.", True),
        ('Intro.\n\n"Bonding," she said.\n\nEnd.', True),
        ("Intro.\n\n'Bonding' is key.\n\nEnd.", True),
        ("Intro.\n\nBondings matter.\n\nEnd.", False),
        ("Intro.\n\nBonding: a guide.\n\nEnd.", False),  # ":" is not among the stripped marks
        ("Intro.\n\nBonding matters.\n\nMore.\n\nEnd.", False),  # four paragraphs
        ("Intro.\n\n\n\nBonding matters.\n\nEnd.", False),  # the 2nd part of the split is the empty one
    ]],
    # forbidden words must stand alone; keywords match anywhere (they are regular expressions)
    ("keywords:forbidden_words", {"forbidden_words": ["rock", "night"]}, "Rocks and rocky roads at nightfall.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["rock", "night"]}, "I like ROCK music.", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "The cat saw a Cat.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "A cat in a category.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "The cat saw a dog.", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "One cat.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "Cat and cat.", False),
    ("keywords:existence", {"keywords": ["mom", "mother"]}, "My MOM and my mother.", True),
    ("keywords:existence", {"keywords": ["mom", "mother"]}, "A grandmother and her mommy.", True),
    ("keywords:existence", {"keywords": ["mom", "mother"]}, "My mom.", False),
    # letters are counted regardless of case; IFEval also asks for "#" and "!"
    ("keywords:letter_frequency", {"letter": "q", "let_frequency": 2, "let_relation": "at least"}, "Quiet queen", True),
    ("keywords:letter_frequency", {"letter": "q", "let_frequency": 2, "let_relation": "at least"}, "Quiet", False),
    ("keywords:letter_frequency", {"letter": "q", "let_frequency": 2, "let_relation": "less than"}, "Quiet", True),
    ("keywords:letter_frequency", {"letter": "q", "let_frequency": 2, "let_relation": "less than"}, "Quick qi", False),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 3, "let_relation": "at least"}, "### Title", True),
    # a highlight is *text* or **text** on one line, with something in it
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** and *it*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **  **", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two\nlines*", False),
    ("detectable_format:title", {}, "<<Poem of Joy>>\nRoses are red.", True),
    ("detectable_format:title", {}, "<<  >>\nRoses are red.", False),
    ("detectable_format:title", {}, "<<Poem\nof Joy>>", False),
    ("detectable_format:title", {}, "<Poem of Joy>", False),
    # exactly N lines starting with "*" (not "**") or "-"; a "---" rule counts too
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Intro:\n  - a\n  - b\nDone.", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**Bold**\n* a\n* b", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b\n* c", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b\n---", False),
    ("detectable_format:json_format", {}, '{"a": 1}', True),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, "```JSON\n[1, 2]\n```", True),
    ("detectable_format:json_format", {}, 'Here it is: {"a": 1}', False),
    ("detectable_format:json_format", {}, '{"a": 1,}', False),
    # the splitter is case-sensitive and needs a number after it
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nA\nSECTION 2\nB", True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "Section 1\nA\nSection 2\nB", False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nA\nSECTION two\nB", False),
    ("detectable_format:constrained_response", {}, "My answer is maybe. It depends.", True),
    ("detectable_format:constrained_response", {}, "my answer is yes.", False),
    ("detectable_format:constrained_response", {}, "My answer is Yes", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "  write a POEM. Roses are red.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure! Write a poem.", False),
    # two different answers separated by exactly ******, nothing empty between separators
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True),
    ("combination:two_responses", {}, "******\nAnswer one.\n******\nAnswer two.\n******", True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False),
    ("combination:two_responses", {}, "A\n******\nB\n******\nC", False),
    ("combination:two_responses", {}, "A\n******\n\n******\nB", False),
    ("combination:two_responses", {}, "A\n***\nB", False),
    ("startend:quotation", {}, '  "Hello there."\n', True),
    ("startend:quotation", {}, '"', False),
    ("startend:quotation", {}, "“Curly quotes”", False),
    ("startend:end_checker", {"end_phrase": END}, f"Here you go. {END}", True),
    ("startend:end_checker", {"end_phrase": END}, f'"Here you go. {END.upper()}"', True),
    ("startend:end_checker", {"end_phrase": END}, f"Here you go. {END} Thanks.", False),
    ("change_case:english_lowercase", {}, "the quick brown fox jumps over the lazy dog near the river.", True),
    ("change_case:english_lowercase", {}, "The quick brown fox jumps over the lazy dog near the river.", False),
    ("change_case:english_lowercase", {}, GERMAN.lower(), False),
    ("change_case:english_capital", {}, "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG NEAR THE RIVER.", True),
    ("change_case:english_capital", {}, "THE QUICK BROWN FOX JUMPS OVER THE LAZY dog.", False),
    ("change_case:english_capital", {}, GERMAN.upper(), False),
    # words in capitals are NLTK's tokens: "DON'T" is "DO" + "N'T", "CANNOT" is "CAN" + "NOT", "U.S." is one
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "I LOVE NEW York", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "Please DON'T go to the U.S. now.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "A well-KNOWN FACT.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Only ONE here.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "You CANNOT.", False),
    ("language:response_language", {"language": "de"}, GERMAN, True),
    ("language:response_language", {"language": "hi"}, HINDI, True),
    ("language:response_language", {"language": "de"}, "The weather is nice today, so we walk in the park.", False),
    ("language:response_language", {"language": "de"}, "12345 !!!", True),  # langdetect cannot tell
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[a][]", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you [at\nhome].", False),
    # "P.S." and "P.P.S" anywhere, in any case, with or without a space after each full stop
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Text.\n\nP.S. Call me.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Text. p. s. call me.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Text.\nPS call me.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Text.\nP.P.S. One more thing.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Text.\np. p. s one more thing.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Text.\nP.S. One more thing.", False),
]  # fmt: skip


@pytest.mark.parametrize(("instruction_id", "kwargs", "response", "expected"), CASES)
def test_each_instruction_type_on_responses_that_follow_it_and_that_do_not(instruction_id, kwargs, response, expected):
    assert follows(instruction_id, response, **kwargs) is expected
    assert INSTRUCTION_TYPES[instruction_id](response, kwargs) is expected


def test_every_type_has_a_case_that_follows_it_and_one_that_does_not():
    assert len(INSTRUCTION_TYPES) == 25
    for expected in (True, False):
        assert {case[0] for case in CASES if case[3] is expected} == set(INSTRUCTION_TYPES)


def test_sentences_and_words_are_nltks():
    # nltk.sent_tokenize's answers (NLTK 3.9.1, punkt_tab English): abbreviations, initials, a numbered list,
    # an ellipsis, closing brackets and quotes realigned onto their sentence
    assert split_sentences("Mr. Smith went to Washington. He arrived at 5 p.m. on Monday. 1. First. 2. Second.") == [
        "Mr. Smith went to Washington.", "He arrived at 5 p.m. on Monday.", "1.", "First.", "2.", "Second."
    ]  # fmt: skip
    assert split_sentences('(It rained.) Then "Stop." he said. J. S. Bach wrote it...  ') == [
        "(It rained.)", 'Then "Stop."', "he said.", "J. S. Bach wrote it..."
    ]  # fmt: skip
    assert count_sentences("") == 0 and count_sentences("no end mark") == 1
    assert count_words("It's a well-known fact_1!") == 6


def test_strict_and_loose_mode():
    reply = "Sure, here it is:\nthe whole answer is in lower case letters from here to the end."
    assert follow_instructions(reply, ["change_case:english_lowercase"], [{}]) == [False]
    assert follow_instructions(reply, ["change_case:english_lowercase"], [{}], loose=True) == [True]
    # markdown emphasis: the loose variants drop every "*"
    bold_end = f"Here you go.\n**{END}**"
    assert not follows("startend:end_checker", bold_end, end_phrase=END)
    assert follows("startend:end_checker", bold_end, end_phrase=END, loose=True)
    # a request repeated after a first line of chatter
    chatty = "Sure!\nWrite a poem. Roses are red."
    assert not follows("combination:repeat_prompt", chatty, prompt_to_repeat="Write a poem.")
    assert follows("combination:repeat_prompt", chatty, prompt_to_repeat="Write a poem.", loose=True)
    assert follows("punctuation:no_comma", "one, two\nthree", loose=True)  # the comma was in the first line
    assert not follows("punctuation:no_comma", "one\ntwo, three\nfour", loose=True)  # every variant keeps it
    assert loose_variants("a\n*b*\nc") == ["a\n*b*\nc", "*b*\nc", "a\n*b*", "*b*", "a\nb\nc", "b\nc", "a\nb", "b"]


def test_an_empty_response_follows_nothing():
    ids = list(INSTRUCTION_TYPES)
    kwargs = [dict(next(c[1] for c in CASES if c[0] == i)) for i in ids]
    assert INSTRUCTION_TYPES["punctuation:no_comma"]("", {}) is True  # the rule alone passes
    for empty in ("", "  \n\t"):
        assert follow_instructions(empty, ids, kwargs) == [False] * 25
        assert follow_instructions(empty, ids, kwargs, loose=True) == [False] * 25
    # in loose mode an empty variant is skipped too: a one-line reply without its line is nothing
    assert not follows("punctuation:no_comma", "a, b", loose=True)


def reference(*instructions: tuple[str, dict]) -> str:
    return json.dumps({"instruction_id_list": [i for i, _ in instructions], "kwargs": [k for _, k in instructions]})


def test_the_ifeval_rewards_score_the_fraction_or_all_of_the_instructions():
    ref = reference(("punctuation:no_comma", {}), ("change_case:english_lowercase", {}))
    replies = [
        "all lower case and no commas in this english sentence here.",  # both
        "Some, Capitals.",  # neither
        "lower case, with a comma in this english sentence.",  # one of the two
    ]
    prompts = [user_prompt("q")] * 3
    assert build_scorer("ifeval").score(prompts, replies, [ref] * 3).tolist() == [1.0, 0.0, 0.5]
    assert build_scorer("ifeval_all").score(prompts, replies, [ref] * 3).tolist() == [1.0, 0.0, 0.0]
    chatty = ["Sure:\nall lower case and no commas in this english sentence here."]
    assert build_scorer("ifeval").score(prompts[:1], chatty, [ref]).tolist() == [0.5]
    assert build_scorer("ifeval:loose").score(prompts[:1], chatty, [ref]).tolist() == [1.0]
    assert build_scorer("ifeval_all:loose").name == "ifeval_all:loose"
    combined = build_scorer("ifeval_all*0.5+ifeval")
    assert isinstance(combined, WeightedSum) and [s.name for s, _ in combined.parts] == ["ifeval_all", "ifeval"]
    assert combined.score(prompts, replies, [ref] * 3).tolist() == [1.5, 0.0, 0.5]
    with pytest.raises(AlignkitError, match="ifeval takes no argument or 'loose'"):
        build_scorer("ifeval:strict")
    with pytest.raises(AlignkitError, match="reference answers"):
        IFEvalScorer().score(prompts[:1], ["x"])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("not json", "must be JSON with lists 'instruction_id_list' and 'kwargs'"),
        ("18", "must be JSON"),
        (json.dumps({"instruction_id_list": ["punctuation:no_comma"], "kwargs": []}), "one equal, non-zero length"),
        (json.dumps({"instruction_id_list": [], "kwargs": []}), "one equal, non-zero length"),
        (reference(("punctuation:no_commas", {})), "unknown IFEval instruction 'punctuation:no_commas'"),
        (reference(("length_constraints:number_words", {"num_words": 5})),
         "'length_constraints:number_words': argument 'relation' is missing"),
        (reference(("length_constraints:number_words", {"num_words": 5, "relation": "at most"})),
         "argument 'relation' must be 'less than' or 'at least', not 'at most'"),
        (reference(("length_constraints:number_words", {"num_words": "5", "relation": "at least"})),
         "argument 'num_words' must be a whole number"),
        (reference(("punctuation:no_comma", {"num_words": 5})),
         "'punctuation:no_comma' takes no argument 'num_words'"),
        (reference(("keywords:existence", {"keywords": ["a(b"]})), "argument 'keywords' is not a valid regular expr"),
        (reference(("length_constraints:nth_paragraph_first_word",
                    {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"})),
         "argument 'nth_paragraph' is 3, outside 1..num_paragraphs"),
    ],
)  # fmt: skip
def test_bad_references_and_instructions_say_what_is_wrong(bad, message):
    with pytest.raises(AlignkitError, match=message.replace("(", r"\(").replace(".", r"\.")) as error:
        build_scorer("ifeval").score([user_prompt("q")], ["reply"], [bad])
    if "JSON" in message or "non-zero length" in message:
        assert "instruction_id_list" in error.value.fix


def test_null_kwargs_count_as_absent_and_ids_must_match_kwargs():
    # the Hugging Face copy of IFEval lists every argument of every type, most of them null
    assert follows("punctuation:no_comma", "a b", num_words=None, relation=None)
    with pytest.raises(AlignkitError, match="one kwargs dict per instruction id"):
        follow_instructions("a", ["punctuation:no_comma", "detectable_format:title"], [{}])


def ifeval_rows() -> list[dict]:
    return [json.loads(line) for line in IFEVAL_541.read_text(encoding="utf-8").splitlines()]


def test_every_shipped_ifeval_instruction_is_known_and_its_kwargs_accepted():
    rows = ifeval_rows()
    assert len(rows) == 541
    for row in rows:
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            INSTRUCTION_TYPES[instruction_id].parse(kwargs)
    assert {i for row in rows for i in row["instruction_id_list"]} == set(INSTRUCTION_TYPES)


def test_ifeval_rows_load_with_their_instructions_as_the_answer(tmp_path):
    row = ifeval_rows()[0]
    answer = json.loads(parse_prompt(row).answer)
    assert answer == {"instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]}
    assert parse_prompt_answer(row).answer == parse_prompt(row).answer
    assert parse_prompt(row).prompt == user_prompt(row["prompt"])
    records, _ = load_records(str(IFEVAL_541), "prompt")
    assert len(records) == 541
    prompts, answers = [r.prompt for r in records[:8]], [r.answer for r in records[:8]]
    scores = build_scorer("ifeval").score(prompts, ["Fine."] * 8, answers)
    assert scores.shape == (8,) and 0.0 <= float(scores.min()) <= float(scores.max()) <= 1.0
    for broken, message in [
        (dict(row, kwargs=row["kwargs"] + [{}]), f"must be a list of {len(row['kwargs'])} objects"),
        (dict(row, kwargs=["x"] * len(row["kwargs"])), "one per instruction id"),
        (dict(row, instruction_id_list=[]), "non-empty list of instruction ids"),
    ]:
        for parse in (parse_prompt, parse_prompt_answer):
            with pytest.raises(InvalidRecord, match=message):
                parse(broken)
