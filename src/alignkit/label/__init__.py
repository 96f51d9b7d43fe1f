"""`alignkit label`: human preference labels from a web app on a real database (the "human feedback" of RLHF).

    alignkit label import --db labels.db samples.jsonl      # `alignkit generate` output -> comparison tasks
    alignkit label add-annotator alice                      # prints alice's token (only its hash is kept)
    alignkit label remove-annotator alice                   # revokes the token; alice's labels stop counting
    alignkit label serve --db labels.db --port 8765         # the labelling page and the JSON API
    alignkit label stats --db labels.db                     # progress, agreement, position bias
    alignkit label export --db labels.db --out prefs.jsonl  # preference pairs / rankings for `rm` and `dpo`

Modules: `db` (tables, migrations, connections), `store` (everything done to the database), `agreement`
(pure agreement math), `analysis` (labels -> statistics and training rows), `server` (HTTP + the page).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.data.loading import load_records
from alignkit.data.records import PreferencePair, Ranking
from alignkit.errors import AlignkitError
from alignkit.io import write_jsonl

# The database (sqlalchemy) and the web server (starlette, uvicorn) are imported by the actions that use them:
# every submodule, the pure `agreement` included, loads this package first.

ACTIONS = ("import", "serve", "add-annotator", "remove-annotator", "export", "stats")


@dataclass
class LabelConfig:
    """Options of `alignkit label ACTION`."""

    action: Literal["import", "serve", "add-annotator", "remove-annotator", "export", "stats"] | None = None
    """what to do (the word after `label`): import, serve, add-annotator, remove-annotator, export or stats"""
    inputs: list[str] = field(default_factory=list)
    """the words after the action: the sample files to import (JSONL with 'prompt' and 'completions'), or the annotator's name"""
    db: str = "labels.db"
    """the database: a SQLite file path (created if missing) or a SQLAlchemy URL such as postgresql+psycopg://user:pw@host/db"""
    mode: Literal["pairwise", "ranking"] = "pairwise"
    """import: pairwise (A vs B, tie, both bad; K > 2 answers make all C(K,2) pairs) or ranking (order all K answers)"""
    annotators_per_task: int = 3
    """import: M, the most annotators a task is given to (never twice to the same one)"""
    skip_invalid: bool = False
    """import: skip and count rows that cannot be used instead of stopping at the first"""
    host: str = "127.0.0.1"
    """serve: the address to listen on (0.0.0.0 for every interface; use HTTPS in front of it on a network)"""
    port: int = 8765
    """serve: the port to listen on"""
    lease_minutes: float = 30.0
    """serve: a task handed out but not answered within this time is offered to another annotator"""
    quiet: bool = False
    """serve: do not log each request"""
    https_proxy: bool = False
    """serve: annotators reach the server through an HTTPS proxy: the login cookie is marked Secure (it also is for
    requests a proxy on 127.0.0.1, or in FORWARDED_ALLOW_IPS, marks X-Forwarded-Proto: https)"""
    admin: bool | None = None
    """add-annotator: --admin: may see progress and export (the /admin page, /api/progress, /api/export); --no-admin:
    may not (with --new-token, an annotator's admin flag is kept unless one of the two is given)"""
    new_token: bool = False
    """add-annotator: give an existing annotator a new token; the old one stops working"""
    out: str = ""
    """export: where to write the preference data (JSONL)"""
    aggregate: Literal["majority", "all"] = "majority"
    """export: one row per task by majority vote (rankings by mean place), or one row per label"""
    min_labels: int = 1
    """export: leave out tasks with fewer labels than this"""
    include_removed: bool = False
    """export, stats: use the labels of removed annotators too (they are kept in the database, left out by default)"""
    against: str = ""
    """stats: a preference file (e.g. an LLM judge's prompt/chosen/rejected) to measure its agreement with the human majority"""
    format: Literal["text", "json"] = "text"
    """stats: a readable summary, or JSON on standard output"""

    def validate(self) -> None:
        if self.action is None:
            raise AlignkitError("no action given", fix=f"say what to do: alignkit label {{{','.join(ACTIONS)}}} ... (--help lists the options)")
        if self.action == "import" and not self.inputs:
            raise AlignkitError("nothing to import", fix="name the samples file(s): alignkit label import --db labels.db samples.jsonl")
        if self.action == "add-annotator" and len(self.inputs) != 1:
            raise AlignkitError("add-annotator takes one name", fix="alignkit label add-annotator NAME [--admin]")
        if self.action == "remove-annotator" and len(self.inputs) != 1:
            raise AlignkitError("remove-annotator takes one name", fix="alignkit label remove-annotator NAME")
        if self.action in ("serve", "export", "stats") and self.inputs:
            raise AlignkitError(f"'{self.action}' takes no words after it, got {' '.join(self.inputs)}", fix="give options as --flags")
        if self.action == "export" and not self.out:
            raise AlignkitError("no output file given", fix="pass --out prefs.jsonl")
        if self.annotators_per_task < 1:
            raise AlignkitError("--annotators-per-task must be at least 1")
        if not 0 <= self.port <= 65535:
            raise AlignkitError("--port must be between 0 and 65535")
        if self.lease_minutes <= 0:
            raise AlignkitError("--lease-minutes must be positive")
        if self.min_labels < 1:
            raise AlignkitError("--min-labels must be at least 1")


def run_label(config: LabelConfig) -> Any:
    from alignkit.label.store import LabelStore

    store = LabelStore.open(config.db)
    try:
        if config.action == "import":
            reports = [
                store.import_samples(path, mode=config.mode, max_annotators=config.annotators_per_task, skip_invalid=config.skip_invalid)
                for path in config.inputs
            ]
            for report in reports:
                print(f"{report.summary()} ({config.mode}, up to {config.annotators_per_task} annotators each)", file=sys.stderr)
            return reports
        if config.action == "add-annotator":
            token = store.add_annotator(config.inputs[0], admin=config.admin, new_token=config.new_token)
            annotator = store.authenticate(token)
            kind = "admin" if annotator is not None and annotator.is_admin else "annotator"
            print(f"token for {kind} '{config.inputs[0].strip()}' (shown once; only its hash is stored):", file=sys.stderr)
            print(token)
            return token
        if config.action == "remove-annotator":
            store.remove_annotator(config.inputs[0])
            print(
                f"removed '{config.inputs[0].strip()}': the token no longer works, and their labels (kept in the database) "
                "are left out of exports, statistics and task counts (--include-removed uses them)",
                file=sys.stderr,
            )
            return None
        if config.action == "serve":
            from alignkit.label.server import serve

            serve(store, config.host, config.port, lease_seconds=config.lease_minutes * 60, log=not config.quiet, https_proxy=config.https_proxy)
            return None
        if config.action == "export":
            return export(store, config)
        return stats(store, config)
    finally:
        store.engine.dispose()


def export(store: Any, config: LabelConfig) -> dict[str, Any]:
    from alignkit.label.analysis import export_rows

    labels = store.labels(include_removed=config.include_removed)
    if not labels:
        raise AlignkitError("there are no labels to export yet", fix="serve the app and label some tasks first")
    rows, left_out = export_rows(labels, aggregate=config.aggregate, min_labels=config.min_labels)
    write_jsonl(rows, config.out)
    pairs = sum("chosen" in r for r in rows)
    left = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in left_out.most_common()) or "nothing"
    print(f"wrote {pairs} preference pairs and {len(rows) - pairs} rankings to {config.out} (left out: {left})", file=sys.stderr)
    return {"rows": rows, "left_out": dict(left_out)}


def stats(store: Any, config: LabelConfig) -> dict[str, Any]:
    from alignkit.label.analysis import agreement_summary, agreement_with, annotator_agreement, json_safe, position_summary

    labels = store.labels(include_removed=config.include_removed)
    result: dict[str, Any] = {
        **store.tasks_overview(),
        "agreement": agreement_summary(labels),
        "agreement_by_annotator": annotator_agreement(labels),
        "position_bias": position_summary(labels),
    }
    if config.against:
        result["against"] = {"file": config.against, **agreement_with(labels, _preference_triples(config.against))}
    if config.format == "json":
        print(json.dumps(json_safe(result), indent=2, ensure_ascii=False))
    else:
        from alignkit.label.db import redacted

        print(format_stats(result, redacted(config.db)))
    return result


def _preference_triples(path: str) -> list[tuple[list[dict[str, str]], str, str]]:
    records, _ = load_records(path, "comparison", skip_invalid=True)
    pairs: list[PreferencePair] = []
    for record in records:
        pairs.extend(record.pairs() if isinstance(record, Ranking) else [record])  # type: ignore[list-item]
    return [([{"role": m.role, "content": m.content} for m in p.prompt], p.chosen, p.rejected) for p in pairs]


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def format_stats(s: dict[str, Any], db: str) -> str:
    modes = ", ".join(f"{n} {mode}" for mode, n in sorted(s["tasks_by_mode"].items())) or "none"
    lines = [
        f"{db}: {s['tasks']} tasks ({modes}); {s['labels']} of {s['labels_wanted']} labels; "
        f"{s['tasks_complete']} complete, {s['tasks_started']} started, {s['tasks_unlabelled']} unlabelled",
    ]
    for a in s["annotators"]:
        seconds = "" if a["mean_seconds"] is None else f", {a['mean_seconds']} s each"
        agrees = s["agreement_by_annotator"].get(a["name"])
        agreeing = "" if agrees is None else f", agrees with others {_pct(agrees)}"
        lines.append(f"  {a['name']}{' (admin)' if a['admin'] else ''}: {a['labels']} labels{seconds}{agreeing}")
    if s["annotators_removed"]:
        lines.append(f"  ({s['annotators_removed']} removed annotator(s) not listed)")
    g = s["agreement"]
    if g["items"]:
        kappa = f"Cohen's κ {_num(g['cohen_kappa'])}" if g["cohen_kappa"] is not None else f"Fleiss' κ {_num(g['fleiss_kappa'])}"
        lines.append(
            f"agreement: {g['items']} comparisons labelled at least twice ({g['tasks']} tasks, {g['annotators']} annotators): "
            f"{_pct(g['percent_agreement'])} agree, {kappa} (InstructGPT's labellers: about 73%)"
        )
    else:
        lines.append("agreement: no comparison has two labels yet")
    for mode, b in s["position_bias"].items():
        if b["decisions"]:
            where = "the left answer won" if mode == "pairwise" else "the first shown answer was ranked best"
            lines.append(
                f"position bias ({mode}): {where} {_pct(b['rate'])} of {b['decisions']} times "
                f"(95% CI {_pct(b['ci_low'])}–{_pct(b['ci_high'])}; {_pct(b['expected'])} without bias)"
            )
    if "against" in s:
        a = s["against"]
        lines.append(
            f"against {a['file']}: {a['matched']} of {a['pairs_in_file']} pairs are labelled here; on the {a['compared']} "
            f"with a human majority: {_pct(a['agreement'])} agree, Cohen's κ {_num(a['cohen_kappa'])}"
        )
    return "\n".join(lines)
