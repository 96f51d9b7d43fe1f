"""Reading records from JSONL, JSON, Parquet or a `datasets` name/directory, with field mapping and validation.

Common layouts are recognised by their field names:
- Alpaca `instruction`/`input`/`output`, `prompt`/`completion` (or `prompt`/`response`), chat `messages`
  -> `Conversation`
- `prompt`/`chosen`/`rejected`, and HH-RLHF dialogues (`\\n\\nHuman: … \\n\\nAssistant: …`) whose shared part
  is split out as the prompt -> `PreferencePair`
- `prompt`/`responses` (best first) -> `Ranking`; `prompt`/`completion`/`label` -> `LabelledCompletion`
- `question`/`final` (GSM8K), `prompt`/`answer` -> `PromptWithAnswer`; `text` -> `PlainText`
- IFEval's `prompt`/`instruction_id_list`/`kwargs` -> `PromptWithAnswer` whose answer is the JSON of the
  instructions, as the `ifeval` reward reads it
A `field_map` renames the user's fields to these names first.

A record that cannot be used is an error naming the file and line; with `skip_invalid=True` it is skipped
and counted instead (the count is reported, never silent).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignkit.data.builtin import builtin_path
from alignkit.data.records import (
    Conversation,
    LabelledCompletion,
    Message,
    PlainText,
    PreferencePair,
    Prompt,
    PromptWithAnswer,
    Ranking,
    Record,
    user_prompt,
)
from alignkit.errors import AlignkitError, DataError
from alignkit.io import not_utf8, read_utf8, utf8

Kind = Literal["conversation", "preference", "ranking", "labelled", "prompt_answer", "text", "prompt", "comparison"]
ROLES = ("system", "user", "assistant")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class InvalidRecord(ValueError):
    """Raised by a parser for one row; the loader adds file and line."""


@dataclass
class LoadReport:
    """What loading kept and what it skipped, by reason."""

    path: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"{self.path}: {self.kept} records"
        if self.skipped:
            text += " (skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) + ")"
        return text


def read_rows(source: str) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, raw row) from a file, a built-in dataset (`builtin:NAME`) or a `datasets` dataset."""
    path = builtin_path(source) or Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
                yield number, row
        else:
            raise AlignkitError(
                f"unsupported data file type '{suffix}'", where=str(path), fix="use .jsonl, .json or .parquet"
            )
        return
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise AlignkitError(
                "directory is not a saved `datasets` dataset", where=str(path), fix="give a .jsonl/.json/.parquet file"
            ) from exc
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        for number, row in enumerate(loaded, start=1):
            yield number, row
        return
    if is_hub_name(source):
        yield from _read_hub_dataset(source)
        return
    raise AlignkitError(f"data file {source} does not exist", fix="check the path (relative paths start from the current directory)")


def strict_rows(source: str) -> Iterator[tuple[int, Any]]:
    """`read_rows` for files that must be whole (the shipped data, a maintainer's inputs): the first row that
    cannot be read stops it, naming its file and line."""
    for number, row in read_rows(source):
        if isinstance(row, InvalidRecord):
            raise DataError(str(row), path=source, line=number)
        yield number, row


def is_hub_name(source: str) -> bool:
    """Whether a data source that is no local file or directory names a dataset on the hub (`org/name[:split]`)."""
    return "/" in source and not source.startswith((".", "/")) and not Path(source).suffix


def _json(text: str) -> Any:
    """`json.loads`, with the JSON that is well formed yet cannot be read (nested deeper than the stack, or an integer
    over 4,300 digits) raised as an InvalidRecord; malformed JSON stays a JSONDecodeError, which says where."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise InvalidRecord("JSON that cannot be read (nested too deeply)") from None
    except ValueError as exc:
        raise InvalidRecord(f"JSON that cannot be read ({str(exc).split(';')[0]})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = utf8(raw)
            except UnicodeDecodeError as exc:
                yield number, InvalidRecord(not_utf8(raw, exc)[1])
                continue
            if not line.strip():
                continue
            try:
                row = _json(line)
            except json.JSONDecodeError as exc:
                row = InvalidRecord(f"malformed JSON ({exc.msg} at column {exc.colno})")
            except InvalidRecord as exc:
                row = exc
            yield number, row


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        loaded = _json(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON ({exc.msg})", path=str(path), line=exc.lineno) from None
    except InvalidRecord as exc:
        # json.loads says neither where nor which record; as JSON Lines, the record's line would be named.
        raise DataError(str(exc), path=str(path), fix="fix the file, or save it as JSON Lines (.jsonl), where --skip-invalid can skip such a record") from None
    if isinstance(loaded, dict) and len(loaded) == 1 and isinstance(next(iter(loaded.values())), list):
        loaded = next(iter(loaded.values()))
    if not isinstance(loaded, list):
        raise DataError("a .json data file must hold a list of records", path=str(path), fix="or use JSON Lines (.jsonl)")
    yield from enumerate(loaded, start=1)


def _read_hub_dataset(name: str) -> Iterator[tuple[int, Any]]:
    import datasets

    dataset_name, _, split = name.partition(":")
    try:
        loaded = datasets.load_dataset(dataset_name, split=split or "train")
    except Exception as exc:  # datasets raises many types for "not found / offline"
        raise AlignkitError(
            f"cannot load dataset '{dataset_name}' ({type(exc).__name__}: {exc})",
            fix="give a local .jsonl/.json/.parquet file or a directory saved with `datasets.save_to_disk`",
        ) from exc
    yield from enumerate(loaded, start=1)


# --- field parsing -------------------------------------------------------------------------------------


def _text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise InvalidRecord(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise InvalidRecord(f"field '{key}' must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidRecord(f"field '{key}' is empty")
    return value


def _messages(value: Any, key: str) -> Prompt:
    if not isinstance(value, list) or not value:
        raise InvalidRecord(f"field '{key}' must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise InvalidRecord(f"{key}[{i}] must be an object with 'role' and 'content'")
        role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(item["role"], item["role"])
        if role not in ROLES:
            raise InvalidRecord(f"{key}[{i}] has role {item['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(item["content"], str):
            raise InvalidRecord(f"{key}[{i}].content must be a string")
        messages.append(Message(role, item["content"]))
    return tuple(messages)


def parse_hh_dialogue(text: str) -> Prompt:
    """Turn `\\n\\nHuman: … \\n\\nAssistant: …` text into messages (a trailing empty Assistant turn is dropped)."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise InvalidRecord("dialogue text does not start with '\\n\\nHuman:'")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append(Message(role, content.strip()))
    if messages and messages[-1].role == "assistant" and not messages[-1].content:
        messages.pop()
    return tuple(messages)


def _prompt(row: dict, key: str = "prompt") -> Prompt:
    if key not in row:
        raise InvalidRecord(f"missing field '{key}'")
    value = row[key]
    if isinstance(value, list):
        return _messages(value, key)
    text = _text(row, key)
    return parse_hh_dialogue(text) if text.startswith("\n\nHuman:") else user_prompt(text)


def _split_hh_pair(chosen: str, rejected: str) -> tuple[Prompt, str, str]:
    """HH-RLHF stores two whole dialogues; the prompt is everything up to the last shared `Assistant:`."""
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0 or rejected[: cut + len(marker)] != chosen[: cut + len(marker)]:
        raise InvalidRecord("chosen and rejected dialogues do not share a prompt ending in '\\n\\nAssistant:'")
    prompt = parse_hh_dialogue(chosen[: cut + len(marker)])
    return prompt, chosen[cut + len(marker) :].strip(), rejected[cut + len(marker) :].strip()


def parse_conversation(row: dict) -> Conversation:
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        if not any(m.role == "assistant" and m.content.strip() for m in messages):
            raise InvalidRecord("'messages' has no non-empty assistant turn to train on")
        return Conversation(messages)
    if "instruction" in row:
        instruction = _text(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise InvalidRecord("field 'input' must be a string")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Conversation((Message("user", user), Message("assistant", _text(row, "output"))))
    if "prompt" in row:
        response_key = next((k for k in ("completion", "response", "output") if k in row), "completion")
        return Conversation(_prompt(row) + (Message("assistant", _text(row, response_key)),))
    raise InvalidRecord(
        "no known conversation fields: expected 'messages', Alpaca 'instruction'/'input'/'output', "
        "or 'prompt'/'completion'"
    )


def parse_preference(row: dict) -> PreferencePair:
    if "chosen" not in row or "rejected" not in row:
        missing = "chosen" if "chosen" not in row else "rejected"
        raise InvalidRecord(f"missing field '{missing}'")
    if "prompt" in row:
        prompt = _prompt(row)
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    else:
        prompt, chosen, rejected = _split_hh_pair(_text(row, "chosen"), _text(row, "rejected"))
        if not chosen.strip() or not rejected.strip():
            raise InvalidRecord("a response after the shared prompt is empty")
    if chosen.strip() == rejected.strip():
        raise InvalidRecord("chosen and rejected responses are identical, so the pair teaches nothing")
    margin = row.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise InvalidRecord("field 'margin' must be a number")
    return PreferencePair(prompt, chosen, rejected, None if margin is None else float(margin))


def parse_ranking(row: dict) -> Ranking:
    responses = row.get("responses", row.get("completions"))
    if not isinstance(responses, list):
        raise InvalidRecord("missing list field 'responses' (answers best first)")
    if len(responses) < 2:
        raise InvalidRecord(f"a ranking needs at least two answers, this one has {len(responses)}")
    if not all(isinstance(r, str) and r.strip() for r in responses):
        raise InvalidRecord("every ranked answer must be a non-empty string")
    if len({r.strip() for r in responses}) < len(responses):
        raise InvalidRecord("a ranking holds the same answer twice")
    return Ranking(_prompt(row), tuple(responses))


def parse_labelled(row: dict) -> LabelledCompletion:
    label = row.get("label", row.get("desirable"))
    if not isinstance(label, bool):
        raise InvalidRecord("field 'label' must be true (desirable) or false (undesirable)")
    return LabelledCompletion(_prompt(row), _text(row, "completion"), label)


def _ifeval_answer(row: dict) -> str:
    """An IFEval row's instructions as the JSON reference answer that the `ifeval` reward reads."""
    ids, kwargs = row["instruction_id_list"], row.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise InvalidRecord("field 'instruction_id_list' must be a non-empty list of instruction ids")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise InvalidRecord(
            f"field 'kwargs' must be a list of {len(ids)} objects, one per instruction id ({{}} for none)"
        )
    return json.dumps({"instruction_id_list": ids, "kwargs": kwargs})


def parse_prompt_answer(row: dict) -> PromptWithAnswer:
    if "instruction_id_list" in row:
        return PromptWithAnswer(_prompt(row), _ifeval_answer(row))
    if "question" in row:
        answer = row.get("final", row.get("answer"))
        return PromptWithAnswer(user_prompt(_text(row, "question")), _text({"answer": answer}, "answer"))
    return PromptWithAnswer(_prompt(row), _text(row, "answer"))


def parse_prompt(row: dict) -> PromptWithAnswer:
    """Any row that holds a prompt, for generation; a reference answer is kept when there is one."""
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        prompt = messages[:-1] if messages[-1].role == "assistant" else messages
        if not prompt:
            raise InvalidRecord("'messages' holds only an assistant reply, no prompt")
        return PromptWithAnswer(prompt, "")
    if "instruction" in row:
        return PromptWithAnswer(parse_conversation(dict(row, output=row.get("output") or "-")).messages[:-1], "")
    if "question" in row:
        return PromptWithAnswer(user_prompt(_text(row, "question")), str(row.get("final", row.get("answer", ""))))
    if "prompt" in row:
        if "instruction_id_list" in row:
            return PromptWithAnswer(_prompt(row), _ifeval_answer(row))
        answer = row.get("answer", row.get("final", ""))
        return PromptWithAnswer(_prompt(row), answer if isinstance(answer, str) else str(answer))
    raise InvalidRecord("no prompt field: expected 'prompt', 'instruction', 'question' or 'messages'")


def parse_comparison(row: dict) -> PreferencePair | Ranking:
    """A preference pair or a K-way ranking, whichever the row holds (reward-model data may mix both)."""
    return parse_ranking(row) if "responses" in row or "completions" in row else parse_preference(row)


def parse_text(row: dict) -> PlainText:
    return PlainText(_text(row, "text"))


PARSERS: dict[str, Callable[[dict], Record]] = {
    "conversation": parse_conversation,
    "preference": parse_preference,
    "ranking": parse_ranking,
    "labelled": parse_labelled,
    "prompt_answer": parse_prompt_answer,
    "text": parse_text,
    "prompt": parse_prompt,
    "comparison": parse_comparison,
}


def load_records(
    source: str,
    kind: Kind,
    *,
    field_map: dict[str, str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> tuple[list[Record], LoadReport]:
    """Load and validate every row of `source` as records of `kind`."""
    parse = PARSERS[kind]
    report = LoadReport(str(source))
    records: list[Record] = []
    for number, row in read_rows(source):
        try:
            if isinstance(row, InvalidRecord):
                raise row
            if not isinstance(row, dict):
                raise InvalidRecord(f"a record must be a JSON object, not {type(row).__name__}")
            if field_map:
                row = {field_map.get(k, k): v for k, v in row.items()}
            record = parse(row)
        except InvalidRecord as exc:
            if not skip_invalid:
                raise DataError(
                    str(exc), path=str(source), line=number, fix="fix or remove this record, or pass --skip-invalid to skip such records"
                ) from None
            report.skipped[str(exc).split(" (")[0]] += 1
            continue
        records.append(_with_origin(record, f"{source}:{number}"))
        if limit is not None and len(records) >= limit:
            break
    report.kept = len(records)
    if not records:
        raise DataError("no usable records", path=str(source), fix="check that the file is the right one and not empty")
    return records, report


def _with_origin(record: Record, origin: str) -> Record:
    from dataclasses import replace

    return replace(record, origin=origin)
