"""The LLM judge: the local judge's probability by hand, both-order averaging and disagreement, rankings,
agreement, templates, constitutions and critique-revise. The HTTP judge is in test_judge_http.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.data.loading import load_records
from alignkit.data.records import Conversation, PreferencePair, Ranking, user_prompt
from alignkit.cli import main
from alignkit.errors import AlignkitError
from alignkit.judge import (
    JudgeScorer,
    PairRequest,
    TransformersJudge,
    agreement,
    agreement_between,
    combine_orders,
    judge_pairs,
    load_constitution,
    load_template,
    probability_agreement,
    rank_by_wins,
)
from alignkit.judge.command import JudgeConfig, ResumableOutput, progress_path, run_agreement, run_compare
from alignkit.judge.prompts import Template
from alignkit.models import TINY_LLAMA, load_model
from conftest import ROOT, builtin_rows, run_cli, write_jsonl

CONSTITUTION = ROOT / "examples" / "constitution.yaml"


class FakeJudge:
    """A judge with known answers: `rule(text) -> P(A)` on the rendered judging prompt."""

    def __init__(self, rule, name="fake"):
        self.rule, self.name, self.calls = rule, name, []

    def prob_a(self, texts):
        self.calls.extend(texts)
        return [self.rule(t) for t in texts]


def answers_in(text: str) -> tuple[str, str]:
    """The two answers of a judging prompt rendered from TEMPLATE below."""
    a = text.split("<A>", 1)[1].split("</A>", 1)[0]
    b = text.split("<B>", 1)[1].split("</B>", 1)[0]
    return a, b


TEMPLATE = Template("Q: {prompt}\n<A>{answer_a}</A>\n<B>{answer_b}</B>\nA or B?", "test")


def longer_wins(text: str) -> float:
    a, b = answers_in(text)
    return 0.9 if len(a) > len(b) else 0.1 if len(a) < len(b) else 0.5


# --- the local judge -----------------------------------------------------------------------------------------


def test_local_judge_probability_is_the_softmax_of_the_a_b_logits(tiny_tokenizer):
    model = load_model(TINY_LLAMA).eval()
    judge = TransformersJudge(model, tiny_tokenizer, name=TINY_LLAMA, batch_size=2)
    texts = ["Which is better? A or B", "A much longer judging prompt, so that the batch needs left padding. A or B?", "x"]
    got = judge.prob_a(texts)
    a_id, b_id = tiny_tokenizer.convert_tokens_to_ids("A"), tiny_tokenizer.convert_tokens_to_ids("B")
    for text, p in zip(texts, got):
        # By hand: the chat template with the generation prompt, one unpadded forward, the last position's logits.
        rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("<|im_start|>assistant\n")
        ids = torch.tensor([tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        z_a, z_b = logits[a_id].item(), logits[b_id].item()
        expected = math.exp(z_a) / (math.exp(z_a) + math.exp(z_b))
        assert p == pytest.approx(expected, abs=1e-5)
    assert len(set(round(p, 6) for p in got)) == 3  # genuinely different prompts, not one cached answer


def test_local_judge_pairs_and_both_orders(tiny_tokenizer):
    judge = TransformersJudge(load_model(TINY_LLAMA).eval(), tiny_tokenizer, name=TINY_LLAMA)
    template = load_template("helpfulness")
    request = PairRequest("Name a colour.", "Blue.", "I like {braces} and {answer_a}.")
    (verdict,) = judge_pairs(judge, template, [request])
    p_ab, p_ba = judge.prob_a(
        [template.render(prompt=request.prompt, answer_a=request.first, answer_b=request.second),
         template.render(prompt=request.prompt, answer_a=request.second, answer_b=request.first)]
    )  # fmt: skip
    assert verdict.p_ab == pytest.approx(p_ab, abs=1e-6) and verdict.p_ba == pytest.approx(p_ba, abs=1e-6)
    assert verdict.p_first == pytest.approx(0.5 * (p_ab + 1 - p_ba), abs=1e-6)


# --- both orders, disagreement -------------------------------------------------------------------------------


def test_combine_orders_averages_the_two_orders():
    v = combine_orders(0.8, 0.3)  # first order: A (= first) at 0.8; swapped: A (= second) at 0.3
    assert v.p_first == pytest.approx(0.5 * (0.8 + 0.7)) and v.outcome == "first" and v.consistent
    assert v.confidence == pytest.approx(0.75)
    v = combine_orders(0.1, 0.95)
    assert v.p_first == pytest.approx(0.075) and v.outcome == "second" and v.confidence == pytest.approx(0.925)
    assert combine_orders(0.5, 0.2).outcome == "first"  # one order without preference is no disagreement
    assert combine_orders(0.5, 0.5).outcome == "tie"
    with pytest.raises(ValueError):
        combine_orders(1.2, 0.5)


def test_a_judge_that_always_says_a_ends_as_a_tie_or_is_dropped():
    always_a = FakeJudge(lambda text: 1.0)
    requests = [PairRequest("q", "good answer", "bad"), PairRequest("q2", "x", "yy")]
    ties = judge_pairs(always_a, TEMPLATE, requests, disagreement="tie")
    assert [v.outcome for v in ties] == ["tie", "tie"] and all(v.p_first == 0.5 and not v.consistent for v in ties)
    dropped = judge_pairs(always_a, TEMPLATE, requests, disagreement="drop")
    assert [v.outcome for v in dropped] == ["drop", "drop"]
    # A softly position-biased judge: the average leans to the first answer, but the orders disagree.
    leaning = FakeJudge(lambda text: 0.9 if "good" in answers_in(text)[0] else 0.6)
    (v,) = judge_pairs(leaning, TEMPLATE, requests[:1], disagreement="tie")
    assert v.p_first == pytest.approx(0.5 * (0.9 + 0.4)) and v.outcome == "tie"
    assert len(always_a.calls) == 8  # every pair asked twice


def test_content_judge_is_position_independent():
    judge = FakeJudge(longer_wins)
    verdicts = judge_pairs(judge, TEMPLATE, [PairRequest("q", "long answer", "short"), PairRequest("q", "short", "long answer")])
    assert [v.outcome for v in verdicts] == ["first", "second"]
    assert verdicts[0].p_first == pytest.approx(0.9) and verdicts[1].p_first == pytest.approx(0.1)
    # The swapped order really shows the answers the other way round.
    assert answers_in(judge.calls[0]) == ("long answer", "short") and answers_in(judge.calls[1]) == ("short", "long answer")


def test_rank_by_wins_counts_ties_half():
    first, second, tie = combine_orders(0.9, 0.1), combine_orders(0.1, 0.9), combine_orders(1.0, 1.0)
    order, wins = rank_by_wins(3, {(0, 1): second, (0, 2): tie, (1, 2): first})
    assert order == [1, 0, 2] and wins == [2.0, 0.5, 0.5]


# --- agreement -----------------------------------------------------------------------------------------------


def test_agreement_counts_ties_half_and_leaves_dropped_out():
    result = agreement(["first", "first", "second", "tie", "drop"])
    assert (result.agree, result.disagree, result.ties, result.dropped, result.pairs) == (2, 1, 1, 1, 4)
    assert result.fraction == pytest.approx(2.5 / 4)
    assert math.isnan(agreement([]).fraction)
    assert probability_agreement([0.9, 0.6, 0.4, 0.5]) == pytest.approx(0.625)


def test_agreement_between_two_label_sets():
    labels = [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        {"prompt": "p2", "chosen": "c", "rejected": "d"},
        {"prompt": "p3", "chosen": "e", "rejected": "f"},
        {"prompt": [{"role": "user", "content": "p4"}], "chosen": "g", "rejected": "h"},
        {"prompt": "p5", "chosen": "i", "rejected": "j"},
    ]
    judged = [
        {"prompt": "p1", "chosen": "a ", "rejected": "b", "confidence": 0.7},  # agrees (whitespace ignored)
        {"prompt": "p2", "chosen": "d", "rejected": "c"},  # disagrees
        {"prompt": "p3", "chosen": "e", "rejected": "f", "tie": True},  # tie
        {"prompt": [{"role": "user", "content": "p4"}], "chosen": "g", "rejected": "h"},  # agrees
    ]
    result = agreement_between(judged, labels)
    assert (result.agree, result.disagree, result.ties, result.unmatched) == (2, 1, 1, 1)
    assert result.fraction == pytest.approx(2.5 / 4)


def test_agreement_run_on_labelled_pairs(tmp_path):
    labels = write_jsonl(tmp_path / "labels.jsonl", [
        {"prompt": "q1", "chosen": "a long answer", "rejected": "short"},  # the judge agrees
        {"prompt": "q2", "chosen": "tiny", "rejected": "a much longer answer"},  # disagrees
        {"prompt": "q3", "chosen": "same", "rejected": "size"},  # equal length: tie
        {"prompt": "q4", "responses": ["first best", "2nd", "3"]},  # a ranking: 3 pairs, all agree
    ])  # fmt: skip
    config = JudgeConfig(agreement_with=str(labels), output=str(tmp_path / "agree.jsonl"), template=str(template_file(tmp_path)))
    summary = run_agreement(config, judge=FakeJudge(longer_wins))
    assert (summary["pairs"], summary["agree"], summary["disagree"], summary["ties"]) == (6, 4, 1, 1)
    assert summary["agreement"] == pytest.approx(4.5 / 6)
    rows = [json.loads(line) for line in (tmp_path / "agree.jsonl").read_text().splitlines()]
    assert [r["result"] for r in rows] == ["agree", "disagree", "tie", "agree", "agree", "agree"]
    # A rerun finds every pair done and asks the judge nothing.
    again = FakeJudge(longer_wins)
    assert run_agreement(config, judge=again)["agreement"] == pytest.approx(4.5 / 6) and again.calls == []


# --- templates -----------------------------------------------------------------------------------------------


def test_template_fills_slots_once_and_keeps_braces_of_the_inputs():
    template = Template('{{"json": 1}} {prompt} | {answer_a} | {answer_b} | { not a slot }', "t")
    text = template.render(prompt="f(x) = {x}", answer_a="{answer_b}", answer_b="{{b}}", principle="")
    assert text == '{"json": 1} f(x) = {x} | {answer_b} | {{b}} | { not a slot }'


def test_template_errors_name_the_template(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("{prompt} {answer_a} {answr_b}")
    with pytest.raises(AlignkitError, match=r"unknown placeholder.*answr_b") as info:
        load_template(str(bad))
    assert str(bad) in str(info.value)
    bad.write_text("{prompt} {answer_a}")
    with pytest.raises(AlignkitError, match=r"no \{answer_b\} placeholder"):
        load_template(str(bad))
    with pytest.raises(AlignkitError, match=r"no \{principle\}"):
        load_template("helpfulness", needs_principle=True)
    with pytest.raises(AlignkitError, match="not a built-in rubric"):
        load_template("kindness")
    for name in ("helpfulness", "harmlessness", "honesty", "principle"):
        assert {"prompt", "answer_a", "answer_b"} <= load_template(name).slots


def test_judge_scorer_is_the_win_probability_against_the_reference():
    scorer = JudgeScorer(FakeJudge(longer_wins), TEMPLATE)
    scores = scorer.score([user_prompt("q")] * 3, ["a long answer", "s", "same"], ["short", "a longer one", "size"])
    assert scores.tolist() == pytest.approx([0.9, 0.1, 0.5])
    with pytest.raises(AlignkitError, match="reference"):
        scorer.score([user_prompt("q")], ["x"])


# --- compare: samples -> preference pairs ---------------------------------------------------------------------


def samples_file(tmp_path, rows=None):
    rows = rows or [
        {"prompt": "q1", "completions": ["a long answer", "short"]},
        {"prompt": "q2", "completions": ["one", "three three", "two two"]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q3"}], "completions": ["x", "x", "yy"]},
        {"prompt": "q4", "completions": ["same", "size"]},
    ]
    return write_jsonl(tmp_path / "samples.jsonl", rows)


def test_compare_writes_pairs_that_load_as_comparisons(tmp_path):
    config = JudgeConfig(samples=str(samples_file(tmp_path)), output=str(tmp_path / "prefs.jsonl"), template=str(template_file(tmp_path)))
    summary = run_compare(config, judge=FakeJudge(longer_wins))
    # q1: 1 pair; q2: 3 pairs; q3: duplicates removed -> 1 pair; q4: a tie, not written
    assert summary == {"prompts": 4, "rows": 5, "pairs_judged": 6, "ties": 1, "dropped": 0, "skipped_prompts": 0}
    records, _ = load_records(config.output, "comparison")
    assert all(isinstance(r, PreferencePair) for r in records) and len(records) == 5
    assert all(len(r.chosen) > len(r.rejected) for r in records)
    assert records[4].prompt[0].content == "Be brief."
    row = json.loads(open(config.output).readline())
    assert row["confidence"] == pytest.approx(0.9) and row["judge"] == "fake" and row["orders"] == pytest.approx([0.9, 0.9])
    log = [json.loads(line) for line in progress_path(config.output).read_text().splitlines()]
    assert log[0]["header"]["judge"] == "fake" and log[-1]["ties"][0]["answers"] == ["same", "size"]


def test_compare_rank_writes_rankings_best_first(tmp_path):
    config = JudgeConfig(samples=str(samples_file(tmp_path)), output=str(tmp_path / "ranked.jsonl"), template=str(template_file(tmp_path)), rank=True)
    run_compare(config, judge=FakeJudge(longer_wins))
    records, _ = load_records(config.output, "comparison")
    rankings = [r for r in records if isinstance(r, Ranking)]
    assert len(rankings) == 3  # q4 is all ties: nothing to rank
    assert rankings[1].responses == ("three three", "two two", "one")
    assert json.loads(open(config.output).read().splitlines()[1])["wins"] == [2.0, 1.0, 0.0]


def template_file(tmp_path):
    path = tmp_path / "template.txt"
    path.write_text(TEMPLATE.text)
    return path


def test_rerun_with_another_judge_is_refused(tmp_path):
    config = JudgeConfig(samples=str(samples_file(tmp_path)), output=str(tmp_path / "prefs.jsonl"), template=str(template_file(tmp_path)))
    run_compare(config, judge=FakeJudge(longer_wins))
    with pytest.raises(AlignkitError, match="another run"):
        run_compare(config, judge=FakeJudge(longer_wins, name="other"))


def test_resumable_output_cuts_a_half_written_unit(tmp_path):
    out = ResumableOutput(tmp_path / "o.jsonl", {"mode": "x"})
    out.append(1, [{"a": 1}, {"a": 2}])
    out.append(2, [])
    with open(tmp_path / "o.jsonl", "a") as handle:  # a unit cut off after its rows, before its log line
        handle.write('{"a": 3}\n{"a": ')
    with open(progress_path(tmp_path / "o.jsonl"), "a") as handle:
        handle.write('{"unit": 3, "ro')
    again = ResumableOutput(tmp_path / "o.jsonl", {"mode": "x"})
    assert again.done == {1, 2}
    assert [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()] == [{"a": 1}, {"a": 2}]
    (tmp_path / "other.jsonl").write_text('{"not": "ours"}\n')
    with pytest.raises(AlignkitError, match="no progress log"):
        ResumableOutput(tmp_path / "other.jsonl", {"mode": "x"})


def test_cli_judges_samples_with_the_tiny_model(tmp_path):
    samples = samples_file(tmp_path)
    result = run_cli("judge", "--samples", str(samples), "--judge", TINY_LLAMA, "--out", str(tmp_path / "p.jsonl"), "--disagreement", "drop")
    assert result.returncode == 0, result.stderr
    assert "judged 6 pairs of 4 prompts with tiny-llama" in result.stderr
    log = [json.loads(line) for line in progress_path(tmp_path / "p.jsonl").read_text().splitlines()]
    assert [e["unit"] for e in log[1:]] == [1, 2, 3, 4]



def test_cli_says_what_is_missing(tmp_path, capsys):
    assert main(["judge", "--judge", TINY_LLAMA, "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "mode compare needs --samples" in capsys.readouterr().err
    assert main(["judge", "--mode", "critique-revise", "--prompts", "p.jsonl", "--output", "o.jsonl"]) == 2
    assert "needs --constitution" in capsys.readouterr().err


# --- constitution --------------------------------------------------------------------------------------------


def test_shipped_constitution_loads(tmp_path):
    constitution = load_constitution(CONSTITUTION)
    assert len(constitution.principles) == 6
    assert all(p.critique and p.revision and p.principle for p in constitution.principles)
    assert constitution.draw("0:1") == constitution.draw("0:1")
    assert len({constitution.draw(f"0:{i}").name for i in range(50)}) > 3
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - name: a\n    principle: p\n    critique: c\n")
    with pytest.raises(AlignkitError, match=r"principle 1 \(a\).*'revision' is missing"):
        load_constitution(bad)
    bad.write_text("principles:\n  - name: a\n    principle: p\n    critique: c\n    revision: r\n    extra: x\n")
    with pytest.raises(AlignkitError, match="unknown key"):
        load_constitution(bad)


def test_critique_revise_writes_sft_rows(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(3)])
    out = tmp_path / "revised.jsonl"
    args = ("judge", "--mode", "critique-revise", "--constitution", str(CONSTITUTION), "--prompts", str(prompts),
            "--model", TINY_LLAMA, "--max-new-tokens", "6", "--revisions", "2", "--chunk-size", "2", "--output", str(out))  # fmt: skip
    assert main(list(args)) == 0
    records, _ = load_records(str(out), "conversation")
    assert len(records) == 3 and all(isinstance(r, Conversation) for r in records)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = {p.name for p in load_constitution(CONSTITUTION).principles}
    for row, record in zip(rows, records):
        assert len(row["critiques"]) == len(row["revisions"]) == len(row["principles"]) == 2
        assert set(row["principles"]) <= names
        assert record.messages[-1].content == row["completion"] and row["completion"].strip()
    capsys.readouterr()
    assert main(list(args)) == 0  # everything is done: nothing is generated again
    assert "3 prompts already revised, 0 to go" in capsys.readouterr().err
    assert out.read_text().count("\n") == 3


def test_preferences_by_principle(tmp_path):
    config = JudgeConfig(
        mode="preferences", constitution=str(CONSTITUTION), samples=str(samples_file(tmp_path)), output=str(tmp_path / "cai.jsonl")
    )
    seen = []

    def rule(text: str) -> float:
        seen.append(text)
        a = text.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
        b = text.split("[Answer B]\n", 1)[1].split("\n\nWhich answer", 1)[0]
        return 0.8 if len(a) > len(b) else 0.2 if len(a) < len(b) else 0.5

    run_compare(config, judge=FakeJudge(rule), constitution=load_constitution(CONSTITUTION))
    rows = [json.loads(line) for line in open(config.output)]
    constitution = {p.name: p.principle for p in load_constitution(CONSTITUTION).principles}
    assert rows and all(row["principle"] in constitution for row in rows)
    assert any(f"Principle: {constitution[rows[0]['principle']]}" in text for text in seen)
    load_records(config.output, "comparison")


@pytest.mark.slow
def test_builtin_model_agreement_with_gpt4_labels(tmp_path):
    """The built-in 135M model as a judge of 30 AlpacaEval pairs labelled by GPT-4 (the shortest, to stay fast)."""
    rows = builtin_rows("alpacaeval-prefs-test")
    rows = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]))[:30]
    labels = write_jsonl(tmp_path / "labels.jsonl", rows)
    summary = run_agreement(JudgeConfig(agreement_with=str(labels), judge="smollm2-135m-instruct", chunk_size=30, batch_size=8))
    print(f"\nsmollm2-135m-instruct vs GPT-4 on 30 AlpacaEval pairs: {json.dumps(summary)}")
    assert summary["pairs"] == 30 and summary["agree"] + summary["disagree"] + summary["ties"] == 30
    assert summary["agreement"] == pytest.approx((summary["agree"] + summary["ties"] / 2) / 30)
    # Asked in both orders, a 135M judge mostly names the same slot both times (position bias, measured: 29 of
    # 30 pairs), which the protocol turns into ties instead of random verdicts: a one-order judge would tie none.
    assert summary["ties"] >= 20
