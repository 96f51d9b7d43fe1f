"""Building the HTML report of one run directory; see the package docstring for what it shows."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.evaluation.diagnostics import CHECKPOINTS_FILE, Alarm, checkpoint_alarms, length_drift_alarm, mode_collapse_alarm
from alignkit.evaluation.ifeval import LEVELS, sorted_types

PLOTTED = ("loss", "lr", "reward", "kl", "accuracy", "length", "entropy", "win_rate")
"""A metrics.jsonl key is plotted when one of these words is in it (e.g. eval_loss, reward_std, kl_coef)."""
SAMPLES_SHOWN = 20


# --- reading a run directory ---------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AlignkitError(f"not valid JSON ({exc.msg})", where=f"{path}:{exc.lineno}") from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AlignkitError(f"not valid JSON ({exc.msg})", where=f"{path}:{number}") from None
    return rows


@dataclass
class Run:
    path: Path
    run: dict | None
    summary: dict | None
    metrics: list[dict]
    evaluation: dict | None
    samples: list[dict]
    checkpoints: list[dict]
    """held-out evaluations of an RL run (`evaluation/tracking.py`), one row per checkpoint"""

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        path = Path(path)
        eval_dir = path if (path / "eval.json").is_file() or (path / "samples.jsonl").is_file() else path / "eval"
        return cls(
            path,
            _read_json(path / "run.json"),
            _read_json(path / "summary.json"),
            _read_jsonl(path / "metrics.jsonl"),
            _read_json(eval_dir / "eval.json"),
            _read_jsonl(eval_dir / "samples.jsonl"),
            sorted(_read_jsonl(path / CHECKPOINTS_FILE), key=lambda row: row.get("step", 0)),
        )


def series(metrics: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Each numeric metrics.jsonl key as (steps, values), skipping rows where it is missing or not finite."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(metrics):
        step = row.get("step", i + 1)
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(step)
            ys.append(float(value))
    return out


def plotted_keys(all_series: dict[str, Any]) -> list[str]:
    return [k for k in all_series if any(word in k.lower() for word in PLOTTED)]


def alarms(all_series: dict[str, tuple[list[float], list[float]]]) -> list[tuple[str, Alarm]]:
    """Length drift on every length series and mode collapse on every entropy series, fired or not."""
    found = []
    for key, (_, values) in all_series.items():
        name = key.lower()
        try:
            if "length" in name and min(values, default=0) > 0:
                found.append((key, length_drift_alarm(values)))
            elif "entropy" in name and min(values, default=0) > 0:
                found.append((key, mode_collapse_alarm(values)))
        except ValueError:
            continue  # e.g. a starting value of 0: nothing this alarm can say
    return found


# --- plots -------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise AlignkitError("the report's plots need matplotlib", fix="pip install matplotlib") from None
    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def line_plot(key: str, lines: dict[str, tuple[list[float], list[float]]], xlabel: str = "step") -> str:
    """One or more (xs, ys) series on one axis, titled `key`; a legend names them unless the one line is `key` itself."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 2.6) if len(lines) == 1 else (5.2, 3.2))
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set_title(key)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if key == "lr" or key.endswith("_lr"):
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if list(lines) != [key]:
        ax.legend(fontsize="small")
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def interval_bars(title: str, bars: dict[str, tuple[float, list[float] | None]]) -> str:
    """One bar per label at its value, with an error bar over its interval [low, high] where it has one."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.2, 0.8 * len(bars) + 1.5), 3.0))
    values = [value for value, _ in bars.values()]
    # matplotlib takes asymmetric error bars as distances below and above each value; 0 where there is no interval.
    below = [value - interval[0] if interval else 0.0 for value, interval in bars.values()]
    above = [interval[1] - value if interval else 0.0 for value, interval in bars.values()]
    ax.bar(range(len(bars)), values, yerr=[below, above], capsize=4, color="C0", alpha=0.8)
    ax.set_xticks(range(len(bars)), list(bars), rotation=30, ha="right")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def _numbers(rows: list[dict], key: str) -> list[float] | None:
    """The column `key` of the rows, or None when a row lacks a number there (e.g. no gold reward)."""
    values = [row.get(key) for row in rows]
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    return None


def twin_plot(title: str, xs: list[float], xlabel: str, left: tuple[str, list[float]], right: tuple[str, list[float]] | None) -> str:
    """Two series against one x axis, each on its own y axis (their scales are unrelated), points in step order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.0))
    ax.plot(xs, left[1], marker="o", markersize=3, color="C0")
    ax.set_ylabel(left[0], color="C0")
    if right is not None:
        other = ax.twinx()
        other.plot(xs, right[1], marker="s", markersize=3, color="C3")
        other.set_ylabel(right[0], color="C3")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def length_histogram(model: list[float], baseline: list[float]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    bins = max(5, min(30, len(model) // 2))
    ax.hist([baseline, model], bins=bins, label=["baseline", "model"], alpha=0.8)
    ax.set_title("answer length (tokens)")
    ax.legend()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


# --- HTML ----------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em;
  text-align: left; vertical-align: top; } th { background: #f5f5f5; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: .5em; } .plots img { border: 1px solid #eee; }
.alarm { background: #fde8e8; border: 2px solid #c62828; padding: .6em 1em; margin: .5em 0; }
.quiet { color: #666; font-size: .9em; }
.samples td { white-space: pre-wrap; max-width: 30em; overflow-wrap: anywhere; font-size: .9em; }
.big { font-size: 1.4em; font-weight: bold; }
.verdicts { margin: 0 0 .4em; padding-left: 1.2em; white-space: normal; } .ok { color: #1b5e20; } .broken { color: #b71c1c; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Numbers to 4 significant digits, everything else as JSON-ish text; always escaped."""
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, int):
        return esc(f"{value:,}")
    if isinstance(value, float):
        return esc(f"{value:.4g}")
    if isinstance(value, (dict, list)):
        return esc(json.dumps(value, default=str))
    return esc(value)


def table(rows: list[tuple[Any, Any]], head: tuple[str, str] | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append(f"<tr><th>{esc(head[0])}</th><th>{esc(head[1])}</th></tr>")
    for key, value in rows:
        cls = ' class="num"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        out.append(f"<tr><th>{esc(key)}</th><td{cls}>{fmt(value)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _flat(prefix: str, value: Any, rows: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, rows)
    else:
        rows.append((prefix, value))


def human_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.3g} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def compute_section(summary: dict) -> str:
    """Estimated training compute: 6·N·D FLOPs (forward 2ND + backward 4ND, Kaplan et al. 2020)."""
    params, tokens = summary.get("parameters"), summary.get("tokens")
    rows: list[tuple[str, Any]] = []
    if isinstance(tokens, (int, float)):
        rows.append(("tokens trained on", int(tokens)))
    if isinstance(params, (int, float)):
        rows.append(("parameters N", int(params)))
        if isinstance(summary.get("trainable_parameters"), (int, float)):
            rows.append(("trainable parameters", int(summary["trainable_parameters"])))
    if isinstance(params, (int, float)) and isinstance(tokens, (int, float)):
        rows.append(("training compute 6·N·tokens (FLOPs)", f"{6.0 * params * tokens:.3e}"))
    if isinstance(summary.get("wall_s"), (int, float)):
        rows.append(("wall time", human_duration(summary["wall_s"])))
        if isinstance(params, (int, float)) and isinstance(tokens, (int, float)) and summary["wall_s"] > 0:
            rows.append(("achieved FLOP/s (estimate)", f"{6.0 * params * tokens / summary['wall_s']:.3e}"))
    if isinstance(summary.get("tokens_per_s"), (int, float)):
        rows.append(("tokens / s", summary["tokens_per_s"]))
    if isinstance(summary.get("peak_memory_mb"), (int, float)):
        rows.append(("peak memory (MiB)", summary["peak_memory_mb"]))
    if not rows:
        return ""
    note = ('<p class="quiet">6·N·tokens counts the forward (2N per token) and backward (4N) passes of a dense '
            "model with N parameters; it leaves out attention's sequence-length term and any generation "
            "(rollouts) or reference-model forward passes.</p>")  # fmt: skip
    return "<h2>Compute</h2>\n" + table(rows) + note


def _interval(numbers: Any, signed: bool = False) -> str:
    """'0.300 [0.175, 0.450]' from {"value", "ci95"}; '-' where eval.json has no such number."""
    if not isinstance(numbers, dict) or not isinstance(numbers.get("value"), (int, float)):
        return "-"
    spec = "+.3f" if signed else ".3f"
    low, high = (numbers.get("ci95") or [None, None])[:2]
    bounds = f" [{low:{spec}}, {high:{spec}}]" if isinstance(low, (int, float)) and isinstance(high, (int, float)) else ""
    return f"{numbers['value']:{spec}}{bounds}"


def _grid(head: list[str], rows: list[list[Any]]) -> str:
    """A table with a header row; numbers right-aligned, a missing number as '-', every cell escaped."""
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [f'<td class="num">{fmt(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                 else f"<td>{'-' if c is None else fmt(c)}</td>" for c in row]  # fmt: skip
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _verdicts(sample: dict) -> str:
    """The answer of one side with each instruction marked followed (✓) or broken (✗), strict then loose."""
    strict, loose = sample.get("follow_instruction_list_strict") or [], sample.get("follow_instruction_list_loose") or []
    items = []
    for type_id, ok, ok_loose in zip(sample.get("instruction_id_list") or [], strict, loose):
        note = "" if ok == ok_loose else f" (loose {'✓' if ok_loose else '✗'})"
        items.append(f'<li class="{"ok" if ok else "broken"}">{"✓" if ok else "✗"} {esc(type_id)}{esc(note)}</li>')
    length = f"{sample['tokens']} tokens" if isinstance(sample.get("tokens"), int) else ""
    cut = ", cut at --max-new-tokens" if sample.get("cut") else ""
    tail = f'\n<span class="quiet">{esc(length + cut)}</span>' if length or cut else ""
    return f'<td><ul class="verdicts">{"".join(items)}</ul>{esc(sample.get("response", ""))}{tail}</td>'


def ifeval_section(evaluation: dict, samples: list[dict], limit: int) -> str:
    """An IFEval result (`alignkit eval --benchmark ifeval`): the four accuracies with their intervals, the paired
    differences, lengths and cut answers, the per-type table (largest gain first), and answers with their verdicts."""
    sides = [side for side in ("model", "baseline") if isinstance(evaluation.get(side), dict)]
    paired = isinstance(evaluation.get("difference"), dict)
    boot = evaluation.get("bootstrap") or {}
    confidence = boot.get("confidence")
    confidence = f"{confidence:.0%}" if isinstance(confidence, (int, float)) else "?"
    names = " against ".join(f"<b>{esc(evaluation[side].get('name', side))}</b>" for side in sides)
    parts = [
        "<h2>IFEval</h2>",
        f"<p>{names} on {esc(evaluation.get('n', '?'))} prompts with {esc(evaluation.get('instructions', '?'))} "
        f"verifiable instructions (Zhou et al. 2023). Intervals: {esc(confidence)} percentile bootstrap "
        f"over prompts, {esc(boot.get('resamples', '?'))} resamples, seed {esc(boot.get('seed', '?'))}"
        + ("; each difference is paired (both sides on the same resampled prompts)." if paired else ".") + "</p>",
    ]
    head = ["", *sides] + (["model − baseline"] if paired else [])
    rows = []
    for key, label in LEVELS.items():
        row: list[Any] = [label, *(_interval((evaluation[side].get("accuracy") or {}).get(key)) for side in sides)]
        if paired:
            row.append(_interval(evaluation["difference"].get(key), signed=True))
        rows.append(row)
    parts.append(_grid(head, rows))

    def side_value(side: str, group: str, key: str) -> Any:
        return (evaluation[side].get(group) or {}).get(key)

    measures = [("mean completion tokens", "lengths", "mean_tokens"), ("mean words", "lengths", "mean_words"),
                ("answers cut at --max-new-tokens", "lengths", "cut"), ("share cut", "lengths", "cut_share"),
                ("generation wall time (s)", "timing", "generation_s"), ("tokens / s", "timing", "tokens_per_s")]  # fmt: skip
    parts.append("<h3>Lengths and time</h3>")
    parts.append(_grid(["", *sides], [[label, *(side_value(side, group, key) for side in sides)] for label, group, key in measures]))
    if any(side_value(side, "lengths", "cut") is not None for side in sides):
        limit_tokens = (evaluation.get("decoding") or {}).get("max_new_tokens")
        parts.append(f'<p class="quiet">A cut answer (one that reached --max-new-tokens {esc(limit_tokens)} before it ended) '
                     "is scored as it stands, never dropped; it usually breaks length and ending instructions. Answers "
                     "read from a response file have no token counts.</p>")  # fmt: skip

    per_type = [row for row in evaluation.get("per_type") or [] if isinstance(row, dict)]
    if per_type:
        columns = ["instruction", "count", "model_strict", "model_loose"]
        if paired:
            columns += ["baseline_strict", "baseline_loose", "difference_strict", "difference_loose"]
        order = "largest strict gain first" if paired else "least followed first"
        parts.append(f"<h3>Per instruction type ({order})</h3>")
        head = [c.replace("_", " ") for c in columns]
        parts.append(_grid(head, [[row.get(c) for c in columns] for row in sorted_types(per_type)]))

    if samples:
        shown = samples[:limit]
        parts.append(f"<h3>Answers ({len(shown)} of {len(samples)}): instructions followed ✓ or broken ✗</h3>")
        parts.append('<table class="samples"><tr><th>prompt</th><th>model</th>' + ("<th>baseline</th>" if "baseline" in sides else "") + "</tr>")
        for sample in shown:
            ids = {"instruction_id_list": sample.get("instruction_id_list")}
            cells = _verdicts(sample)
            if "baseline" in sides and isinstance(sample.get("baseline"), dict):
                cells += _verdicts({**sample["baseline"], **ids})
            parts.append(f"<tr><td>{esc(sample.get('prompt', ''))}\n<span class=\"quiet\">key {esc(sample.get('key', '?'))}</span></td>{cells}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def evaluation_section(evaluation: dict | None, samples: list[dict], limit: int) -> str:
    if not evaluation and not samples:
        return ""
    if evaluation and evaluation.get("benchmark") == "ifeval":
        return ifeval_section(evaluation, samples, limit)
    parts = ["<h2>Evaluation</h2>"]
    if evaluation:
        wr, ci = evaluation.get("win_rate"), evaluation.get("win_rate_ci95") or [None, None]
        if isinstance(wr, (int, float)):
            low = f"{ci[0]:.3f}" if isinstance(ci[0], (int, float)) else "?"
            high = f"{ci[1]:.3f}" if isinstance(ci[1], (int, float)) else "?"
            parts.append(
                f'<p><span class="big">win rate {wr:.3f}</span> (95% bootstrap CI [{esc(low)}, {esc(high)}]) of '
                f"<b>{esc(evaluation.get('model', 'the model'))}</b> over <b>{esc(evaluation.get('baseline', 'the baseline'))}</b>, "
                f"judged by <code>{esc(evaluation.get('judge', '?'))}</code> on {esc(evaluation.get('n', '?'))} prompts; "
                "ties count half.</p>"
            )
        rows: list[tuple[str, Any]] = []
        skip = {"model", "baseline", "judge", "win_rate", "win_rate_ci95"}
        for key, value in evaluation.items():
            if key in skip:
                continue
            if key == "kl" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "per_sequence"}
            _flat(key, value, rows)
        parts.append(table(rows, ("measure", "value")))
    if samples:
        lm = [float(s["length_model"]) for s in samples if isinstance(s.get("length_model"), (int, float))]
        lb = [float(s["length_baseline"]) for s in samples if isinstance(s.get("length_baseline"), (int, float))]
        if lm and len(lm) == len(lb):
            parts.append(f'<div class="plots"><img alt="answer length histogram" src="{length_histogram(lm, lb)}"></div>')
        parts.append(f"<h3>Samples ({min(limit, len(samples))} of {len(samples)})</h3>")
        parts.append('<table class="samples"><tr><th>prompt</th><th>baseline (before)</th><th>model (after)</th></tr>')
        for s in samples[:limit]:
            def cell(answer: str, score: str) -> str:
                text = s.get(answer, "")
                sc = s.get(score)
                tail = f'\n<span class="quiet">score {fmt(sc)}</span>' if sc is not None else ""
                return f"<td>{esc(text)}{tail}</td>"

            prompt = s.get("prompt", "")
            if not isinstance(prompt, str):
                prompt = json.dumps(prompt, ensure_ascii=False)
            parts.append(f"<tr><td>{esc(prompt)}</td>{cell('answer_baseline', 'score_baseline')}{cell('answer_model', 'score_model')}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def checkpoints_section(rows: list[dict]) -> str:
    """Gao et al. 2022's over-optimisation curve and the length / diversity drift of the held-out checkpoints."""
    if not rows:
        return ""
    steps = [float(row.get("step", i)) for i, row in enumerate(rows)]
    proxy, gold, sqrt_kl = _numbers(rows, "proxy"), _numbers(rows, "gold"), _numbers(rows, "sqrt_kl")
    parts = ["<h2>Held-out checkpoints: reward over-optimisation</h2>", '<div class="plots">']
    if proxy is not None:
        xs, xlabel = (sqrt_kl, "√KL(π ‖ π_ref), √nats") if sqrt_kl is not None else (steps, "step (the run has no reference model)")
        right = None if gold is None else ("gold reward (--gold-reward)", gold)
        image = twin_plot("proxy and gold reward", xs, xlabel, ("proxy reward (--reward)", proxy), right)
        parts.append(f'<img alt="proxy and gold reward against square-root KL" src="{image}">')
    length, distinct = _numbers(rows, "length"), _numbers(rows, "distinct_2")
    if length is not None:
        right = None if distinct is None else ("distinct-2", distinct)
        image = twin_plot("answer length and diversity", steps, "step", ("mean answer length (tokens)", length), right)
        parts.append(f'<img alt="answer length and distinct-2 against step" src="{image}">')
    parts.append("</div>")
    if gold is None:
        parts.append('<p class="quiet">No gold reward was given (--gold-reward), so the over-optimisation alarm cannot run.</p>')
    columns = ["step", "kl", "sqrt_kl", "proxy", "gold", "length", "distinct_2"]
    parts.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f'<td class="num">{fmt(row.get(c))}</td>' for c in columns) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def build_report(run_dir: str | Path, samples_shown: int = SAMPLES_SHOWN) -> str:
    """The HTML page of one run directory, as a string."""
    run = Run.load(run_dir)
    if not any([run.run, run.summary, run.metrics, run.evaluation, run.samples, run.checkpoints]):
        raise AlignkitError(
            "nothing to report: no run.json, summary.json, metrics.jsonl, overoptimisation.jsonl, eval.json or samples.jsonl",
            where=str(run.path),
            fix="give the --output directory of a training run or of alignkit eval",
        )
    algorithm = (run.run or {}).get("algorithm") or ("eval" if run.evaluation else "run")
    title = f"{algorithm}: {run.path.resolve().name}"
    body = [f"<h1>{esc(title)}</h1>", f'<p class="quiet">{esc(run.path.resolve())}</p>']

    all_series = series(run.metrics)
    found = alarms(all_series)
    for name, alarm in checkpoint_alarms(run.checkpoints).items():
        # The alarm counts checkpoints; the reader looks for steps.
        at = "" if alarm.at_index is None else f", step {run.checkpoints[alarm.at_index].get('step', '?')}"
        found.append((f"held-out {name}{at}", alarm))
    for key, alarm in found:
        if alarm.fired:
            body.append(f'<div class="alarm"><b>alarm ({esc(key)})</b>: {esc(alarm.message)}</div>')

    if run.summary:
        headline = [(k, v) for k, v in run.summary.items() if k.startswith("eval_") and isinstance(v, (int, float))]
        rows: list[tuple[str, Any]] = []
        for key, value in run.summary.items():
            if key == "examples" or any(key == k for k, _ in headline):
                continue
            _flat(key, value, rows)
        body.append("<h2>Summary</h2>")
        if headline:
            body.append(table(headline, ("held-out", "value")))
        body.append(table(rows))
        body.append(compute_section(run.summary))

    keys = plotted_keys(all_series)
    if keys:
        body.append("<h2>Training curves</h2>")
        body.append('<div class="plots">')
        for key in keys:
            xs, ys = all_series[key]
            body.append(f'<img alt="{esc(key)} against step" src="{line_plot(key, {key: (xs, ys)})}">')
        body.append("</div>")
    body.append(checkpoints_section(run.checkpoints))
    if found:
        quiet = [(k, a.message) for k, a in found if not a.fired]
        if quiet:
            body.append("<h3>Diagnostics that stayed quiet</h3>" + table(quiet))

    body.append(evaluation_section(run.evaluation, run.samples, samples_shown))

    if run.run:
        rows = []
        _flat("", run.run.get("config", {}), rows)
        body.append(f"<h2>Configuration ({esc(run.run.get('algorithm', '?'))})</h2>")
        body.append(table(rows, ("option", "value")))

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )
