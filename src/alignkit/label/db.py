"""The labelling database: tables, connections, and versioned schema migrations.

SQLAlchemy Core over SQLite (a file path; the default) or PostgreSQL (a `postgresql+psycopg://…` URL).

Why labels cannot be lost or counted twice under concurrent annotators:
- every answer is one transaction; a label is acknowledged only after it commits;
- writers take turns: on SQLite, write transactions start with `BEGIN IMMEDIATE` (a deferred one could
  read, then fail to upgrade its lock), on PostgreSQL they first take one advisory lock. So an answer's
  read-check-insert (is the task still open? did this annotator answer it?) never interleaves with
  another's, across threads and across `serve` processes;
- SQLite runs in WAL mode (readers never block the writer), and an answer commits with
  `synchronous=FULL`: a label acknowledged to the annotator survives a power cut;
- `UNIQUE (task_id, annotator_id)` on labels and assignments is the last line: a second label by the same
  annotator for the same task is refused by the database itself.

Migrations: `schema_version` holds one integer; `MIGRATIONS[i]` takes a database from version i to i+1.
`open_database` applies the missing ones in order, each in its own transaction, and refuses a database
written by a newer alignkit. A migration is never edited once released; a change is a new function.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from alignkit.errors import AlignkitError

# --- the current schema (what the code reads and writes; the migrations below build it) -------------------

metadata = MetaData()

annotators = Table(
    "annotators",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 of the token; the token is never stored
    Column("is_admin", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("removed_at", Float),  # version 3: set by `label remove-annotator`; their labels stop counting
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(64), nullable=False, unique=True),  # sha256 of (mode, prompt, responses): re-imports are no-ops
    Column("mode", String(16), nullable=False),  # "pairwise" | "ranking"
    Column("prompt", Text, nullable=False),  # JSON list of {role, content}
    Column("responses", Text, nullable=False),  # JSON list of strings (2 for pairwise, K for ranking)
    Column("max_annotators", Integer, nullable=False),  # M
    Column("source", Text, nullable=False),  # "file:line" it was imported from
    Column("created_at", Float, nullable=False),
)

assignments = Table(
    "assignments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, ForeignKey("tasks.id"), nullable=False),
    Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
    Column("shown_order", Text, nullable=False),  # JSON: shown_order[p] = index of the response shown at position p
    Column("status", String(16), nullable=False),  # "pending" | "done" | "skipped" | "closed" | "removed"
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # a pending task not answered by then is offered to others
    UniqueConstraint("task_id", "annotator_id", name="uq_assignment_task_annotator"),
)

labels = Table(
    "labels",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("task_id", Integer, ForeignKey("tasks.id"), nullable=False),
    Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
    Column("verdict", String(16), nullable=False),  # "ranked" | "tie" | "both_bad"
    Column("ranking", Text),  # JSON response indices best first ([winner, loser] for a pair); null for tie/both_bad
    Column("shown_order", Text, nullable=False),  # copied from the assignment: position bias is measurable
    Column("created_at", Float, nullable=False),
    Column("reason", Text),  # version 2
    Column("seconds", Float),  # version 2: time from the task being shown to the answer
    UniqueConstraint("task_id", "annotator_id", name="uq_label_task_annotator"),
    Index("ix_labels_task", "task_id"),  # version 2
)

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))


# --- migrations -------------------------------------------------------------------------------------------


def _v1_initial(conn: Connection) -> None:
    """Annotators, tasks, assignments and labels (labels without reason and timing)."""
    # A frozen copy of the version-1 tables: later changes to the tables above must not change what
    # migration 1 creates, or an old database and a new one would differ.
    m = MetaData()
    Table("annotators", m, Column("id", Integer, primary_key=True), Column("name", String(200), nullable=False, unique=True),
          Column("token_hash", String(64), nullable=False, unique=True), Column("is_admin", Boolean, nullable=False),
          Column("created_at", Float, nullable=False))  # fmt: skip
    Table("tasks", m, Column("id", Integer, primary_key=True), Column("key", String(64), nullable=False, unique=True),
          Column("mode", String(16), nullable=False), Column("prompt", Text, nullable=False),
          Column("responses", Text, nullable=False), Column("max_annotators", Integer, nullable=False),
          Column("source", Text, nullable=False), Column("created_at", Float, nullable=False))  # fmt: skip
    Table("assignments", m, Column("id", Integer, primary_key=True),
          Column("task_id", Integer, ForeignKey("tasks.id"), nullable=False),
          Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
          Column("shown_order", Text, nullable=False), Column("status", String(16), nullable=False),
          Column("created_at", Float, nullable=False), Column("expires_at", Float, nullable=False),
          UniqueConstraint("task_id", "annotator_id", name="uq_assignment_task_annotator"))  # fmt: skip
    Table("labels", m, Column("id", Integer, primary_key=True),
          Column("task_id", Integer, ForeignKey("tasks.id"), nullable=False),
          Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
          Column("verdict", String(16), nullable=False), Column("ranking", Text),
          Column("shown_order", Text, nullable=False), Column("created_at", Float, nullable=False),
          UniqueConstraint("task_id", "annotator_id", name="uq_label_task_annotator"))  # fmt: skip
    m.create_all(conn)


def _v2_reasons_and_timing(conn: Connection) -> None:
    """The annotator's optional reason and the seconds an answer took; an index for per-task counts."""
    conn.execute(text("ALTER TABLE labels ADD COLUMN reason TEXT"))
    conn.execute(text("ALTER TABLE labels ADD COLUMN seconds FLOAT"))
    Index("ix_labels_task", Table("labels", MetaData(), Column("task_id", Integer)).c.task_id).create(conn)


def _v3_removed_annotators(conn: Connection) -> None:
    """`annotators.removed_at`: a removed annotator's token stops working; their labels are kept but not counted."""
    conn.execute(text("ALTER TABLE annotators ADD COLUMN removed_at FLOAT"))


MIGRATIONS: list[Callable[[Connection], None]] = [_v1_initial, _v2_reasons_and_timing, _v3_removed_annotators]
LATEST = len(MIGRATIONS)
WRITE_LOCK_KEY = 52414  # PostgreSQL advisory lock that serialises alignkit label's writers
_writer_locks: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()


# --- connections ------------------------------------------------------------------------------------------


def database_url(db: str) -> str:
    """A SQLAlchemy URL as given, or a SQLite URL for a file path (its folder is created).

    A new SQLite file is created readable by its owner only (0600): it holds every annotator's labels and
    token hashes. SQLite gives its -wal and -shm files the database file's permissions."""
    if "://" in db:
        return db
    path = Path(db).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:  # it exists, or cannot be created, which opening it will report with the path
        pass
    return f"sqlite:///{path}"


def redacted(db: str) -> str:
    """The database as it may be printed: a URL's password replaced by ***."""
    if "://" not in db:
        return db
    try:
        return make_url(db).render_as_string(hide_password=True)
    except ArgumentError:
        return db.split("://")[0] + "://…"


def create_db_engine(db: str) -> Engine:
    url = database_url(db)
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, pool_size=8, max_overflow=24)
            _configure_sqlite(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=24)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise AlignkitError(
            f"cannot use database '{redacted(db)}' ({exc})",
            fix="give a SQLite file path or a URL such as postgresql+psycopg://user:password@host/dbname "
            "(PostgreSQL needs `pip install psycopg[binary]`)",
        ) from None
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # The driver's own implicit BEGIN is switched off: we issue BEGIN (IMMEDIATE) in `_on_begin`.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if not options.get("alignkit_write"):
            conn.exec_driver_sql("BEGIN")
            return
        # FULL syncs the WAL to disk at every commit; NORMAL leaves it to the next synced commit or
        # checkpoint. Mixing them per transaction is safe: WAL frames are appended in order, and a FULL
        # commit syncs every frame before it.
        conn.exec_driver_sql(f"PRAGMA synchronous={'FULL' if options.get('alignkit_durable', True) else 'NORMAL'}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def write_transaction(engine: Engine, *, durable: bool = True) -> Iterator[Connection]:
    """One transaction that holds SQLite's write lock from its first statement (BEGIN IMMEDIATE).

    `durable=False` is for writes that may be lost to a power cut without harm (handing out a task): on
    SQLite their commit skips the fsync. Labels are always written durably."""
    # SQLite's busy handler polls with sleeps of up to 100 ms, so the writers of one process waiting on its
    # lock are served in no order, and under 20 annotators a few waited over a second (the p99). A lock
    # here queues them in the process; writers in other processes still meet the busy handler.
    queue = _writer_locks.setdefault(engine, threading.Lock()) if engine.dialect.name == "sqlite" else nullcontext()
    with queue, engine.connect() as conn:
        conn.execution_options(alignkit_write=True, alignkit_durable=durable)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # The same one-writer-at-a-time rule as SQLite's: a transaction-scoped advisory lock. Each
                # statement after it (READ COMMITTED) sees every answer committed before, so a count of a
                # task's labels cannot be stale when the next label is inserted.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})
            yield conn


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A consistent snapshot for reading (SQLite WAL: does not block writers)."""
    with engine.connect() as conn:
        with conn.begin():
            yield conn


def current_version(conn: Connection) -> int:
    if not conn.dialect.has_table(conn, "schema_version"):
        return 0
    version = conn.execute(text("SELECT max(version) FROM schema_version")).scalar()
    return int(version or 0)


def migrate(engine: Engine, target: int = LATEST) -> int:
    """Apply the migrations from the database's version up to `target`; returns the version reached."""
    version = 0
    for step in range(target):
        with write_transaction(engine) as conn:
            schema_version.create(conn, checkfirst=True)
            version = current_version(conn)
            if version > LATEST:
                raise AlignkitError(
                    f"the label database is at schema version {version}, newer than this alignkit knows ({LATEST})",
                    where=engine.url.render_as_string(hide_password=True),
                    fix="upgrade alignkit (pip install -U alignkit)",
                )
            if version > step:
                continue
            MIGRATIONS[step](conn)
            conn.execute(schema_version.delete())
            conn.execute(schema_version.insert().values(version=step + 1))
            version = step + 1
    return version


def open_database(db: str) -> Engine:
    """An engine on a database brought up to the latest schema."""
    engine = create_db_engine(db)
    try:
        migrate(engine)
    except OperationalError as exc:
        raise AlignkitError(
            f"cannot open the label database ({exc.orig})",
            where=redacted(db),
            fix="check the path or URL, that the server is running, and that you may write there",
        ) from None
    return engine


def now() -> float:
    return time.time()
