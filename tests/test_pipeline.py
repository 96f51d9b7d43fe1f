"""`alignkit run`: the pipeline file's checks, skip / rerun / --from / --until, rounds, the shipped examples on
the tiny model, and a pipeline killed with -9 mid-stage that resumes and ends where an uninterrupted one ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.demo import headline
from alignkit.models import RESOURCES, SMOLLM2, TINY_LLAMA
from alignkit.pipeline.registry import read_runs
from alignkit.pipeline.spec import parse_command
from conftest import ROOT, SFT_DATA, chromium_page, loaded_images, read_metrics
from test_judge_http import FakeOpenAI

PREFS = "builtin:hh-helpful-test"
TWO_STAGES = f"""
name: two
output: {{out}}
defaults: {{model: {TINY_LLAMA}, seed: 0, progress: false, batch_size: 2}}
stages:
  - name: sft
    command: sft
    with: {{data: {SFT_DATA}, limit: 64, max_steps: 2, max_length: 128}}
  - name: dpo
    command: dpo
    with: {{model: "${{sft}}", data: {PREFS}, limit: 8, max_steps: 2, max_length: 256}}
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("{out}", str(tmp_path / "out")), encoding="utf-8")
    return path


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --- the file's checks ------------------------------------------------------------------------------------------

HEAD = "output: o\nstages:\n"
BAD = {
    "unknown command": (HEAD + "  - {name: a, command: sfft}\n", ["p.yaml:3: stage 'a'", "unknown command 'sfft'", "did you mean 'sft'?"]),
    "unknown action": (HEAD + "  - {name: a, command: rm trian}\n", ["'rm' has no action 'trian'", "did you mean 'train'?"]),
    "unknown option": (HEAD + "  - name: a\n    command: sft\n    with:\n      data: x\n      max_stepz: 3\n",
                       ["p.yaml:7: stage 'a'", "unknown option 'max_stepz' of sft", "did you mean 'max_steps'?"]),
    "unknown top-level key": ("output: o\nstagez: []\n", ["p.yaml:2", "unknown key 'stagez'", "did you mean 'stages'?"]),
    "output set by hand": (HEAD + "  - {name: a, command: sft, with: {data: x, output: y}}\n", ["'output' is set by the pipeline", "${a}"]),
    "later stage": (HEAD + "  - {name: a, command: sft, with: {data: x, model: '${b}'}}\n  - {name: b, command: sft, with: {data: x}}\n",
                    ["stage 'a'", "${b} refers to stage 'b', which runs after this one"]),
    "cycle": (HEAD + "  - {name: a, command: sft, with: {data: '${b}/x'}}\n  - {name: b, command: sft, with: {data: '${a}/x'}}\n",
              ["stage 'a'", "which runs after this one"]),
    "own output": (HEAD + "  - {name: a, command: sft, with: {data: x, model: '${a}'}}\n", ["refers to the stage's own output"]),
    "missing stage": (HEAD + "  - {name: sft, command: sft, with: {data: x}}\n  - {name: b, command: dpo, with: {data: x, model: '${sfft}'}}\n",
                      ["p.yaml:4: stage 'b'", "${sfft} names no stage", "did you mean 'sft'?"]),
    "round 1 has no previous": (HEAD + "  - {name: a, command: sft, with: {data: x}}\nrounds:\n  count: 2\n  stages:\n"
                                "    - {name: b, command: sft, with: {data: x, model: '${previous.b}'}}\n",
                                ["stage 'round-1/b'", "round 1 has no previous round", "${previous.b|STAGE}"]),
    "duplicate name": (HEAD + "  - {name: a, command: sft, with: {data: x}}\n  - {name: a, command: sft, with: {data: x}}\n", ["two stages are named 'a'"]),
    "bad value": (HEAD + "  - {name: a, command: sft, with: {data: x, max_steps: many}}\n", ["stage 'a'", "'max_steps' must be an integer"]),
    "bad default": ("output: o\ndefaults: {modle: x}\nstages:\n  - {name: a, command: sft, with: {data: x}}\n", ["p.yaml:2", "default 'modle'", "did you mean 'model'?"]),
    "serve": (HEAD + "  - {name: a, command: label serve}\n", ["'label serve' cannot be a pipeline stage"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_pipeline_files_get_one_located_message(tmp_path, capsys, case):
    text, needles = BAD[case]
    code, out = run(capsys, write(tmp_path, text), "--dry-run")
    assert code == 2 and out.startswith("error: "), out
    for needle in needles:
        assert needle in out, out


def test_bad_yaml_names_file_and_line_and_exits_2(tmp_path):
    path = write(tmp_path, "output: o\nstages:\n  - {name: a, command: sft\n  - {name: b}\n")
    result = subprocess.run([sys.executable, "-m", "alignkit", "run", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert f"{path}:4" in result.stderr and "not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_set_overrides_a_stage_a_default_and_says_which_stage_is_unknown(tmp_path, capsys):
    path = write(tmp_path, TWO_STAGES)
    code, out = run(capsys, path, "--dry-run", "--set", "dpo.beta=0.3", "seed=7")
    assert code == 0, out
    dpo = out[out.index("dpo: dpo") :]
    assert "beta: 0.3" in dpo and "seed: 7" in dpo and f'model: "{tmp_path / "out" / "sft"}"' in dpo
    code, out = run(capsys, path, "--dry-run", "--set", "dop.beta=0.3")
    assert code == 2 and "no stage named 'dop'" in out and "did you mean 'dpo'?" in out


# --- skip, rerun, --from, --until ----------------------------------------------------------------------------


def mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_done_stages_are_skipped_a_changed_one_reruns_with_those_after_it_and_from_forces(tmp_path, capsys):
    path = write(tmp_path, TWO_STAGES)
    out = tmp_path / "out"
    code, log = run(capsys, path)
    assert code == 0, log
    state = json.loads((out / "pipeline.json").read_text())
    assert [state["stages"][k]["status"] for k in ("sft", "dpo")] == ["done", "done"] and state["status"] == "done"
    assert json.loads((out / "dpo" / "run.json").read_text())["config"]["model"] == str(out / "sft")
    page = (out / "report.html").read_text()
    assert 'href="sft/report.html"' in page and 'href="dpo/report.html"' in page and "final loss" in page
    sft_done, dpo_done = mtime(out / "sft" / "summary.json"), mtime(out / "dpo" / "summary.json")

    code, log = run(capsys, path)
    assert code == 0 and "skip sft (done)" in log and "skip dpo (done)" in log, log
    assert (mtime(out / "sft" / "summary.json"), mtime(out / "dpo" / "summary.json")) == (sft_done, dpo_done)

    # A changed stage reruns afresh (no --overwrite needed), and so does every stage after it.
    code, log = run(capsys, path, "--set", "sft.lr=1e-3")
    assert code == 0 and "afresh sft" in log and "its settings changed: lr" in log and "afresh dpo" in log, log
    assert json.loads((out / "sft" / "run.json").read_text())["config"]["lr"] == 1e-3
    dpo_rerun = mtime(out / "dpo" / "summary.json")
    assert dpo_rerun != dpo_done

    code, log = run(capsys, path, "--set", "sft.lr=1e-3", "--from", "dpo")
    assert code == 0 and "skip sft (done)" in log and "afresh dpo" in log and "(--from)" in log, log
    assert mtime(out / "dpo" / "summary.json") != dpo_rerun

    # --until stops after sft; dpo, made from the old sft, must not pass for done on the next run.
    code, log = run(capsys, path, "--until", "sft")
    assert code == 0 and "afresh sft" in log and "dpo" not in log, log
    assert json.loads((out / "pipeline.json").read_text())["stages"]["dpo"]["status"] == "outdated"
    code, log = run(capsys, path, "--dry-run")
    assert "skip    sft" in log and "afresh  dpo: dpo (an earlier stage ran again after it)" in log, log


def test_a_rerun_redoes_only_the_stages_that_read_it_and_only_runs_a_chosen_few(tmp_path, capsys):
    other = f"""  - name: other
    command: sft
    with: {{data: {SFT_DATA}, limit: 32, max_steps: 1, max_length: 128}}
"""
    path = write(tmp_path, TWO_STAGES + other)
    out = tmp_path / "out"
    code, log = run(capsys, path)
    assert code == 0, log
    done = {name: mtime(out / name / "summary.json") for name in ("sft", "dpo", "other")}

    # other reads nothing of sft: a changed sft redoes dpo, which reads it, and leaves other done.
    code, log = run(capsys, path, "--set", "sft.lr=1e-3", "--dry-run")
    assert "afresh  sft" in log and "afresh  dpo: dpo (sft, whose output it reads, runs again)" in log and "skip    other" in log, log

    code, log = run(capsys, path, "--only", "other", "--set", "other.lr=1e-3", "sft.lr=1e-3")
    assert code == 0 and "leave sft (not in --only)" in log and "leave dpo" in log and "afresh other" in log, log
    assert {name: mtime(out / name / "summary.json") for name in ("sft", "dpo")} == {k: done[k] for k in ("sft", "dpo")}
    assert mtime(out / "other" / "summary.json") != done["other"]
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [stages[k]["status"] for k in ("sft", "dpo", "other")] == ["done", "done", "done"]

    # A chosen stage whose input was never made is refused before anything runs.
    code, log = run(capsys, path, "--only", "dpo", "--set", f"output={tmp_path / 'fresh'}")
    assert code == 2 and "stage dpo reads the output of sft, which is not done" in log and "add sft to --only" in log, log
    assert not (tmp_path / "fresh" / "dpo").exists()
    code, log = run(capsys, path, "--only", "dpoo", "--dry-run")
    assert code == 2 and "did you mean 'dpo'?" in log, log


def test_a_failed_stage_stops_the_pipeline_names_the_stage_and_is_recorded(tmp_path, capsys):
    # A file that exists but holds no usable pair fails only when its stage reads it (a missing one is refused
    # before the first stage: tests/test_bad_input.py).
    (tmp_path / "unusable.jsonl").write_text('{"prompt": "q", "chosen": "a"}\n')
    path = write(tmp_path, TWO_STAGES.replace(str(PREFS), str(tmp_path / "unusable.jsonl")))
    code, log = run(capsys, path)
    assert code == 2 and "stage dpo (dpo) failed: missing field 'rejected'" in log and "unusable.jsonl:1" in log, log
    state = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert state["stages"]["sft"]["status"] == "done" and state["stages"]["dpo"]["status"] == "failed"
    assert state["status"] == "failed" and "failed" in (tmp_path / "out" / "report.html").read_text()
    rows = {r["name"]: r for r in read_runs()}
    assert rows["dpo"]["status"] == "failed" and "missing field 'rejected'" in rows["dpo"]["error"]
    assert rows["two"]["status"] == "failed" and rows["sft"]["status"] == "done" and rows["sft"]["parent"] == rows["two"]["id"]


# --- the shipped examples, shrunk to the tiny model ---------------------------------------------------------

DEMO = RESOURCES / "demo.yaml"
EXAMPLES = [*sorted((ROOT / "examples").glob("*.yaml")), DEMO]
PIPELINES = [p for p in EXAMPLES if "stages" in (yaml.safe_load(p.read_text()) or {})]
RLAIF = ROOT / "examples" / "rlaif.yaml"
BAKEOFF = ROOT / "examples" / "ifeval_bakeoff.yaml"
"""scored by IFEval's rules, not a judge's win rate: run end to end in test_bakeoff.py"""
TINY_SIZES = {"max_steps": 2, "limit": 4, "eval_limit": 2, "max_new_tokens": 8, "max_length": 256, "batch_size": 2,
              "rollout_size": 2, "ppo_epochs": 1, "save_every": 2, "num_generations": 2, "eval_fraction": 0.25,
              "bootstrap_resamples": 20, "norm_samples": 8}  # fmt: skip


def tiny_overrides(path: Path, output: Path, judge_url: str = "") -> list[str]:
    """--set words that run `path` on the tiny model in seconds: every size shrunk, every model made tiny.

    The tiny random model, as a judge, prefers whichever answer is shown first, so it calls every pair a tie and
    leaves DPO nothing to train on; `judge_url` replaces it by a server that prefers the longer answer.
    """
    data = yaml.safe_load(path.read_text())
    sets = [f"output={output}", f"model={TINY_LLAMA}", "progress=false"]
    for stage in [*data["stages"], *(data.get("rounds") or {}).get("stages", [])]:
        name, options = stage["name"], parse_command(stage["command"], "test").settable()
        sets += [f"{name}.{k}={v}" for k, v in TINY_SIZES.items() if k in options]
        sets += [f"{name}.{k}={TINY_LLAMA}" for k, v in (stage.get("with") or {}).items() if v == SMOLLM2]
        if stage["command"] == "judge" and judge_url:
            sets.append(f"{name}.judge={judge_url}")
    return sets


def longer_answer(text: str) -> float:
    """P(A) of a judge that prefers the longer answer, read from the helpfulness rubric's layout."""
    a = text.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]\n", 1)
    b = a[1].split("\n\nWhich answer", 1)[0]
    return 0.9 if len(a[0]) > len(b) else 0.1 if len(a[0]) < len(b) else 0.5


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = FakeOpenAI()
    server.rule = longer_answer
    yield server.url + "/v1"
    server.close()


def test_every_example_pipeline_resolves_with_its_real_model(capsys, monkeypatch):
    assert {p.name for p in PIPELINES} >= {"instructgpt.yaml", "dpo.yaml", "grpo_gsm8k.yaml", "rlaif.yaml"}
    monkeypatch.chdir(ROOT)
    for path in PIPELINES:
        code, out = run(capsys, path, "--dry-run")
        assert code == 0, out
        assert f'model: "{SMOLLM2}"' in out or f'baseline: "{SMOLLM2}"' in out, out


@pytest.mark.parametrize("example", [p for p in PIPELINES if p not in (RLAIF, BAKEOFF)], ids=lambda p: p.stem)
def test_example_runs_end_to_end_on_the_tiny_model(tmp_path, capsys, monkeypatch, example):
    monkeypatch.chdir(tmp_path)  # the examples read built-in datasets only, so they run from any directory
    out = tmp_path / "out"
    code, log = run(capsys, example, "--set", *tiny_overrides(example, out))
    assert code == 0, log
    state = json.loads((out / "pipeline.json").read_text())
    assert state["status"] == "done" and all(s["status"] == "done" for s in state["stages"].values()), state
    page = (out / "report.html").read_text()
    assert "pending" not in page and "failed" not in page
    evals = [json.loads(p.read_text()) for p in out.rglob("eval.json")]
    assert evals and all(0 <= e["win_rate"] <= 1 for e in evals)
    assert "win rate" in page
    if example == DEMO:
        lines = dict(headline(out))
        assert lines["win rate of the aligned model over the start model, by the trained RM"].startswith(f"{evals[0]['win_rate']:.2f}")
        assert "95% CI" in lines["... by the held-out judge (RM on human HH-RLHF labels)"]
        # The pipeline page and every stage page it links open offline in a browser with no broken image.
        with chromium_page(out / "report.html") as (browser_page, requests):
            links = browser_page.eval_on_selector_all("a[href$='report.html']", "els => els.map(e => e.href)")
            assert len(links) >= 6, links
            for link in links:
                browser_page.goto(link)
                loaded_images(browser_page)
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
            browser_page.goto((out / "ppo" / "report.html").as_uri())
            assert len(loaded_images(browser_page)) >= 3  # training curves and the held-out checkpoint plots


def test_rounds_of_the_rlaif_example_write_round_directories_and_chain_the_policy(tmp_path, capsys, monkeypatch, judge_server):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    code, log = run(capsys, RLAIF, "--set", *tiny_overrides(RLAIF, out, judge_server))
    assert code == 0, log
    state = json.loads((out / "pipeline.json").read_text())
    assert state["status"] == "done" and all(s["status"] == "done" for s in state["stages"].values()), state
    for number in (1, 2):
        assert (out / f"round-{number}" / "generate" / "samples.jsonl").is_file()
        assert (out / f"round-{number}" / "dpo" / "model").is_dir()
    # Round 1 starts from the SFT model; round 2 samples from and trains round 1's DPO model.
    assert json.loads((out / "round-1" / "dpo" / "run.json").read_text())["config"]["model"] == str(out / "sft")
    round_2 = json.loads((out / "round-2" / "dpo" / "run.json").read_text())["config"]
    assert round_2["model"] == str(out / "round-1" / "dpo") and round_2["data"] == str(out / "round-2" / "judge" / "judge.jsonl")
    assert state["stages"]["round-2/generate"]["settings"]["seed"] == "2"
    page = (out / "report.html").read_text()
    assert "Round 1" in page and 'href="round-1/report.html"' in page and 'href="round-2/report.html"' in page
    assert page.count("win rate") == 2 and "pending" not in page
    round_page = (out / "round-1" / "report.html").read_text()
    assert 'href="../report.html"' in round_page and 'href="dpo/report.html"' in round_page


# --- killed mid-stage ----------------------------------------------------------------------------------------

KILLABLE = f"""
name: killable
output: {{out}}
defaults: {{model: {TINY_LLAMA}, seed: 0, progress: false, batch_size: 2, lr: 3.0e-3}}
stages:
  - name: sft
    command: sft
    with: {{data: {SFT_DATA}, limit: 64, max_steps: 12, max_length: 128, save_every: 2}}
  - name: dpo
    command: dpo
    with: {{model: "${{sft}}", data: {PREFS}, limit: 8, max_steps: 3, max_length: 256, batch_size: 2}}
"""


def test_a_pipeline_killed_mid_stage_resumes_and_ends_where_an_uninterrupted_one_ends(tmp_path, capsys):
    straight = tmp_path / "straight"
    straight.mkdir()
    assert run(capsys, write(straight, KILLABLE))[0] == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    path = write(killed, KILLABLE)
    out = killed / "out"
    proc = subprocess.Popen([sys.executable, "-m", "alignkit", "run", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any((out / "sft" / "checkpoints").glob("step-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "the pipeline ended before its first stage wrote a checkpoint"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "sft" / "summary.json").exists(), "the first stage finished before it was killed"
    assert json.loads((out / "pipeline.json").read_text())["stages"]["sft"]["status"] == "running"
    pipeline_row = next(r for r in read_runs() if r["kind"] == "pipeline")
    assert pipeline_row["status"] == "killed" and pipeline_row["ended"] is None

    code, log = run(capsys, path)
    assert code == 0, log
    assert "resume sft" in log and "resuming from" in log, log
    summary = json.loads((out / "sft" / "summary.json").read_text())
    reference = json.loads((straight / "out" / "sft" / "summary.json").read_text())
    assert summary["resumed_from"] > 0 and summary["steps"] == reference["steps"] == 12
    assert summary["final_loss"] == pytest.approx(reference["final_loss"], abs=1e-4)
    assert [m["loss"] for m in read_metrics(out / "dpo")] == pytest.approx([m["loss"] for m in read_metrics(straight / "out" / "dpo")], abs=1e-4)
    assert json.loads((out / "dpo" / "summary.json").read_text())["final_loss"] == pytest.approx(
        json.loads((straight / "out" / "dpo" / "summary.json").read_text())["final_loss"], abs=1e-4
    )
