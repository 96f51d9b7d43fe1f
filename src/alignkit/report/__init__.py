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

from alignkit.report.page import ReportConfig, build_report, run_report

__all__ = ["ReportConfig", "build_report", "run_report"]
