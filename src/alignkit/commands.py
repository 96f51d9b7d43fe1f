"""The commands of alignkit, in one table that both the CLI (`cli.py`) and pipeline stages (`pipeline/spec.py`) read."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

Output = tuple[str, str | None]
"""(the config field that names it, the file name inside the stage directory, or None for the directory itself)"""


@dataclass(frozen=True)
class Command:
    """One `alignkit COMMAND`: what runs it, how the words after it are read, and what it is to a pipeline."""

    help: str
    target: str
    """"module:ConfigClass:run_function"""
    actions: tuple[str, ...] = ()
    """sub-actions named by the word after the command (`alignkit label import ...`); it fills the config's `action`"""
    positional: str = ""
    """the config field that takes the words after the command: a list takes them all (`alignkit label import
    a.jsonl b.jsonl`), a string one (`alignkit run pipeline.yaml`)"""
    recorded: bool = True
    """each run is recorded in the run registry (`alignkit runs`); a pipeline records itself and its stages"""
    outputs: Mapping[str, Output] = field(default_factory=dict)
    """what a run writes that a later pipeline stage can use (`${stage}`), by action ("" for a command without
    actions); a command or action left out writes nothing a later stage could use"""
    not_in_pipelines: Mapping[str, str] = field(default_factory=dict)
    """why an action ("" for the whole command) cannot be a pipeline stage"""


DIRECTORY: dict[str, Output] = {"": ("output", None)}
"""what a training or evaluation command writes: its output directory"""

COMMANDS: dict[str, Command] = {
    "sft": Command(
        "supervised fine-tuning on instruction or chat data", "alignkit.algorithms.sft:SFTConfig:run_sft",
        outputs=DIRECTORY,
    ),
    "rm": Command(
        "train, evaluate or apply (score) a reward model", "alignkit.algorithms.rm:RMConfig:run_rm",
        actions=("train", "eval", "score"),
        outputs={"train": ("output", None), "eval": ("output", None), "score": ("output", "scores.jsonl")},
    ),
    "dpo": Command(
        "offline preference optimisation (DPO, cDPO, robust, IPO, hinge, SimPO, ORPO)",
        "alignkit.algorithms.dpo:DPOConfig:run_dpo", outputs=DIRECTORY,
    ),
    "kto": Command(
        "KTO on unpaired desirable/undesirable completions", "alignkit.algorithms.kto:KTOConfig:run_kto",
        outputs=DIRECTORY,
    ),
    "ppo": Command(
        "PPO against a reward model with a KL penalty", "alignkit.algorithms.ppo:PPOConfig:run_ppo", outputs=DIRECTORY
    ),
    "grpo": Command(
        "GRPO / RLOO with verifiable or model rewards", "alignkit.algorithms.grpo:GRPOConfig:run_grpo",
        outputs=DIRECTORY,
    ),
    "generate": Command(
        "sample K completions per prompt (or the best of N by a scorer)",
        "alignkit.generation:GenerateConfig:run_generate", outputs={"": ("output", "samples.jsonl")},
    ),
    "rsft": Command(
        "rejection-sampling fine-tuning: sample N, keep the best by a scorer, SFT on it",
        "alignkit.algorithms.rsft:RSFTConfig:run_rsft", outputs=DIRECTORY,
    ),
    "judge": Command(
        "AI feedback: an LLM judge compares or ranks answers, measures agreement, or applies a constitution",
        "alignkit.judge.command:JudgeConfig:run_judge", outputs={"": ("output", "judge.jsonl")},
    ),
    "label": Command(
        "human feedback: the labelling web app and its database",
        "alignkit.label:LabelConfig:run_label",
        actions=("import", "serve", "add-annotator", "remove-annotator", "export", "stats"),
        positional="inputs",
        outputs={"export": ("out", "labels.jsonl")},
        not_in_pipelines={"serve": "it waits for annotators forever", "add-annotator": "it prints a secret token"},
    ),
    "eval": Command(
        "a model against a baseline: win rate (CI, length-controlled), KL, diversity, refusals, alignment tax",
        "alignkit.evaluation.evaluate:EvalConfig:run_eval", outputs=DIRECTORY,
    ),
    "report": Command(
        "a self-contained HTML report of a run directory", "alignkit.report:ReportConfig:run_report", positional="runs"
    ),
    "run": Command(
        "run a YAML pipeline of stages: done stages are skipped, a cut one resumes",
        "alignkit.pipeline.runner:RunConfig:run_pipeline", positional="pipeline", recorded=False,
        not_in_pipelines={"": "a pipeline cannot run another pipeline"},
    ),
    "data": Command(
        "the built-in datasets (builtin:NAME), shipped with alignkit", "alignkit.data.builtin:DataConfig:run_data",
        actions=("list",), recorded=False,
    ),
    "runs": Command(
        "list the recorded runs (commands, pipelines and their stages)", "alignkit.pipeline.registry:RunsConfig:list_runs",
        recorded=False, not_in_pipelines={"": "it only lists runs"},
    ),
}


def load_target(target: str) -> tuple[type, Callable]:
    """The config class and run function a `Command.target` names; their module is imported only now."""
    module_name, config_name, run_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, run_name)
