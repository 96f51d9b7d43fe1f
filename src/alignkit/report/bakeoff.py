"""`alignkit report --compare NAME=EVAL_DIR[@TRAIN_DIR] ... --output PATH.html`: methods side by side on IFEval.

Each entry names a method, the directory of its `alignkit eval --benchmark ifeval` run, and optionally what made
the model: a training run's directory (summary.json, metrics.jsonl, run.json) or the file `alignkit generate
--best-of N` wrote (test-time best-of-N, whose answers the eval read with --responses). Per method it shows:

* the four IFEval numbers with their 95 % intervals (eval.json `model.accuracy`);
* the paired difference to the eval's baseline, the start model (eval.json `difference`: both sides recomputed on
  the same resampled prompts), prompt-level loose first, and whether its interval excludes 0;
* KL(model ‖ start model) in nats per answer where the eval measured it (eval.json `kl`); for best-of-N, which has
  no model to measure, the analytic log N − (N − 1)/N (Stiennon et al. 2020; an upper bound, Beirami et al. 2024);
* mean answer length and the share of answers cut at --max-new-tokens;
* compute, each number with what it covers (`COMPUTE`): the training loop's wall time and tokens (summary.json),
  the completions and tokens a best-of-N file sampled, the eval's generation time, and the wall time of each
  pipeline stage (pipeline.json, when the directories were written by `alignkit run`);
* reward and KL against training progress (metrics.jsonl), and the per-instruction-type gains.

Written: PATH.html (self-contained, built from page.py's helpers), PATH.json (every number) and PATH.md (the
tables, to commit beside a real run's results). Everything from `method_numbers` to `markdown` is a pure function
of the loaded files; `load_method` reads them and `write_comparison` writes the three files.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.evaluation.ifeval import LEVELS
from alignkit.io import write_json
from alignkit.report.page import STYLE, _grid, _interval, _read_json, _read_jsonl, esc, human_duration, interval_bars, line_plot, series

HEADLINE = "prompt_level_loose"
"""The number the page leads with: a prompt counts only when every instruction is followed, and loose mode forgives
a "Sure, here it is:" line or markdown emphasis, which a small model's answers are full of."""
ORDER = [HEADLINE, *(key for key in LEVELS if key != HEADLINE)]
CURVES = {"reward": "reward of the sampled answers", "kl": "KL to the reference"}
"""metrics.jsonl keys drawn per method against training progress, and their plot's title"""
KL_UNITS = {"grpo": "k3 per token", "ppo": "k1 per answer"}
"""What each algorithm logs as `kl` (run.json's algorithm up to its first dash: grpo-rloo is GRPO's run): GRPO and
RLOO the mean k3 per token, PPO the summed k1 per answer."""
COMPUTE = {
    "train_stage_s": ("training stage", "wall time of the pipeline stage that made the model: loading, sampling (RSFT's "
                      "and on-policy DPO's samples, best-of-N's N answers per prompt), training and saving"),
    "train_loop_s": ("training loop", "wall time of the training loop alone (summary.json): GRPO, RLOO and PPO sample "
                     "inside it; RSFT and on-policy DPO sample before it, so their sampling is not in it"),
    "train_tokens": ("trained tokens", "tokens the loop trained on, prompts and completions (summary.json)"),
    "sampled_completions": ("sampled completions", "completions best-of-N sampled (the generate file's rows)"),
    "sampled_tokens": ("sampled tokens", "completion tokens best-of-N sampled (the generate file's rows)"),
    "eval_generation_s": ("eval generation", "wall time the evaluated model took to answer the benchmark's prompts (eval.json)"),
    "eval_stage_s": ("eval stage", "wall time of the eval stage: loading, generation and scoring"),
    "wall_s": ("wall time", "the method's stages together (training or sampling, and its eval); the start model's "
               "is its eval alone; given only when pipeline.json records every one of them"),
}  # fmt: skip
"""Each compute number of a method: its column and what it covers."""
EXPLAINED = ("Differences are paired: both sides recomputed on the same bootstrap draws of prompts; an interval that "
             "excludes 0 is evidence of a change at this number of prompts, one that includes it is no evidence either "
             "way. KL: the eval's k1 sum per answer, log π(y) - log π_start(y) on the model's answers y (on greedy answers a "
             "log-likelihood ratio rather than an unbiased KL estimate), or for best-of-N the bound log N - (N - 1)/N. "
             "The training curves' x axis is the share of each run's steps.")  # fmt: skip


# --- the entries and their files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One --compare entry: NAME=EVAL_DIR or NAME=EVAL_DIR@TRAIN_DIR."""

    text: str
    name: str
    eval_dir: Path
    train: Path | None


def parse_entries(entries: Sequence[str]) -> list[Entry]:
    """The entries, checked for their form and for unique names (no file is read: a pipeline checks them before
    the stages that write the directories have run)."""
    parsed: list[Entry] = []
    for text in entries:
        name, sep, paths = text.partition("=")
        eval_dir, at, train = paths.partition("@")
        if not sep or not name.strip() or not eval_dir.strip() or (at and not train.strip()):
            raise AlignkitError(f"compare entry {text!r} is not NAME=EVAL_DIR or NAME=EVAL_DIR@TRAIN_DIR",
                                fix="e.g. --compare start=outputs/start grpo=outputs/grpo_eval@outputs/grpo")  # fmt: skip
        if any(e.name == name.strip() for e in parsed):
            raise AlignkitError(f"compare entry {text!r}: a second method named {name.strip()!r}", fix="give each method its own name")
        parsed.append(Entry(text, name.strip(), Path(eval_dir.strip()), Path(train.strip()) if at else None))
    return parsed


@dataclass
class Method:
    """What one method's files hold."""

    entry: Entry
    evaluation: dict[str, Any]
    """eval.json of an IFEval run"""
    run: dict[str, Any] | None
    """run.json of the training run (its algorithm and config)"""
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    generated: list[dict[str, Any]]
    """rows of an `alignkit generate` file (best-of-N at test time); empty for a training run"""
    stages: dict[str, float]
    """"train" / "eval": wall seconds of the pipeline stage that wrote it, where pipeline.json records one"""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stage_walls(paths: Sequence[Path]) -> dict[Path, float]:
    """Wall seconds per stage output, from the pipeline.json of the pipeline that wrote `paths` (their parent, or
    for a stage's one file, its grandparent), where there is one."""
    walls: dict[Path, float] = {}
    for path in paths:
        record = _read_json((path.parent if path.is_dir() else path.parent.parent) / "pipeline.json") or {}
        for stage in (record.get("stages") or {}).values():
            if isinstance(stage, dict) and isinstance(stage.get("output"), str) and _number(stage.get("wall_s")):
                walls[Path(stage["output"]).resolve()] = float(stage["wall_s"])
    return walls


def load_method(entry: Entry) -> Method:
    """The files of one entry; a missing path or an eval that is not an IFEval result is an error naming the entry."""
    where = f"compare entry {entry.text!r}"
    if not entry.eval_dir.is_dir():
        raise AlignkitError(f"{where}: the eval directory {entry.eval_dir} does not exist",
                            fix="give the --output directory of alignkit eval --benchmark ifeval")  # fmt: skip
    evaluation = _read_json(entry.eval_dir / "eval.json")
    if not isinstance(evaluation, dict) or evaluation.get("benchmark") != "ifeval" or not isinstance(evaluation.get("model"), dict):
        what = "no eval.json" if evaluation is None else "an eval.json that is not an IFEval result"
        raise AlignkitError(f"{where}: {entry.eval_dir} holds {what}", fix="evaluate the model with alignkit eval --benchmark ifeval")
    run, summary, metrics, generated = None, None, [], []
    if entry.train is not None:
        if entry.train.is_dir():
            run, summary, metrics = _read_json(entry.train / "run.json"), _read_json(entry.train / "summary.json"), _read_jsonl(entry.train / "metrics.jsonl")
        elif entry.train.is_file():
            generated = _read_jsonl(entry.train)
        else:
            raise AlignkitError(f"{where}: {entry.train} does not exist",
                                fix="after @ give the training run's --output directory, or the file alignkit generate wrote")  # fmt: skip
    walls = _stage_walls([entry.eval_dir, *([entry.train] if entry.train else [])])
    stages = {role: walls[path.resolve()] for role, path in (("eval", entry.eval_dir), ("train", entry.train)) if path and path.resolve() in walls}
    return Method(entry, evaluation, run, summary, metrics, generated, stages)


# --- the numbers ------------------------------------------------------------------------------------------------


def excludes_zero(numbers: dict[str, Any]) -> bool | None:
    """Whether the interval {"value", "ci95"} lies wholly above or below 0 (None without an interval)."""
    low, high = (numbers.get("ci95") or [None, None])[:2]
    if not (_number(low) and _number(high)):
        return None
    return low > 0 or high < 0


def sampling_numbers(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Completions and completion tokens of an `alignkit generate` file, and N for best-of-N rows (None otherwise)."""
    completions = sum(len(row.get("completions") or []) for row in rows)
    counts = [t for row in rows for t in row.get("completion_tokens") or [None]]
    best_of = len(rows[0]["scores"]) if rows and "best" in rows[0] and isinstance(rows[0].get("scores"), list) else None
    return {"completions": completions, "tokens": sum(counts) if counts and all(_number(t) for t in counts) else None, "best_of": best_of}


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ sampler) = log n − (n − 1)/n nats (Stiennon et al. 2020; an upper bound, Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def kl_numbers(evaluation: dict[str, Any], best_of: int | None) -> dict[str, Any] | None:
    """KL to the baseline: the eval's measured k1 (eval.json `kl`, a number or {"kl": ..., "note": ...}), with the
    eval's note on how it was measured, else best-of-N's bound."""
    kl = evaluation.get("kl")
    value = kl.get("kl") if isinstance(kl, dict) else kl
    if _number(value):
        note = kl.get("note") if isinstance(kl, dict) else None
        return {"value": float(value), "bound": False, "how": "the eval's k1, nats per answer, on the model's answers" + (f" ({note})" if note else "")}
    if best_of:
        return {"value": best_of_n_kl(best_of), "bound": True, "how": f"log N - (N - 1)/N for best-of-{best_of}"}
    return None


def method_numbers(method: Method) -> dict[str, Any]:
    """Every number of one method's row: accuracies, paired differences, KL, lengths and compute."""
    evaluation, summary = method.evaluation, method.summary or {}
    model = evaluation["model"]
    difference = evaluation.get("difference")
    sampled = sampling_numbers(method.generated) if method.generated else None
    lengths = model.get("lengths") or {}
    compute = {
        "train_stage_s": method.stages.get("train"),
        "train_loop_s": summary.get("wall_s") if _number(summary.get("wall_s")) else None,
        "train_tokens": summary.get("tokens") if _number(summary.get("tokens")) else None,
        "sampled_completions": sampled["completions"] if sampled else None,
        "sampled_tokens": sampled["tokens"] if sampled else None,
        "eval_generation_s": (model.get("timing") or {}).get("generation_s"),
        "eval_stage_s": method.stages.get("eval"),
    }
    # The total is given only when every stage of the method is known: a partial sum would pass for the whole.
    needed = ["eval"] + (["train"] if method.entry.train is not None else [])
    compute["wall_s"] = sum(method.stages[r] for r in needed) if all(r in method.stages for r in needed) else None
    made_by = (method.run or {}).get("algorithm") or (f"best-of-{sampled['best_of']} sampling" if sampled and sampled["best_of"] else None)
    return {
        "name": method.entry.name,
        "made_by": made_by,
        "eval": str(method.entry.eval_dir),
        "train": None if method.entry.train is None else str(method.entry.train),
        "model": model.get("name"),
        "baseline": (evaluation.get("baseline") or {}).get("name"),
        "n": evaluation.get("n"),
        "accuracy": {key: (model.get("accuracy") or {}).get(key) for key in ORDER},
        "difference": None if not isinstance(difference, dict) else {
            key: {**difference[key], "excludes_zero": excludes_zero(difference[key])} for key in ORDER if isinstance(difference.get(key), dict)
        },
        "kl": kl_numbers(evaluation, sampled["best_of"] if sampled else None),
        "lengths": {"mean_tokens": lengths.get("mean_tokens"), "mean_words": lengths.get("mean_words"), "cut_share": lengths.get("cut_share")},
        "compute": compute,
    }  # fmt: skip


def per_type_gains(methods: Sequence[Method]) -> list[dict[str, Any]]:
    """Per instruction type: how many prompts ask for it, the share the baseline follows (loose), and each method's
    loose difference to its baseline; the largest mean gain first. Methods without a baseline have no column."""
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        for row in method.evaluation.get("per_type") or []:
            if not isinstance(row, dict) or not _number(row.get("difference_loose")):
                continue
            entry = rows.setdefault(row["instruction"], {"instruction": row["instruction"], "count": row.get("count"),
                                                         "baseline_loose": row.get("baseline_loose"), "gains": {}})  # fmt: skip
            entry["gains"][method.entry.name] = row["difference_loose"]

    def mean_gain(row: dict[str, Any]) -> float:
        return sum(row["gains"].values()) / len(row["gains"])

    return sorted(rows.values(), key=lambda r: (-mean_gain(r), r["instruction"]))


def training_curves(methods: Sequence[Method]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Per plot title, each method's `reward` or `kl` (metrics.jsonl) against the share of its run's steps done, so
    that runs whose steps mean different amounts of work (a GRPO step is a rollout, a PPO step a minibatch) share
    one axis. KL gets a plot per unit: GRPO's k3 per token and PPO's k1 per answer are on different scales."""
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for method in methods:
        found = series(method.metrics)
        algorithm = str((method.run or {}).get("algorithm")).split("-")[0]
        for key, title in CURVES.items():
            if key in found:
                steps, values = found[key]
                title += f" ({KL_UNITS.get(algorithm, 'as logged')})" if key == "kl" else ""
                curves.setdefault(title, {})[method.entry.name] = ([s / max(steps) for s in steps], values)
    return curves


def notices(numbers: Sequence[dict[str, Any]], evaluations: Sequence[dict[str, Any]]) -> list[str]:
    """What makes the rows less comparable than they look: other prompts, other answer lengths, other baselines."""
    found = []
    for label, values in (("number of prompts", {row["name"]: row["n"] for row in numbers}),
                          ("prompt file", {row["name"]: e.get("prompts") for row, e in zip(numbers, evaluations)}),
                          ("--max-new-tokens", {row["name"]: (e.get("decoding") or {}).get("max_new_tokens") for row, e in zip(numbers, evaluations)}),
                          ("baseline", {row["name"]: row["baseline"] for row in numbers if row["baseline"] is not None})):  # fmt: skip
        if len({json.dumps(v) for v in values.values()}) > 1:
            shown = ", ".join(f"{name}: {v}" for name, v in values.items())
            found.append(f"the evals differ in their {label} ({shown}): compare their numbers with care")
    return found


def header_line(note: str, pipeline: dict[str, Any] | None, numbers: Sequence[dict[str, Any]]) -> str:
    """The line above the tables: the note, the pipeline's command and machine, and the compared stages' wall time."""
    parts = [note.strip()] if note.strip() else []
    if pipeline and pipeline.get("command"):
        parts.append(f"`{pipeline['command']}`" + (f" on {pipeline['machine']}" if pipeline.get("machine") else ""))
    walls = [row["compute"]["wall_s"] for row in numbers]
    if walls and all(_number(w) for w in walls):
        parts.append(f"wall time of the compared stages {human_duration(sum(walls))}")
    return "; ".join(parts) or "no --note given"


def comparison(methods: Sequence[Method], note: str = "", pipeline: dict[str, Any] | None = None) -> dict[str, Any]:
    """PATH.json: the header line, each method's numbers, the per-type gains, notices, and what each compute number covers."""
    numbers = [method_numbers(m) for m in methods]
    return {
        "benchmark": "ifeval",
        "header": header_line(note, pipeline, numbers),
        "note": note,
        "pipeline": pipeline,
        "methods": numbers,
        "per_type": per_type_gains(methods),
        "notices": notices(numbers, [m.evaluation for m in methods]),
        "covers": {key: covers for key, (_, covers) in COMPUTE.items()},
    }


# --- tables, shared by the Markdown and the page -------------------------------------------------------------------


def _duration(seconds: Any) -> str:
    return human_duration(seconds) if _number(seconds) else "-"


def _count(value: Any) -> str:
    return f"{int(value):,}" if _number(value) else "-"


def _kl(kl: dict[str, Any] | None) -> str:
    if kl is None:
        return "-"
    return f"≤ {kl['value']:.3f} (bound)" if kl["bound"] else f"{kl['value']:.3f}"


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, cells as text: one source for PATH.md and the page."""
    methods = result["methods"]
    main = []
    for row in methods:
        diff = (row["difference"] or {}).get(HEADLINE) or {}
        excluded = {True: "yes", False: "no"}.get(diff.get("excludes_zero"), "-")
        lengths = row["lengths"]
        main.append([row["name"], *(_interval(row["accuracy"][k]) for k in ORDER),
                     _interval(diff, signed=True), excluded, _kl(row["kl"]),
                     f"{lengths['mean_tokens']:.0f}" if _number(lengths["mean_tokens"]) else "-",
                     f"{lengths['cut_share']:.0%}" if _number(lengths["cut_share"]) else "-",
                     _duration(row["compute"]["wall_s"])])  # fmt: skip
    main_head = ["method", *(LEVELS[k] for k in ORDER), f"Δ {LEVELS[HEADLINE]} (paired)", "excludes 0",
                 "KL to start (nats)", "mean tokens", "cut", "wall time"]  # fmt: skip
    differences = [[row["name"], *(_interval(row["difference"].get(k), signed=True) for k in ORDER)] for row in methods if row["difference"]]
    compute = [[row["name"], *(_duration(row["compute"][k]) if k.endswith("_s") else _count(row["compute"][k]) for k in COMPUTE)]
               for row in methods]  # fmt: skip
    gains = [name for name in (row["name"] for row in methods) if any(name in t["gains"] for t in result["per_type"])]
    per_type = [[t["instruction"], _count(t["count"]), f"{t['baseline_loose']:.2f}" if _number(t["baseline_loose"]) else "-",
                 *(f"{t['gains'][name]:+.2f}" if name in t["gains"] else "-" for name in gains)] for t in result["per_type"]]  # fmt: skip
    return [
        ("IFEval accuracy (95% CI)", main_head, main),
        ("Paired differences to the baseline (95% CI)", ["method", *(f"Δ {LEVELS[k]}" for k in ORDER)], differences),
        ("Compute", ["method", *(column for column, _ in COMPUTE.values())], compute),
        ("Gains per instruction type (loose, model − baseline)", ["instruction", "prompts", "baseline follows", *gains], per_type),
    ]  # fmt: skip


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(result: dict[str, Any]) -> str:
    """PATH.md: the header line, every table, the notices, and what the compute columns cover."""
    lines = ["# IFEval bake-off", "", result["header"], ""]
    lines += [f"> **Note:** {notice}" for notice in result["notices"]] + ([""] if result["notices"] else [])
    for title, head, rows in tables(result):
        if not rows:
            continue
        lines += [f"## {title}", "", "| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
        lines.append("")
    lines += [EXPLAINED, ""]
    lines += [f"- **{column}**: {result['covers'][key]}" for key, (column, _) in COMPUTE.items()]
    return "\n".join(lines) + "\n"


def page(result: dict[str, Any], curves: dict[str, dict[str, tuple[list[float], list[float]]]]) -> str:
    """PATH.html: the tables of `tables`, a bar chart of the headline number with its intervals, the training curves."""
    title = "IFEval bake-off"
    body = [f"<h1>{esc(title)}</h1>", f'<p class="quiet">{esc(result["header"])}</p>']
    body += [f'<div class="alarm">{esc(notice)}</div>' for notice in result["notices"]]
    bars = {row["name"]: (row["accuracy"][HEADLINE]["value"], (row["accuracy"][HEADLINE].get("ci95") or None))
            for row in result["methods"] if isinstance(row["accuracy"].get(HEADLINE), dict)}  # fmt: skip
    images = [f'<img alt="{esc(LEVELS[HEADLINE])} per method with 95% intervals" src="{interval_bars(LEVELS[HEADLINE] + " (95% CI)", bars)}">']
    for title_text, lines in curves.items():
        images.append(f'<img alt="{esc(title_text)} against training progress" src="{line_plot(title_text, lines, "share of the run")}">')
    body.append('<div class="plots">' + "".join(images) + "</div>")
    for title_text, head, rows in tables(result):
        if rows:
            body += [f"<h2>{esc(title_text)}</h2>", _grid(head, rows)]
    body.append(f'<p class="quiet">{esc(EXPLAINED)}</p>')
    body.append("<h2>What the compute numbers cover</h2>" + _grid(["number", "covers"], [[column, result["covers"][key]] for key, (column, _) in COMPUTE.items()]))
    body.append("<h2>Sources</h2>" + _grid(["method", "eval", "its baseline", "made by", "from"],
                                           [[r["name"], r["eval"], r["baseline"] or "-", r["made_by"] or "-", r["train"] or "-"]
                                            for r in result["methods"]]))  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_comparison(entries: Sequence[str], output: Path, note: str = "") -> list[Path]:
    """Read every entry, and write PATH.html, PATH.json and PATH.md (each whole, then renamed into place)."""
    methods = [load_method(entry) for entry in parse_entries(entries)]
    pipelines = [_read_json(m.entry.eval_dir.parent / "pipeline.json") for m in methods]
    pipeline = next((p for p in pipelines if isinstance(p, dict)), None)
    result = comparison(methods, note, None if pipeline is None else {k: pipeline.get(k) for k in ("name", "file", "command", "machine", "started")})
    output.parent.mkdir(parents=True, exist_ok=True)
    written = [output, output.with_suffix(".json"), output.with_suffix(".md")]
    for path, text in ((written[0], page(result, training_curves(methods))), (written[2], markdown(result))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    write_json(written[1], result)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return written
