"""What ships works in a user's clone: no file needs the project's own data folder beside the repository (which
only our machines have), the built-in datasets load by name, and no evaluation prompt is training data."""

from __future__ import annotations

import json
import re

import pytest

from alignkit.data.builtin import BUILTIN
from alignkit.data.decontaminate import EvalIndex, read_prompts, row_text
from alignkit.data.loading import load_records
from alignkit.errors import AlignkitError
from conftest import ROOT, run_cli

# Recorded results of past benchmark runs name the files those runs read; nothing reads them back.
NOT_SHIPPED = {".git", ".venv", ".venv-bench", "outputs", "runs", "build", "dist", "__pycache__", ".pytest_cache", "results"}
# The project's data folder, one level above the repository on our machines; spelt in pieces so that this file,
# which is checked like any other, does not name it.
FOLDER = "shared"
SHARED = re.compile(rf"\.\./{FOLDER}\b|\b{FOLDER}/data\b")


def shipped_files():
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT)
        if path.is_file() and not NOT_SHIPPED & set(relative.parts) and not any(p.endswith(".egg-info") for p in relative.parts):
            yield relative


def test_no_shipped_file_needs_the_projects_shared_folder():
    files = [f for f in shipped_files() if f.suffix in (".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".js", ".html", "")]
    assert any(f.parts[0] == "examples" for f in files) and any(f.name == "README.md" for f in files)
    offending = [f"{f}:{n}" for f in files for n, line in enumerate((ROOT / f).read_text(errors="ignore").splitlines(), 1) if SHARED.search(line)]
    assert not offending, "these read the project's data folder, which a user's clone does not have: " + ", ".join(offending)


KINDS = {"preference pairs": "preference", "instructions (Alpaca)": "conversation", "prompts with answers": "prompt_answer",
         "evaluation prompts": "prompt", "prompts with constraints": "prompt_answer"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_dataset_loads_by_name_with_its_origin(name):
    records, report = load_records(f"builtin:{name}", KINDS[BUILTIN[name].kind])
    assert len(records) == BUILTIN[name].records() == report.kept
    assert records[0].origin == f"builtin:{name}:1"


def test_an_unknown_builtin_name_lists_the_known_ones():
    with pytest.raises(AlignkitError, match="no built-in dataset 'hh-helpfull'") as caught:
        load_records("builtin:hh-helpfull", "preference")
    assert "hh-helpful" in caught.value.render() and "alignkit data list" in caught.value.render()


def test_data_list_names_every_builtin_dataset_with_its_licence():
    result = run_cli("data", "list", "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and [r["name"] for r in rows] == [f"builtin:{n}" for n in BUILTIN]
    assert all(r["licence"] and r["records"] > 0 for r in rows)


def evaluation_index() -> tuple[EvalIndex, list[str]]:
    prompts, owners = [], []
    for name, dataset in BUILTIN.items():
        if dataset.evaluation:
            found = read_prompts(dataset.path)
            prompts, owners = prompts + found, owners + [name] * len(found)
    return EvalIndex(prompts), owners


def test_no_evaluation_prompt_is_in_a_shipped_training_set():
    """Decontamination: every training row of every built-in dataset against every built-in evaluation set."""
    index, owners = evaluation_index()
    assert len(index.prompts) > 500
    for name, dataset in BUILTIN.items():
        if dataset.evaluation:
            continue
        for number, line in enumerate(dataset.path.read_text(encoding="utf-8").splitlines(), 1):
            hits = index.contaminating(row_text(json.loads(line)))
            assert not hits, f"builtin:{name}:{number} repeats an evaluation prompt of {owners[hits[0]]}: {index.prompts[hits[0]][:12]}"


def test_the_detector_catches_an_evaluation_prompt_inside_a_dialogue_or_lightly_edited():
    index, owners = evaluation_index()
    vicuna = read_prompts(BUILTIN["vicuna80"].path)[5]
    words = vicuna.split()
    edited = " ".join(words[:-1] + ["please"])  # the last word changed
    assert index.contaminating(f"\n\nHuman: Hello!\n\nAssistant: Hi.\n\nHuman: {vicuna}\n\nAssistant:")
    assert "vicuna80" in {owners[i] for i in index.contaminating(edited)}
    # A stock phrase shared with long prompts is no copy of any of them.
    assert not index.contaminating("Can you tell me more about what you're looking for? I would like to help you with that.")
