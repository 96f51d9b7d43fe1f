"""`alignkit report` on a tiny SFT run: plots embedded, numbers and config shown, every text escaped, alarms as
a banner, and the page rendered by a real headless Chromium with no broken image."""

from __future__ import annotations

import json

import pytest

from alignkit.algorithms.sft import SFTConfig, run_sft
from alignkit.cli import main
from alignkit.models import TINY_LLAMA
from alignkit.report import build_report
from alignkit.report.page import alarms, series
from conftest import SFT_DATA, chromium_page, loaded_images, write_jsonl

XSS = "<script>window.pwned = 1</script>"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A 3-step tiny-llama SFT run directory, plus an eval/ of it with a hostile sample."""
    out = tmp_path_factory.mktemp("run") / "sft"
    config = SFTConfig(model=TINY_LLAMA, data=str(SFT_DATA), output=str(out), max_steps=3, batch_size=4,
                       max_length=128, lr=3e-3, eval_fraction=0.05, progress=False, log_every=1)  # fmt: skip
    config.validate()
    run_sft(config)
    (out / "eval").mkdir()
    evaluation = {"model": str(out), "baseline": TINY_LLAMA, "judge": "rm:<b>rm</b>", "n": 2, "win_rate": 0.75,
                  "win_rate_ci95": [0.5, 1.0], "kl": {"kl": 0.12, "per_sequence": [0.1, 0.14]}}  # fmt: skip
    (out / "eval" / "eval.json").write_text(json.dumps(evaluation))
    write_jsonl(out / "eval" / "samples.jsonl", [
        {"prompt": f"Say {XSS}", "answer_model": f"ok {XSS}", "answer_baseline": "<img src=x onerror=alert(1)>",
         "score_model": 1.0, "score_baseline": 0.0, "length_model": 5, "length_baseline": 3},
        {"prompt": "Count", "answer_model": "1 2 3", "answer_baseline": "1", "score_model": 0.5, "score_baseline": 0.5,
         "length_model": 4, "length_baseline": 2},
    ])  # fmt: skip
    return out


def test_report_embeds_plots_numbers_and_config_and_escapes_text(sft_run):
    page = build_report(sft_run)
    assert page.count("data:image/png;base64,") >= 3  # loss, lr, ... and the length histogram
    assert "<script" not in page.lower()  # neither ours nor the sample's
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "<img src=x" not in page
    assert "rm:&lt;b&gt;rm&lt;/b&gt;" in page
    assert "win rate 0.750" in page and "[0.500, 1.000]" in page
    summary = json.loads((sft_run / "summary.json").read_text())
    flops = 6.0 * summary["parameters"] * summary["tokens"]
    assert f"{flops:.3e}" in page
    assert "eval_loss_before" in page and "eval_loss_after" in page
    assert "Configuration (sft)" in page and "<th>max_steps</th><td class=\"num\">3</td>" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch: it opens offline


def test_length_drift_fires_a_banner(tmp_path):
    rows = [{"step": i + 1, "loss": 1.0 / (i + 1), "completion_length": 10.0 * (1 + i)} for i in range(8)]
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    found = alarms(series(rows))
    assert [a.fired for _, a in found] == [True]
    page = build_report(tmp_path)
    assert 'class="alarm"' in page and "response length drift" in page


def test_the_command_writes_report_html_and_refuses_an_empty_directory(sft_run, tmp_path, capsys):
    target = tmp_path / "page.html"
    assert main(["report", str(sft_run), "--output", str(target)]) == 0
    assert target.read_text().startswith("<!DOCTYPE html>")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "nothing to report" in capsys.readouterr().err


def test_report_renders_in_chromium_without_broken_images(sft_run, tmp_path):
    page_file = tmp_path / "report.html"
    page_file.write_text(build_report(sft_run), encoding="utf-8")
    with chromium_page(page_file) as (page, requests):
        images = loaded_images(page)
        assert len(images) >= 3
        assert page.evaluate("window.pwned") is None  # the sample's script never ran
        assert all(u.startswith(("file:", "data:")) for u in requests), requests  # offline
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000


def checkpoint_rows(gold: list[float]) -> list[dict]:
    return [{"step": 10 * i, "kl": i * i / 4, "sqrt_kl": i / 2, "proxy": 0.1 * i, "gold": g, "length": 20.0 + i,
             "distinct_2": 0.6} for i, g in enumerate(gold)]  # fmt: skip


@pytest.mark.parametrize("gold, fires", [([0.0, 0.2, 0.4, 0.5, 0.4, 0.2, 0.0, -0.2], True),
                                         ([0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], False)])  # fmt: skip
def test_the_overoptimisation_curve_is_plotted_with_its_alarm(tmp_path, gold, fires):
    write_jsonl(tmp_path / "overoptimisation.jsonl", checkpoint_rows(gold))
    page = build_report(tmp_path)
    assert 'alt="proxy and gold reward against square-root KL" src="data:image/png;base64,' in page
    assert 'alt="answer length and distinct-2 against step" src="data:image/png;base64,' in page
    assert ('class="alarm"' in page) == fires
    assert ("held-out overoptimisation, step 50" in page and "reward over-optimisation at checkpoint 5" in page) == fires
    assert ("no over-optimisation over 8 checkpoints" in page) != fires  # the quiet verdict is listed instead
