"""What the labelling app does to its database: annotators and tokens, importing tasks, handing out tasks,
recording answers, and reading labels back. The web server and the CLI both go through `LabelStore`.

Task hand-out: tasks are offered in import order; a task is offered to an annotator who has never been
given it, while its labels plus other annotators' live (unexpired) assignments number fewer than M. The
order of the answers is shuffled for each annotator when the task is handed out and stored with the
assignment (and copied into the label), so position bias can be measured. An annotator who reloads the
page gets the same pending task in the same order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Engine, Select, and_, exists, func, or_, select
from sqlalchemy.exc import IntegrityError

from alignkit.data.loading import InvalidRecord, parse_prompt, read_rows
from alignkit.data.records import distinct_answers
from alignkit.errors import AlignkitError, DataError
from alignkit.label.db import annotators, assignments, labels, now, open_database, read_transaction, tasks, write_transaction

Mode = Literal["pairwise", "ranking"]
Verdict = Literal["ranked", "tie", "both_bad"]
MAX_REASON_CHARS = 2000
_shuffler = random.SystemRandom()


class Refused(Exception):
    """A request the store will not carry out; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class ShownTask:
    """A task as one annotator sees it: the responses in this annotator's shuffled order."""

    id: int
    mode: Mode
    prompt: list[dict[str, str]]
    responses: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode, "prompt": self.prompt, "responses": self.responses}


@dataclass(frozen=True)
class Answer:
    """An answer in the positions the annotator saw: `shown_ranking` holds 0-based shown positions, best first."""

    verdict: Verdict
    shown_ranking: list[int] | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Label:
    """A stored label with its task, for statistics and export. Indices refer to `responses` (import order)."""

    task_id: int
    mode: Mode
    prompt: list[dict[str, str]]
    responses: list[str]
    max_annotators: int
    annotator: str
    verdict: Verdict
    ranking: list[int] | None
    shown_order: list[int]
    reason: str | None
    seconds: float | None


@dataclass
class ImportReport:
    path: str
    prompts: int = 0
    tasks_added: int = 0
    already_there: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        text = f"{self.path}: {self.prompts} prompts -> {self.tasks_added} new tasks"
        if self.already_there:
            text += f", {self.already_there} already imported"
        if self.skipped:
            text += " (skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) + ")"
        return text


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def task_key(mode: str, prompt: list[dict[str, str]], responses: list[str]) -> str:
    return hashlib.sha256(json.dumps([mode, prompt, responses], ensure_ascii=False).encode("utf-8")).hexdigest()


def comparisons(responses: list[str], mode: Mode) -> list[list[str]]:
    """The tasks one prompt's K answers make: all C(K, 2) pairs, or one ranking of all K."""
    if mode == "ranking":
        return [responses]
    return [[a, b] for a, b in itertools.combinations(responses, 2)]


class LabelStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def open(cls, db: str) -> LabelStore:
        return cls(open_database(db))

    # --- annotators ----------------------------------------------------------------------------------------

    def add_annotator(self, name: str, *, admin: bool | None = None, new_token: bool = False) -> str:
        """Create an annotator (or give an existing one a new token) and return the token; only its hash is kept.

        `admin`: True or False sets the flag; None leaves an existing annotator's as it is (a new one is not an admin)."""
        name = name.strip()
        if not name or len(name) > 200:
            raise AlignkitError("an annotator's name must be 1 to 200 characters")
        token = secrets.token_urlsafe(24)
        with write_transaction(self.engine) as conn:
            existing = conn.execute(select(annotators.c.id, annotators.c.removed_at).where(annotators.c.name == name)).first()
            if existing is not None and existing.removed_at is not None:
                raise AlignkitError(
                    f"annotator '{name}' was removed",
                    fix="give the annotator another name (the removed one's labels stay in the database under this one)",
                )
            if existing is not None and not new_token:
                raise AlignkitError(
                    f"annotator '{name}' already exists",
                    fix="pass --new-token to give them a new token (the old one stops working)",
                )
            if existing is not None:
                values: dict[str, Any] = {"token_hash": hash_token(token)}
                if admin is not None:
                    values["is_admin"] = admin
                conn.execute(annotators.update().where(annotators.c.id == existing.id).values(**values))
            else:
                conn.execute(annotators.insert().values(name=name, token_hash=hash_token(token), is_admin=bool(admin), created_at=now()))
        return token

    def remove_annotator(self, name: str) -> None:
        """Revoke an annotator: their token stops working and their pending tasks go to others. Their labels
        stay in the database but no longer count: not in exports or statistics (unless asked for), and not
        towards a task's M, so their tasks are handed out again."""
        name = name.strip()
        with write_transaction(self.engine) as conn:
            row = conn.execute(select(annotators.c.id, annotators.c.removed_at).where(annotators.c.name == name)).first()
            if row is None:
                raise AlignkitError(f"there is no annotator '{name}'", fix="`alignkit label stats` lists the annotators")
            if row.removed_at is not None:
                raise AlignkitError(f"annotator '{name}' is already removed")
            conn.execute(annotators.update().where(annotators.c.id == row.id).values(removed_at=now()))
            # "removed" assignments neither hold a slot nor count as done when tasks are handed out.
            conn.execute(
                assignments.update()
                .where(assignments.c.annotator_id == row.id, assignments.c.status.in_(("pending", "done")))
                .values(status="removed")
            )

    def authenticate(self, token: str | None) -> Annotator | None:
        if not token:
            return None
        with read_transaction(self.engine) as conn:
            row = conn.execute(
                select(annotators).where(annotators.c.token_hash == hash_token(token), annotators.c.removed_at.is_(None))
            ).first()
        return None if row is None else Annotator(row.id, row.name, bool(row.is_admin))

    # --- import --------------------------------------------------------------------------------------------

    def import_samples(self, path: str, *, mode: Mode, max_annotators: int, skip_invalid: bool = False) -> ImportReport:
        """Load `alignkit generate` output (prompt + completions per row) as comparison tasks."""
        report = ImportReport(path)
        new: list[dict[str, Any]] = []
        for number, row in read_rows(path):
            try:
                if isinstance(row, InvalidRecord):  # a line that is not JSON, as the reader reports it
                    raise row
                if not isinstance(row, dict):
                    raise InvalidRecord(f"a record must be a JSON object, not {type(row).__name__}")
                completions = row.get("completions", row.get("responses"))
                if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
                    raise InvalidRecord("missing list field 'completions' (the K answers to compare)")
                prompt = [{"role": m.role, "content": m.content} for m in parse_prompt(row).prompt]
            except InvalidRecord as exc:
                if not skip_invalid:
                    raise DataError(str(exc), path=path, line=number, fix="fix the record, or pass --skip-invalid") from None
                report.skipped[str(exc)] += 1
                continue
            report.prompts += 1
            answers = distinct_answers(completions)
            if len(answers) < 2:
                report.skipped["prompts with fewer than two distinct non-empty answers"] += 1
                continue
            for responses in comparisons(answers, mode):
                new.append({
                    "key": task_key(mode, prompt, responses), "mode": mode, "prompt": json.dumps(prompt, ensure_ascii=False),
                    "responses": json.dumps(responses, ensure_ascii=False), "max_annotators": max_annotators,
                    "source": f"{path}:{number}", "created_at": now(),
                })  # fmt: skip
        if report.prompts == 0 and not report.skipped:
            raise DataError("no records", path=path, fix="check that the file is the output of `alignkit generate`")
        for start in range(0, len(new), 500):
            batch = new[start : start + 500]
            with write_transaction(self.engine) as conn:
                keys = [t["key"] for t in batch]
                present = set(conn.execute(select(tasks.c.key).where(tasks.c.key.in_(keys))).scalars())
                fresh = list({t["key"]: t for t in batch if t["key"] not in present}.values())
                if fresh:
                    conn.execute(tasks.insert(), fresh)
                report.tasks_added += len(fresh)
                report.already_there += len(batch) - len(fresh)
        return report

    # --- labelling -----------------------------------------------------------------------------------------

    def next_task(self, annotator: Annotator, *, lease_seconds: float = 1800) -> ShownTask | None:
        """The annotator's pending task, or a new one in a freshly shuffled order; None when none is left."""
        # Not durable: a hand-out lost to a power cut is simply handed out again.
        with write_transaction(self.engine, durable=False) as conn:
            t = now()  # after the write lock is ours
            pending = conn.execute(
                select(assignments.c.id.label("assignment_id"), assignments.c.shown_order, tasks)
                .join(tasks, tasks.c.id == assignments.c.task_id)
                .where(assignments.c.annotator_id == annotator.id, assignments.c.status == "pending")
                .order_by(assignments.c.id)
            ).all()
            for row in pending:
                done = conn.execute(_counted_labels(row.id)).scalar_one()
                if done >= row.max_annotators:  # filled by others while this annotator was away
                    conn.execute(assignments.update().where(assignments.c.id == row.assignment_id).values(status="closed"))
                    continue
                conn.execute(assignments.update().where(assignments.c.id == row.assignment_id).values(expires_at=t + lease_seconds))
                return _shown(row, json.loads(row.shown_order))
            other = assignments.alias("other")
            occupied = (
                select(func.count())
                .select_from(other)
                .where(
                    other.c.task_id == tasks.c.id,
                    or_(other.c.status == "done", and_(other.c.status == "pending", other.c.expires_at > t)),
                )
                .scalar_subquery()
            )
            seen = exists().where(assignments.c.task_id == tasks.c.id, assignments.c.annotator_id == annotator.id)
            row = conn.execute(select(tasks).where(~seen, occupied < tasks.c.max_annotators).order_by(tasks.c.id).limit(1)).first()
            if row is None:
                return None
            order = list(range(len(json.loads(row.responses))))
            _shuffler.shuffle(order)
            conn.execute(assignments.insert().values(
                task_id=row.id, annotator_id=annotator.id, shown_order=json.dumps(order), status="pending",
                created_at=t, expires_at=t + lease_seconds,
            ))  # fmt: skip
            return _shown(row, order)

    def submit(self, annotator: Annotator, task_id: int, answer: Answer) -> int:
        """Record an answer in one transaction; returns the label id. Raises `Refused` (→ 400/404/409)."""
        if answer.reason is not None and len(answer.reason) > MAX_REASON_CHARS:
            raise Refused(400, f"'reason' is longer than {MAX_REASON_CHARS} characters")
        with write_transaction(self.engine) as conn:
            t = now()
            task = conn.execute(select(tasks).where(tasks.c.id == task_id)).first()
            if task is None:
                raise Refused(404, f"there is no task {task_id}")
            assignment = conn.execute(
                select(assignments).where(assignments.c.task_id == task_id, assignments.c.annotator_id == annotator.id)
            ).first()
            if assignment is None:
                raise Refused(409, f"task {task_id} was not given to you; ask GET /api/next for a task")
            if assignment.status != "pending":
                what = {
                    "done": "you already answered", "skipped": "you skipped", "closed": "others have filled",
                    "removed": "you were removed as an annotator of",
                }[assignment.status]  # fmt: skip
                raise Refused(409, f"{what} task {task_id}")
            order = json.loads(assignment.shown_order)
            ranking = _check_answer(answer, task.mode, len(order), order)
            done = conn.execute(_counted_labels(task_id)).scalar_one()
            if done >= task.max_annotators:
                raise Refused(409, f"task {task_id} already has its {task.max_annotators} labels")
            try:
                label_id = conn.execute(labels.insert().values(
                    task_id=task_id, annotator_id=annotator.id, verdict=answer.verdict,
                    ranking=None if ranking is None else json.dumps(ranking), shown_order=assignment.shown_order,
                    created_at=t, reason=answer.reason or None, seconds=round(t - assignment.created_at, 3),
                )).inserted_primary_key[0]  # fmt: skip
            except IntegrityError:
                raise Refused(409, f"you already answered task {task_id}") from None
            conn.execute(assignments.update().where(assignments.c.id == assignment.id).values(status="done"))
        return int(label_id)

    def skip(self, annotator: Annotator, task_id: int) -> None:
        """Give a pending task back: it is not offered to this annotator again and frees its slot for others."""
        with write_transaction(self.engine) as conn:
            updated = conn.execute(
                assignments.update()
                .where(assignments.c.task_id == task_id, assignments.c.annotator_id == annotator.id, assignments.c.status == "pending")
                .values(status="skipped")
            ).rowcount
        if not updated:
            raise Refused(409, f"task {task_id} is not pending for you")

    # --- reading -------------------------------------------------------------------------------------------

    def labels(self, *, include_removed: bool = False) -> list[Label]:
        """Every label with its task; a removed annotator's only with `include_removed`."""
        query = (
            select(labels, tasks.c.mode, tasks.c.prompt, tasks.c.responses, tasks.c.max_annotators, annotators.c.name)
            .join(tasks, tasks.c.id == labels.c.task_id)
            .join(annotators, annotators.c.id == labels.c.annotator_id)
            .order_by(labels.c.task_id, labels.c.id)
        )
        if not include_removed:
            query = query.where(annotators.c.removed_at.is_(None))
        with read_transaction(self.engine) as conn:
            rows = conn.execute(query).all()
        return [
            Label(
                r.task_id, r.mode, json.loads(r.prompt), json.loads(r.responses), r.max_annotators, r.name, r.verdict,
                None if r.ranking is None else json.loads(r.ranking), json.loads(r.shown_order), r.reason, r.seconds,
            )
            for r in rows
        ]

    def tasks_overview(self) -> dict[str, Any]:
        """Counts of tasks by mode and by how many labels they have, and of each annotator's work (removed
        annotators and their labels left out)."""
        active = select(annotators.c.id).where(annotators.c.removed_at.is_(None))
        with read_transaction(self.engine) as conn:
            per_task = (
                select(tasks.c.id, tasks.c.mode, tasks.c.max_annotators, func.count(labels.c.id).label("n"))
                .select_from(tasks.outerjoin(labels, and_(labels.c.task_id == tasks.c.id, labels.c.annotator_id.in_(active))))
                .group_by(tasks.c.id, tasks.c.mode, tasks.c.max_annotators)
            ).subquery()
            task_rows = conn.execute(select(per_task.c.mode, per_task.c.max_annotators, per_task.c.n)).all()
            people = conn.execute(
                select(annotators.c.name, annotators.c.is_admin, func.count(labels.c.id), func.avg(labels.c.seconds))
                .select_from(annotators.outerjoin(labels, labels.c.annotator_id == annotators.c.id))
                .where(annotators.c.removed_at.is_(None))
                .group_by(annotators.c.id, annotators.c.name, annotators.c.is_admin)
                .order_by(annotators.c.name)
            ).all()
            removed = conn.execute(select(func.count()).select_from(annotators).where(annotators.c.removed_at.is_not(None))).scalar_one()
            pending = conn.execute(
                select(func.count()).select_from(assignments).where(assignments.c.status == "pending", assignments.c.expires_at > now())
            ).scalar_one()
        by_mode = Counter(r.mode for r in task_rows)
        return {
            "tasks": len(task_rows),
            "tasks_by_mode": dict(by_mode),
            "labels": sum(r.n for r in task_rows),
            "tasks_complete": sum(r.n >= r.max_annotators for r in task_rows),
            "tasks_started": sum(0 < r.n < r.max_annotators for r in task_rows),
            "tasks_unlabelled": sum(r.n == 0 for r in task_rows),
            "labels_wanted": sum(r.max_annotators for r in task_rows),
            "pending_assignments": pending,
            "annotators": [
                {"name": name, "admin": bool(admin), "labels": n, "mean_seconds": None if s is None else round(float(s), 1)}
                for name, admin, n, s in people
            ],
            "annotators_removed": removed,
        }

    def annotator_summary(self, annotator: Annotator) -> dict[str, Any]:
        with read_transaction(self.engine) as conn:
            done = conn.execute(select(func.count()).select_from(labels).where(labels.c.annotator_id == annotator.id)).scalar_one()
        return {"name": annotator.name, "admin": annotator.is_admin, "labelled": done}


def _counted_labels(task_id: int) -> Select:
    """The number of a task's labels that count towards its M: a removed annotator's do not."""
    return (
        select(func.count())
        .select_from(labels.join(annotators, annotators.c.id == labels.c.annotator_id))
        .where(labels.c.task_id == task_id, annotators.c.removed_at.is_(None))
    )


def _shown(row: Any, order: list[int]) -> ShownTask:
    responses = json.loads(row.responses)
    return ShownTask(row.id, row.mode, json.loads(row.prompt), [responses[i] for i in order])


def _check_answer(answer: Answer, mode: str, k: int, order: list[int]) -> list[int] | None:
    """Validate an answer for the task's mode and turn shown positions into response indices (best first)."""
    if answer.verdict in ("tie", "both_bad"):
        if mode != "pairwise":
            raise Refused(400, f"'{answer.verdict}' is an answer for pairwise tasks; rank all {k} answers instead")
        return None
    shown = answer.shown_ranking
    if shown is None or sorted(shown) != list(range(k)):
        raise Refused(400, f"the ranking must list each of the {k} shown answers once")
    return [order[p] for p in shown]
