"""Small file helpers shared by every command: atomic writes, file digests, the lock on an output directory, and
reading UTF-8 text and YAML with located errors."""

from __future__ import annotations

import codecs
import contextlib
import functools
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from filelock import FileLock, Timeout

from alignkit.errors import AlignkitError, DataError

LOCK_NAME = ".alignkit.lock"
Result = TypeVar("Result")


def _replace_from_tmp(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it over `path`: a kill never leaves half a file,
    and a failed write (a full disk) leaves no temporary file either."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: object) -> None:
    """Write JSON atomically (temp file + rename)."""
    _replace_from_tmp(path, json.dumps(payload, indent=2, default=str))


def write_jsonl(rows: list[dict], output: str) -> None:
    """JSONL to a file (written whole, then renamed into place) or to standard output for '-'."""
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output == "-":
        sys.stdout.write(lines)
        return
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    _replace_from_tmp(out, lines)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(
    path: Path, known: dict[str, dict[str, Any]] | None = None, name: str | None = None
) -> dict[str, dict[str, Any]]:
    """Size, modification time and sha256 of the file `path`, or of every file under the directory `path`, keyed
    by `name` (default: the path as given) joined with the file's place in the directory.

    A file whose size and modification time match its entry in `known` keeps that entry's hash unread: a resumed
    run over many gigabytes of data does not hash them again unless they were touched.
    """
    known = known or {}
    name = str(path) if name is None else name
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digests = {}
    for file in files:
        key = name if file == path else os.path.join(name, str(file.relative_to(path)))
        stat = file.stat()
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        before = known.get(key, {})
        same = all(before.get(k) == v for k, v in entry.items()) and "sha256" in before
        digests[key] = {**entry, "sha256": before["sha256"] if same else sha256_of(file)}
    return digests


def _holder(lock_file: Path) -> str:
    """Who holds the lock, as its holder wrote it beside the lock: "pid 123 on host, since 12:00:00"."""
    try:
        owner = json.loads(lock_file.with_name(lock_file.name + ".owner").read_text(encoding="utf-8"))
        return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment after the lock is taken
        return "its process id not yet written"


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output directory for the block, or refuse at once if another run holds it.

    The lock is the operating system's (flock, through `filelock`): it dies with its process, so a run killed
    with -9 leaves only a file that the next run locks again. Blocks nest within one process (a command's run
    function takes it through `locks_output`, and `train()` takes it again). Only the first process of a multi-process
    run (RANK 0, as torchrun and accelerate set it) takes it; the others write nothing there on their own.
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    output.mkdir(parents=True, exist_ok=True)
    lock_file = output / LOCK_NAME
    lock = FileLock(lock_file, is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise AlignkitError(
            f"another run is using this output directory ({_holder(lock_file)})",
            where=str(output),
            fix="wait for that run to end (it resumes from its own checkpoints), or give this run another --output",
        ) from None
    owner = lock_file.with_name(lock_file.name + ".owner")
    outermost = lock.lock_counter == 1
    try:
        if outermost:
            write_json(owner, {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield
    finally:
        if outermost:
            owner.unlink(missing_ok=True)
        lock.release()


def locks_output(run: Callable[[Any], Result]) -> Callable[[Any], Result]:
    """A command's run function that holds `output_lock` on its config's --output from start to end: a second run
    on a busy directory refuses at once, before it loads any data or model, and whatever the run writes there
    before training (sampled pairs, a reference cache) is its own."""

    @functools.wraps(run)
    def locked(config: Any) -> Result:
        with output_lock(Path(config.output)):
            return run(config)

    return locked


def utf8(data: bytes) -> str:
    """`data` as text; a byte-order mark in front (some Windows editors write one) is not part of the text."""
    return data.removeprefix(codecs.BOM_UTF8).decode("utf-8")


def not_utf8(data: bytes, exc: UnicodeDecodeError) -> tuple[int, str]:
    """The line (from 1) of the first byte of `data` that is not UTF-8, and what to say about it."""
    start = exc.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
    column = start - data.rfind(b"\n", 0, start)
    return data.count(b"\n", 0, start) + 1, f"not UTF-8 text (byte 0x{data[start]:02x} at byte {column} of the line)"


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file, past a byte-order mark; bytes that are not UTF-8 are an error naming the line."""
    data = path.read_bytes()
    try:
        return utf8(data)
    except UnicodeDecodeError as exc:
        line, what = not_utf8(data, exc)
        raise DataError(what, path=str(path), line=line, fix="save the file as UTF-8") from None


def read_yaml(path: str | Path, *, what: str, fix: str, loader: type = yaml.SafeLoader) -> Any:
    """Parse a YAML file; a missing file, bytes that are not UTF-8 or a syntax error is an AlignkitError naming the
    file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise AlignkitError(f"{what} {path} does not exist", fix=fix)
    try:
        return yaml.load(read_utf8(path), Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise AlignkitError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=where) from None
