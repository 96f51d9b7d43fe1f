"""`alignkit report RUN_DIR`: one self-contained HTML page per run directory.

The page opens offline and runs no script: the plots are PNGs embedded as ``data:`` URIs (matplotlib, Agg),
the rest is plain HTML with a small inline stylesheet, and every piece of text that comes from a file
(prompts, answers, config values, metric names) goes through ``html.escape``. What it shows depends on
what the directory holds:

* ``metrics.jsonl``: one plot per logged series among loss, lr, reward, KL, accuracy, length, entropy;
* ``summary.json``: the numbers (held-out loss before/after, tokens, wall time, peak memory) and the
  estimated training compute ``6 · N · tokens`` FLOPs (Kaplan et al. 2020), N the model's parameter count;
* ``run.json``: the algorithm and its configuration;
* ``eval.json`` / ``samples.jsonl`` (written by ``alignkit eval``, in the directory or its ``eval/``
  subdirectory): the win rate with its 95 % interval, the other evaluation numbers, a length histogram
  and the answers of both models side by side;
* ``overoptimisation.jsonl`` (the held-out checkpoints of ``alignkit ppo`` / ``grpo``): proxy and gold
  reward against √KL (Gao et al. 2022's over-optimisation curve, one y axis each), answer length and
  distinct-2 against step, and the table of rows;
* alarms from ``evaluation.diagnostics``: length drift on the length series and mode collapse on the
  entropy series of ``metrics.jsonl``, and ``checkpoint_alarms`` (over-optimisation, length drift,
  distinct-2 collapse) on ``overoptimisation.jsonl``, shown as a banner at the top when they fire.

`alignkit report --compare NAME=EVAL_DIR[@TRAIN_DIR] ... --output PATH.html` instead puts several methods' IFEval
results on one page, with PATH.json and PATH.md beside it (`bakeoff`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import at_least
from alignkit.errors import AlignkitError
from alignkit.report.bakeoff import parse_entries, write_comparison
from alignkit.report.page import SAMPLES_SHOWN, build_report

__all__ = ["ReportConfig", "build_report", "run_report"]


@dataclass
class ReportConfig:
    """Options of `alignkit report`."""

    runs: list[str] = field(default_factory=list)
    """run directories (the --output of a training run or of alignkit eval), one page each"""
    output: str = ""
    """where to write the page (default: RUN_DIR/report.html); only with a single run directory; with --compare, PATH.html (PATH.json and PATH.md beside it)"""
    samples: int = at_least(0, SAMPLES_SHOWN)
    """how many sample prompts to show side by side"""
    compare: list[str] = field(default_factory=list)
    """instead of run directories: IFEval results of several methods on one page, each NAME=EVAL_DIR or NAME=EVAL_DIR@TRAIN_DIR (the training run, or the file `alignkit generate` wrote)"""
    note: str = ""
    """with --compare: a header line for the page and PATH.md, e.g. the command, the machine and the wall time"""

    def validate(self) -> None:
        if self.compare:
            if self.runs:
                raise AlignkitError("--compare makes a page of its own: give run directories or --compare, not both")
            if not self.output.endswith(".html"):
                raise AlignkitError("--compare writes one page", fix="give --output PATH.html (PATH.json and PATH.md go beside it)")
            parse_entries(self.compare)
            return
        if not self.runs:
            raise AlignkitError("no run directory given", fix="alignkit report outputs/sft [--output report.html]")
        if self.output and len(self.runs) > 1:
            raise AlignkitError("--output names one file but several run directories were given",
                                fix="leave out --output: each page is written to RUN_DIR/report.html")  # fmt: skip
        for run in self.runs:
            if not Path(run).is_dir():
                raise AlignkitError(f"run directory {run} does not exist", fix="give the --output directory of a run")


def run_report(config: ReportConfig) -> list[Path]:
    if config.compare:
        return write_comparison(config.compare, Path(config.output), config.note)
    written = []
    for run_dir in config.runs:
        page = build_report(run_dir, config.samples)
        out = Path(config.output) if config.output else Path(run_dir) / "report.html"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
        print(f"wrote {out}", file=sys.stderr)
        written.append(out)
    return written
