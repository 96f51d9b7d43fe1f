"""Nonsense options and faulty files are refused with a message that says what is wrong and where, before
anything loads: every numeric option against the range its field declares, nan and inf, trackers, `--set`,
pipeline inputs, non-UTF-8 data, GSM8K references without a number, and reward functions that hang or exit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.config import build_config, read_yaml_config
from alignkit.data.loading import load_records
from alignkit.errors import AlignkitError, DataError
from alignkit.judge.prompts import load_template
from alignkit.models import TINY_LLAMA
from alignkit.rewards.scorer import check_references
from alignkit.rewards.verifiers import PythonFunction, build_scorer
from conftest import SFT_DATA, write_jsonl

GSM8K = "builtin:gsm8k-train"


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_refused(code: int, text: str, *expected: str) -> None:
    assert code == 2, text
    assert "internal error" not in text and "Traceback" not in text, text
    for part in expected:
        assert part in text, text


# --- options: refused as they are read, before any model or data loads -------------------------------------

SFT = ["sft", "--data", "no-such-file.jsonl", "--output", "unused"]
GRPO = ["grpo", "--prompts", "no-such-file.jsonl", "--output", "unused"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*SFT, "--limit", "-1"], "'--limit' must be ≥ 0, not -1"),
        ([*SFT, "--batch-size", "0"], "'--batch-size' must be ≥ 1, not 0"),
        ([*SFT, "--batch-size", "-3"], "'--batch-size' must be ≥ 1, not -3"),
        ([*SFT, "--max-length", "0"], "'--max-length' must be ≥ 1, not 0"),
        ([*SFT, "--max-length", "-5"], "'--max-length' must be ≥ 1, not -5"),
        ([*SFT, "--lora-r", "-4"], "'--lora-r' must be ≥ 0, not -4"),
        ([*SFT, "--lr", "0"], "'--lr' must be > 0, not 0.0"),
        ([*SFT, "--lr", "nan"], "'--lr' must be a finite number, not 'nan'"),
        ([*SFT, "--lr", "inf"], "'--lr' must be a finite number, not 'inf'"),
        ([*SFT, "--max-steps", "-1"], "'--max-steps' must be ≥ 0, not -1"),
        ([*SFT, "--epochs", "0"], "'--epochs' must be > 0, not 0.0"),
        ([*SFT, "--warmup-ratio", "2"], "'--warmup-ratio' must be in [0, 1], not 2.0"),
        ([*SFT, "--save-every", "-1"], "'--save-every' must be ≥ 0, not -1"),
        ([*SFT, "--grad-accum", "0"], "'--grad-accum' must be ≥ 1, not 0"),
        ([*SFT, "--adam-betas", "1.5"], "each value of '--adam-betas' must be in [0, 1), not 1.5"),
        ([*SFT, "--adam-betas", "0.9", "0.99", "0.5"], "'--adam-betas' takes 2 values, not 3"),
        ([*SFT, "--seed", "-1"], "'--seed' must be in [0, 4294967295], not -1"),
        ([*SFT, "--report-to", "bogus"], "'--report-to' must be one of tensorboard, wandb, mlflow"),
        ([*GRPO, "--temperature", "-1"], "'--temperature' must be ≥ 0, not -1.0"),
        ([*GRPO, "--max-new-tokens", "0"], "'--max-new-tokens' must be ≥ 1, not 0"),
        ([*GRPO, "--num-generations", "1"], "'--num-generations' must be ≥ 2, not 1: advantages compare samples"),
        ([*GRPO, "--top-p", "0"], "'--top-p' must be in (0, 1], not 0.0"),
        ([*GRPO, "--reward-timeout", "-1"], "'--reward-timeout' must be ≥ 0"),
        ([*GRPO, "--temperature", "0"], "--temperature 0 is greedy decoding, so the 4 completions per prompt"),
        ([*GRPO, "--advantage", "rloo", "--num-generations", "2", "--temperature", "0"], "the 2 completions per prompt"),
        (["ppo", "--prompts", "p.jsonl", "--reward", "gsm8k", "--output", "o", "--gamma", "1.5"], "'--gamma' must be in [0, 1]"),
        (["dpo", "--data", "d.jsonl", "--output", "o", "--beta", "0"], "'--beta' must be > 0, not 0.0"),
        (["rsft", "--temperature", "0"], "'--temperature' must be > 0, not 0.0: greedy samples of one prompt are all the same"),
        (["generate", "--prompts", "p", "--output", "o", "--best-of", "4", "--scorer", "gsm8k", "--temperature", "0"],
         "the 4 completions per prompt (--best-of) would all be the same"),
        (["eval", "--bootstrap-resamples", "0"], "'--bootstrap-resamples' must be ≥ 1"),
        (["judge", "--workers", "0"], "'--workers' must be ≥ 1"),
        (["runs", "--limit", "-1"], "'--limit' must be ≥ 0"),
    ],
    ids=lambda value: " ".join(value[:1] + value[len(SFT):]) if isinstance(value, list) else "",
)
def test_nonsense_option_is_a_clear_error(capsys, args, message):
    assert_refused(*cli(capsys, *args), message)


def test_zero_keeps_its_documented_meaning(capsys):
    """0 is 'all' for --limit and 'off' for --save-every, --lora-r and --max-grad-norm: still accepted."""
    from alignkit.algorithms.sft import SFTConfig

    config = build_config(SFTConfig, {"limit": 0, "save_every": 0, "lora_r": 0, "max_grad_norm": 0, "max_steps": 0})
    assert (config.limit, config.save_every, config.lora_r) == (0, 0, 0)


def test_a_tracker_whose_package_is_missing_is_refused_before_training(capsys, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    assert_refused(*cli(capsys, *SFT, "--report-to", "wandb"), "tracker 'wandb' is not installed", "pip install wandb")


def test_help_shows_each_range(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(≥ 1; default: 4)" in text and "(> 0; default: 2e-05)" in text and "(in [0, 1); default: [0.9, 0.999])" in text


def test_yaml_values_are_checked_where_they_are_written(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 0\n")
    assert_refused(*cli(capsys, *SFT, "--config", config), f"{config}: 'batch_size' must be ≥ 1, not 0")
    config.write_text("lr: .nan\n")
    assert_refused(*cli(capsys, *SFT, "--config", config), f"{config}: 'lr' must be a finite number")
    # a flag's bad value is the command line's, not the YAML file's
    config.write_text("batch_size: 2\n")
    code, text = cli(capsys, *SFT, "--config", config, "--lr", "nan")
    assert_refused(code, text, "command line: '--lr' must be a finite number")
    assert str(config) not in text


# --- pipelines ---------------------------------------------------------------------------------------------

PIPELINE = f"""name: p
output: {{out}}
defaults: {{model: {TINY_LLAMA}, progress: false}}
stages:
  - name: sft
    command: sft
    with: {{data: {SFT_DATA}, max_steps: 1}}
  - name: dpo
    command: dpo
    with:
      model: "${{sft}}"
      data: {{dpo_data}}
      max_steps: 1
"""


def pipeline(tmp_path: Path, dpo_data: str = "builtin:hh-helpful-test") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace("{out}", str(tmp_path / "out")).replace("{dpo_data}", dpo_data))
    return path


@pytest.mark.parametrize(
    ("setting", "expected", "not_expected"),
    [
        ("x=[1,", ["--set 'x=[1,': the value is not valid YAML"], []),
        ("sft.max_stepz=3", ["--set sft.max_stepz=3: unknown option 'max_stepz' of sft", "did you mean 'max_steps'"], ["p.yaml:"]),
        ("sft.batch_size=0", ["--set sft.batch_size=0: 'batch_size' must be ≥ 1, not 0"], ["p.yaml:"]),
        ("sft.lr=nan", ["--set sft.lr=nan: 'lr' must be a finite number"], ["p.yaml:"]),
        ("max_stepz=3", ["--set max_stepz=3: default 'max_stepz' is an option of no stage's command"], ["p.yaml:"]),
        ("rounds=0", ["--set rounds=0: rounds: count must be a whole number ≥ 1"], ["p.yaml:"]),
    ],
)
def test_set_errors_name_the_set_item_not_a_yaml_line(capsys, tmp_path, setting, expected, not_expected):
    code, text = cli(capsys, "run", pipeline(tmp_path), "--set", setting)
    assert_refused(code, text, *expected)
    assert not any(part in text for part in not_expected), text


def test_a_bad_value_in_the_file_names_its_line(capsys, tmp_path):
    path = pipeline(tmp_path)
    path.write_text(path.read_text().replace("      max_steps: 1\n", "      max_steps: -1\n"))
    assert_refused(*cli(capsys, "run", path), f"{path}:13: stage 'dpo': 'max_steps' must be ≥ 0, not -1")


def test_a_missing_input_of_a_later_stage_is_found_before_the_first_stage_runs(capsys, tmp_path):
    path = pipeline(tmp_path, dpo_data="no/such/prefs.jsonl")
    assert_refused(*cli(capsys, "run", path), f"{path}:12: stage 'dpo': 'data': no/such/prefs.jsonl does not exist")
    assert not (tmp_path / "out" / "sft").exists()
    # ${here} is a plain path too; an output of an earlier stage (${sft}) is not checked, as it appears only when it runs
    path = pipeline(tmp_path, dpo_data='"${here}/prefs.jsonl"')
    assert_refused(*cli(capsys, "run", path, "--dry-run"), f"'data': {tmp_path}/prefs.jsonl does not exist")
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert cli(capsys, "run", path, "--dry-run")[0] == 0


# --- data files --------------------------------------------------------------------------------------------


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    with pytest.raises(AlignkitError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at byte 14 of the line\)"):
        load_records(str(path), "text")
    records, report = load_records(str(path), "text", skip_invalid=True)
    assert len(records) == 2 and "skipped: 1 not UTF-8 text" in report.summary()
    whole = tmp_path / "bad.json"
    whole.write_bytes(b'[{"text": "fine"},\n {"text": "caf\xe9"}]')
    with pytest.raises(AlignkitError, match=rf"{whole}:2: not UTF-8 text"):
        load_records(str(whole), "text")


def test_the_prompt_builders_readers_name_the_file_and_line(tmp_path):
    from alignkit.data.constraints import read_bases
    from alignkit.data.decontaminate import read_prompts

    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"prompt": "Write a poem."}\n{"prompt": "caf\xe9"}\n')
    for read in (lambda: read_bases([path]), lambda: read_prompts(path)):
        with pytest.raises(AlignkitError, match=rf"{path}:2: not UTF-8 text"):
            read()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_order_mark_is_read_past(tmp_path, suffix):
    path = tmp_path / f"bom{suffix}"
    rows = [{"text": "first"}, {"text": "second"}]
    body = "\n".join(map(json.dumps, rows)) if suffix == ".jsonl" else json.dumps(rows)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    records, _ = load_records(str(path), "text")
    assert [r.text for r in records] == ["first", "second"]


@pytest.mark.parametrize(
    ("body", "what"),
    [("[" * 100_000, "nested too deeply"),
     ('[{"text": "fine"},\n {"text": "big", "n": ' + "9" * 5000 + "}]", "value has 5000 digits")],
    ids=["deep", "huge-integer"],
)  # fmt: skip
def test_unreadable_json_in_a_whole_json_file_names_the_file(tmp_path, body, what):
    # Before: RecursionError or ValueError escaped as an internal error (the .jsonl reader already caught them).
    path = tmp_path / "data.json"
    path.write_text(body)
    for skip_invalid in (False, True):
        with pytest.raises(DataError, match=rf"^{path}: JSON that cannot be read \(.*{what}") as caught:
            load_records(str(path), "text", skip_invalid=skip_invalid)
        assert "set_int_max_str_digits" not in caught.value.render() and ".jsonl" in caught.value.fix


def test_yaml_and_template_files_that_are_not_utf8_name_the_line_and_a_bom_is_read_past(capsys, tmp_path):
    # Before: "internal error: UnicodeDecodeError … position 26", with no file or line.
    config = tmp_path / "sft.yaml"
    config.write_bytes(b"data: d.jsonl\noutput: caf\xe9\n")
    assert_refused(*cli(capsys, "sft", "--config", config), f"{config}:2: not UTF-8 text (byte 0xe9 at byte 12 of the line)")
    config.write_bytes(b"\xef\xbb\xbfdata: d.jsonl\nmax_steps: 3\n")
    assert read_yaml_config(config) == {"data": "d.jsonl", "max_steps": 3}

    template = tmp_path / "judge.txt"
    body = "Which is better?\n{prompt}\nA: {answer_a}\nB: {answer_b}\n"
    template.write_bytes(body.encode() + b"caf\xe9\n")
    with pytest.raises(DataError, match=rf"^{template}:5: not UTF-8 text"):
        load_template(str(template))
    template.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_template(str(template)).text == body


@pytest.mark.parametrize(
    ("reward", "rows", "message"),
    [
        ("gsm8k", [{"question": "1+1?", "final": "2"}, {"question": "2+2?", "final": "four"}],
         "prompts.jsonl:2: scorer 'gsm8k': the reference answer has no number in it: 'four'"),
        ("gsm8k*1+format*0.2", [{"question": "1+1?"}], "prompts.jsonl:1: scorer 'gsm8k': the reference answer has no number"),
        ("exact", [{"prompt": "say hi", "answer": "hi"}, {"prompt": "say yo"}],
         "prompts.jsonl:2: scorer 'exact' compares completions with a reference answer, and this prompt has none"),
    ],
)
def test_unusable_references_are_found_at_load_time(tmp_path, reward, rows, message):
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    records, _ = load_records(str(path), "prompt")
    with pytest.raises(AlignkitError, match=message.replace("*", r"\*").replace("?", r"\?").replace("+", r"\+")):
        check_references(build_scorer(reward), records)  # type: ignore[arg-type]


def test_grpo_reports_a_reference_without_a_number_before_training(capsys, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"question": "1+1?", "final": "2"}, {"question": "2+2?", "final": "n/a"}])
    common = ["grpo", "--model", TINY_LLAMA, "--prompts", prompts, "--output", tmp_path / "out", "--progress", "false"]
    assert_refused(*cli(capsys, *common), f"{prompts}:2: scorer 'gsm8k': the reference answer has no number in it")
    assert_refused(*cli(capsys, *common, "--max-prompt-length", "2"),
                   "all 2 prompts are longer than --max-prompt-length 2 tokens", "raise --max-prompt-length")
    assert not (tmp_path / "out" / "model").exists()


# --- user reward functions ---------------------------------------------------------------------------------


def rewards_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "import sys, time\n"
        "def hangs(completions):\n    time.sleep(600)\n"
        "def exits(completions):\n    sys.exit(3)\n"
        "def fine(completions):\n    return [float(len(c)) for c in completions]\n"
    )
    return path


def test_a_reward_function_that_hangs_stops_the_run_after_the_timeout(tmp_path):
    scorer = build_scorer(f"python:{rewards_file(tmp_path)}:hangs", timeout=0.3)
    started = time.perf_counter()
    with pytest.raises(AlignkitError, match=r"reward function 'hangs' did not return within 0.3 s \(--reward-timeout\)"):
        scorer.score([()], ["an answer"])
    assert time.perf_counter() - started < 5


def test_a_reward_function_that_exits_is_an_error_not_the_end_of_the_run(tmp_path):
    scorer = build_scorer(f"python:{rewards_file(tmp_path)}:exits")
    with pytest.raises(AlignkitError, match=r"reward function 'exits' called sys.exit\(3\) instead of returning scores") as caught:
        scorer.score([()], ["an answer"])
    assert "my_rewards.py:exits" in str(caught.value)


def test_a_reward_function_that_returns_is_unchanged_by_the_worker(tmp_path):
    scorer = PythonFunction(f"{rewards_file(tmp_path)}:fine", timeout=5)
    assert scorer.score([(), ()], ["ab", "abcd"]).tolist() == [2.0, 4.0]
    no_limit = PythonFunction(lambda completions: [1 / 0 for _ in completions], timeout=0)
    with pytest.raises(AlignkitError, match="raised ZeroDivisionError"):
        no_limit.score([()], ["x"])
