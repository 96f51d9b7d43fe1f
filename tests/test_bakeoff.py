"""`alignkit report --compare`: the comparison's numbers by hand from handmade eval.json files, the page, PATH.json
and PATH.md, the errors that name their entry, and examples/ifeval_bakeoff.yaml end to end on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.report.bakeoff import comparison, load_method, markdown, parse_entries, per_type_gains, tables, training_curves
from conftest import ROOT, chromium_page, loaded_images, write_jsonl
from test_pipeline import run, tiny_overrides

LEVELS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose")


def numbers(values: tuple[float, float, float, float], half_width: float) -> dict:
    """The four numbers in eval.json's form, each interval `half_width` either side of its value."""
    return {key: {"value": v, "ci95": [v - half_width, v + half_width]} for key, v in zip(LEVELS, values)}


def ifeval_result(name: str, accuracy: tuple, *, baseline: tuple | None = None, difference: dict | None = None,
                  kl: dict | None = None, per_type: list | None = None, generation_s: float | None = 100.0) -> dict:  # fmt: skip
    result = {
        "benchmark": "ifeval", "n": 4, "instructions": 6, "prompts": "builtin:ifeval", "decoding": {"max_new_tokens": 64},
        "model": {"name": name, "accuracy": numbers(accuracy, 0.1),
                  "lengths": {"mean_tokens": 40.0, "mean_words": 30.0, "cut": 1, "cut_share": 0.25},
                  "timing": {"generation_s": generation_s, "tokens_per_s": 1.6}},
        "per_type": per_type or [],
    }  # fmt: skip
    if baseline is not None:
        result["baseline"] = {"name": "start-model", "accuracy": numbers(baseline, 0.1)}
        result["difference"] = difference
    if kl is not None:
        result["kl"] = kl
    return result


def type_row(instruction: str, count: int, baseline_loose: float, difference_loose: float) -> dict:
    return {"instruction": instruction, "count": count, "model_strict": 0.0, "model_loose": baseline_loose + difference_loose,
            "baseline_strict": 0.0, "baseline_loose": baseline_loose, "difference_strict": 0.0, "difference_loose": difference_loose}  # fmt: skip


@pytest.fixture
def bakeoff(tmp_path) -> Path:
    """A pipeline's output by hand: the start model's eval, a GRPO run and its eval, best-of-3 samples and their eval,
    and pipeline.json with each stage's wall time."""
    out = tmp_path / "out"
    start, grpo, grpo_eval, best, best_eval = (out / name for name in ("start", "grpo", "grpo_eval", "best", "best_eval"))
    for directory in (start, grpo, grpo_eval, best, best_eval):
        directory.mkdir(parents=True)
    (start / "eval.json").write_text(json.dumps(ifeval_result("start-model", (0.25, 0.25, 0.5, 0.5))))
    (grpo_eval / "eval.json").write_text(json.dumps(ifeval_result(
        str(grpo), (0.5, 0.75, 0.5, 0.75), baseline=(0.25, 0.25, 0.5, 0.5),
        difference={"prompt_level_strict": {"value": 0.25, "ci95": [-0.25, 0.5]}, "prompt_level_loose": {"value": 0.5, "ci95": [0.25, 0.75]},
                    "instruction_level_strict": {"value": 0.0, "ci95": [-0.25, 0.25]}, "instruction_level_loose": {"value": 0.25, "ci95": [0.0, 0.5]}},
        kl={"kl": 0.125, "kl_k3": 0.1, "per_sequence": [0.1, 0.15]},
        per_type=[type_row("punctuation:no_comma", 2, 0.5, 0.5), type_row("length_constraints:number_words", 3, 0.0, -0.25)])))  # fmt: skip
    (best_eval / "eval.json").write_text(json.dumps(ifeval_result(
        str(best / "samples.jsonl"), (0.5, 0.5, 0.5, 0.5), baseline=(0.25, 0.25, 0.5, 0.5), generation_s=None,
        difference={key: {"value": 0.25, "ci95": [-0.25, 0.5]} for key in LEVELS},
        per_type=[type_row("punctuation:no_comma", 2, 0.5, 0.0), type_row("length_constraints:number_words", 3, 0.0, 0.25)])))  # fmt: skip
    (grpo / "run.json").write_text(json.dumps({"algorithm": "grpo-grpo", "config": {}}))
    (grpo / "summary.json").write_text(json.dumps({"wall_s": 600.0, "tokens": 12000, "steps": 4}))
    write_jsonl(grpo / "metrics.jsonl", [{"step": s, "loss": 0.1, "reward": 0.1 * s, "kl": 0.01 * s} for s in (1, 2, 3, 4)])
    write_jsonl(best / "samples.jsonl", [{"prompt": f"p{i}", "completions": ["a", "b", "c"], "completion_tokens": [5, 6, 7],
                                          "best": "a", "best_score": 1.0, "scores": [1.0, 0.0, 0.5]} for i in range(4)])  # fmt: skip
    walls = {"start": (start, 60.0), "grpo": (grpo, 900.0), "grpo_eval": (grpo_eval, 90.0),
             "best": (best / "samples.jsonl", 300.0), "best_eval": (best_eval, 5.0)}  # fmt: skip
    state = {"name": "bakeoff", "command": "alignkit run bakeoff.yaml", "machine": "2 × test CPU",
             "stages": {k: {"output": str(path), "status": "done", "wall_s": wall} for k, (path, wall) in walls.items()}}  # fmt: skip
    (out / "pipeline.json").write_text(json.dumps(state))
    return out


def entries(out: Path) -> list[str]:
    return [f"start={out / 'start'}", f"grpo={out / 'grpo_eval'}@{out / 'grpo'}", f"best-of-3={out / 'best_eval'}@{out / 'best' / 'samples.jsonl'}"]


def test_the_comparison_numbers_by_hand(bakeoff):
    methods = [load_method(e) for e in parse_entries(entries(bakeoff))]
    result = comparison(methods, "a note", {"command": "alignkit run bakeoff.yaml", "machine": "2 × test CPU"})
    start, grpo, best = result["methods"]
    assert [m["name"] for m in result["methods"]] == ["start", "grpo", "best-of-3"]
    assert [m["made_by"] for m in result["methods"]] == [None, "grpo-grpo", "best-of-3 sampling"]
    # The headline first; each number as eval.json gives it.
    assert list(grpo["accuracy"]) == ["prompt_level_loose", "prompt_level_strict", "instruction_level_strict", "instruction_level_loose"]
    assert grpo["accuracy"]["prompt_level_loose"] == {"value": 0.75, "ci95": [0.65, 0.85]}
    assert start["difference"] is None and start["kl"] is None
    # [0.25, 0.75] lies above 0; [-0.25, 0.5] and [0.0, 0.5] do not exclude it.
    assert grpo["difference"]["prompt_level_loose"]["excludes_zero"] is True
    assert grpo["difference"]["prompt_level_strict"]["excludes_zero"] is False
    assert grpo["difference"]["instruction_level_loose"]["excludes_zero"] is False
    assert grpo["kl"]["value"] == 0.125 and grpo["kl"]["bound"] is False
    # Best-of-3 has no model to measure: log 3 - 2/3.
    assert best["kl"]["value"] == pytest.approx(math.log(3) - 2 / 3) and best["kl"]["bound"] is True
    assert best["compute"]["sampled_completions"] == 12 and best["compute"]["sampled_tokens"] == 4 * (5 + 6 + 7)
    # Wall time: the stages of each method from pipeline.json; the start model is its eval alone.
    assert start["compute"]["wall_s"] == 60.0
    assert grpo["compute"] == {"train_stage_s": 900.0, "train_loop_s": 600.0, "train_tokens": 12000, "sampled_completions": None,
                                    "sampled_tokens": None, "eval_generation_s": 100.0, "eval_stage_s": 90.0, "wall_s": 990.0}  # fmt: skip
    assert best["compute"]["wall_s"] == 305.0 and best["compute"]["eval_generation_s"] is None
    assert result["header"] == "a note; `alignkit run bakeoff.yaml` on 2 × test CPU; wall time of the compared stages 22.6 min"
    assert result["notices"] == []
    # Per type: mean gain (0.5 + 0) / 2 = 0.25 before (-0.25 + 0.25) / 2 = 0; the start model has no column.
    gains = per_type_gains(methods)
    assert [(r["instruction"], r["gains"]) for r in gains] == [
        ("punctuation:no_comma", {"grpo": 0.5, "best-of-3": 0.0}),
        ("length_constraints:number_words", {"grpo": -0.25, "best-of-3": 0.25}),
    ]
    assert gains[0]["count"] == 2 and gains[0]["baseline_loose"] == 0.5
    # Curves against the share of the run: steps 1..4 of 4.
    curves = training_curves(methods)
    assert list(curves) == ["reward of the sampled answers", "KL to the reference (k3 per token)"]
    assert curves["reward of the sampled answers"] == {"grpo": ([0.25, 0.5, 0.75, 1.0], [0.1, 0.2, pytest.approx(0.3), 0.4])}


def test_evals_that_differ_get_a_notice(bakeoff):
    other = json.loads((bakeoff / "grpo_eval" / "eval.json").read_text())
    other |= {"n": 5, "decoding": {"max_new_tokens": 32}, "baseline": other["baseline"] | {"name": "other-model"}}
    (bakeoff / "grpo_eval" / "eval.json").write_text(json.dumps(other))
    result = comparison([load_method(e) for e in parse_entries(entries(bakeoff))])
    assert len(result["notices"]) == 3
    assert "number of prompts (start: 4, grpo: 5, best-of-3: 4)" in result["notices"][0]
    assert "--max-new-tokens (start: 64, grpo: 32, best-of-3: 64)" in result["notices"][1]
    assert "baseline (grpo: other-model, best-of-3: start-model)" in result["notices"][2]  # the start model has none
    assert result["header"] == "wall time of the compared stages 22.6 min"  # no note, no pipeline passed


def test_the_markdown_is_a_clean_table(bakeoff):
    result = comparison([load_method(e) for e in parse_entries(entries(bakeoff))], "run on a laptop")
    text = markdown(result)
    lines = text.splitlines()
    assert lines[0] == "# IFEval bake-off" and lines[2].startswith("run on a laptop")
    head = "| method | prompt-level loose | prompt-level strict | instruction-level strict | instruction-level loose |"
    start = lines.index(next(line for line in lines if line.startswith(head)))
    assert lines[start + 1] == "|" + "---|" * 11
    assert lines[start + 2] == "| start | 0.250 [0.150, 0.350] | 0.250 [0.150, 0.350] | 0.500 [0.400, 0.600] | 0.500 [0.400, 0.600] | - | - | - | 40 | 25% | 60.0 s |"
    assert lines[start + 3] == ("| grpo | 0.750 [0.650, 0.850] | 0.500 [0.400, 0.600] | 0.500 [0.400, 0.600] | 0.750 [0.650, 0.850] "
                                "| +0.500 [+0.250, +0.750] | yes | 0.125 | 40 | 25% | 16.5 min |")  # fmt: skip
    assert lines[start + 4].startswith("| best-of-3 | 0.500 [0.400, 0.600] |") and "| no | ≤ 0.432 (bound) |" in lines[start + 4]
    assert "| punctuation:no_comma | 2 | 0.50 | +0.50 | +0.00 |" in lines
    assert "| grpo | 15.0 min | 10.0 min | 12,000 | - | - | 100.0 s | 90.0 s | 16.5 min |" in lines
    # Every table row has as many cells as its header.
    for title, head_cells, rows in tables(result):
        assert all(len(row) == len(head_cells) for row in rows), title


def test_the_command_writes_the_page_json_and_markdown_and_the_page_loads(bakeoff, tmp_path):
    target = tmp_path / "pages" / "bakeoff.html"
    assert main(["report", "--compare", *entries(bakeoff), "--output", str(target), "--note", "by hand"]) == 0
    page = target.read_text()
    assert json.loads(target.with_suffix(".json").read_text())["methods"][1]["kl"]["value"] == 0.125
    assert target.with_suffix(".md").read_text().startswith("# IFEval bake-off\n\nby hand")
    # The bar chart and the reward and KL curves; the tables with a row per method, and the per-type table.
    assert page.count('src="data:image/png;base64,') == 3
    assert 'alt="prompt-level loose per method with 95% intervals"' in page
    assert 'alt="reward of the sampled answers against training progress"' in page
    assert "<tr><td>grpo</td><td>0.750 [0.650, 0.850]</td>" in page and "<tr><td>start</td><td>0.250 [0.150, 0.350]</td>" in page
    assert "<tr><td>best-of-3</td><td>0.500 [0.400, 0.600]</td>" in page and "<td>best-of-3 sampling</td>" in page
    assert "Gains per instruction type" in page and "<td>punctuation:no_comma</td><td>2</td><td>0.50</td><td>+0.50</td><td>+0.00</td>" in page
    assert "http://" not in page and "https://" not in page
    with chromium_page(target) as (browser_page, requests):
        assert len(loaded_images(browser_page)) == 3
        assert all(u.startswith(("file:", "data:")) for u in requests), requests


ERRORS = {
    "no =": (lambda out: ["grpo"], "compare entry 'grpo' is not NAME=EVAL_DIR or NAME=EVAL_DIR@TRAIN_DIR"),
    "empty train": (lambda out: [f"grpo={out / 'grpo_eval'}@"], "is not NAME=EVAL_DIR"),
    "same name": (lambda out: [f"a={out / 'start'}", f"a={out / 'grpo_eval'}"], "a second method named 'a'"),
    "missing eval": (lambda out: [f"x={out / 'nowhere'}"], "compare entry 'x=" + "{out}/nowhere': the eval directory"),
    "not ifeval": (lambda out: [f"grpo={out / 'grpo'}"], "holds no eval.json"),
    "win rate eval": (lambda out: [f"w={out / 'winrate'}"], "holds an eval.json that is not an IFEval result"),
    "missing train": (lambda out: [f"grpo={out / 'grpo_eval'}@{out / 'nowhere'}"], "compare entry 'grpo=" + "{out}/grpo_eval@{out}/nowhere': {out}/nowhere does not exist"),
}  # fmt: skip


@pytest.mark.parametrize("case", ERRORS)
def test_bad_entries_are_errors_naming_the_entry(bakeoff, tmp_path, capsys, case):
    (bakeoff / "winrate").mkdir()
    (bakeoff / "winrate" / "eval.json").write_text(json.dumps({"win_rate": 0.5, "model": "m"}))
    given, message = ERRORS[case]
    code = main(["report", "--compare", *given(bakeoff), "--output", str(tmp_path / "c.html")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message.format(out=bakeoff) in err, err
    assert not (tmp_path / "c.html").exists()


def test_compare_needs_an_html_output_and_no_run_directories(bakeoff, capsys):
    assert main(["report", "--compare", f"s={bakeoff / 'start'}"]) == 2
    assert "give --output PATH.html" in capsys.readouterr().err
    assert main(["report", str(bakeoff / "grpo"), "--compare", f"s={bakeoff / 'start'}", "--output", "c.html"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    ('{compare: ["start${start}"]}', "compare entry 'start"),
    ('{compare: ["start=${start}"], notes: x}', "unknown option 'notes' of report"),
])  # fmt: skip
def test_a_bad_report_stage_fails_before_any_stage_runs(tmp_path, capsys, options, message):
    path = tmp_path / "p.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\nstages:\n  - {{name: start, command: eval, with: {{benchmark: ifeval, model: tiny-llama}}}}\n"
                    f"  - {{name: cmp, command: report, with: {options}}}\n")  # fmt: skip
    code, log = run(capsys, path)
    assert code == 2 and "p.yaml:4: stage 'cmp'" in log and message in log, log
    assert not (tmp_path / "out" / "start").exists()


# --- the example pipeline on the tiny model ----------------------------------------------------------------------

BAKEOFF = ROOT / "examples" / "ifeval_bakeoff.yaml"
METHODS = ["start", "best_of_8", "rsft", "dpo", "grpo", "rloo", "ppo"]


def test_the_bakeoff_example_runs_end_to_end_on_the_tiny_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    # Beyond the shared tiny sizes: the sampling options no other example has. The tiny random model's best answer
    # rarely follows half its constraints, so RSFT keeps every prompt's best.
    extra = ["rsft.prompt_limit=4", "rsft.num_samples=2", "rsft.min_score=null", "dpo.prompt_limit=8", "dpo.num_samples=4",
             "dpo.sample_max_new_tokens=8"]  # fmt: skip
    code, log = run(capsys, BAKEOFF, "--set", *tiny_overrides(BAKEOFF, out), *extra)
    assert code == 0, log
    state = json.loads((out / "pipeline.json").read_text())
    assert state["status"] == "done" and all(s["status"] == "done" for s in state["stages"].values()), state
    result = json.loads((out / "bakeoff.json").read_text())
    assert [m["name"] for m in result["methods"]] == METHODS
    for method in result["methods"][1:]:
        assert method["baseline"] is not None and method["difference"]["prompt_level_loose"]["ci95"]
        assert method["compute"]["wall_s"] > 0
    text = (out / "bakeoff.md").read_text()
    assert all(f"| {name} |" in text for name in METHODS)
    page = (out / "bakeoff.html").read_text()
    assert all(f"<td>{name}</td>" in page for name in METHODS) and page.count('src="data:image/png;base64,') >= 3
    assert 'href="bakeoff.html"' in (out / "report.html").read_text()  # the pipeline's page links the comparison
