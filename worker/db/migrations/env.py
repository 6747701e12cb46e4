"""Alembic migration environment of the results database.

Run by `Database.create_schema()` with a connection in `config.attributes["connection"]`,
or by the `alembic` command with `-c worker/db/alembic.ini` (URL from `-x url=...`, else
`PAPSCAN_DB_URL`, else papscan's default SQLite file).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from worker.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later revisions rebuild tables in batches.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    from worker.settings import get_settings

    return context.get_x_argument(as_dictionary=True).get("url") or get_settings().db_url


if config.attributes.get("connection") is not None:
    _run(config.attributes["connection"])
elif context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    from worker.db.session import Database

    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    database = Database(_url())
    try:
        with database.engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        database.dispose()
