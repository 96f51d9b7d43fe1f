"""`alignkit eval --benchmark ifeval`: the four accuracies, their bootstrap intervals and the paired differences
from verdicts worked out by hand; scoring a response file; a tiny-model run with a baseline and its report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alignkit.errors import AlignkitError
from alignkit.evaluation import metrics
from alignkit.evaluation.evaluate import EvalConfig, run_eval
from alignkit.evaluation.ifeval import (
    Following,
    Side,
    accuracies,
    benchmark_numbers,
    format_table,
    length_numbers,
    load_prompts,
    paired_differences,
    per_instruction_type,
    ratio_terms,
    read_responses,
    resample_indices,
    resampled_ratios,
)
from alignkit.models import TINY_LLAMA
from alignkit.report import build_report
from conftest import builtin_rows, run_cli, write_jsonl

# Three prompts: A asks x and y, B asks x, C asks x, y and z.
#   A strict [T, F] loose [T, T]   (e.g. a "Sure:" opening line breaks y until loose mode drops it)
#   B strict [T]    loose [T]
#   C strict [F, F, T] loose [T, F, T]
IDS = [["x", "y"], ["x"], ["x", "y", "z"]]
HAND = Following(strict=[[True, False], [True], [False, False, True]], loose=[[True, True], [True], [True, False, True]])


def test_the_four_numbers_by_hand():
    got = accuracies(HAND, resample_indices(3, 50, seed=0))
    # prompt level: all followed in B only (strict), in A and B (loose)
    assert got["prompt_level_strict"]["value"] == pytest.approx(1 / 3)
    assert got["prompt_level_loose"]["value"] == pytest.approx(2 / 3)
    # instruction level pools instructions: (1 + 1 + 1) / 6 strict, (2 + 1 + 2) / 6 loose -- not the mean of the
    # per-prompt shares, (1/2 + 1 + 1/3) / 3 = 0.611 strict
    assert got["instruction_level_strict"]["value"] == pytest.approx(3 / 6)
    assert got["instruction_level_loose"]["value"] == pytest.approx(5 / 6)
    for numbers in got.values():
        low, high = numbers["ci95"]
        assert 0.0 <= low <= numbers["value"] <= high <= 1.0


def test_a_resample_recomputes_the_ratio_of_sums():
    (hits, sizes), (all_followed, ones) = ratio_terms(HAND)["instruction_level_strict"], ratio_terms(HAND)["prompt_level_strict"]
    assert hits.tolist() == [1, 1, 1] and sizes.tolist() == [2, 1, 3]
    indices = np.array([[0, 0, 2], [1, 1, 1]])
    # draw 1: A, A, C -> (1 + 1 + 1) / (2 + 2 + 3); draw 2: B three times -> 3 / 3
    assert resampled_ratios(hits, sizes, indices).tolist() == pytest.approx([3 / 7, 1.0])
    assert resampled_ratios(all_followed, ones, indices).tolist() == pytest.approx([0.0, 1.0])


def test_the_prompt_level_interval_is_the_plain_bootstrap_of_the_outcomes():
    rng = np.random.default_rng(7)
    followed = [[bool(b) for b in rng.integers(0, 2, size=k)] for k in rng.integers(1, 4, size=40)]
    got = accuracies(Following(followed, followed), resample_indices(40, 300, seed=5))
    outcomes = [float(all(f)) for f in followed]
    assert got["prompt_level_strict"]["ci95"] == pytest.approx(list(metrics.bootstrap_ci(outcomes, n_resamples=300, seed=5)))


def one_instruction_each(followed: list[bool]) -> Following:
    return Following([[f] for f in followed], [[f] for f in followed])


def test_a_paired_difference_excludes_zero_for_a_clearly_better_side_and_includes_it_for_identical_ones():
    indices = resample_indices(30, 1000, seed=0)
    better = one_instruction_each([True] * 27 + [False] * 3)
    worse = one_instruction_each([False] * 27 + [True] * 3)
    gain = paired_differences(better, worse, indices)
    for key, numbers in gain.items():
        assert numbers["value"] == pytest.approx(0.8), key
        assert numbers["ci95"][0] > 0, key
    same = paired_differences(better, better, indices)
    assert all(n["value"] == 0.0 and n["ci95"] == [0.0, 0.0] for n in same.values())
    # paired: two sides that differ on one prompt in 30 differ by (draws of that prompt) / 30 in every resample
    one_more = one_instruction_each([True] * 14 + [False] * 16)
    fewer = one_instruction_each([True] * 13 + [False] * 17)
    low, high = paired_differences(one_more, fewer, indices)["prompt_level_strict"]["ci95"]
    assert 0.0 <= low and high <= 0.15
    with pytest.raises(ValueError, match="same prompts"):
        paired_differences(better, HAND, indices)


def test_the_per_type_table_by_hand():
    baseline = Following(strict=[[False, False], [True], [False, False, False]], loose=[[False, True], [True], [False, False, False]])
    rows = {row["instruction"]: row for row in per_instruction_type(IDS, HAND, baseline)}
    assert [rows[t]["count"] for t in "xyz"] == [3, 2, 1]
    # x: strict T, T, F; loose T, T, T.  y: strict F, F; loose T, F.  z: T both.
    assert (rows["x"]["model_strict"], rows["x"]["model_loose"]) == pytest.approx((2 / 3, 1.0))
    assert (rows["y"]["model_strict"], rows["y"]["model_loose"]) == pytest.approx((0.0, 0.5))
    assert (rows["z"]["model_strict"], rows["z"]["model_loose"]) == (1.0, 1.0)
    assert rows["x"]["baseline_strict"] == pytest.approx(1 / 3) and rows["x"]["difference_strict"] == pytest.approx(1 / 3)
    assert rows["y"]["difference_loose"] == pytest.approx(0.0)
    assert "baseline_strict" not in per_instruction_type(IDS, HAND)[0]


def test_lengths_count_cut_answers_and_keep_them():
    numbers = length_numbers(["one two", "three", "four five six"], [10, 384, 20], [False, True, False])
    assert numbers == {"mean_tokens": pytest.approx(138.0), "mean_words": pytest.approx(2.0), "cut": 1,
                       "cut_share": pytest.approx(1 / 3)}  # fmt: skip
    assert length_numbers(["a"], None, None) == {"mean_tokens": None, "mean_words": 1.0, "cut": None, "cut_share": None}


def test_benchmark_numbers_and_the_printed_table():
    model = Side("m", ["a b", "c", "d e f"], HAND, tokens=[4, 2, 6], cut=[False, False, True], generation_s=2.0)
    nothing = [[False, False], [False], [False, False, False]]
    baseline = Side("b", ["a", "b", "c"], Following(nothing, nothing))
    result = benchmark_numbers(IDS, model, baseline, n_resamples=100, seed=1)
    assert (result["n"], result["instructions"]) == (3, 6)
    assert result["model"]["timing"] == {"generation_s": 2.0, "tokens_per_s": pytest.approx(6.0)}
    assert result["baseline"]["timing"]["generation_s"] is None
    assert result["difference"]["instruction_level_loose"]["value"] == pytest.approx(5 / 6)
    assert result["model"]["lengths"]["cut"] == 1
    table = format_table(result)
    for text in ("prompt-level strict", "instruction-level loose", "model - baseline", "+0.833", "1 (33.3%)", "+0.67 / +1.00"):
        assert text in table, text


# --- response files -----------------------------------------------------------------------------------------

KEYS = (1001, 1322, 1705)  # no commas; a <<title>>; a P.P.S and a fixed last phrase


@pytest.fixture
def subset(tmp_path):
    rows = {row["key"]: row for row in builtin_rows("ifeval")}
    return write_jsonl(tmp_path / "ifeval3.jsonl", [rows[k] for k in KEYS]), [rows[k]["prompt"] for k in KEYS]


ANSWERS = [
    "Hark the journey begins in Tokyo",  # no comma: followed
    "Kotlin is concise but Java is everywhere.",  # no <<title>>: broken
    # P.P.S followed; ends with the phrase only once the last line is dropped: broken strict, followed loose
    "Dear boss I would like a raise.\nP.P.S Thank you. Hope you agree with me.\nLet me know if you need changes.",
]


def test_scoring_a_response_file(tmp_path, subset, capsys):
    prompts_file, texts = subset
    given = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": p, "response": r} for p, r in zip(texts, ANSWERS)])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": p, "response": "Hello, world"} for p in reversed(texts)])
    config = EvalConfig(benchmark="ifeval", prompts=str(prompts_file), responses=str(given), baseline_responses=str(plain),
                        output=str(tmp_path / "out"), bootstrap_resamples=200)  # fmt: skip
    config.validate()
    result = run_eval(config)
    values = {key: numbers["value"] for key, numbers in result["model"]["accuracy"].items()}
    assert values == pytest.approx({"prompt_level_strict": 1 / 3, "prompt_level_loose": 2 / 3,
                                    "instruction_level_strict": 2 / 4, "instruction_level_loose": 3 / 4})  # fmt: skip
    assert all(numbers["value"] == 0.0 for numbers in result["baseline"]["accuracy"].values())
    assert result["difference"]["instruction_level_loose"]["value"] == pytest.approx(3 / 4)
    assert result["model"]["lengths"]["mean_tokens"] is None and result["model"]["timing"]["generation_s"] is None
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == list(KEYS)
    assert rows[2]["follow_instruction_list_strict"] == [True, False] and rows[2]["follow_instruction_list_loose"] == [True, True]
    assert (rows[2]["follow_all_strict"], rows[2]["follow_all_loose"]) == (False, True)
    assert rows[0]["baseline"]["response"] == "Hello, world"  # matched by prompt text, whatever the file's order
    assert (out / "responses.jsonl").read_text() == given.read_text()
    assert "prompt-level strict" in capsys.readouterr().out


def test_a_response_file_must_answer_exactly_the_prompts(tmp_path, subset):
    prompts_file, texts = subset
    rows = [{"prompt": p, "response": r} for p, r in zip(texts, ANSWERS)]
    short = write_jsonl(tmp_path / "short.jsonl", rows[:1])
    config = EvalConfig(benchmark="ifeval", prompts=str(prompts_file), responses=str(short), output=str(tmp_path / "o"))
    with pytest.raises(AlignkitError, match=r"no response to 2 of the 3 prompts \(keys 1322, 1705\)"):
        run_eval(config)
    # --limit 1 scores the first prompt only, so the one answer is enough
    result = run_eval(EvalConfig(benchmark="ifeval", prompts=str(prompts_file), responses=str(short), limit=1,
                                 output=str(tmp_path / "o"), bootstrap_resamples=10))  # fmt: skip
    assert result["n"] == 1 and result["model"]["accuracy"]["prompt_level_strict"]["value"] == 1.0
    twice = write_jsonl(tmp_path / "twice.jsonl", [*rows, rows[0]])
    with pytest.raises(AlignkitError, match="twice.jsonl:4: a second response to the prompt of line 1"):
        run_eval(EvalConfig(benchmark="ifeval", prompts=str(prompts_file), responses=str(twice), output=str(tmp_path / "o")))


def test_an_unknown_prompt_is_a_clean_error_with_file_and_line(tmp_path, subset):
    prompts_file, texts = subset
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": texts[0], "response": "Hi"},
                                               {"prompt": "What is the capital of France?", "response": "Paris"}])  # fmt: skip
    done = run_cli("eval", "--benchmark", "ifeval", "--prompts", str(prompts_file), "--responses", str(bad),
                   "--output", str(tmp_path / "o"), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"{bad}:2: the prompt 'What is the capital of France?' is not one of the prompts of --prompts" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o" / "eval.json").exists()


def test_a_bad_instruction_in_the_prompt_file_names_its_line(tmp_path):
    rows = builtin_rows("ifeval")[:2]
    rows[1] = {**rows[1], "instruction_id_list": ["punctuation:no_semicolon"], "kwargs": [{}]}
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(AlignkitError, match=r"p.jsonl:2: unknown IFEval instruction 'punctuation:no_semicolon'"):
        load_prompts(str(path))


@pytest.mark.parametrize("settings, message", [
    (dict(model=TINY_LLAMA, responses="r.jsonl"), "give --model .* or --responses"),
    (dict(), "give --model .* or --responses"),
    (dict(model=TINY_LLAMA, judge="exact"), "--judge: not with --benchmark"),
    (dict(responses="r.jsonl", baseline=TINY_LLAMA, baseline_responses="b.jsonl"), "only scores the model's answers for the KL"),
    (dict(model=TINY_LLAMA, benchmark="alpacaeval"), "unknown benchmark 'alpacaeval'"),
    (dict(model=TINY_LLAMA, benchmark="", responses="r.jsonl"), "add --benchmark ifeval"),
])  # fmt: skip
def test_benchmark_options_are_checked(settings, message):
    with pytest.raises(AlignkitError, match=message):
        EvalConfig(**{"benchmark": "ifeval", "output": "o", **settings}).validate()


# --- a tiny-model run -----------------------------------------------------------------------------------------


def test_a_tiny_model_run_against_a_baseline_writes_every_file_and_a_report(tmp_path, capsys):
    out = tmp_path / "ifeval"
    config = EvalConfig(benchmark="ifeval", model=TINY_LLAMA, baseline=TINY_LLAMA, limit=5, max_new_tokens=6,
                        output=str(out), bootstrap_resamples=100)  # fmt: skip
    config.validate()
    result = run_eval(config)
    saved = json.loads((out / "eval.json").read_text())
    assert saved == result and saved["prompts"] == "builtin:ifeval" and saved["n"] == 5
    assert {"model", "baseline", "difference", "per_type", "bootstrap", "decoding", "config"} <= set(saved)
    for side in ("model", "baseline"):
        assert set(saved[side]) == {"name", "accuracy", "lengths", "timing"}
        assert saved[side]["lengths"]["mean_tokens"] <= 6 and saved[side]["timing"]["generation_s"] > 0
    # the same greedy model on both sides: every paired difference is exactly 0
    assert all(n["value"] == 0.0 and n["ci95"] == [0.0, 0.0] for n in saved["difference"].values())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    keys = [row["key"] for row in builtin_rows("ifeval")[:5]]
    assert [s["key"] for s in samples] == keys
    assert {"prompt", "response", "follow_instruction_list_strict", "follow_instruction_list_loose", "follow_all_strict",
            "follow_all_loose", "tokens", "cut", "baseline"} <= set(samples[0])  # fmt: skip
    assert all(s["cut"] == (s["tokens"] == 6) for s in samples)
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [set(r) for r in responses] == [{"prompt", "response"}] * 5
    assert "instruction-level loose" in capsys.readouterr().out
    page = build_report(out)
    assert "<h2>IFEval</h2>" in page and "prompt-level strict" in page and "model − baseline" in page
    assert "Per instruction type (largest strict gain first)" in page and "key 1000" in page
    assert "win rate" not in page  # not the pairwise-judge section
    # the same model on both sides: its answers are exactly as likely under the baseline, KL 0 on every answer
    assert saved["kl"]["kl"] == 0.0 and saved["kl"]["per_sequence"] == [0.0] * 5 and saved["kl"]["tokens"] > 0
    assert "greedy" in saved["kl"]["note"] and [s["kl"] for s in samples] == [0.0] * 5


def test_generate_output_is_a_response_file(tmp_path, subset):
    prompts_file, texts = subset
    rows = [
        {"prompt": texts[0], "completions": [ANSWERS[0]], "completion_tokens": [7], "finished": [True]},  # generate
        {"prompt": texts[1], "completions": ["a", ANSWERS[1]], "scores": [0.0, 1.0], "best": ANSWERS[1], "best_score": 1.0},  # --best-of
        {"prompt": texts[2], "response": ANSWERS[2]},  # input_response_data
    ]
    mixed = write_jsonl(tmp_path / "generated.jsonl", rows)
    prompts = load_prompts(str(prompts_file))
    assert read_responses(str(mixed), prompts, set(texts)) == ANSWERS
    several = write_jsonl(tmp_path / "several.jsonl", [rows[0], {"prompt": texts[1], "completions": ["a", "b"]}])
    with pytest.raises(AlignkitError, match=r'several.jsonl:2: a response row must be an object with a string "prompt" '
                                            r'and the answer in "response" .*"best" .*"completions" holding one completion'):
        read_responses(str(several), prompts, set(texts))


def test_a_baseline_model_with_its_answers_from_a_file_is_not_regenerated_and_gives_the_kl(tmp_path, capsys):
    prompts = [row["prompt"] for row in builtin_rows("ifeval")[:4]]
    answers = write_jsonl(tmp_path / "start.jsonl", [{"prompt": p, "response": f"Answer {i}, by the start model."}
                                                     for i, p in enumerate(prompts)])  # fmt: skip
    out = tmp_path / "ifeval"
    config = EvalConfig(benchmark="ifeval", model=TINY_LLAMA, baseline=TINY_LLAMA, baseline_responses=str(answers),
                        limit=4, max_new_tokens=6, output=str(out), bootstrap_resamples=50)  # fmt: skip
    config.validate()
    result = run_eval(config)
    logged = capsys.readouterr()
    assert logged.err.count("answering 4 prompts") == 1  # the model answered, the baseline did not
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["baseline"]["response"] for s in samples] == [f"Answer {i}, by the start model." for i in range(4)]
    assert result["baseline"]["name"] == str(answers) and result["baseline"]["timing"]["generation_s"] is None
    kl = result["kl"]
    assert kl["kl"] == 0.0 and kl["tokens"] == sum(s["tokens"] for s in samples) + sum(not s["cut"] for s in samples)
    assert all(math.isfinite(x) for x in (kl["kl"], kl["kl_k3"], kl["kl_per_token"], *kl["per_sequence"]))
    assert [s["kl"] for s in samples] == kl["per_sequence"]
    assert "KL(model || baseline)" in logged.out
