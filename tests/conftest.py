"""Shared fixtures: the tiny model and tokenizer, the built-in data, and a way to run the CLI as a user does.

Tests read only what ships (the built-in datasets), as a user's clone has nothing else."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.data.builtin import BUILTIN
from alignkit.models import TINY_LLAMA, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SFT_DATA = ROOT / "src" / "alignkit" / "resources" / "sft_instructions.jsonl"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_tokenizer(TINY_LLAMA)


def builtin_rows(name: str) -> list[dict]:
    """The rows of the built-in dataset `name`, as the file ships them."""
    return [json.loads(line) for line in BUILTIN[name].path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `alignkit ARGS` in a fresh process, as a user would, and capture its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "alignkit", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def e_reward(tmp_path):
    """A reward the tiny random model learns fast: the share of the letter 'e' in a completion."""
    path = tmp_path / "rewards.py"
    path.write_text("def share_of_e(prompts, completions, references):\n    return [c.count('e') / max(len(c), 1) for c in completions]\n")
    return f"python:{path}:share_of_e"


@pytest.fixture(autouse=True)
def run_registry(tmp_path, monkeypatch):
    """Every command records itself in the run registry; tests keep theirs out of the user's (~/.cache/alignkit)."""
    home = tmp_path / "alignkit-home"
    monkeypatch.setenv("ALIGNKIT_HOME", str(home))
    return home / "runs.db"


CHROMIUM = os.environ.get("ALIGNKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip


@contextlib.contextmanager
def chromium_browser():
    """Headless Chromium (Debian's, which `make test` installs) through Playwright; the test is skipped without it."""
    if not os.path.exists(CHROMIUM) or shutil.which(CHROMIUM) is None:
        pytest.skip(f"no Chromium at {CHROMIUM} (`make test` installs Debian's chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def chromium_page(html: Path):
    """`html` opened in headless Chromium: the page and every URL it requested."""
    with chromium_browser() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        yield page, requests


def loaded_images(page) -> list:
    """The page's images as (alt, complete, width); fails the test if any is missing or broken."""
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
    assert all(complete and width > 0 for _, complete, width in images), images
    return images
