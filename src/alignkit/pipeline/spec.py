"""The pipeline file: parsed once into typed stages, every name checked, every `${...}` resolved before a run.

Errors name the file, the line, the stage and the key, and suggest the closest valid word. See
docs/pipelines.md for the format; in brief:

    name: instructgpt
    output: outputs/instructgpt            # a stage writes to OUTPUT/<stage> (OUTPUT/round-<i>/<stage> in rounds)
    defaults: {model: smollm2-135m-instruct} # given to every stage whose command has that option
    stages:
      - {name: sft, command: sft, with: {data: ..., max_steps: 30}}
      - {name: rm, command: rm train, with: {model: "${sft}", data: ...}}
    rounds:                                # optional: these stages repeated `count` times, after `stages`
      count: 2
      stages:
        - {name: dpo, command: dpo, with: {model: "${previous.dpo|sft}", data: ...}}
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.commands import COMMANDS, Output, load_target
from alignkit.config import build_config
from alignkit.data.loading import is_hub_name
from alignkit.errors import AlignkitError
from alignkit.io import read_yaml

TOP_KEYS = ("name", "output", "defaults", "stages", "rounds")
STAGE_KEYS = ("name", "command", "with")
ROUND_KEYS = ("count", "stages")
VARIABLES = ("round", "here", "resources")
"""`${round}`: the round number (1, 2, ...); `${here}`: the pipeline file's directory; `${resources}`: the data
shipped inside alignkit."""
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
REFERENCE = re.compile(r"\$\{([^}]*)\}")

INPUTS = ("data", "eval_data", "mix_data", "ptx_data", "prompts", "eval_prompts", "task_prompts", "heldout_data",
          "samples", "agreement_with", "constitution", "responses", "baseline_responses", "inputs")
"""options that name files a stage reads: those given as plain paths must exist before the first stage starts"""
REPORT = "report"
"""In a pipeline, `report` writes the pipeline's page (OUTPUT/report.html), or in a round that round's page; with
options it also runs `alignkit report` with them into OUTPUT/<stage>.html (e.g. `compare:`, a comparison page)."""


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{close[0]}'?" if close else None


class Located(dict):
    """A YAML mapping that remembers the line it starts on and the line of each key."""

    def __init__(self, line: int = 0):
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}
        self.set_by: dict[Any, str] = {}
        """keys given by `--set` (to the `--set` item), which no line of the file holds"""

    def where(self, key: Any, path: Path) -> str:
        """FILE:LINE of `key`, or the `--set` item that gave it."""
        return f"--set {self.set_by[key]}" if key in self.set_by else f"{path}:{self.key_lines.get(key, self.line)}"


class _Loader(yaml.SafeLoader):
    pass


def _construct_located(loader: _Loader, node: yaml.MappingNode):
    data = Located(node.start_mark.line + 1)
    yield data
    data.update(loader.construct_mapping(node))
    data.key_lines = {loader.construct_object(k): k.start_mark.line + 1 for k, _ in node.value}


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_located)


@dataclass(frozen=True)
class StageCommand:
    """What a stage's `command:` names: an alignkit command (and its action), its config and run function."""

    text: str
    """as written and normalised, e.g. "rm train", "sft", "report" """
    config_class: type
    run: Callable[[Any], Any]
    action: str | None = None

    @property
    def output(self) -> Output | None:
        name, _, action = self.text.partition(" ")
        return COMMANDS[name].outputs.get(action)

    def fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_class)]

    def settable(self) -> list[str]:
        """The options a pipeline file may give: all but the output (the runner sets it) and the action."""
        reserved = {"action", self.output[0] if self.output else "output"}
        return [f for f in self.fields() if f not in reserved]


def parse_command(text: Any, where: str) -> StageCommand:
    words = str(text).split() if isinstance(text, str) else []
    if not words or len(words) > 2:
        raise AlignkitError(f"'command' must be an alignkit command such as sft or 'rm train', not {text!r}", where=where)
    if words[0] == REPORT and len(words) == 1:
        return StageCommand(REPORT, *load_target(COMMANDS[REPORT].target))
    spec = COMMANDS.get(words[0])
    if spec is None:
        raise AlignkitError(f"unknown command '{words[0]}'", where=where,
                            fix=suggest(words[0], [*COMMANDS, REPORT]) or f"one of {', '.join(COMMANDS)}")  # fmt: skip
    if len(words) == 2 and words[1] not in spec.actions:
        choices = [a for a in spec.actions if a not in spec.not_in_pipelines]
        raise AlignkitError(f"'{words[0]}' has no action '{words[1]}'", where=where,
                            fix=suggest(words[1], choices) or (f"one of {', '.join(choices)}" if choices else f"write just '{words[0]}'"))  # fmt: skip
    if spec.actions and len(words) == 1:
        if words[0] == "label":
            raise AlignkitError("'label' needs an action: label import, label export or label stats", where=where)
        words.append(spec.actions[0])
    normal = " ".join(words)
    action = words[1] if len(words) == 2 else None
    why = spec.not_in_pipelines.get(action or "") or spec.not_in_pipelines.get("")
    if why:
        raise AlignkitError(f"'{normal}' cannot be a pipeline stage: {why}", where=where)
    config_class, run = load_target(spec.target)
    return StageCommand(normal, config_class, run, action)


@dataclass
class Stage:
    name: str
    command: StageCommand
    settings: dict[str, Any]
    """`with`, keys with underscores, `${...}` not yet resolved"""
    path: Path
    line: int
    key_lines: dict[str, int]
    set_by: dict[str, str] = dataclasses.field(default_factory=dict)
    """keys given by `--set`, to the `--set` item"""

    def where(self, key: str | None = None, label: str | None = None) -> str:
        """FILE:LINE: stage 'NAME' for errors, at the line of `key` when known (or the `--set` item that gave it)."""
        if key in self.set_by:
            return f"--set {self.set_by[key]}"
        line = self.key_lines.get(key, self.line) if key else self.line
        return f"{self.path}:{line}: stage '{label or self.name}'"


@dataclass
class Pipeline:
    path: Path
    name: str
    output: Path
    defaults: dict[str, Any]
    stages: list[Stage]
    rounds: int
    round_stages: list[Stage]
    raw: dict[str, Any]
    """the file's content after --set, recorded in the run registry"""


@dataclass
class PlannedStage:
    """One stage of one round, every reference resolved: what the runner runs."""

    key: str
    """"sft", or "round-2/dpo" for a stage of a round"""
    stage: Stage
    round: int | None
    directory: Path | None
    """the stage's own directory (removed to start it afresh); None for `report`, which writes into its scope"""
    output: Path | None
    """what `${name}` stands for: the directory, or the one file the command writes there"""
    settings: dict[str, Any]
    """the options passed to the command: `with` and defaults resolved, plus the output (and action)"""
    needs: tuple[str, ...] = ()
    """the keys of the stages whose outputs its settings name (`${sft}`, `${previous.dpo|sft}`)"""

    @property
    def command(self) -> StageCommand:
        return self.stage.command

    @property
    def runs_command(self) -> bool:
        """Whether the stage runs its command: every stage but a report stage without options (the pipeline's page alone)."""
        return self.command.text != REPORT or bool(self.settings)

    def build(self) -> Any:
        """The command's config, checked as `alignkit CMD --config FILE` checks it."""
        where = self.stage.where(label=self.key)
        config = build_config(self.command.config_class, self.settings, source=where,
                              where_of=lambda key: self.stage.where(key, self.key))  # fmt: skip
        if hasattr(config, "validate"):
            try:
                config.validate()
            except AlignkitError as exc:
                raise AlignkitError(exc.what, where=exc.where or where, fix=exc.fix) from None
        return config


# --- reading the file -----------------------------------------------------------------------------------------


def _check_keys(mapping: Located, allowed: tuple[str, ...], path: Path, what: str) -> None:
    for key in mapping:
        if key not in allowed:
            line = mapping.key_lines.get(key, mapping.line)
            raise AlignkitError(f"unknown key '{key}' in {what}", where=f"{path}:{line}",
                                fix=suggest(str(key), allowed) or f"the keys are {', '.join(allowed)}")  # fmt: skip


def _mapping(value: Any, where: str, what: str) -> Located:
    if value is None:
        return Located()
    if not isinstance(value, Located):
        raise AlignkitError(f"{what} must be a mapping (key: value), not {type(value).__name__}", where=where)
    return value


def apply_overrides(data: Located, overrides: Sequence[str], path: Path) -> None:
    """`--set stage.key=value` (a stage's `with`), `--set key=value` (defaults), or `--set output=DIR` / `rounds=N`."""
    for item in overrides:
        target, sep, text = item.partition("=")
        if not sep or not target:
            raise AlignkitError(f"--set {item!r} is not of the form stage.key=value or key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise AlignkitError(f"--set {item!r}: the value is not valid YAML ({problem})",
                                fix="quote text that YAML would read otherwise, e.g. --set 'sft.data=\"[1,\"'; a list is [1, 2]") from None  # fmt: skip
        if target in ("name", "output"):
            data[target] = value
        elif target == "rounds":
            if data.get("rounds") is None:
                data["rounds"] = Located()
            block = _mapping(data["rounds"], str(path), "'rounds'")
            block["count"], block.set_by["count"] = value, item
        elif "." in target:
            name, _, key = target.partition(".")
            stages = [s for s in [*(data.get("stages") or []), *((data.get("rounds") or {}).get("stages") or [])] if isinstance(s, dict)]
            match = [s for s in stages if s.get("name") == name]
            if not match:
                raise AlignkitError(f"--set {item}: no stage named '{name}'", where=str(path),
                                    fix=suggest(name, [str(s.get("name")) for s in stages]))  # fmt: skip
            stage = match[0]
            settings = stage.get("with")
            if settings is None:
                settings = stage["with"] = Located(getattr(stage, "line", 0))
            block = _mapping(settings, str(path), "'with'")
            block[key], block.set_by[key] = value, item
        else:
            if data.get("defaults") is None:
                data["defaults"] = Located()
            block = _mapping(data["defaults"], str(path), "'defaults'")
            block[target], block.set_by[target] = value, item


def _stages(items: Any, path: Path, line: int, where_list: str, seen: set[str]) -> list[Stage]:
    if not isinstance(items, list) or not items:
        raise AlignkitError(f"{where_list} must be a non-empty list of stages", where=f"{path}:{line}")
    stages = []
    for item in items:
        if not isinstance(item, Located):
            raise AlignkitError(f"each stage must be a mapping with name, command and with, not {item!r}", where=f"{path}:{line}")
        _check_keys(item, STAGE_KEYS, path, "a stage")
        name = item.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise AlignkitError(f"a stage needs a name of letters, digits, - and _ (starting with a letter), not {name!r}",
                                where=f"{path}:{item.line}")  # fmt: skip
        where = f"{path}:{item.line}: stage '{name}'"
        if name in VARIABLES or name == "previous":
            raise AlignkitError(f"'{name}' is a reserved word in references; choose another stage name", where=where)
        if name in seen:
            raise AlignkitError(f"two stages are named '{name}'", where=where, fix="stage names must be unique (rounds included)")
        seen.add(name)
        if "command" not in item:
            raise AlignkitError("the stage has no 'command'", where=where, fix="e.g. command: sft")
        command = parse_command(item["command"], where)
        raw = _mapping(item.get("with"), where, "'with'")
        settings = {str(k).replace("-", "_"): v for k, v in raw.items()}
        key_lines = {str(k).replace("-", "_"): raw.key_lines.get(k, raw.line) for k in raw} if raw else {}
        set_by = {str(k).replace("-", "_"): text for k, text in raw.set_by.items()}
        stage = Stage(name, command, settings, path, item.line, key_lines, set_by)
        allowed = command.settable()
        for key in settings:
            if key not in allowed:
                key_where = stage.where(key)
                if key in command.fields():
                    raise AlignkitError(f"'{key}' is set by the pipeline", where=key_where,
                                        fix=f"the output is OUTPUT/{name}; other stages refer to it as ${{{name}}}"
                                        if key != "action" else f"give the action in the command, e.g. command: {command.text.split()[0]} score")  # fmt: skip
                raise AlignkitError(f"unknown option '{key}' of {command.text}", where=key_where,
                                    fix=suggest(key, allowed) or f"see alignkit {command.text.split()[0]} --help")  # fmt: skip
        stages.append(stage)
    return stages


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> Pipeline:
    path = Path(path)
    data = read_yaml(path, what="pipeline file", fix="give the path of a pipeline YAML file (see examples/)", loader=_Loader)
    if not isinstance(data, Located):
        raise AlignkitError("a pipeline file must be a mapping with name, output and stages", where=str(path))
    apply_overrides(data, overrides, path)
    _check_keys(data, TOP_KEYS, path, "the pipeline")
    for key in ("output", "stages"):
        if key not in data:
            raise AlignkitError(f"the pipeline has no '{key}'", where=f"{path}:{data.line}",
                                fix="e.g. output: outputs/my-pipeline" if key == "output" else "list the stages under stages:")  # fmt: skip
    seen: set[str] = set()
    stages = _stages(data["stages"], path, data.key_lines.get("stages", 1), "'stages'", seen)
    rounds, round_stages = 0, []
    if data.get("rounds") is not None:
        block = _mapping(data["rounds"], f"{path}:{data.key_lines.get('rounds', 1)}", "'rounds'")
        _check_keys(block, ROUND_KEYS, path, "'rounds'")
        rounds = block.get("count")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise AlignkitError(f"rounds: count must be a whole number ≥ 1, not {rounds!r}", where=block.where("count", path))
        round_stages = _stages(block.get("stages"), path, block.line, "rounds: stages", seen)
    defaults_block = _mapping(data.get("defaults"), f"{path}:{data.key_lines.get('defaults', 1)}", "'defaults'")
    defaults = {str(k).replace("-", "_"): v for k, v in defaults_block.items()}
    known = sorted({f for s in stages + round_stages for f in s.command.settable()})
    for key in defaults:
        if key not in known:
            raise AlignkitError(f"default '{key}' is an option of no stage's command", where=defaults_block.where(key, path),
                                fix=suggest(key, known) or "defaults hold options shared by several stages, e.g. model or seed")  # fmt: skip
    name = str(data.get("name") or path.stem)
    return Pipeline(path, name, Path(str(data["output"])), defaults, stages, rounds, round_stages, _as_dicts(data))


def _as_dicts(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _as_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_dicts(v) for v in value]
    return value


# --- resolving references ---------------------------------------------------------------------------------------


def plan(pipeline: Pipeline) -> list[PlannedStage]:
    """Every stage of every round in run order, with defaults applied and each `${...}` replaced."""
    from alignkit.models import RESOURCES  # models brings in torch and transformers: parsing a pipeline needs neither

    planned: list[PlannedStage] = []
    top: dict[str, PlannedStage] = {}
    previous: dict[str, PlannedStage] = {}
    variables = {"here": str(pipeline.path.parent), "resources": str(RESOURCES)}
    for round_number in [None, *range(1, pipeline.rounds + 1)]:
        stages = pipeline.stages if round_number is None else pipeline.round_stages
        scope = pipeline.output if round_number is None else pipeline.output / f"round-{round_number}"
        current: dict[str, PlannedStage] = {}
        for index, stage in enumerate(stages):
            later = {s.name for s in stages[index + 1 :]}
            if round_number is None:
                later |= {s.name for s in pipeline.round_stages}

            label = stage.name if round_number is None else f"round-{round_number}/{stage.name}"
            needs: dict[str, None] = {}  # ordered, without repeats

            def output_of(entry: PlannedStage, key: str, where: str) -> str:
                needs[entry.key] = None
                return _output_of(entry, key, where)

            def lookup(expression: str, key: str) -> str:
                where = stage.where(key, label)
                text = expression.strip()
                if text == "round":
                    if round_number is None:
                        raise AlignkitError(f"'{key}': ${{round}} is only defined in the stages of rounds", where=where)
                    return str(round_number)
                if text in variables:
                    return variables[text]
                if text.startswith("previous."):
                    name, bar, fallback = text[len("previous.") :].partition("|")
                    if name not in {s.name for s in pipeline.round_stages}:
                        raise AlignkitError(f"'{key}': ${{{text}}} names no stage of the rounds", where=where,
                                            fix=suggest(name, [s.name for s in pipeline.round_stages]))  # fmt: skip
                    if round_number is None:
                        raise AlignkitError(f"'{key}': ${{previous.…}} is only defined in the stages of rounds", where=where)
                    if name in previous:
                        return output_of(previous[name], key, where)
                    if not bar:
                        raise AlignkitError(f"'{key}': round 1 has no previous round", where=where,
                                            fix=f"give a stage to use in round 1: ${{previous.{name}|STAGE}}, e.g. ${{previous.{name}|sft}}")  # fmt: skip
                    text = fallback.strip()
                if text in current:
                    return output_of(current[text], key, where)
                if text in top:
                    return output_of(top[text], key, where)
                if text == stage.name:
                    raise AlignkitError(f"'{key}': ${{{text}}} refers to the stage's own output", where=where,
                                        fix=f"in rounds, ${{previous.{text}}} is this stage's output of the round before" if round_number else None)  # fmt: skip
                if text in later:
                    raise AlignkitError(f"'{key}': ${{{text}}} refers to stage '{text}', which runs after this one", where=where,
                                        fix="a stage can only use the outputs of stages listed before it")  # fmt: skip
                names = [*top, *current, *VARIABLES, *(f"previous.{s.name}" for s in pipeline.round_stages)]
                raise AlignkitError(f"'{key}': ${{{text}}} names no stage or variable", where=where, fix=suggest(text, names))

            settings = {key: _substitute(value, lambda e, key=key: lookup(e, key)) for key, value in stage.settings.items()}
            for key, value in pipeline.defaults.items():
                if key in stage.command.settable() and key not in settings:
                    settings[key] = _substitute(value, lambda e, key=key: lookup(e, key))
            if stage.command.text == REPORT:
                # With options it runs `alignkit report` too, whose one page is named after the stage.
                directory, output = None, scope / (f"{stage.name}.html" if settings else "report.html")
                if settings:
                    settings["output"] = str(output)
            else:
                directory = scope / stage.name
                kind = stage.command.output
                output = None if kind is None else directory if kind[1] is None else directory / kind[1]
                if kind is not None:
                    settings[kind[0]] = str(output)
                if stage.command.action:
                    settings["action"] = stage.command.action
            entry = PlannedStage(label, stage, round_number, directory, output, settings, tuple(needs))
            planned.append(entry)
            current[stage.name] = entry
        if round_number is None:
            top = current
        else:
            previous = current
    return planned


def check_inputs(pipeline: Pipeline, stage: PlannedStage) -> None:
    """The files a stage reads and names by a plain path (not by another stage's output, which appears only when that
    stage runs) exist: a typo in the last stage's data path costs seconds, not the hours of the stages before it."""
    for key in INPUTS:
        given = stage.stage.settings.get(key, pipeline.defaults.get(key))
        if key not in stage.settings or _names_a_stage(given):
            continue
        value = stage.settings[key]
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and path and not path.startswith("builtin:") and not is_hub_name(path) and not Path(path).exists():
                raise AlignkitError(f"'{key}': {path} does not exist", where=stage.stage.where(key, stage.key),
                                    fix="check the path (a relative path starts from the directory alignkit runs in; "
                                    "${here} is the pipeline file's)")  # fmt: skip


def _names_a_stage(value: Any) -> bool:
    if isinstance(value, list):
        return any(_names_a_stage(v) for v in value)
    return isinstance(value, str) and any(m.group(1).strip() not in VARIABLES for m in REFERENCE.finditer(value))


def _output_of(stage: PlannedStage, key: str, where: str) -> str:
    if stage.output is None or stage.command.text == REPORT:
        raise AlignkitError(f"'{key}': stage '{stage.stage.name}' ({stage.command.text}) writes nothing another stage can read", where=where)
    return str(stage.output)


def _substitute(value: Any, lookup: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: lookup(m.group(1)), value)
    if isinstance(value, list):
        return [_substitute(v, lookup) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, lookup) for k, v in value.items()}
    return value
