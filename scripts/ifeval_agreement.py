"""Compare alignkit's IFEval checks (`alignkit.rewards.ifeval`) with the reference implementation.

A developer tool, not a test: it needs the reference code and its dependencies, which alignkit does not
depend on. Every distinct instruction of IFEval's 541 prompts (id + kwargs) is checked, in strict and in loose
mode, on real responses (the shipped AlpacaEval pairs and SFT answers) and on variants of them made to pass
instructions (lowercased, uppercased, without commas, quoted, JSON-wrapped, with a postscript, split by `***`,
cut to N words, ...), so that both outcomes occur for every type. It prints the checks and disagreements per
type, and the first disagreements in full. Before that it checks the shipped Punkt tables against NLTK's, and
the sentences and capital-word counts of every text and variant against NLTK's own.

Setup (the reference: lm-evaluation-harness's `lm_eval/tasks/ifeval`, or a folder holding google-research's
`instruction_following_eval`; NLTK 3.9.1, the version alignkit matches, with its `punkt_tab` English model
under $NLTK_DATA, from `nltk.download("punkt_tab")` where the network allows):

    python3 -m venv /tmp/ifeval-ref
    /tmp/ifeval-ref/bin/pip install --no-deps lm-eval
    /tmp/ifeval-ref/bin/pip install langdetect nltk==3.9.1 immutabledict absl-py
    NLTK_DATA=/path/to/nltk_data .venv/bin/python scripts/ifeval_agreement.py \\
        /tmp/ifeval-ref/lib/python3.11/site-packages/lm_eval/tasks/ifeval \\
        --site-packages /tmp/ifeval-ref/lib/python3.11/site-packages

The reference runs in this process (alignkit needs torch, the reference venv need not have it): its folder is
imported as a package of its own, and `--site-packages` (appended to sys.path) supplies NLTK and friends.
Both sides use langdetect with seed 0. Sentence splits, word tokens and language verdicts are memoised by
text on both sides (they are pure), so each distinct text is analysed once per side.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import random
import re
import sys
import types
from collections import Counter, defaultdict
from pathlib import Path

from alignkit.rewards import ifeval

RESOURCES = Path(ifeval.__file__).resolve().parents[1] / "resources"

# A few sentences in other languages, so that `language:response_language` is also followed now and then.
FOREIGN = (
    "Das Wetter ist heute schön, und wir gehen am Nachmittag im Park spazieren.",
    "El desayuno es la comida más importante del día, según mi abuela.",
    "Eu gosto muito de ler livros antigos nas tardes de domingo.",
    "Nous avons visité le musée hier et nous avons beaucoup appris sur l'histoire.",
    "Мы живём в большом городе, и летом мы часто ездим на море.",
    "Ние обичаме да пътуваме из планините през лятото.",
    "मुझे सुबह जल्दी उठकर चाय पीना बहुत पसंद है।",
    "저는 주말마다 친구들과 함께 공원에서 산책을 합니다.",
    "Tôi thích đọc sách vào buổi tối sau khi làm việc xong.",
    "Ninapenda kusoma vitabu na kunywa chai asubuhi.",
    "من هر روز صبح قبل از کار کمی ورزش می‌کنم.",
    "Pidän kovasti kahvista ja pitkistä kävelyretkistä metsässä.",
)


def base_texts() -> list[str]:
    """Real responses: both answers of each shipped AlpacaEval pair and each shipped SFT answer."""
    texts = []
    for line in (RESOURCES / "prefs_alpacaeval_train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["chosen"], row["rejected"]]
    for line in (RESOURCES / "sft_instructions.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["output"])
    return [t for t in dict.fromkeys(texts) if t.strip()]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def generic_variants(text: str) -> list[str]:
    """The text and transformations of it that make one instruction type or another pass (or just fail)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    sentences = _sentences(text)
    half = max(1, len(paragraphs) // 2)
    first_line = text.strip().split("\n")[0][:40]
    return [
        text,
        text.lower(),
        text.upper(),
        text.replace(",", ""),
        f'"{text}"',
        json.dumps({"response": text}),
        "```json\n" + json.dumps({"response": text}, indent=2) + "\n```",
        f"{text}\n\nP.S. Thanks for reading.",
        f"{text}\n\np. p. s: one more thing.",
        "\n***\n".join(paragraphs),
        "***\n" + "\n\n***\n\n".join(paragraphs) + "\n***",
        "Sure, here it is:\n" + text,
        "Sure, here it is:\n" + text.lower() + "\nHope it helps!",
        text.replace("*", ""),
        re.sub(r"\b(\w+ \w+)\b", r"*\1*", text, count=3),
        re.sub(r"\b(\w+)\b", r"**\1**", text, count=2),
        f"<<{first_line}>>\n{text}",
        f"{text}\nMy answer is yes.",
        "\n\n".join(paragraphs[:half]) + "\n******\n" + "\n\n".join(paragraphs[half:]),
        "\n".join(f"SECTION {i}\n{p}" for i, p in enumerate(paragraphs, 1)),
        "\n".join(f"Section {i}: {p}" for i, p in enumerate(paragraphs, 1)),
        f"{text} [name] and [address]",
        " ".join(sentences[:3]),
        " ".join(text.split()[:40]),
        "\n".join(f"* {s}" for s in sentences[:4]),
        "\n".join(f"- {s}" for s in sentences[:3]) + "\n---",
    ]


def targeted_variants(instruction_id: str, kwargs: dict, text: str) -> list[str]:
    """Variants built from the instruction's own arguments, at and around its thresholds."""
    k = kwargs
    words = text.split()
    if instruction_id == "combination:repeat_prompt":
        return [f"{k['prompt_to_repeat']}\n{text}", f"{k['prompt_to_repeat'].upper()} {text}"]
    if instruction_id == "startend:end_checker":
        return [f"{text}\n{k['end_phrase']}", f'"{text} {k["end_phrase"]}"', f"{text} {k['end_phrase']}."]
    if instruction_id == "length_constraints:nth_paragraph_first_word":
        n, nth, word = k["num_paragraphs"], k["nth_paragraph"], k["first_word"]
        chunks = (_sentences(text) * n)[: n + 1] or ["Filler."]
        out = []
        for count, opener in ((n, word.capitalize()), (n, f'"{word},'), (n + 1, word), (n, "Also")):
            paragraphs = [chunks[i % len(chunks)] for i in range(count)]
            paragraphs[nth - 1] = f"{opener} {paragraphs[nth - 1]}"
            out += ["\n\n".join(paragraphs), "\n\n\n\n".join(paragraphs)]
        return out
    if instruction_id == "keywords:existence":
        return [f"{text} {' '.join(k['keywords'])}", f"{text} {k['keywords'][0].upper()}"]
    if instruction_id == "keywords:forbidden_words":
        pattern = "|".join(re.escape(w) for w in k["forbidden_words"])
        return [re.sub(rf"\b(?:{pattern})\b", "", text, flags=re.IGNORECASE), f"{text} {k['forbidden_words'][0]}s"]
    if instruction_id == "keywords:frequency":
        f = k["frequency"]
        return [f"{text} {' '.join([k['keyword']] * f)}", " ".join([k["keyword"].title()] * max(f - 1, 0)) + " end"]
    if instruction_id == "keywords:letter_frequency":
        f = k["let_frequency"]
        stripped = re.sub(re.escape(k["letter"]), "", text, flags=re.IGNORECASE)
        return [stripped + k["letter"] * f, stripped + k["letter"].upper() * (f - 1), stripped]
    if instruction_id == "length_constraints:number_words":
        n = k["num_words"]
        padded = (words * (n // max(len(words), 1) + 2))[: n + 1]
        return [" ".join(padded[:n]), " ".join(padded[: n - 1]), " ".join(padded[: n + 1])]
    if instruction_id == "length_constraints:number_sentences":
        n = k["num_sentences"]
        return [" ".join(f"This is sentence number {i}." for i in range(count)) for count in (n - 1, n, n + 1)]
    if instruction_id == "length_constraints:number_paragraphs":
        n = k["num_paragraphs"]
        parts = (_sentences(text) * n)[:n] or ["Filler."]
        return ["\n***\n".join(parts), "\n\n***\n\n".join(parts[:-1]), "***\n" + " *** ".join(parts) + "\n***"]
    if instruction_id == "detectable_format:number_highlighted_sections":
        n = k["num_highlights"]
        return [text + " *key point*" * n, text + " **bold one**" * (n - 1), text + " *  *" * n]
    if instruction_id == "detectable_format:number_bullet_lists":
        n = k["num_bullets"]
        return ["\n".join(f"* item {i}" for i in range(n)), "\n".join(f"- item {i}" for i in range(n + 1))]
    if instruction_id == "detectable_format:multiple_sections":
        n, splitter = k["num_sections"], k["section_spliter"]
        return ["\n".join(f"{splitter} {i}\nText {i}." for i in range(1, count + 1)) for count in (n - 1, n)]
    if instruction_id == "detectable_content:number_placeholders":
        n = k["num_placeholders"]
        return [text + " [x]" * n, text + " [y]" * (n - 1)]
    if instruction_id == "change_case:capital_word_frequency":
        n = k["capital_frequency"]
        return [text + " WORD" * n, text.lower() + " DON'T" * max(n // 2, 1), text.lower() + " CANNOT STOP" * (n - 1)]
    if instruction_id == "detectable_content:postscript":
        return [f"{text}\n\n{k['postscript_marker']} note", f"{text}\nP. S. note"]
    if instruction_id == "language:response_language":
        return [*FOREIGN, "12345 67890 !!!"]
    return []


class Reference:
    """The reference implementation in `folder` (lm-evaluation-harness's `lm_eval/tasks/ifeval`, or a copy of
    google-research's `instruction_following_eval`), imported under its own package name."""

    def __init__(self, folder: Path):
        for package in ("lm_eval", "lm_eval.tasks", "lm_eval.tasks.ifeval", "instruction_following_eval"):
            module = types.ModuleType(package)
            module.__path__ = [str(folder)] if package.endswith(("ifeval", "following_eval")) else []
            sys.modules[package] = module
        name = "lm_eval.tasks.ifeval" if (folder / "utils.py").exists() else "instruction_following_eval"
        self.util = importlib.import_module(f"{name}.instructions_util")
        self.registry = importlib.import_module(f"{name}.instructions_registry").INSTRUCTION_DICT
        if (folder / "utils.py").exists():
            lib = importlib.import_module(f"{name}.utils")
            self._strict, self._loose = lib.test_instruction_following_strict, lib.test_instruction_following_loose
            self._example, self._by_prompt = lib.InputExample, False
        else:
            lib = importlib.import_module(f"{name}.evaluation_lib")
            self._strict, self._loose = lib.test_instruction_following_strict, lib.test_instruction_following_loose
            self._example, self._by_prompt = lib.InputExample, True

    def follows(self, instruction_id: str, kwargs: dict, response: str, *, loose: bool) -> bool:
        example = self._example(key=0, instruction_id_list=[instruction_id], prompt="", kwargs=[kwargs])
        test = self._loose if loose else self._strict
        return test(example, {"": response} if self._by_prompt else response).follow_instruction_list[0]

    def randomises(self, instruction_id: str, kwargs: dict) -> bool:
        """Whether the reference replaces a given argument by a random one (lm-evaluation-harness draws a random
        letter for `letter_frequency` when the letter is not in a-z)."""
        instruction = self.registry[instruction_id](instruction_id)
        instruction.build_description(**kwargs)
        args = instruction.get_instruction_args() or {}
        return "letter" in kwargs and args.get("letter") != kwargs["letter"].strip().lower()


def memoise_pure_functions(reference: Reference) -> None:
    """Cache sentence splits, word tokens and language verdicts by text on both sides (see the docstring)."""
    import langdetect
    import nltk

    ifeval.split_sentences = functools.lru_cache(maxsize=None)(ifeval.split_sentences)
    ifeval._is_language = functools.lru_cache(maxsize=None)(ifeval._is_language)
    reference.util.count_sentences = functools.lru_cache(maxsize=None)(reference.util.count_sentences)
    word_tokenize = functools.lru_cache(maxsize=None)(nltk.word_tokenize)
    reference.util.nltk = types.SimpleNamespace(**{**vars(nltk), "word_tokenize": lambda t: list(word_tokenize(t))})
    langdetect.DetectorFactory.seed = 0
    detect = functools.lru_cache(maxsize=None)(langdetect.detect)
    for module in sys.modules.values():
        if getattr(module, "langdetect", None) is langdetect and module.__name__.endswith(".instructions"):
            module.langdetect = types.SimpleNamespace(detect=detect, LangDetectException=langdetect.LangDetectException)


def check_punkt_tables() -> None:
    """The shipped Punkt tables against NLTK's English model (types never seen lower-case are left out)."""
    from nltk.tokenize.punkt import PunktTokenizer

    theirs, ours = PunktTokenizer("english")._params, ifeval._punkt_english()
    lower = {t: f for t, f in theirs.ortho_context.items() if f & ifeval._ORTHO_LC}
    same = (
        set(theirs.abbrev_types) == ours.abbreviations
        and {tuple(c) for c in theirs.collocations} == ours.collocations
        and set(theirs.sent_starters) == ours.sentence_starters
        and lower == dict(ours.orthography)
    )
    print(f"Punkt tables: {'identical to' if same else 'DIFFERENT FROM'} NLTK's punkt_tab/english")


def check_tokenizers(texts: list[str]) -> None:
    """Sentences and capital-word counts of every text against NLTK's own (not just the instructions' verdicts)."""
    import nltk

    sentences = [t for t in texts if ifeval.split_sentences(t) != nltk.sent_tokenize(t)]
    capitals = [t for t in texts if ifeval._capital_words(t) != sum(w.isupper() for w in nltk.word_tokenize(t))]
    print(f"{len(texts)} texts: {len(sentences)} split into other sentences than NLTK's, "
          f"{len(capitals)} with another count of words in capitals")
    for text in (sentences + capitals)[:5]:
        print(f"  {text[:300]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path, help="folder of the reference's instructions*.py")
    parser.add_argument("--site-packages", type=Path, help="where NLTK, immutabledict and absl are (appended)")
    parser.add_argument("--texts", type=int, default=40, help="real responses per instruction (more: slower)")
    parser.add_argument("--show", type=int, default=10, help="disagreements to print in full")
    args = parser.parse_args()
    if args.site_packages:
        sys.path.append(str(args.site_packages))
    logging.disable(logging.CRITICAL)  # the reference logs an error for each text langdetect cannot tell
    reference = Reference(args.reference.resolve())
    memoise_pure_functions(reference)
    check_punkt_tables()

    rows = [json.loads(line) for line in (RESOURCES / "ifeval_541.jsonl").read_text(encoding="utf-8").splitlines()]
    instructions = {}
    for row in rows:
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            instructions[(instruction_id, json.dumps(kwargs, sort_keys=True))] = kwargs
    texts = base_texts()
    sample = random.Random(0).sample(texts, min(args.texts, len(texts)))  # the same for every instruction
    variants = {text: generic_variants(text) for text in sample}
    check_tokenizers(sorted({v for text in texts for v in generic_variants(text)}))

    checks: Counter = Counter()
    followed: Counter = Counter()
    disagree: dict[str, list] = defaultdict(list)
    skipped: Counter = Counter()
    for (instruction_id, _), kwargs in sorted(instructions.items()):
        if reference.randomises(instruction_id, kwargs):
            skipped[instruction_id] += 1
            continue
        responses = {v for text in sample for v in (*variants[text], *targeted_variants(instruction_id, kwargs, text))}
        for response in sorted(responses):
            for loose in (False, True):
                ours = ifeval.follow_instructions(response, [instruction_id], [kwargs], loose=loose)[0]
                theirs = reference.follows(instruction_id, kwargs, response, loose=loose)
                mode = "loose" if loose else "strict"
                checks[instruction_id, mode] += 1
                followed[instruction_id, mode] += theirs
                if ours != theirs:
                    disagree[mode].append((instruction_id, kwargs, response, ours, theirs))

    print(f"\n{'instruction':<48} {'checks':>7} {'reference follows: strict':>26} {'loose':>6} "
          f"{'disagree: strict':>17} {'loose':>6}")
    for instruction_id in sorted({i for i, _ in checks}):
        n = checks[instruction_id, "strict"]
        strict_bad = sum(1 for d in disagree["strict"] if d[0] == instruction_id)
        loose_bad = sum(1 for d in disagree["loose"] if d[0] == instruction_id)
        print(f"{instruction_id:<48} {n:>7} {followed[instruction_id, 'strict']:>26} "
              f"{followed[instruction_id, 'loose']:>6} {strict_bad:>17} {loose_bad:>6}")
    total = sum(checks[key] for key in checks if key[1] == "strict")
    print(f"{'all (per mode)':<48} {total:>7} {'':>33} {len(disagree['strict']):>17} {len(disagree['loose']):>6}")
    for instruction_id, count in skipped.items():
        print(f"skipped {count} {instruction_id}: the reference draws a random argument for them")
    for mode in ("strict", "loose"):
        for instruction_id, kwargs, response, ours, theirs in disagree[mode][: args.show]:
            print(f"\n[{mode}] {instruction_id} {kwargs}: alignkit {ours}, reference {theirs}\n{response[:400]!r}")


if __name__ == "__main__":
    main()
