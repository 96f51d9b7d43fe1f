"""`alignkit run PIPELINE.yaml`: run the stages in order, in this process, each as its own command would.

What a rerun does with each stage, decided before anything runs (and printed by `--dry-run`):

* skip: OUTPUT/pipeline.json records it done with the same resolved settings, and its output is there;
* resume: it was cut off (running, failed or interrupted) with the same settings: its directory is kept, so
  a training command continues from its last checkpoint and a judge from its progress log;
* afresh: its settings changed, a stage whose output it reads (`${name}`, directly or through other stages) ran
  again (in this run, or in one that stopped before this stage: it is then recorded "outdated"), or `--from`
  names it or an earlier stage: its directory is removed first, since what it holds was made from other inputs;
* run: never run before.

Stages that read nothing of each other are independent: rerunning one (`--only grpo grpo_eval`) leaves the
others done, which is what lets a bake-off of methods run, and be extended, one method at a time.

Every stage is checked (its config built and validated, as `alignkit CMD --config` does) before the first
one starts, so a typo in the last stage costs seconds, not the hours of the stages before it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.io import write_json
from alignkit.pipeline.registry import recorded
from alignkit.pipeline.spec import REPORT, Pipeline, PlannedStage, check_inputs, load_pipeline, plan, suggest


@dataclass
class RunConfig:
    """Options of `alignkit run`."""

    pipeline: str = ""
    """the pipeline file (YAML; see docs/pipelines.md and examples/)"""
    from_: str = ""
    """run this stage and every later one afresh, even if done (a stage of a round as round-2/dpo; a bare name means its first round)"""
    until: str = ""
    """stop after this stage (a bare name of a round's stage means its last round)"""
    set_: list[str] = field(default_factory=list)
    """change the file's settings: stage.key=value (a stage's option), key=value (a default), output=DIR, rounds=N"""
    dry_run: bool = False
    """print each stage's resolved options and whether it would be skipped, resumed or run, then stop"""
    overwrite: bool = False
    """run every stage afresh (the same as --from the first stage)"""
    only: list[str] = field(default_factory=list)
    """run just these stages (and the pipeline's page), each as a plain run would; the stages they read must be done"""

    def validate(self) -> None:
        if not self.pipeline:
            raise AlignkitError("no pipeline file given", fix="alignkit run PIPELINE.yaml (see examples/)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _plain(value: Any) -> Any:
    """As it reads back from JSON, so settings written to pipeline.json compare equal to fresh ones."""
    return json.loads(json.dumps(value, default=str))


class State:
    """OUTPUT/pipeline.json: per stage its command, settings, output, status, start, end and wall time.

    Rewritten (atomically) at every change, so a process killed at any moment leaves the last status
    written: a stage killed mid-run reads "running", which is what makes the next run resume it.
    """

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise AlignkitError(f"not valid JSON ({exc.msg})", where=f"{path}:{exc.lineno}",
                                    fix="remove it to run every stage afresh") from None  # fmt: skip

    def stage(self, key: str) -> dict[str, Any] | None:
        return self.data["stages"].get(key)

    def update(self, key: str, **fields: Any) -> None:
        self.data["stages"].setdefault(key, {}).update(_plain(fields))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.data)


@dataclass
class Decision:
    stage: PlannedStage
    action: str
    """skip, resume, afresh, run, or leave (not in --only)"""
    reason: str = ""


def decide(stages: list[PlannedStage], state: State, first_forced: int | None, only: set[str] | None = None) -> list[Decision]:
    """What to do with each stage; once one runs, every stage that reads its output runs afresh too."""
    decisions: list[Decision] = []
    ran: set[str] = set()
    for index, stage in enumerate(stages):
        previous = state.stage(stage.key)
        rerun_inputs = [key for key in stage.needs if key in ran]
        if only is not None and stage.runs_command and not {stage.key, stage.stage.name} & only:
            decision = Decision(stage, "leave", "not in --only")
        elif stage.command.text == REPORT:
            decision = Decision(stage, "run", "reports are always rewritten")
        elif first_forced is not None and index >= first_forced:
            decision = Decision(stage, "afresh", "--from" if index == first_forced else "an earlier stage runs again")
        elif previous is None:
            decision = Decision(stage, "run")
        elif rerun_inputs:
            decision = Decision(stage, "afresh", f"{', '.join(rerun_inputs)}, whose output it reads, runs again")
        elif previous.get("settings") != _plain(stage.settings):
            old, new = previous.get("settings") or {}, _plain(stage.settings)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            decision = Decision(stage, "afresh", f"its settings changed: {', '.join(changed)}")
        elif previous.get("status") == "outdated":
            decision = Decision(stage, "afresh", "an earlier stage ran again after it")
        elif previous.get("status") == "done":
            there = stage.output is None or stage.output.exists()
            decision = Decision(stage, "skip", "done") if there else Decision(stage, "afresh", "its output is missing")
        else:
            decision = Decision(stage, "resume", f"it was {previous.get('status')} when the last run stopped")
        if decision.action not in ("skip", "leave") and stage.command.text != REPORT:
            ran.add(stage.key)
        decisions.append(decision)
    if only is not None:
        check_only(decisions, state, only)
    return decisions


def check_only(decisions: list[Decision], state: State, only: set[str]) -> None:
    """`--only` names real stages, and every stage one of them reads is done or runs too."""
    keys = {d.stage.key for d in decisions} | {d.stage.stage.name for d in decisions}
    unknown = sorted(only - keys)
    if unknown:
        raise AlignkitError(f"--only {unknown[0]}: the pipeline has no such stage (before --until)",
                            fix=suggest(unknown[0], sorted(keys)) or f"the stages are {', '.join(d.stage.key for d in decisions)}")  # fmt: skip
    left = {d.stage.key for d in decisions if d.action == "leave"}
    for decision in decisions:
        if decision.action == "leave":
            continue
        for key in decision.stage.needs:
            if key in left and (state.stage(key) or {}).get("status") != "done":
                raise AlignkitError(f"--only: stage {decision.stage.key} reads the output of {key}, which is not done",
                                    fix=f"add {key} to --only, or run it first")  # fmt: skip


def readers(stages: list[PlannedStage], stage: PlannedStage) -> list[PlannedStage]:
    """The later stages that read `stage`'s output, directly or through other stages."""
    reading, found = {stage.key}, []
    for later in stages[stages.index(stage) + 1 :]:
        if later.command.text != REPORT and reading & set(later.needs):
            reading.add(later.key)
            found.append(later)
    return found


def find_stage(stages: list[PlannedStage], name: str, flag: str, *, last: bool) -> int:
    """The index of `name` (a key such as round-2/dpo, or a bare stage name: its first or last round)."""
    matches = [i for i, s in enumerate(stages) if name in (s.key, s.stage.name)]
    if not matches:
        raise AlignkitError(f"{flag} {name}: the pipeline has no such stage",
                            fix=suggest(name, [s.key for s in stages]) or f"the stages are {', '.join(s.key for s in stages)}")  # fmt: skip
    return matches[-1] if last else matches[0]


def machine() -> str:
    """The CPU model and count, and the GPU if there is one: what a pipeline's wall times were measured on."""
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")] if cpuinfo.is_file() else []
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} × {models[0] if models else platform.processor() or platform.machine()} CPU{gpu}"


def command_line(config: RunConfig) -> str:
    words = ["alignkit", "run", config.pipeline]
    for flag, value in (("--from", config.from_), ("--until", config.until)):
        if value:
            words += [flag, value]
    if config.only:
        words += ["--only", *config.only]
    if config.set_:
        words += ["--set", *config.set_]
    words += [flag for flag, on in (("--dry-run", config.dry_run), ("--overwrite", config.overwrite)) if on]
    return shlex.join(words)


def run_pipeline(config: RunConfig) -> list[Decision]:
    pipeline = load_pipeline(config.pipeline, config.set_)
    stages = plan(pipeline)
    configs = {s.key: s.build() for s in stages if s.runs_command}
    first = find_stage(stages, config.from_, "--from", last=False) if config.from_ else 0 if config.overwrite else None
    last = find_stage(stages, config.until, "--until", last=True) if config.until else len(stages) - 1
    state = State(pipeline.output / "pipeline.json")
    decisions = decide(stages[: last + 1], state, first, set(config.only) if config.only else None)
    for decision in decisions:
        if decision.action not in ("skip", "leave") and decision.stage.runs_command:
            check_inputs(pipeline, decision.stage)
    if config.dry_run:
        print_plan(pipeline, decisions, configs)
        return decisions
    with recorded("pipeline", pipeline.name, command_line(config), str(pipeline.output), pipeline.raw) as pipeline_id:
        state.data.update(_plain({"name": pipeline.name, "file": str(pipeline.path), "command": command_line(config), "machine": machine(),
                                  "started": _now(), "ended": None, "status": "running"}))  # fmt: skip
        status = "failed"
        try:
            for decision in decisions:
                run_stage(decision, configs.get(decision.stage.key), pipeline, stages, state, pipeline_id)
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            state.data.update({"ended": _now(), "status": status})
            write_json(state.path, state.data)
            write_pages(pipeline, stages, state)
    _log(f"pipeline {pipeline.name} done: {pipeline.output / 'report.html'}")
    return decisions


def print_plan(pipeline: Pipeline, decisions: list[Decision], configs: dict[str, Any]) -> None:
    """Each stage, what a run would do with it, and the options it gets (as its command reads them)."""
    print(f"pipeline {pipeline.name} ({pipeline.path}) -> {pipeline.output}")
    for d in decisions:
        reason = f" ({d.reason})" if d.reason else ""
        print(f"{d.action:7} {d.stage.key}: {d.stage.command.text}{reason}")
        config = configs.get(d.stage.key)
        for key in d.stage.settings:
            print(f"          {key}: {json.dumps(getattr(config, key), default=str)}")


def run_stage(
    decision: Decision, config: Any, pipeline: Pipeline, stages: list[PlannedStage], state: State, pipeline_id: int | None
) -> None:
    stage = decision.stage
    reason = f" ({decision.reason})" if decision.reason else ""
    if decision.action in ("skip", "leave"):
        _log(f"{decision.action} {stage.key}{reason}")
        return
    _log(f"{decision.action} {stage.key}: {stage.command.text} -> {stage.output}{reason}")
    if stage.command.text == REPORT:
        write_pages(pipeline, stages, state, only_round=stage.round)
        if config is None:  # no options: the pipeline's page is all it writes
            state.update(stage.key, command=REPORT, settings={}, output=str(stage.output), status="done", ended=_now())
            return
    else:
        # Stages that read this one's output were made from its old output; this run may stop before they rerun.
        for later in readers(stages, stage):
            if (state.stage(later.key) or {}).get("status") == "done":
                state.update(later.key, status="outdated")
    if decision.action == "afresh" and stage.directory is not None and stage.directory.exists():
        shutil.rmtree(stage.directory)
    previous = state.stage(stage.key) or {}
    spent = previous.get("wall_s", 0.0) if decision.action == "resume" else 0.0
    state.update(stage.key, command=stage.command.text, settings=stage.settings, output=str(stage.output), round=stage.round,
                 status="running", started=_now(), ended=None, wall_s=spent, error=None)  # fmt: skip
    from alignkit.engine import reset_peak_memory  # torch only once a stage runs: `alignkit runs` stays light

    started = time.perf_counter()
    reset_peak_memory()

    def end(status: str, error: str | None = None) -> None:
        state.update(stage.key, status=status, ended=_now(), wall_s=spent + time.perf_counter() - started, error=error)

    try:
        with recorded("stage", stage.key, stage.command.text, str(stage.output), stage.settings, parent=pipeline_id):
            stage.command.run(config)
    except KeyboardInterrupt:
        end("interrupted")
        raise
    except AlignkitError as exc:
        end("failed", exc.render())
        raise AlignkitError(f"stage {stage.key} ({stage.command.text}) failed: {exc.what}", where=exc.where, fix=exc.fix) from None
    except Exception as exc:
        end("failed", f"{type(exc).__name__}: {exc}")
        raise
    end("done")
    if stage.directory is not None and stage.output == stage.directory:
        stage_report(stage.directory)


def stage_report(directory: Path) -> None:
    """The stage's own page (`alignkit report`), linked from the pipeline's; a failure there fails no stage."""
    if not any((directory / name).is_file() for name in ("run.json", "summary.json", "eval.json")):
        return
    try:
        from alignkit.report import ReportConfig, run_report  # matplotlib: only once a stage is done

        run_report(ReportConfig(runs=[str(directory)]))
    except Exception as exc:  # the stage is done; its page is a convenience
        _log(f"warning: no report for {directory}: {type(exc).__name__}: {exc}")


def write_pages(pipeline: Pipeline, stages: list[PlannedStage], state: State, only_round: int | None = None) -> None:
    """The pipeline's page, or with `only_round` that round's page."""
    from alignkit.pipeline.page import pipeline_page  # it builds on the report's page, which brings in matplotlib

    scope = pipeline.output if only_round is None else pipeline.output / f"round-{only_round}"
    target = scope / "report.html"
    try:
        page = pipeline_page(pipeline, stages, state.data, target, only_round)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(target)
    except Exception as exc:  # the page sums up the stages; losing it must not fail them
        _log(f"warning: could not write {target}: {type(exc).__name__}: {exc}")
