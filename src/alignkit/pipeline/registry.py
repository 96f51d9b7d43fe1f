"""The run registry: every `alignkit` command, pipeline and pipeline stage, in one SQLite file.

`$ALIGNKIT_HOME/runs.db` (default `~/.cache/alignkit/runs.db`) holds one row per run: what ran (kind, name,
command line, output, configuration as JSON), on what (git revision of the working directory, versions of
alignkit, torch, transformers, peft and accelerate, host and process id), when (start and end, UTC) and how
it ended (running, done, failed, interrupted). A stage row points at its pipeline row (`parent`).

A process killed with -9 cannot write its end, so its row stays "running"; `alignkit runs` shows such a row
as "killed" when its process is no longer alive on this host. The registry is bookkeeping: when it cannot be
written (read-only disk, locked file) a run goes on, after one warning.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from alignkit.config import at_least
from alignkit.errors import AlignkitError

PACKAGES = ("alignkit", "torch", "transformers", "peft", "accelerate")
STATUSES = ("running", "done", "failed", "interrupted", "killed")
KINDS = ("command", "pipeline", "stage")
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER REFERENCES runs(id),
    kind TEXT NOT NULL,          -- command, pipeline or stage
    name TEXT NOT NULL,          -- the command (sft, rm, ...), the pipeline's name, or the stage's (round-2/dpo)
    command TEXT NOT NULL,       -- the command line, or for a stage its command (rm train)
    output TEXT,
    config TEXT NOT NULL,        -- JSON
    git_revision TEXT,
    versions TEXT NOT NULL,      -- JSON: package -> version
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started TEXT NOT NULL,
    ended TEXT,
    status TEXT NOT NULL,
    error TEXT
)
"""
_warned = False


def registry_path() -> Path:
    home = os.environ.get("ALIGNKIT_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "alignkit") / "runs.db"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_revision(cwd: str | Path | None = None) -> str | None:
    """The commit checked out in the working directory's repository, or None outside one (or without git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=10)
    connection.row_factory = sqlite3.Row
    connection.execute(SCHEMA)
    return connection


def _warn_once(exc: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"warning: the run registry {registry_path()} cannot be written ({exc}); this run goes unrecorded", file=sys.stderr)


def start_run(kind: str, name: str, command: str, output: str | None, config: Any, parent: int | None = None) -> int | None:
    """Insert a "running" row; its id, or None when the registry cannot be written."""
    try:
        with closing(_connect(registry_path())) as connection, connection:
            cursor = connection.execute(
                "INSERT INTO runs (parent, kind, name, command, output, config, git_revision, versions, host, pid, started, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                (parent, kind, name, command, output or None, json.dumps(config, default=str), git_revision(),
                 json.dumps(versions()), socket.gethostname(), os.getpid(), _now()),
            )  # fmt: skip
            return cursor.lastrowid
    except (sqlite3.Error, OSError) as exc:
        _warn_once(exc)
        return None


def finish_run(run_id: int | None, status: str, error: str | None = None) -> None:
    if run_id is None:
        return
    try:
        with closing(_connect(registry_path())) as connection, connection:
            connection.execute("UPDATE runs SET status = ?, ended = ?, error = ? WHERE id = ?", (status, _now(), error, run_id))
    except (sqlite3.Error, OSError) as exc:
        _warn_once(exc)


@contextmanager
def recorded(kind: str, name: str, command: str, output: str | None, config: Any, parent: int | None = None) -> Iterator[int | None]:
    """Record the run inside the block: "running" on entry, then done, failed or interrupted."""
    run_id = start_run(kind, name, command, output, config, parent)
    try:
        yield run_id
    except KeyboardInterrupt:
        finish_run(run_id, "interrupted")
        raise
    except BaseException as exc:
        finish_run(run_id, "failed", f"{type(exc).__name__}: {exc}" if not isinstance(exc, AlignkitError) else exc.render())
        raise
    finish_run(run_id, "done")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds that id
        return True
    return True


def read_runs(path: Path | None = None) -> list[dict[str, Any]]:
    """All rows, newest first, JSON fields decoded; a "running" row whose process is gone reads "killed"."""
    path = path or registry_path()
    if not path.exists():
        return []
    try:
        with closing(_connect(path)) as connection:
            rows = [dict(r) for r in connection.execute("SELECT * FROM runs ORDER BY id DESC")]
    except sqlite3.Error as exc:
        raise AlignkitError(f"cannot read the run registry ({exc})", where=str(path)) from None
    host = socket.gethostname()
    for row in rows:
        row["config"] = json.loads(row["config"])
        row["versions"] = json.loads(row["versions"])
        if row["status"] == "running" and row["host"] == host and not _alive(row["pid"]):
            row["status"] = "killed"
    return rows


# --- `alignkit runs` --------------------------------------------------------------------------------------------


@dataclass
class RunsConfig:
    """Options of `alignkit runs`."""

    limit: int = at_least(0, 20)
    """show the N most recent runs (0: all)"""
    status: str = ""
    """show only runs with this status: running, done, failed, interrupted, or killed (recorded as running, but its process is gone)"""
    kind: str = ""
    """show only runs of this kind: command, pipeline or stage"""
    json_: bool = False
    """print the rows as JSON (every field) instead of a table"""

    def validate(self) -> None:
        for flag, value, choices in (("--status", self.status, STATUSES), ("--kind", self.kind, KINDS)):
            if value and value not in choices:
                raise AlignkitError(f"{flag} must be one of {', '.join(choices)}, not {value!r}")


def _duration(row: dict[str, Any]) -> str:
    if not row["ended"]:
        return ""
    seconds = (datetime.fromisoformat(row["ended"]) - datetime.fromisoformat(row["started"])).total_seconds()
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def list_runs(config: RunsConfig) -> list[dict[str, Any]]:
    rows = [r for r in read_runs() if (not config.status or r["status"] == config.status) and (not config.kind or r["kind"] == config.kind)]
    rows = rows[: config.limit] if config.limit else rows
    if config.json_:
        print(json.dumps(rows, indent=2))
        return rows
    if not rows:
        print(f"no runs recorded in {registry_path()}" + (" match" if config.status or config.kind else ""), file=sys.stderr)
        return rows
    head = ("ID", "KIND", "NAME", "STATUS", "STARTED", "TIME", "OUTPUT")
    table = [head] + [
        (str(r["id"]), r["kind"] + (f" of {r['parent']}" if r["parent"] else ""), r["name"], r["status"],
         r["started"].replace("T", " ")[:19], _duration(r), r["output"] or "")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return rows
