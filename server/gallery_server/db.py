"""Engine creation and sessions: SQLite (WAL) by default, PostgreSQL when the URL names it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlmodel import Session, SQLModel

from . import models  # noqa: F401  (registers the tables on SQLModel.metadata)


def create_engine(url: str, *, pool_size: int = 32) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=0,
        )
        _use_real_sqlite_transactions(engine)
    else:
        engine = sa.create_engine(
            url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True
        )
    return engine


def _use_real_sqlite_transactions(engine: sa.Engine) -> None:
    # Python's sqlite3 module starts transactions lazily and never for SELECT, so SQLAlchemy's
    # transaction boundaries would not hold. Take over BEGIN ourselves (SQLAlchemy's documented
    # pysqlite recipe). Writes issue their write statement first, so a deferred BEGIN is enough.
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed upload survives power loss, not only a process crash.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection):  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN")


class Database:
    """Owns the engine; hands out one session per unit of work (one per RPC, never shared)."""

    def __init__(self, url: str, *, pool_size: int = 32) -> None:
        self.engine = create_engine(url, pool_size=pool_size)

    def create_tables(self) -> None:
        SQLModel.metadata.create_all(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
