"""Records: parsing of every supported layout, validation errors with file:line, and label masking."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignkit.data.loading import load_records, parse_hh_dialogue
from alignkit.data.records import LabelledCompletion, Message, PreferencePair, PromptWithAnswer, Ranking
from alignkit.data.tokenize import IGNORE, encode_conversation, encode_text, pack, truncate, Example
from alignkit.errors import DataError
from alignkit.models import SMOLLM2, load_tokenizer
from conftest import write_jsonl


def test_alpaca_prompt_completion_and_messages_become_conversations(tmp_path):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"prompt": "Capital of France?", "completion": "Paris."},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        ],
    )
    records, report = load_records(str(path), "conversation")
    assert report.kept == 4 and not report.skipped
    assert records[0].messages == (Message("user", "Add the numbers.\n\n2 and 3"), Message("assistant", "5"))
    assert records[1].messages[0].content == "Say hi."
    assert records[2].messages == (Message("user", "Capital of France?"), Message("assistant", "Paris."))
    assert [m.role for m in records[3].messages] == ["system", "user", "assistant"]
    assert records[2].origin == f"{path}:3"


def test_hh_dialogues_are_split_into_shared_prompt_and_two_replies(tmp_path):
    chosen = "\n\nHuman: How do I bake bread?\n\nAssistant: Which kind?\n\nHuman: Rye.\n\nAssistant: Mix rye flour, water and starter."
    rejected = "\n\nHuman: How do I bake bread?\n\nAssistant: Which kind?\n\nHuman: Rye.\n\nAssistant: I don't know."
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    (pair,), _ = load_records(str(path), "preference")
    assert isinstance(pair, PreferencePair)
    assert pair.prompt == (Message("user", "How do I bake bread?"), Message("assistant", "Which kind?"), Message("user", "Rye."))
    assert (pair.chosen, pair.rejected) == ("Mix rye flour, water and starter.", "I don't know.")


def test_shipped_preference_files_parse():
    records, _ = load_records("builtin:hh-harmless-test", "preference", limit=50)
    assert all(r.prompt[-1].role == "user" for r in records)
    records, _ = load_records("builtin:alpacaeval-prefs-test", "preference", limit=5)
    assert records[0].prompt[0].role == "user" and records[0].chosen != records[0].rejected


def test_hh_prompt_field_is_parsed_into_turns():
    assert parse_hh_dialogue("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == (
        Message("user", "a"), Message("assistant", "b"), Message("user", "c"))


def test_rankings_labelled_and_prompt_answer_records(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["best", "mid", "worst"]}])
    (ranking,), _ = load_records(str(path), "ranking")
    assert isinstance(ranking, Ranking)
    assert [(p.chosen, p.rejected) for p in ranking.pairs()] == [("best", "mid"), ("best", "worst"), ("mid", "worst")]
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "p", "completion": "c", "label": False}])
    (labelled,), _ = load_records(str(path), "labelled")
    assert labelled == LabelledCompletion((Message("user", "p"),), "c", False, origin=f"{path}:1")
    (gsm,), _ = load_records("builtin:gsm8k-test", "prompt_answer", limit=1)
    assert isinstance(gsm, PromptWithAnswer) and gsm.answer == "18"


def test_json_and_parquet_and_field_map(tmp_path):
    rows = [{"q": "Why?", "a": "Because."}, {"q": "How?", "a": "So."}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        records, _ = load_records(str(tmp_path / name), "conversation", field_map={"q": "prompt", "a": "completion"})
        assert records[1].messages[-1] == Message("assistant", "So.")
        assert records[1].origin.endswith(":2")


@pytest.mark.parametrize(
    "line, kind, message",
    [
        ('{"instruction": "x", "output": "y"', "conversation", "malformed JSON"),
        ('{"instruction": "x"}', "conversation", "missing field 'output'"),
        ('{"instruction": "x", "output": "   "}', "conversation", "field 'output' is empty"),
        ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "preference", "identical"),
        ('{"prompt": "p", "chosen": "a"}', "preference", "missing field 'rejected'"),
        ('{"prompt": "p", "responses": ["only one"]}', "ranking", "at least two answers"),
        ('["not", "an", "object"]', "conversation", "must be a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, line, kind, message):
    good = {"conversation": '{"instruction": "a", "output": "b"}', "preference": '{"prompt": "p", "chosen": "a", "rejected": "b"}',
            "ranking": '{"prompt": "p", "responses": ["a", "b"]}'}[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DataError) as caught:
        load_records(str(path), kind)
    assert caught.value.where == f"{path}:3"
    assert message in str(caught.value)
    records, report = load_records(str(path), kind, skip_invalid=True)
    assert len(records) == 2 and sum(report.skipped.values()) == 1 and "skipped: 1" in report.summary()


def _expected_labels(tokenizer, prefix_messages, reply):
    """Labels built independently of the span logic: prompt tokens, then the reply and <|im_end|> trained."""
    prefix = tokenizer.apply_chat_template([m.__dict__ for m in prefix_messages], tokenize=False, add_generation_prompt=True)
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return prefix_ids + reply_ids + newline, prefix_ids, reply_ids


def _check_masking(tokenizer):
    messages = (Message("user", "What is 2+2?"), Message("assistant", "It is 4."))
    example = encode_conversation(tokenizer, messages)
    ids, prefix_ids, reply_ids = _expected_labels(tokenizer, messages[:1], "It is 4.")
    assert example.input_ids == ids
    # labels[i] is the target of position i: IGNORE until the last prompt token, which predicts the reply.
    expected = [IGNORE] * (len(prefix_ids) - 1) + reply_ids + [IGNORE] * (len(ids) - len(prefix_ids) - len(reply_ids) + 1)
    assert example.labels == expected
    trained = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert trained == "It is 4.<|im_end|>"


def test_masking_token_by_token_on_the_chatml_template(tiny_tokenizer):
    _check_masking(tiny_tokenizer)


@pytest.mark.slow
def test_masking_token_by_token_on_smollm2_tokenizer():
    _check_masking(load_tokenizer(SMOLLM2))


def test_multi_turn_masks_every_assistant_turn_or_only_the_last(tiny_tokenizer):
    messages = (Message("user", "a"), Message("assistant", "first answer"), Message("user", "b"), Message("assistant", "second answer"))
    decode = lambda ex: tiny_tokenizer.decode([t for t in ex.labels if t != IGNORE])
    assert decode(encode_conversation(tiny_tokenizer, messages)) == "first answer<|im_end|>second answer<|im_end|>"
    assert decode(encode_conversation(tiny_tokenizer, messages, last_only=True)) == "second answer<|im_end|>"


def test_truncation_reports_cuts_and_drops_examples_with_nothing_left(tiny_tokenizer):
    long_reply = encode_conversation(tiny_tokenizer, (Message("user", "hi"), Message("assistant", "word " * 200)))
    long_prompt = encode_conversation(tiny_tokenizer, (Message("user", "word " * 200), Message("assistant", "ok")))
    kept, report = truncate([long_reply, long_prompt], 64)
    assert len(kept) == 1 and len(kept[0]) == 64 and kept[0].labels[-1] == IGNORE
    assert (report.truncated, report.dropped) == (2, 1)
    assert report.tokens_cut == len(long_reply) - 64 + len(long_prompt) - 64


def test_packing_fills_rows_first_fit():
    examples = [Example([1] * n, [1] * n) for n in (6, 5, 3, 2)]
    rows = pack(examples, 8)
    assert [[len(e) for e in row] for row in rows] == [[6, 2], [5, 3]]


def test_plain_text_trains_on_every_token(tiny_tokenizer):
    example = encode_text(tiny_tokenizer, "hello world")
    assert example.labels == example.input_ids[1:] + [IGNORE]
