"""`alignkit eval` on the tiny model: a model against itself is an exact tie with zero KL; a briefly
fine-tuned model differs from its base (KL > 0); and the pairwise numbers from known scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignkit.algorithms.sft import SFTConfig, run_sft
from alignkit.cli import main
from alignkit.evaluation.evaluate import EvalConfig, compare, run_eval
from alignkit.models import TINY_LLAMA
from conftest import SFT_DATA, write_jsonl

PROMPTS = [{"prompt": "Say hi"}, {"prompt": "What is 2+2?"}, {"prompt": "Name a colour"}, {"prompt": "Tell a joke"},
           {"prompt": "Why is the sky blue?"}, {"prompt": "Write a haiku"}]  # fmt: skip


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """tiny-llama after 3 SFT steps at a high learning rate: a model measurably different from its base."""
    out = tmp_path_factory.mktemp("sft") / "out"
    config = SFTConfig(model=TINY_LLAMA, data=str(SFT_DATA), output=str(out), max_steps=3, batch_size=4,
                       max_length=128, lr=3e-3, eval_fraction=0.05, progress=False)  # fmt: skip
    config.validate()
    run_sft(config)
    return out


def eval_config(tmp_path, prompts, judge, **overrides) -> EvalConfig:
    settings = dict(model=TINY_LLAMA, baseline=TINY_LLAMA, prompts=str(prompts), judge=judge,
                    output=str(tmp_path / "eval"), max_new_tokens=8, bootstrap_resamples=200)  # fmt: skip
    settings.update(overrides)
    config = EvalConfig(**settings)
    config.validate()
    return config


def test_a_model_against_itself_ties_with_zero_kl(tmp_path, prompts, e_reward):
    result = run_eval(eval_config(tmp_path, prompts, e_reward, temperature=1.0, seed=3))
    assert result["win_rate"] == 0.5
    low, high = result["win_rate_ci95"]
    assert low <= 0.5 <= high
    assert result["ties"] == len(PROMPTS)
    assert result["kl"]["kl"] == 0.0 and result["kl"]["kl_k3"] == 0.0
    assert result["kl"]["tokens"] > 0
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["win_rate"] == 0.5 and "length_controlled" in saved and "diversity" in saved
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROMPTS)
    assert {"prompt", "answer_model", "answer_baseline", "score_model", "score_baseline"} <= set(rows[0])
    assert all(r["answer_model"] == r["answer_baseline"] for r in rows)


def test_a_fine_tuned_model_has_positive_kl_to_its_base_and_alignment_tax(tmp_path, prompts, e_reward, fine_tuned):
    task = write_jsonl(tmp_path / "task.jsonl", [{"question": "What is 2+3?", "answer": "5"},
                                                 {"question": "What is 1+1?", "answer": "2"}])  # fmt: skip
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"instruction": "Say hi", "output": "Hello there!"},
                                                       {"instruction": "Count to 3", "output": "1 2 3"}])  # fmt: skip
    config = eval_config(tmp_path, prompts, e_reward, model=str(fine_tuned), task_prompts=str(task),
                         heldout_data=str(heldout), max_new_tokens=16, temperature=1.0)  # fmt: skip
    result = run_eval(config)
    # Sampled answers (temperature 1) make the k1 mean an unbiased KL estimate; k3 is positive term by term.
    assert result["kl"]["kl"] > 0 and result["kl"]["kl_k3"] > 0
    assert len(result["kl"]["per_sequence"]) == len(PROMPTS)
    tax = result["alignment_tax"]
    assert set(tax["before_after"]) == {"gsm8k", "perplexity"}
    assert tax["perplexity_ratio"] > 0
    assert 0.0 <= result["win_rate"] <= 1.0


def test_the_command_line_writes_both_files_and_prints_a_table(tmp_path, prompts, e_reward, capsys):
    out = tmp_path / "cli"
    code = main(["eval", "--model", TINY_LLAMA, "--baseline", TINY_LLAMA, "--prompts", str(prompts), "--judge", e_reward,
                 "--limit", "2", "--max-new-tokens", "4", "--output", str(out)])  # fmt: skip
    assert code == 0
    assert (out / "eval.json").exists() and len((out / "samples.jsonl").read_text().splitlines()) == 2
    assert "win rate" in capsys.readouterr().out


def test_missing_options_are_named(tmp_path, capsys):
    assert main(["eval", "--model", TINY_LLAMA, "--output", str(tmp_path / "x")]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_pairwise_numbers_from_known_scores():
    # The model wins 3, loses 1, ties 1; longer answers win, which length control discounts.
    result = compare(np.array([2.0, 2.0, 2.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0, 1.0, 1.0]),
                     np.array([9.0, 8.0, 9.0, 3.0, 5.0]), np.array([5.0, 5.0, 5.0, 5.0, 5.0]),
                     ["a b", "a c", "a b", "d", "e f"], ["x", "y", "I can't help with that.", "z", "w"],
                     n_resamples=200)  # fmt: skip
    assert result["win_rate"] == pytest.approx(0.7)
    assert (result["wins"], result["ties"], result["losses"]) == (3, 1, 1)
    assert result["length_controlled"]["length_coef"] > 0
    assert result["length_controlled"]["win_rate"] < 0.7
    assert result["refusal_rate"] == {"model": 0.0, "baseline": 0.2}
    assert result["diversity"]["distinct_1"] == pytest.approx(6 / 9)


def test_a_gold_judge_is_scored_on_the_same_answers(tmp_path, prompts, e_reward, fine_tuned):
    # The gold judge scores exactly the opposite of the judge, so its win rate is the judge's mirrored.
    gold_file = tmp_path / "gold.py"
    gold_file.write_text("def fewer_e(prompts, completions, references):\n    return [-c.count('e') / max(len(c), 1) for c in completions]\n")
    result = run_eval(eval_config(tmp_path, prompts, e_reward, model=str(fine_tuned), temperature=1.0,
                                  gold_judge=f"python:{gold_file}:fewer_e"))  # fmt: skip
    gold = result["gold"]
    assert gold["judge"].endswith(":fewer_e")
    assert gold["wins"] == result["losses"] and gold["losses"] == result["wins"]
    assert gold["win_rate"] == pytest.approx(1.0 - result["win_rate"])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["gold_score_model"] == pytest.approx(-rows[0]["score_model"])
