"""Bad input gets one clear message (what, where, what to do), a non-zero exit, and no traceback."""

from __future__ import annotations

from alignkit.commands import COMMANDS
from alignkit.models import TINY_LLAMA
from conftest import SFT_DATA, run_cli, write_jsonl

TINY = ["--model", TINY_LLAMA, "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--no-progress"]


def assert_clean_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_help_lists_every_stage_and_option_docs():
    result = run_cli("--help")
    for name in COMMANDS:
        assert name in result.stdout
    sft_help = run_cli("sft", "--help").stdout
    assert "--lora-r" in sft_help and "LoRA rank" in sft_help and "--mix-ratio" in sft_help


def test_missing_data_file(tmp_path):
    assert_clean_error(run_cli("sft", *TINY, "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")), "nope.jsonl", "does not exist")


def test_malformed_json_line_names_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '])
    assert_clean_error(run_cli("sft", *TINY, "--data", str(data), "--output", str(tmp_path / "o")), f"{data}:2", "malformed JSON", "--skip-invalid")


def test_missing_field_names_file_line_and_field(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"instruction": "a"}'])
    assert_clean_error(run_cli("sft", *TINY, "--data", str(data), "--output", str(tmp_path / "o")), f"{data}:1", "missing field 'output'")


def test_unknown_model(tmp_path):
    assert_clean_error(run_cli("sft", *TINY, "--model", "no-such-model", "--data", str(SFT_DATA), "--output", str(tmp_path / "o")), "no-such-model", "alias")


def test_unknown_config_key_suggests_the_right_one(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.1\nlr: 0.1\n")
    assert_clean_error(run_cli("sft", "--config", str(config), "--data", str(SFT_DATA)), "unknown option 'learning_rate'", str(config))
    config.write_text("max_stepz: 3\n")
    assert_clean_error(run_cli("sft", "--config", str(config)), "did you mean 'max_steps'")


def test_bad_value_type_in_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: many\n")
    assert_clean_error(run_cli("sft", "--config", str(config), "--data", str(SFT_DATA), "--output", "x"), "'max_steps' must be an integer")


def test_output_dir_of_another_run_is_refused_and_kept(tmp_path):
    out = tmp_path / "o"
    first = run_cli("sft", *TINY, "--data", str(SFT_DATA), "--output", str(out), "--save-every", "1")
    assert first.returncode == 0, first.stderr
    before = (out / "summary.json").read_text()
    result = run_cli("sft", *TINY, "--lr", "0.5", "--data", str(SFT_DATA), "--output", str(out))
    assert_clean_error(result, "another run", "lr", "--overwrite")
    assert (out / "summary.json").read_text() == before and (out / "model" / "model.safetensors").exists()
    again = run_cli("sft", *TINY, "--data", str(SFT_DATA), "--output", str(out))
    assert again.returncode == 0 and "already holds a complete run" in again.stdout + again.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("sft", "--debug", *TINY, "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" in result.stderr
