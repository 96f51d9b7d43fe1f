"""Judging prompts: rubric templates with `{prompt}`, `{answer_a}`, `{answer_b}` (and `{principle}`) slots.

A template is plain text. The built-in rubrics (`helpfulness`, `harmlessness`, `honesty`, and `principle`
for constitutional preference labels) are files in `alignkit/judge/rubrics/`; `--template FILE` gives your
own. Placeholders follow `str.format`: `{name}` is a slot and `{{` / `}}` are literal braces. Unlike
`str.format`, filling is one pass over the template, so braces inside a prompt or an answer (code, JSON,
LaTeX) are copied as they are and never read as slots, and a slot name the template does not know is an
error that names the template, not a `KeyError` at the first pair.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from alignkit.data.records import Prompt
from alignkit.errors import AlignkitError
from alignkit.io import read_utf8

RUBRICS_DIR = Path(__file__).parent / "rubrics"
RUBRICS = ("helpfulness", "harmlessness", "honesty", "principle")
SLOTS = ("prompt", "answer_a", "answer_b", "principle")
REQUIRED_SLOTS = ("prompt", "answer_a", "answer_b")

# `{{` and `}}` are escapes; `{name}` is a slot. A lone brace that starts no slot (`{ "a": 1 }`) stays text.
_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Template:
    """A judging prompt with slots; `render` fills them in one pass (inputs are never re-read as slots)."""

    text: str
    name: str
    """the rubric name, or the file the template came from"""

    @property
    def slots(self) -> set[str]:
        return {m[1] for m in _TOKEN.finditer(self.text) if m[1]}

    @property
    def digest(self) -> str:
        """A short hash of the text: a rerun that continues an output file must use the same prompt."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]

    def render(self, **values: str) -> str:
        def fill(match: re.Match) -> str:
            if match[0] == "{{":
                return "{"
            if match[0] == "}}":
                return "}"
            return values[match[1]]

        return _TOKEN.sub(fill, self.text)


def load_template(spec: str, *, needs_principle: bool = False) -> Template:
    """A built-in rubric by name, or a template file by path; the slots are checked here, once."""
    if spec in RUBRICS:
        path, name = RUBRICS_DIR / f"{spec}.txt", spec
    else:
        path, name = Path(spec), spec
        if not path.is_file():
            raise AlignkitError(
                f"no template '{spec}': not a built-in rubric and not a file",
                fix=f"use one of {', '.join(RUBRICS)} or the path of a text file with {{prompt}}, {{answer_a}} and {{answer_b}}",
            )
    template = Template(read_utf8(path), name)
    check_template(template, needs_principle=needs_principle)
    return template


def check_template(template: Template, *, needs_principle: bool = False) -> None:
    unknown = sorted(template.slots - set(SLOTS))
    if unknown:
        raise AlignkitError(
            f"template uses unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}",
            where=template.name,
            fix="the placeholders are {prompt}, {answer_a}, {answer_b} and {principle}; write {{ and }} for literal braces",
        )
    missing = [s for s in REQUIRED_SLOTS + (("principle",) if needs_principle else ()) if s not in template.slots]
    if missing:
        raise AlignkitError(
            f"template has no {', '.join('{' + m + '}' for m in missing)} placeholder",
            where=template.name,
            fix="a judging template shows the request and both answers: {prompt}, {answer_a}, {answer_b}"
            + (" (and {principle} when judging by a constitution)" if needs_principle else ""),
        )


def prompt_text(prompt: Prompt) -> str:
    """The request as the judge reads it: the user's text, or the whole dialogue turn by turn."""
    if len(prompt) == 1 and prompt[0].role == "user":
        return prompt[0].content
    return "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in prompt)


def shorten(text: str, max_chars: int) -> str:
    """Cut an answer to `max_chars` characters (0: no limit), marking the cut so the judge can see it."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    return text[:max_chars] + " [...]"
