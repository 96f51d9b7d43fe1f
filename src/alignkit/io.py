"""Small file helpers shared by every command: atomic writes and YAML reading with located errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from alignkit.errors import AlignkitError


def write_json(path: Path, payload: object) -> None:
    """Write JSON atomically (temp file + rename) so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(rows: list[dict], output: str) -> None:
    """JSONL to a file (written whole, then renamed into place) or to standard output for '-'."""
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output == "-":
        sys.stdout.write(lines)
        return
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(lines, encoding="utf-8")
    tmp.replace(out)


def read_yaml(path: str | Path, *, what: str, fix: str, loader: type = yaml.SafeLoader) -> Any:
    """Parse a YAML file; a missing file or a syntax error is an AlignkitError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise AlignkitError(f"{what} {path} does not exist", fix=fix)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise AlignkitError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=where) from None
