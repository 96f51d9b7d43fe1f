"""The pipeline's HTML page: one row per stage (status, wall time, compute, headline numbers, links).

Self-contained like `alignkit report`'s pages (whose helpers and stylesheet it uses): no script, every piece
of text from a file escaped. The page links each stage's own report; each round's page links back here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from alignkit.pipeline.spec import Pipeline, PlannedStage
from alignkit.report.page import STYLE, esc, fmt, human_duration


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def headline(stage: PlannedStage) -> list[str]:
    """The few numbers that say how a stage went, from what it wrote."""
    if stage.output is None or stage.directory is None:
        return []
    if stage.output != stage.directory:
        if not stage.output.is_file():
            return []
        with stage.output.open("rb") as handle:
            return [f"{sum(1 for _ in handle):,} rows"]
    out = []
    evaluation = _read_json(stage.directory / "eval.json")
    if _number(evaluation.get("win_rate")):
        low, high = (evaluation.get("win_rate_ci95") or [None, None])[:2]
        ci = f" [{low:.3f}, {high:.3f}]" if _number(low) and _number(high) else ""
        out.append(f"win rate {evaluation['win_rate']:.3f}{ci}")
        lc = (evaluation.get("length_controlled") or {}).get("win_rate")
        if _number(lc):
            out.append(f"length-controlled {lc:.3f}")
    summary = _read_json(stage.directory / "summary.json")
    if _number(summary.get("final_loss")):
        out.append(f"final loss {summary['final_loss']:.4g}")
    if _number(summary.get("eval_loss_before")) and _number(summary.get("eval_loss_after")):
        out.append(f"held-out loss {summary['eval_loss_before']:.4g} → {summary['eval_loss_after']:.4g}")
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if isinstance(before, dict) and isinstance(after, dict):
        for key in ("reward", "accuracy"):
            if _number(before.get(key)) and _number(after.get(key)):
                out.append(f"held-out {key} {before[key]:.3f} → {after[key]:.3f}")
    if isinstance(summary.get("eval"), dict) and _number(summary["eval"].get("accuracy")):
        out.append(f"held-out accuracy {summary['eval']['accuracy']:.3f}")
    return out


def _link(target: Path, page: Path, text: str) -> str:
    href = os.path.relpath(target, page.parent)
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def stage_table(stages: list[PlannedStage], records: dict[str, Any], page: Path) -> str:
    head = ("stage", "command", "status", "wall time", "tokens", "compute 6·N·tokens", "peak memory", "headline", "output")
    rows = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for stage in stages:
        record = records.get(stage.key) or {}
        summary = _read_json(stage.directory / "summary.json") if stage.directory else {}
        tokens, params = summary.get("tokens"), summary.get("parameters")
        report = stage.directory / "report.html" if stage.directory else None
        name = _link(report, page, stage.key) if report is not None and report.is_file() else esc(stage.key)
        output = _link(stage.output, page, os.path.relpath(stage.output, page.parent)) if stage.output and stage.output.exists() else ""
        cells = [
            name,
            esc(stage.command.text),
            esc(record.get("status", "pending")) + (f'<br><span class="quiet">{esc(record["error"])}</span>' if record.get("error") else ""),
            esc(human_duration(record["wall_s"])) if _number(record.get("wall_s")) else "",
            fmt(int(tokens)) if _number(tokens) else "",
            esc(f"{6.0 * params * tokens:.3e} FLOPs") if _number(tokens) and _number(params) else "",
            esc(f"{summary['peak_memory_mb']:.0f} MiB") if _number(summary.get("peak_memory_mb")) else "",
            "<br>".join(esc(h) for h in headline(stage)),
            output,
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def pipeline_page(pipeline: Pipeline, stages: list[PlannedStage], state: dict[str, Any], page: Path, only_round: int | None) -> str:
    """The page of the whole pipeline (its stages, then each round's), or of one round."""
    records = state.get("stages", {})
    title = f"pipeline {pipeline.name}" + (f": round {only_round}" if only_round else "")
    body = [f"<h1>{esc(title)}</h1>",
            f'<p class="quiet">{esc(pipeline.path)} → {esc(pipeline.output.resolve())}; status {esc(state.get("status", "?"))}, '
            f'started {esc(state.get("started", "?"))}, ended {esc(state.get("ended") or "not yet")}</p>']  # fmt: skip
    if only_round:
        body.append(f"<p>{_link(pipeline.output / 'report.html', page, 'the whole pipeline')}</p>")
        body.append(stage_table([s for s in stages if s.round == only_round], records, page))
    else:
        body.append(stage_table([s for s in stages if s.round is None], records, page))
        for number in range(1, pipeline.rounds + 1):
            round_page = pipeline.output / f"round-{number}" / "report.html"
            link = f" ({_link(round_page, page, 'its report')})" if round_page.is_file() else ""
            body.append(f"<h2>Round {number}{link}</h2>")
            body.append(stage_table([s for s in stages if s.round == number], records, page))
    body.append('<p class="quiet">compute: 6·N·tokens estimates the training FLOPs of a dense model with N parameters '
                "(forward and backward passes, no generation); wall time adds up the runs of a resumed stage.</p>")  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
