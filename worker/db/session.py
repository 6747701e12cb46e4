"""Connecting to the results database: engine, sessions, schema migrations.

`Database(url)` wraps one SQLAlchemy engine. Every failure to reach or open the database
(refused connection, unknown host, missing database, unwritable SQLite folder, bad URL)
raises `DatabaseUnavailableError` whose message is one sentence naming the URL with its
password hidden. Typical use at a task or command boundary::

    db = Database(get_settings().db_url)
    db.create_schema()
    with db.session() as s, s.begin():
        queries.write_chunk(s, scan_id, rois, cells)

SQLite (the laptop default) runs in WAL mode with foreign keys on and a 30 s busy
timeout; SQLAlchemy emits `BEGIN` itself (instead of Python's sqlite3 module), so DDL is
transactional and a migration either applies completely or not at all. After a fork
(Celery prefork), call `dispose()` in the child before using the database.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from worker.errors import DatabaseConfigError, DatabaseUnavailableError

__all__ = ["MIGRATIONS_DIR", "Database", "alembic_config", "safe_url"]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Key of the PostgreSQL advisory lock that serialises `create_schema` across workers
# starting at once (an arbitrary constant: "papscan" as a number).
_MIGRATION_LOCK_KEY = 0x7061707363616E
_SQLITE_BUSY_TIMEOUT_S = 30.0
_SQLITE_BEGIN_OPTION = "papscan_sqlite_begin"


def safe_url(url: str | URL) -> str:
    """Return `url` as text with its password replaced by `***`.

    Args:
        url: a SQLAlchemy URL, parsed or not (unparsable text is masked by pattern).
    """
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def alembic_config(connection: Any = None) -> Config:
    """Build the Alembic configuration in code (no alembic.ini, no reliance on the cwd).

    Args:
        connection: a SQLAlchemy `Connection` the migration environment should run on.
    """
    config = Config()
    # `%` would start an interpolation in Alembic's ConfigParser.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _reason(exc: BaseException) -> str:
    """Condense a driver's error message into a short clause (no newlines, no prefixes)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    reason = re.sub(r"^connection failed:\s*", "", reason)
    reason = re.sub(r"^connection to server at .*? failed:\s*", "", reason)
    reason = re.sub(r"^(FATAL|ERROR):\s*", "", reason)
    reason = reason.rstrip(". ")
    return reason[:1].lower() + reason[1:] if reason[:2] != reason[:2].upper() else reason


class Database:
    """The results database at one URL.

    Creating it connects to nothing; the first session, `check()` or `create_schema()`
    does. For SQLite, the database file's folder is created on first connection.

    Attributes:
        url: the parsed URL.
        engine: the SQLAlchemy engine.

    Raises:
        DatabaseUnavailableError: the URL is not valid or names a driver not installed.
    """

    def __init__(self, url: str | URL, *, echo: bool = False) -> None:
        try:
            self.url = make_url(url)
        except ArgumentError:
            raise DatabaseConfigError(
                f"the results database URL {safe_url(url)!r} is not valid"
                " (expected e.g. sqlite:///path/papscan.db or"
                " postgresql+psycopg://user@host:5432/papscan)."
            ) from None
        self._safe_url = safe_url(self.url)
        self._is_sqlite = self.url.get_backend_name() == "sqlite"
        options: dict[str, Any] = {"echo": echo}
        if self._is_sqlite:
            options["connect_args"] = {"timeout": _SQLITE_BUSY_TIMEOUT_S}
        else:
            # Workers idle between slides; the server or a proxy may drop idle connections.
            options["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(self.url, **options)
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise DatabaseConfigError(
                f"cannot use the results database {self._safe_url}: {_reason(exc)}."
            ) from exc
        event.listen(self.engine, "handle_error", self._on_error)
        if self._is_sqlite:
            event.listen(self.engine, "do_connect", self._make_sqlite_folder)
            event.listen(self.engine, "connect", _configure_sqlite)
            event.listen(self.engine, "begin", _begin_sqlite)
        self._sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({self._safe_url!r})"

    @property
    def safe_url(self) -> str:
        """The URL as text, password hidden."""
        return self._safe_url

    @property
    def sessionmaker(self) -> sessionmaker[Session]:
        """The session factory (objects stay usable after commit: expire_on_commit=False)."""
        return self._sessionmaker

    def session(self) -> Session:
        """Open a session; use it as `with db.session() as s, s.begin(): ...`.

        Query functions take the session and never commit: the caller's `s.begin()` block
        is the transaction.
        """
        return self._sessionmaker()

    @contextmanager
    def transaction(
        self, *, write: bool = True, timeout_s: float | None = None
    ) -> Iterator[Session]:
        """A session in one transaction, committed on success, rolled back on error.

        Args:
            write: on SQLite, take the write lock at `BEGIN IMMEDIATE`, so two writers
                queue at the start instead of one failing "database is locked" halfway
                (a fenced-off writer then waits, reads the row and finds it superseded).
            timeout_s: bound every lock wait and statement on PostgreSQL (`lock_timeout`,
                `statement_timeout`), for code that must not hang when the database is
                what is stuck; SQLite waits at most its busy timeout.
        """
        with self.session() as s, s.begin():
            options = {_SQLITE_BEGIN_OPTION: "IMMEDIATE"} if write and self._is_sqlite else {}
            conn = s.connection(execution_options=options)
            if timeout_s is not None and not self._is_sqlite:
                ms = max(1, int(timeout_s * 1000))
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
            yield s

    def check(self) -> None:
        """Connect and run a trivial query.

        Raises:
            DatabaseUnavailableError: the database cannot be reached or opened.
        """
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def create_schema(self) -> None:
        """Create or upgrade the schema to the newest migration (`alembic upgrade head`).

        Safe to call on every start: an up-to-date schema is left alone. On PostgreSQL an
        advisory lock makes workers starting together migrate one after another; on
        SQLite the migration runs in a `BEGIN IMMEDIATE` transaction.

        Raises:
            DatabaseUnavailableError: the database cannot be reached or opened.
        """
        with self.engine.connect() as conn:
            conn.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                    )
                command.upgrade(alembic_config(conn), "head")
        logger.info("results database %s at schema %s", self._safe_url, self.head_revision())

    def current_revision(self) -> str | None:
        """Return the schema revision the database is at (None before `create_schema`)."""
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @staticmethod
    def head_revision() -> str | None:
        """Return the newest schema revision this version of papscan ships."""
        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    def dispose(self) -> None:
        """Close pooled connections (call in a forked child, or when done)."""
        self.engine.dispose()

    def _make_sqlite_folder(self, dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> None:
        database = self.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return
        folder = Path(database).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnavailableError(
                f"cannot open the results database {self._safe_url}:"
                f" cannot create its folder {folder} ({exc.strerror or exc})."
            ) from exc

    def _on_error(self, context: ExceptionContext) -> BaseException | None:
        """Turn "cannot connect" failures into one-sentence `DatabaseUnavailableError`s."""
        exc = context.original_exception
        if context.is_pre_ping or isinstance(exc, DatabaseUnavailableError):
            return None
        verb = "open" if self._is_sqlite else "reach"
        if context.connection is None or context.is_disconnect:
            return DatabaseUnavailableError(
                f"cannot {verb} the results database {self._safe_url}: {_reason(exc)}."
            )
        if self._is_sqlite and "database is locked" in str(exc):
            return DatabaseUnavailableError(
                f"the results database {self._safe_url} stayed locked by another writer"
                f" for {_SQLITE_BUSY_TIMEOUT_S:.0f} s."
            )
        return None


def _configure_sqlite(dbapi_connection: Any, connection_record: Any) -> None:
    # Python's sqlite3 would emit BEGIN only before DML and commit around DDL; turn that
    # off and let `_begin_sqlite` emit BEGIN, so every transaction (DDL included) is real.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL: readers (the CLI, exports) never block the worker's writes, nor it them.
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _begin_sqlite(conn: Any) -> None:
    mode = conn.get_execution_options().get(_SQLITE_BEGIN_OPTION, "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")
