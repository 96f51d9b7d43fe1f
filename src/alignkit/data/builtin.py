"""Built-in datasets: small slices of public datasets shipped inside the package, named `builtin:NAME`.

The built-in model has a name (`smollm2-135m-instruct`) that works offline; so does the data that the README,
the docs, the examples and `make demo` use: `--data builtin:hh-helpful` reads a file that came with the wheel,
whatever the current directory. `alignkit data list` prints this table. Each file's source and licence are in
`resources/README.md` beside the files. Evaluation sets are marked as such: training on them is refused by the
decontamination checks of the commands that build training data, and a test keeps them out of every shipped
training file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import AlignkitError

PREFIX = "builtin:"
RESOURCES = Path(__file__).resolve().parents[1] / "resources"


@dataclass(frozen=True)
class BuiltinDataset:
    file: str
    """the file's name under alignkit/resources/"""
    kind: str
    """what its rows are: preference pairs, SFT instructions, prompts with answers, evaluation prompts"""
    licence: str
    description: str
    evaluation: bool = False
    """an evaluation set: never training data"""

    @property
    def path(self) -> Path:
        return RESOURCES / self.file

    def records(self) -> int:
        with self.path.open(encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())


BUILTIN: dict[str, BuiltinDataset] = {
    "sft-instructions": BuiltinDataset(
        "sft_instructions.jsonl", "instructions (Alpaca)", "Apache-2.0",
        "self-instruct seed tasks and AlpacaEval train instructions with GPT-4 Turbo answers",
    ),
    "alpacaeval-prefs": BuiltinDataset(
        "prefs_alpacaeval_train.jsonl", "preference pairs", "Apache-2.0",
        "AlpacaEval answers judged by GPT-4 (AI feedback), train instructions",
    ),
    "alpacaeval-prefs-test": BuiltinDataset(
        "prefs_alpacaeval_test.jsonl", "preference pairs", "Apache-2.0",
        "the same on held-out instructions (none shared with alpacaeval-prefs)", evaluation=True,
    ),
    "hh-helpful": BuiltinDataset(
        "prefs_hh_helpful_train.jsonl", "preference pairs", "MIT",
        "Anthropic HH-RLHF helpfulness comparisons by crowdworkers (human feedback)",
    ),
    "hh-helpful-test": BuiltinDataset(
        "prefs_hh_helpful_test.jsonl", "preference pairs", "MIT", "the same, held-out split", evaluation=True
    ),
    "hh-harmless": BuiltinDataset(
        "prefs_hh_harmless_train.jsonl", "preference pairs", "MIT",
        "Anthropic HH-RLHF harmlessness comparisons by crowdworkers (Llama 2's safety side)",
    ),
    "hh-harmless-test": BuiltinDataset(
        "prefs_hh_harmless_test.jsonl", "preference pairs", "MIT", "the same, held-out split", evaluation=True
    ),
    "gsm8k-train": BuiltinDataset(
        "gsm8k_train_500.jsonl", "prompts with answers", "MIT", "500 GSM8K training problems (every 14th)"
    ),
    "gsm8k-test": BuiltinDataset(
        "gsm8k_test_100.jsonl", "prompts with answers", "MIT", "the first 100 GSM8K test problems", evaluation=True
    ),
    "ifeval-train": BuiltinDataset(
        "ifeval_train_prompts.jsonl", "prompts with constraints", "Apache-2.0",
        "2,500 of our SFT requests with 1-3 verifiable IFEval-type constraints each (Tülu 3's RLVR prompts)",
    ),
    "ifeval": BuiltinDataset(
        "ifeval_541.jsonl", "prompts with constraints", "Apache-2.0",
        "IFEval's 541 prompts with verifiable instructions (Zhou et al. 2023)", evaluation=True,
    ),
    "alpacaeval-prompts": BuiltinDataset(
        "eval_alpacaeval_prompts.jsonl", "evaluation prompts", "Apache-2.0",
        "AlpacaEval's held-out instructions with two reference answers", evaluation=True,
    ),
    "vicuna80": BuiltinDataset(
        "eval_vicuna80.jsonl", "evaluation prompts", "Apache-2.0", "the Vicuna 80 questions in 9 categories",
        evaluation=True,
    ),
}  # fmt: skip


def builtin_path(source: str) -> Path | None:
    """The shipped file a `builtin:NAME` source names, or None when `source` is not a built-in name."""
    if not source.startswith(PREFIX):
        return None
    name = source[len(PREFIX) :]
    if name not in BUILTIN:
        raise AlignkitError(f"there is no built-in dataset '{name}'", fix=f"one of: {', '.join(BUILTIN)} (alignkit data list)")
    return BUILTIN[name].path


def training_sources() -> list[Path]:
    """The shipped files that are not evaluation sets."""
    return [d.path for d in BUILTIN.values() if not d.evaluation]


def table() -> list[dict]:
    return [
        {"name": PREFIX + name, "records": d.records(), "kind": d.kind, "licence": d.licence,
         "evaluation": d.evaluation, "description": d.description}  # fmt: skip
        for name, d in BUILTIN.items()
    ]


@dataclass
class DataConfig:
    """`alignkit data list`: the built-in datasets."""

    action: str = "list"
    """list: print the built-in datasets (name, records, kind, licence)"""
    json: bool = False
    """print the table as JSON lines"""

    def validate(self) -> None:
        if self.action != "list":
            raise AlignkitError(f"unknown action '{self.action}' of `alignkit data`", fix="alignkit data list")


def run_data(config: DataConfig) -> list[dict]:
    config.validate()
    rows = table()
    if config.json:
        for row in rows:
            print(json.dumps(row))
        return rows
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        use = "evaluation" if row["evaluation"] else "training"
        print(f"{row['name']:<{width}}  {row['records']:>4}  {row['kind']:<20} {use:<10}  {row['licence']:<10}  {row['description']}")
    print("\nuse as --data / --prompts builtin:NAME; sources and licences: alignkit/resources/README.md")
    return rows
