"""The run registry: plain commands and pipelines record themselves, a killed run reads "killed",
`alignkit runs` lists and filters them, and a registry that cannot be written never stops a run."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys

from alignkit.cli import main
from alignkit.models import TINY_LLAMA
from alignkit.pipeline.registry import git_revision, read_runs, registry_path, start_run
from conftest import run_cli

PROMPTS = "builtin:vicuna80"
GENERATE = ["generate", "--model", TINY_LLAMA, "--prompts", PROMPTS, "--limit", "2", "--max-new-tokens", "4"]


def test_commands_are_recorded_with_config_versions_and_outcome(tmp_path, capsys):
    assert main([*GENERATE, "--output", str(tmp_path / "s.jsonl")]) == 0
    assert main([*GENERATE, "--prompts", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "t.jsonl")]) == 2
    failed, done = read_runs()
    assert (done["kind"], done["name"], done["status"]) == ("command", "generate", "done")
    assert done["command"].startswith("alignkit generate --model tiny-llama") and done["output"] == str(tmp_path / "s.jsonl")
    assert done["config"]["limit"] == 2 and done["config"]["max_new_tokens"] == 4
    assert set(done["versions"]) == {"alignkit", "torch", "transformers", "peft", "accelerate"} and done["versions"]["torch"]
    assert done["started"] <= done["ended"] and done["parent"] is None
    assert failed["status"] == "failed" and "missing.jsonl does not exist" in failed["error"]


def test_git_revision_of_a_repository_and_none_outside_one(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    assert git_revision(tmp_path / "repo") is None  # no commit yet
    subprocess.run(["git", "-C", str(tmp_path / "repo"), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    assert re.fullmatch(r"[0-9a-f]{40}", git_revision(tmp_path / "repo") or "")
    assert git_revision(tmp_path) is None


def test_pipeline_and_its_stages_are_recorded_under_it(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: sampling\noutput: {tmp_path / 'out'}\nstages:\n"
        f"  - {{name: sample, command: generate, with: {{model: {TINY_LLAMA}, prompts: {PROMPTS}, limit: 2, max_new_tokens: 4}}}}\n"
        "  - {name: report, command: report}\n"
    )
    assert main(["run", str(path)]) == 0
    rows = read_runs()
    assert [(r["kind"], r["name"], r["status"]) for r in rows] == [("stage", "sample", "done"), ("pipeline", "sampling", "done")]
    stage, pipeline = rows
    assert stage["parent"] == pipeline["id"] and stage["command"] == "generate"
    assert stage["output"] == str(tmp_path / "out" / "sample" / "samples.jsonl")
    assert pipeline["command"] == f"alignkit run {path}" and pipeline["config"]["stages"][0]["name"] == "sample"


def test_a_killed_run_reads_killed_and_runs_lists_and_filters(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    start_run("command", "sft", "alignkit sft --max-steps 3", str(tmp_path / "o"), {"max_steps": 3})
    # The row a process killed with -9 leaves behind: still "running", with a process id that is gone.
    with sqlite3.connect(registry_path()) as connection:
        connection.execute("UPDATE runs SET pid = ?", (dead.pid,))
    start_run("command", "dpo", "alignkit dpo", str(tmp_path / "d"), {})  # this process: alive, so "running"

    assert main(["runs"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "KIND", "NAME", "STATUS", "STARTED", "TIME", "OUTPUT"]
    assert table[1].split()[:4] == ["2", "command", "dpo", "running"] and table[2].split()[:4] == ["1", "command", "sft", "killed"]

    assert main(["runs", "--status", "killed", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["sft"] and rows[0]["config"] == {"max_steps": 3}
    assert main(["runs", "--limit", "1", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["dpo"]
    assert main(["runs", "--status", "kiled"]) == 2 and "--status must be one of" in capsys.readouterr().err


def test_runs_with_an_empty_registry_says_so(capsys):
    assert main(["runs"]) == 0
    assert "no runs recorded" in capsys.readouterr().err


def test_a_registry_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    path = tmp_path / "p.yaml"  # a pipeline: its row and each stage's would be written, and each one fails
    path.write_text(
        f"output: {tmp_path / 'out'}\nstages:\n"
        f"  - {{name: a, command: generate, with: {{model: {TINY_LLAMA}, prompts: {PROMPTS}, limit: 1, max_new_tokens: 2}}}}\n"
        f"  - {{name: b, command: generate, with: {{model: {TINY_LLAMA}, prompts: {PROMPTS}, limit: 1, max_new_tokens: 2}}}}\n"
    )
    result = subprocess.run([sys.executable, "-m", "alignkit", "run", str(path)], capture_output=True, text=True,
                            env={**os.environ, "ALIGNKIT_HOME": str(blocker)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: the run registry") == 1 and "goes unrecorded" in result.stderr
    assert (tmp_path / "out" / "b" / "samples.jsonl").is_file()


def test_runs_lists_a_run_of_another_process(tmp_path):
    assert run_cli(*GENERATE, "--output", str(tmp_path / "s.jsonl"), cwd=tmp_path).returncode == 0
    result = run_cli("runs", "--json")
    (row,) = json.loads(result.stdout)
    assert row["status"] == "done" and row["git_revision"] is None  # tmp_path is no git repository
